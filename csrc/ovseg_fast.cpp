// The ovseg_fast operator library: defines the namespace and the Python module `ovseg_fast._C`.
//
// Every op's C++ kernels live in csrc/<op>.cpp and add their schemas with
// TORCH_LIBRARY_FRAGMENT(ovseg_fast, m) and their CPU implementations with
// TORCH_LIBRARY_IMPL(ovseg_fast, CPU, m). This file owns the single TORCH_LIBRARY block, so the
// namespace is defined exactly once however many op files are compiled in.
#include <torch/extension.h>
#include <torch/library.h>

#include <map>

#include "cpu_dispatch.h"

#ifndef OVSEG_TORCH_VERSION
#define OVSEG_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(ovseg_fast, m) {
  // Schemas are added by the per-op fragments.
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "Fused C++ CPU kernels of ovseg-fast (registered as torch.ops.ovseg_fast.*).";
  module.def("built_for_torch", []() { return std::string(OVSEG_TORCH_VERSION); },
             "The torch version this extension was compiled against.");
  module.def("kernel_capability",
             []() { return std::string(ovseg_fast::capability_name(ovseg_fast::runtime_capability())); },
             "The copy of the kernels this process runs (DEFAULT, AVX2 or AVX512).");
  module.def("supported_capability",
             [](bool apply_mask) { return std::string(ovseg_fast::capability_name(ovseg_fast::supported_capability(apply_mask))); },
             pybind11::arg("apply_mask") = true,
             "The best copy this CPU can execute (with OVSEG_CPU_MASK's features hidden unless apply_mask=False).");
  module.def("cpu_features", []() {
    std::map<std::string, bool> out;
    for (const char* f : ovseg_fast::kAvx2Features) out[f] = ovseg_fast::cpu_has_feature(f);
    for (const char* f : ovseg_fast::kAvx512Features) out[f] = ovseg_fast::cpu_has_feature(f);
    return out;
  }, "The instruction-set extensions the kernel copies need, and whether this CPU has each (after OVSEG_CPU_MASK).");
  module.def("masked_cpu_features", []() { return ovseg_fast::masked_cpu_features(); },
             "The features OVSEG_CPU_MASK hides.");
  module.def("compiled_capabilities", []() {
#if defined(OVSEG_HAVE_X86_VARIANTS)
    return std::vector<std::string>{"DEFAULT", "AVX2", "AVX512"};
#else
    return std::vector<std::string>{"DEFAULT"};
#endif
  });
  module.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}

// The ovseg_fast operator library: defines the namespace and the Python module `ovseg_fast._C`.
//
// Every op's C++ kernels live in csrc/<op>.cpp and add their schemas with
// TORCH_LIBRARY_FRAGMENT(ovseg_fast, m) and their CPU implementations with
// TORCH_LIBRARY_IMPL(ovseg_fast, CPU, m). This file owns the single TORCH_LIBRARY block, so the
// namespace is defined exactly once however many op files are compiled in.
#include <torch/extension.h>
#include <torch/library.h>

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

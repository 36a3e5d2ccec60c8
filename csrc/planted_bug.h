// Test-only planted bugs: proof that the test suite notices a wrong C++ kernel.
//
// With the environment variable OVSEG_PLANT_BUG=<kernel> set, that kernel's root entry point (the
// registered op, csrc/<op>.cpp) returns a wrong result, like a real bug would: a scaled parameter
// (sinkhorn's epsilon, routed_attention's softmax scale, dense_crf's bilateral weight) or one output
// entry off by one (topk_gating, moe_dispatch, moe_combine, lpm_hcl, lpm_logits).
// tests/ops/test_planted_bugs.py runs each op's kernel-vs-reference tests in a subprocess with the
// bug planted and asserts that they fail.
//
// Cost in normal runs: the variable is read once per process (a function-local static); afterwards
// each op call (never each element) tests one empty std::string.
//
// Only the root compilation (OVSEG_DISPATCH_ROOT, the DEFAULT copy that registers the ops) sees these
// inline functions: no AVX2/AVX-512 compiled copy of them exists for the linker to pick.
#pragma once

#ifdef OVSEG_DISPATCH_ROOT

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

namespace ovseg_fast {

// Whether OVSEG_PLANT_BUG names `kernel`.
inline bool planted_bug(const char* kernel) {
  static const std::string planted = [] {
    const char* env = std::getenv("OVSEG_PLANT_BUG");
    return std::string(env ? env : "");
  }();
  return !planted.empty() && planted == kernel;
}

// Adds 1 to the first entry of `out` (a freshly allocated, contiguous result) when `kernel`'s bug is planted.
inline void plant_bug_in(const char* kernel, const at::Tensor& out) {
  if (planted_bug(kernel) && out.numel() > 0) out.view(-1)[0].add_(1);
}

}  // namespace ovseg_fast

#endif  // OVSEG_DISPATCH_ROOT

// Runtime CPU-capability dispatch for ovseg_fast's kernels.
//
// A wheel has to run on any x86-64 CPU, yet the kernels should use AVX2 or AVX-512 when the CPU has
// them. So, as ATen does for its own kernels, the build compiles every csrc/<op>.cpp once per
// capability: DEFAULT (the compiler's baseline), AVX2 (-mavx2 -mfma) and AVX512 (-mavx512f/bw/vl/dq),
// each time with CPU_CAPABILITY naming the capability. ATen's vec headers put Vectorized<T> in the
// inline namespace at::vec::CPU_CAPABILITY, and kernels go in ovseg_fast::CPU_CAPABILITY, so the copies
// never collide. Only the DEFAULT compilation (OVSEG_DISPATCH_ROOT defined) registers the op; it picks
// a copy once per call from at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY=default|avx2|
// avx512 (the tests use that to check every copy).
#pragma once

#include <ATen/Version.h>

#include <string>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace ovseg_fast {

enum class Capability { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// Read once, as ATen reads ATEN_CPU_CAPABILITY once: a process runs one copy of each kernel.
inline Capability runtime_capability() {
  static const Capability capability = []() {
#if defined(OVSEG_HAVE_X86_VARIANTS)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Capability::AVX512;
    if (cap == "AVX2") return Capability::AVX2;
#endif
    return Capability::DEFAULT;
  }();
  return capability;
}

inline const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512: return "AVX512";
    case Capability::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace ovseg_fast

// Declares `name` in every capability namespace (the root compilation sees the other copies only
// through these declarations).
#define OVSEG_DECLARE_KERNEL(ret, name, params) \
  namespace ovseg_fast {                        \
  namespace DEFAULT { ret name params; }        \
  namespace AVX2 { ret name params; }           \
  namespace AVX512 { ret name params; }         \
  }

// Calls the copy of `name` built for the running CPU.
#if defined(OVSEG_HAVE_X86_VARIANTS)
#define OVSEG_DISPATCH_KERNEL(name, ...)                                  \
  ([&]() {                                                                \
    switch (::ovseg_fast::runtime_capability()) {                         \
      case ::ovseg_fast::Capability::AVX512: return ::ovseg_fast::AVX512::name(__VA_ARGS__); \
      case ::ovseg_fast::Capability::AVX2: return ::ovseg_fast::AVX2::name(__VA_ARGS__);     \
      default: return ::ovseg_fast::DEFAULT::name(__VA_ARGS__);           \
    }                                                                     \
  }())
#else
#define OVSEG_DISPATCH_KERNEL(name, ...) (::ovseg_fast::DEFAULT::name(__VA_ARGS__))
#endif

// Runtime CPU-capability dispatch for ovseg_fast's kernels.
//
// A wheel has to run on any x86-64 CPU, yet the kernels should use AVX2 or AVX-512 when the CPU has
// them. So, as ATen does for its own kernels, the build compiles every csrc/<op>.cpp once per
// capability: DEFAULT (the compiler's baseline), AVX2 (-mavx2 -mfma -mf16c) and AVX512 (-mavx512f/bw/vl/dq
// on top of AVX2's), each time with CPU_CAPABILITY naming the capability. ATen's vec headers put
// Vectorized<T> in the inline namespace at::vec::CPU_CAPABILITY, and kernels go in
// ovseg_fast::CPU_CAPABILITY, so the copies never collide. Only the DEFAULT compilation
// (OVSEG_DISPATCH_ROOT defined) registers the op; it picks a copy once per process.
//
// The copy is the one torch asks for (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY=default|avx2|avx512) but never above what this CPU can execute: ATen trusts the
// environment variable blindly, and an AVX-512 copy on an AVX2-only CPU dies with SIGILL. The CPU's own
// feature bits decide (every extension a copy is compiled with, and the OS's register-state support,
// which libgcc's __builtin_cpu_supports checks). OVSEG_CPU_MASK=avx512f,avx2,... hides features, so the
// fallback can be tested on any CPU. ovseg_fast/_extension.py warns once when the request is lowered.
#pragma once

#include <ATen/Version.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace ovseg_fast {

enum class Capability { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The instruction-set extensions each copy is compiled with (setup.py's X86_VARIANTS).
inline constexpr const char* kAvx2Features[] = {"avx2", "fma", "f16c"};
inline constexpr const char* kAvx512Features[] = {"avx512f", "avx512bw", "avx512vl", "avx512dq"};

// Names hidden by OVSEG_CPU_MASK (comma-separated, lower case).
inline const std::vector<std::string>& masked_cpu_features() {
  static const std::vector<std::string> masked = []() {
    std::vector<std::string> out;
    const char* env = std::getenv("OVSEG_CPU_MASK");
    std::string item;
    for (const char* c = env ? env : ""; ; ++c) {
      if (*c == ',' || *c == '\0') {
        if (!item.empty()) out.push_back(item);
        item.clear();
        if (*c == '\0') break;
      } else if (*c != ' ') {
        item.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(*c))));
      }
    }
    return out;
  }();
  return masked;
}

// Whether the CPU (and the OS) support `feature`; masked features count as absent when `apply_mask`.
inline bool cpu_has_feature(const std::string& feature, bool apply_mask = true) {
  if (apply_mask) {
    for (const auto& m : masked_cpu_features()) {
      if (m == feature) return false;
    }
  }
#if defined(OVSEG_HAVE_X86_VARIANTS) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports takes string literals only.
  __builtin_cpu_init();
  if (feature == "avx2") return __builtin_cpu_supports("avx2");
  if (feature == "fma") return __builtin_cpu_supports("fma");
  if (feature == "f16c") return __builtin_cpu_supports("f16c");
  if (feature == "avx512f") return __builtin_cpu_supports("avx512f");
  if (feature == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (feature == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (feature == "avx512dq") return __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

// The best copy this CPU can execute.
inline Capability supported_capability(bool apply_mask = true) {
#if defined(OVSEG_HAVE_X86_VARIANTS)
  auto all = [&](const auto& features) {
    for (const char* f : features) {
      if (!cpu_has_feature(f, apply_mask)) return false;
    }
    return true;
  };
  if (!all(kAvx2Features)) return Capability::DEFAULT;
  if (!all(kAvx512Features)) return Capability::AVX2;
  return Capability::AVX512;
#else
  (void)apply_mask;
  return Capability::DEFAULT;
#endif
}

// The copy torch asks for.
inline Capability requested_capability() {
#if defined(OVSEG_HAVE_X86_VARIANTS)
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return Capability::AVX512;
  if (cap == "AVX2") return Capability::AVX2;
#endif
  return Capability::DEFAULT;
}

// Read once, as ATen reads ATEN_CPU_CAPABILITY once: a process runs one copy of each kernel.
inline Capability runtime_capability() {
  static const Capability capability = []() {
    const Capability requested = requested_capability();
    const Capability supported = supported_capability();
    return static_cast<int>(requested) <= static_cast<int>(supported) ? requested : supported;
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

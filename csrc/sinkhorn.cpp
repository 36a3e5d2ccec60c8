// Batched Sinkhorn-Knopp (SwAV order: column step, then row step), fused CPU kernels.
//
// Ops (see ovseg_fast/ops/sinkhorn_reference.py for the math and the contract, which these kernels
// reproduce: history outputs, masks, zero marginals, early stopping and the -inf conventions):
//   sinkhorn_cpu_forward(scores, mask, row_marginals, col_marginals, epsilon, n_iters, tol,
//                        check_every) -> (plan, log_u, log_v, n_done)
//   sinkhorn_cpu_backward(grad_plan, scores, mask, row_marginals, col_marginals, log_u, log_v,
//                         n_done, epsilon) -> grad_scores
//   sinkhorn_cpu_plan(scores, mask?, row_marginals?, col_marginals?, epsilon, n_iters, tol,
//                     check_every) -> plan      (the forward when no backward follows: no history;
//                                               absent mask / marginals take their defaults)
//
// Notation (one problem): x = scores / eps (N x K), duals f (rows) and g (columns), iterate t:
//   g^t = log c - lse_i(x + f^{t-1}),   f^t = log r - lse_j(x + g^t),   plan = exp(x + f^T + g^T).
//
// Why not the log domain throughout: it costs an exp per element per half-step (Sleef's vector exp
// is ~3x a division on x86), while the iterations are really diagonal scalings of one matrix. Both
// kernels therefore work on the row-shifted kernel K_ij = exp(x_ij - sh_i) (sh_i ~ the row max, so
// K <= 1 and no row underflows as a whole), computed with ONE exp per element, and reduce
// everything else to dot products and axpys over K's rows:
//
// Forward (ForwardSolver). plan^t = diag(a) K diag(b) with b = c / (K^T a) (column step) and
// a = r / (K b) (row step); f^t = log a + Mg - sh, g^t = log b - Mg (Mg = max shift). Pass 1 writes
// K into the plan buffer as 2^(s c - sh / ln 2) with c = log2(e) / eps (an inline exp2, the exponent
// rounded once) and sums its columns; each iteration is then one pass over K: per row a dot
// product (its row sum) and an axpy (the column sums of the next step, so never a strided column
// read); the last iteration writes a_i K_ij b_j in place. The pass goes in blocks of rows, each in
// phases (all row sums, then all divides, then all axpys), since one row's chain of reduction ->
// divide -> axpy is latency-bound for short rows. Scaling is exact as long as the entries of K that
// underflowed stay negligible in every scaling sum once multiplied by the scalings; a cheap bound
// checks that each iteration and when it fails (scores/eps far beyond the float exponent range
// between columns, zero masses making sums vanish, ...) the problem continues from the last good
// duals with a log-domain iteration whose plan becomes the new base (level B), or in the pure log
// domain (level C). The results are those of the reference in every case, only the cost differs.
//
// Backward (BackwardSolver). With p^t_i = exp(sh_i + f^t_i - C^t) and w^t_j = exp(g^t_j + C^t), the
// softmaxes of the reverse sweep are A^t_ij = K_ij w^t_j / (K w^t)_i and
// B^t_ij = K_ij p^{t-1}_i / (K^T p^{t-1})_j (normalised by their actual sums, as the reference's
// softmaxes are; the saved duals only provide the factors), so the recursion of
// sinkhorn_backward_reference is a chain of matrix-vector products with K and K^T: one pass over K
// per reverse iteration, and dx assembled in a final pass as K_ij times a rank-(2T+1) combination of
// row and column vectors. The same kind of underflow bound guards it; when it fails the problem is
// redone by a direct path with one pass per reverse iteration and exps per element.
//
// Parallelism: at::parallel_for over problems (each problem stays in cache through all its
// iterations); a large problem that would leave threads idle (e.g. SwAV's B=1, N=4096, K=3000) runs
// every pass in parallel over row chunks instead, with per-chunk column partials reduced afterwards
// in chunk order (no locks, deterministic for a given thread count).
//
// Dtypes: float32/float64 compute in their own type; bfloat16/float16 scores (and grad_plan) are
// converted to float32 on the fly, and results are rounded back only when stored.
//
// Build (see cpu_dispatch.h): this file is compiled three times (DEFAULT, AVX2, AVX512). Kernels
// live in ovseg_fast::CPU_CAPABILITY (helpers in an anonymous namespace inside it, so they have
// internal linkage and the copies cannot collide); only the DEFAULT compilation
// (OVSEG_DISPATCH_ROOT) validates arguments, allocates the outputs, picks a copy and registers the
// ops. Kernel code avoids out-of-line std:: containers so that no shared template instance
// compiled with AVX-512 flags can be picked by the linker for the DEFAULT copy.
#include "cpu_dispatch.h"  // first: defines CPU_CAPABILITY before ATen's vec headers use it
#include "planted_bug.h"

#include <ATen/Parallel.h>
// GCC 12 reports -Wmaybe-uninitialized false positives inside avx512fintrin.h (its
// _mm512_undefined_* idiom) wherever the vec helpers inline; silenced for these headers only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace ovseg_fast {
namespace sinkhorn {

// Plain-data argument blocks shared by the three compilations (identical in every copy and without
// member functions, so they emit no symbols).
enum class DType : int32_t { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };

struct ForwardArgs {
  DType dtype;                // of scores and plan; compute dtype is double for Double, else float
  const void* scores;         // (B, N, K) contiguous
  const bool* mask;           // (B, N) contiguous; null: every sample valid
  const void* row_marginals;  // (B, N) contiguous, compute dtype; null: 1 per valid sample
  const void* col_marginals;  // (B, K) contiguous, compute dtype; null: N_valid / K each
  void* plan;                 // (B, N, K) out, dtype
  void* log_u;                // (B, T, N) out, compute dtype; null: no history (then log_v is null too)
  void* log_v;                // (B, T, K) out, compute dtype
  int64_t* n_done;            // (B,) out, may be null
  int64_t batch, n, k, n_iters, check_every;
  double epsilon, tol;
};

struct BackwardArgs {
  DType dtype;                // of grad_plan, scores and grad_scores
  const void* grad_plan;      // (B, N, K) contiguous
  const void* scores;         // (B, N, K) contiguous
  const bool* mask;           // (B, N)
  const void* row_marginals;  // (B, N) compute dtype
  const void* col_marginals;  // (B, K) compute dtype
  const void* log_u;          // (B, T, N) compute dtype
  const void* log_v;          // (B, T, K) compute dtype
  const int64_t* n_done;      // (B,), each in [1, T]
  void* grad_scores;          // (B, N, K) out, dtype
  int64_t batch, n, k, n_iters;
  double epsilon;
};

}  // namespace sinkhorn
}  // namespace ovseg_fast

namespace ovseg_fast {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Problems with at least this many elements run their passes in parallel over row chunks when
// parallelising over problems would leave threads idle. Below it a parallel region per pass costs
// more than it saves; it is also the least work handed to one task of the batch-parallel loop.
constexpr int64_t kRowParallelMinElements = 1 << 15;

// Rows of a column-logsumexp block: the block is swept twice (max, then exp-sum), so it should stay
// in L2 (1-2 MB per core on current x86 parts) between the sweeps.
constexpr int64_t kLseBlockBytes = 384 * 1024;

// Problems of at most this many elements are treated as cache resident by the backward: its passes
// are split into phases over all rows (see BackwardSolver's factored path) instead of streaming row
// by row.
constexpr int64_t kCacheResidentElements = 1 << 17;

// Rows per block of the forward's scaling pass (ForwardSolver::scaling_rows), and the column vectors
// whose accumulators it keeps in registers while it sweeps a block's rows.
constexpr int64_t kScaleRows = 32;
constexpr int kAxpyVecs = 8;  // ForwardSolver::axpy_rows dispatches 1..8 column vectors

// f(std::integral_constant<int, nv>()) for nv in 1..kAxpyVecs: the register-blocked loops of the
// forward's scaling passes, compiled for each count of column vectors.
template <typename F>
inline void with_vec_count(int64_t nv, const F& f) {
  static_assert(kAxpyVecs == 8, "with_vec_count: one case per column-vector count");
  switch (nv) {
    case 8: f(std::integral_constant<int, 8>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    default: f(std::integral_constant<int, 1>()); break;
  }
}

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }
template <typename T>
inline T tmax(T a, T b) { return a < b ? b : a; }

// Scratch memory from c10's CPU allocator (64-byte aligned). A tiny RAII owner defined here rather
// than std::vector, see the header comment about shared template instances.
class Scratch {
 public:
  explicit Scratch(size_t bytes) : ptr_(bytes ? c10::alloc_cpu(bytes) : nullptr) {}
  ~Scratch() {
    if (ptr_) c10::free_cpu(ptr_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_;
};

// Carves 64-byte aligned arrays out of one Scratch; with a null base it only measures (size()), so
// that one list of arrays both sizes the workspace and lays it out.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<size_t>(round_up(count * static_cast<int64_t>(sizeof(T)), 64));
    return p;
  }
  size_t size() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// ---- loads and stores with on-the-fly conversion ---------------------------------------------
// `n` (1..size) is the number of valid lanes: a partial load zero-fills the rest, a partial store
// writes only n elements, so rows of any length K are handled without reading past the end.

template <typename in_t>
inline void load_reduced(const in_t* p, Vec<float>& out) {
  if constexpr (std::is_same_v<in_t, c10::BFloat16>) {
    at::vec::load_fp32_from_bf16(p, out);
  } else {
    at::vec::load_fp32_from_fp16(p, out);
  }
}

template <typename ct, typename in_t>
inline Vec<ct> load_as(const in_t* p, int64_t n) {
  if constexpr (std::is_same_v<in_t, ct>) {
    return n == Vec<ct>::size() ? Vec<ct>::loadu(p) : Vec<ct>::loadu(p, n);
  } else {
    static_assert(std::is_same_v<ct, float>, "16-bit inputs compute in float32");
    Vec<float> out;
    if (n == Vec<float>::size()) {
      load_reduced(p, out);
    } else {
      in_t buf[Vec<float>::size()];
      std::memset(static_cast<void*>(buf), 0, sizeof(buf));
      std::memcpy(static_cast<void*>(buf), static_cast<const void*>(p), n * sizeof(in_t));
      load_reduced(static_cast<const in_t*>(buf), out);
    }
    return out;
  }
}

template <typename out_t, typename ct>
inline void store_as(out_t* p, const Vec<ct>& v, int64_t n) {
  if constexpr (std::is_same_v<out_t, ct>) {
    v.store(p, n);
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    at::vec::convert_float_bfloat16(v, v).store(p, n);
  } else {
    at::vec::convert_float_half(v, v).store(p, n);
  }
}

// Horizontal sum / max of a vector (max: of lanes that are never NaN here): the shuffle-tree members
// of the AVX2/AVX-512 float vectors; elsewhere (the DEFAULT copy, double) a loop over the lanes.
template <typename ct, bool kMax>
inline ct hreduce(const Vec<ct>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<ct, float>) return kMax ? v.reduce_max() : v.reduce_add();
#endif
  ct buf[Vec<ct>::size()];
  v.store(buf);
  ct acc = kMax ? buf[0] : ct(0);
  for (int64_t i = kMax ? 1 : 0; i < Vec<ct>::size(); ++i) {
    if constexpr (kMax) {
      acc = buf[i] > acc ? buf[i] : acc;
    } else {
      acc += buf[i];
    }
  }
  return acc;
}
template <typename ct>
inline ct hsum(const Vec<ct>& v) { return hreduce<ct, false>(v); }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// v's two halves added (kMax: their max) for AVX-512, v for AVX2: the same horizontal sum (max) in 256 bits.
template <bool kMax>
inline __m256 fold_to_256(const Vec<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  const __m256 lo = _mm512_castps512_ps256(x), hi = _mm512_extractf32x8_ps(x, 1);
  return kMax ? _mm256_max_ps(lo, hi) : _mm256_add_ps(lo, hi);
#else
  return v;
#endif
}

// Lane r = the horizontal max of v[r], for 8 vectors at once (no NaN handling beyond max's).
inline __m256 hmax_rows8(const __m256* v) {
  __m256 m[4];
  for (int q = 0; q < 4; ++q)  // lanes: v0_{02}, v1_{02}, v0_{13}, v1_{13} per 128-bit half
    m[q] = _mm256_max_ps(_mm256_unpacklo_ps(v[2 * q], v[2 * q + 1]), _mm256_unpackhi_ps(v[2 * q], v[2 * q + 1]));
  // per half: rows 0-3 (resp. 4-7), each reduced over its half's 4 lanes
  const __m256 b0 = _mm256_max_ps(_mm256_shuffle_ps(m[0], m[1], 0x44), _mm256_shuffle_ps(m[0], m[1], 0xEE));
  const __m256 b1 = _mm256_max_ps(_mm256_shuffle_ps(m[2], m[3], 0x44), _mm256_shuffle_ps(m[2], m[3], 0xEE));
  return _mm256_max_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// Lane r = the horizontal sum of v[r], for 8 vectors at once.
inline __m256 hsum_rows8(const __m256* v) {
  const __m256 a01 = _mm256_hadd_ps(v[0], v[1]), a23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a45 = _mm256_hadd_ps(v[4], v[5]), a67 = _mm256_hadd_ps(v[6], v[7]);
  // per 128-bit half: rows 0-3 (resp. 4-7), each summed over its half's 4 lanes
  const __m256 b0 = _mm256_hadd_ps(a01, a23), b1 = _mm256_hadd_ps(a45, a67);
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}
#endif
template <typename ct>
inline ct hmax(const Vec<ct>& v) { return hreduce<ct, true>(v); }

// exp of float vectors, inline, for the AVX2 / AVX-512 copies: Cody-Waite reduction x = n ln2 + r
// (|r| <= ln2 / 2), Cephes' polynomial for e^r (~1 ulp), 2^n built in the exponent bits, in place of
// the out-of-line Sleef call, in the passes that exponentiate every element. Results below FLT_MIN
// are 0 (no denormals: the solvers' underflow bounds already allow an absolute error of FLT_MIN per
// entry), exp(-inf) = 0, exp(x) = inf from x > 88.376, NaN stays NaN.
struct ExpConstants {
  static constexpr float kLo = -87.3365447504f;   // ln FLT_MIN
  static constexpr float kHi = 88.3762626647949f;  // largest x with round(x log2 e) <= 127
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// 2^n for integral n in [-126, 127], built in the exponent bits; n = -127 gives 0 (all bits zero).
inline Vec<float> pow2i(const Vec<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
#else
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
#endif
}

// kAnySign = false: the caller guarantees x <= 0 (or -inf, or NaN), so the overflow clamp is skipped.
// Always inlined: out of line, every call reloads the constants (the per-element passes are bound by it).
template <bool kAnySign>
__attribute__((always_inline)) inline Vec<float> exp_ps(const Vec<float>& x) {
  using C = ExpConstants;
  using V = Vec<float>;
  // clamp_min(x, lo) = max(lo, x) returns x when x is NaN: a NaN stays NaN through the polynomial.
  V xc = at::vec::clamp_min(x, V(C::kLo));
  if constexpr (kAnySign) xc = at::vec::clamp_max(xc, V(C::kHi));
  const V n = (xc * V(C::kLog2e)).round();
  V r = at::vec::fnmadd(n, V(C::kLn2Hi), xc);
  r = at::vec::fnmadd(n, V(C::kLn2Lo), r);
  V p(C::kP[0]);
  for (int i = 1; i < 6; ++i) p = at::vec::fmadd(p, r, V(C::kP[i]));
  p = at::vec::fmadd(p, r * r, r) + V(1.0f);
  V y = V::blendv(p * pow2i(n), V(0.0f), x < V(C::kLo));
  if constexpr (kAnySign) y = V::blendv(y, V(std::numeric_limits<float>::infinity()), x > V(C::kHi));
  return y;
}
#endif

// 2^t of float vectors, inline, for the AVX2 / AVX-512 copies: t = n + f (n = round(t), |f| <= 1/2,
// exact), a degree-5 polynomial for 2^f (minimax in relative error, 2 ulp in float arithmetic: the
// rounding of t itself, |t| 2^-24 ln 2, is 10 ulp already at |t| = 30, so a degree more buys
// nothing), and 2^n as a factor built in the exponent bits. t <= -127 gives exactly 0 (2^n's bits
// are 0), as does -inf; results between 2^-127 and FLT_MIN are denormal or 0; NaN stays NaN. The
// caller guarantees t <= 127 (no overflow clamp).
struct Exp2Constants {
  static constexpr float kLo = -127.0f;
  static constexpr float kP[5] = {1.3264671434e-3f, 9.6714999527e-3f, 5.5507335812e-2f, 2.4022242427e-1f,
                                  6.9314700365e-1f};
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
__attribute__((always_inline)) inline Vec<float> exp2_ps(const Vec<float>& t) {
  using C = Exp2Constants;
  using V = Vec<float>;
  // max(lo, t) returns t when t is NaN (the second operand), so a NaN goes on through the polynomial.
  const V tc = at::vec::clamp_min(t, V(C::kLo));
  const V n = tc.round();
  const V f = tc - n;
  V p(C::kP[0]);
  for (int i = 1; i < 5; ++i) p = at::vec::fmadd(p, f, V(C::kP[i]));
  p = at::vec::fmadd(p, f, V(1.0f));
  return p * pow2i(n);
}
#endif

// s / eps rounded as the division is (x = scores / eps reaches 1e7, where an ulp of x is a factor e
// in the plan) without the divider's throughput where FMA is compiled in: q = s * (1 / eps) is within
// an ulp and one fused residual step rounds it correctly (Markstein's correction).
template <typename ct>
inline Vec<ct> div_eps(const Vec<ct>& s, const Vec<ct>& eps, const Vec<ct>& inv) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<ct, float>) {
    const Vec<ct> q = s * inv;
    return at::vec::fmadd(at::vec::fnmadd(q, eps, s), inv, q);
  }
#endif
  return s / eps;
}

// exp(v); kAnySign = false promises v <= 0 (or -inf / NaN), which saves the overflow clamp.
template <typename ct, bool kAnySign = true>
__attribute__((always_inline)) inline Vec<ct> vexp(const Vec<ct>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<ct, float>) return exp_ps<kAnySign>(v);
#endif
  return v.exp();
}

// 2^v (see exp2_ps; ATen's elsewhere).
template <typename ct>
__attribute__((always_inline)) inline Vec<ct> vexp2(const Vec<ct>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<ct, float>) return exp2_ps(v);
#endif
  return v.exp2();
}

// max(a, b) for lanes that are never NaN: a single max instruction (at::vec::maximum adds NaN
// propagation, which costs two more).
template <typename ct>
inline Vec<ct> vmax(const Vec<ct>& a, const Vec<ct>& b) {
  return at::vec::clamp_min(a, b);
}

// tmp = x = row / eps, rounded as the division is (padding lanes -inf: neutral for max, exp -> 0);
// returns max_j x_j (-inf for an empty row).
template <typename ct, typename in_t>
inline ct scaled_row(const in_t* row, int64_t K, ct eps, ct inv_eps, ct* tmp) {
  using V = Vec<ct>;
  constexpr int64_t kVS = V::size();
  const V veps(eps), vinv(inv_eps), vninf(-std::numeric_limits<ct>::infinity());
  V vm = vninf;
  for (int64_t j = 0; j < K; j += kVS) {
    const int64_t n = imin(kVS, K - j);
    V y = div_eps<ct>(load_as<ct>(row + j, n), veps, vinv);
    if (n < kVS) y = V::set(vninf, y, n);
    y.store(tmp + j);
    vm = vmax<ct>(vm, y);
  }
  return hmax<ct>(vm);
}

// Lane-wise max over the vectors of a row (its max is this vector's; -inf for an empty row), in two chains.
template <typename ct, typename in_t>
inline Vec<ct> row_max_lanes(const in_t* row, int64_t K) {
  using V = Vec<ct>;
  constexpr int64_t kVS = V::size();
  const V vninf(-std::numeric_limits<ct>::infinity());
  V m0 = vninf, m1 = vninf;
  int64_t j = 0;
  for (; j + 2 * kVS <= K; j += 2 * kVS) {
    m0 = vmax<ct>(m0, load_as<ct>(row + j, kVS));
    m1 = vmax<ct>(m1, load_as<ct>(row + j + kVS, kVS));
  }
  for (; j < K; j += kVS) {
    const int64_t n = imin(kVS, K - j);
    m0 = vmax<ct>(m0, n < kVS ? V::set(vninf, load_as<ct>(row + j, n), n) : load_as<ct>(row + j, kVS));
  }
  return vmax<ct>(m0, m1);
}

// out[r] = the horizontal sum (kMax: max) of the vector lanes(r), for r < n: eight rows reduced
// together where the vector width allows (a row at a time, each waited for its own reduction tree).
template <typename ct, bool kMax, typename F>
inline void reduce_rows(int64_t n, const F& lanes, ct* out) {
  int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<ct, float>) {
    for (; r + 8 <= n; r += 8) {
      __m256 v[8];
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) v[q] = fold_to_256<kMax>(lanes(r + q));
      _mm256_storeu_ps(out + r, kMax ? hmax_rows8(v) : hsum_rows8(v));
    }
  }
#endif
  for (; r < n; ++r) out[r] = hreduce<ct, kMax>(lanes(r));
}

template <typename ct>
inline void fill(ct* p, ct value, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = value;
}

template <typename ct>
inline void copy(ct* dst, const ct* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, n * sizeof(ct));
}

// dst[i] = log(src[i]) (log 0 = -inf), vectorised; `a` (optional) is added: dst = a + log(src).
template <typename ct>
inline void log_add(ct* dst, const ct* a, const ct* src, int64_t n) {
  constexpr int64_t vs = Vec<ct>::size();
  for (int64_t i = 0; i < n; i += vs) {
    const int64_t m = imin(vs, n - i);
    Vec<ct> v = Vec<ct>::loadu(src + i, m).log();
    if (a) v = Vec<ct>::loadu(a + i, m) + v;
    v.store(dst + i, m);
  }
}

// Tolerances of the fast paths. kRel: worst-case relative error allowed in a scaling sum from the
// entries of the scaled base (K, or a log-domain plan) that underflowed; a bound, the actual error
// is far smaller. kLimit: largest per-row/column factor the direct backward applies to exp'ed
// entries before it computes its two softmaxes with separate exps.
template <typename ct>
struct Tuning;
template <>
struct Tuning<float> {
  static constexpr float kRel = 1.0f / (1 << 20);
  static constexpr float kLimit = 1.152921504606846976e18f;  // 2^60
};
template <>
struct Tuning<double> {
  static constexpr double kRel = 2.842170943040401e-14;  // 2^-45
  static constexpr double kLimit = 1e150;
};

// Runs f(chunk, row_begin, row_end) for every row chunk, in parallel when there are several.
template <typename F>
inline void for_row_chunks(int64_t n_rows, int64_t n_chunks, const F& f) {
  if (n_chunks <= 1) {
    f(int64_t{0}, int64_t{0}, n_rows);
    return;
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, n_rows * c / n_chunks, n_rows * (c + 1) / n_chunks);
  });
}

// Effective marginals of one problem, shared by forward and backward: masked rows, and non-positive
// or non-finite masses, count as mass 0 (the reference's safe_log gives them dual -inf); f0 = 0 on
// valid rows, -inf on masked ones. Null mask / r / c stand for the defaults of default_marginals
// (every sample valid, mass 1 per valid sample, N_valid / K per cluster, in the same float
// arithmetic), which are then written to c_default. In two parts, so that the forward can take the
// rows' part within its parallel first pass: the rows [i0, i1) (returns how many are valid), then
// the columns (returns the column marginals the early-stopping error compares against).
template <typename ct>
int64_t row_marginals(int64_t i0, int64_t i1, const bool* mask, const ct* r, ct* reff, ct* f0) {
  constexpr ct kInf = std::numeric_limits<ct>::infinity();
  int64_t n_valid = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const bool valid = mask == nullptr || mask[i];
    const ct ri = r ? r[i] : ct(1);
    reff[i] = (valid && ri > 0 && ri < kInf) ? ri : ct(0);
    f0[i] = valid ? ct(0) : -kInf;
    n_valid += valid;
  }
  return n_valid;
}

template <typename ct>
const ct* column_marginals(int64_t n_valid, int64_t K, int64_t Kp, const ct* c, ct* ceff, ct* c_default) {
  constexpr ct kInf = std::numeric_limits<ct>::infinity();
  if (c == nullptr) {
    fill(c_default, ct(n_valid) / ct(K), K);
    c = c_default;
  }
  for (int64_t j = 0; j < Kp; ++j) {
    const ct cj = j < K ? c[j] : ct(0);
    ceff[j] = (cj > 0 && cj < kInf) ? cj : ct(0);
  }
  return c;
}

// =============================================================================================
// Forward
// =============================================================================================
//
// Three levels, each exact (to rounding) when it runs, each falling back to the next from the last
// iteration whose duals it got right:
//   A. Scaling of the row-shifted kernel K_ij = exp(x_ij - sh_i) (sh_i ~ row max, so K <= 1 and no
//      row underflows entirely): plan^t = diag(a) K diag(b), b = c / (K^T a), a = r / (K b). One exp
//      per element in all, then a dot product and an axpy per row and iteration.
//   B. Absorption: one log-domain iteration t0 from f^{t0-1} (exact for any finite input), whose
//      plan P^{t0} (rows sum to r) becomes the scaled base for iterations t0+1.. (two exps per
//      element once). Helps when whole columns of K underflow (a column far below every row's max).
//   C. Pure log domain: column logsumexp and row logsumexp every iteration (two exps per element
//      per iteration). Needed only for extreme inputs (scores/eps spreading far beyond the float
//      exponent range between rows and columns), zero masses that make scaling sums vanish, ...
// Scaling (A, B) is exact as long as the entries of the base that underflowed (absolute error at
// most `tiny` each) stay negligible in every scaling sum once multiplied by the largest scalings;
// column_scaling / scaling_rows check exactly that bound each iteration (kRel = worst-case relative
// error allowed) and report failure instead of producing an inexact result.

template <typename in_t, typename ct>
class ForwardSolver {
  using V = Vec<ct>;
  static constexpr int64_t kVS = V::size();
  static constexpr ct kNegInf = -std::numeric_limits<ct>::infinity();
  static constexpr ct kInf = std::numeric_limits<ct>::infinity();
  static constexpr bool kPlanIsCompute = std::is_same_v<in_t, ct>;
  // A row whose max is within this of the running max is shifted by the running max (so its column
  // contribution needs no weight); a row further below is shifted by its own max and weighted
  // (log2 units: a factor 2^-29 ~ e^-20).
  static constexpr ct kShareShift = ct(29);
  static constexpr int64_t kBaseRows = 8;

 public:
  ForwardSolver(const sinkhorn::ForwardArgs& a, int64_t n_chunks)
      : a_(a),
        N_(a.n),
        K_(a.k),
        Kp_(round_up(a.k, kVS)),
        T_(a.n_iters),
        n_chunks_(n_chunks < 1 ? 1 : n_chunks),
        keep_history_(a.log_u != nullptr),
        eps_(static_cast<ct>(a.epsilon)),
        exp2_scale_(static_cast<ct>(1.4426950408889634 / a.epsilon)),
        tol_(static_cast<ct>(a.tol)),
        use_tol_(a.tol > 0),
        check_every_(a.check_every < 1 ? 1 : a.check_every),
        lse_rows_(tmax<int64_t>(4, kLseBlockBytes / tmax<int64_t>(1, a.k * int64_t(sizeof(in_t))))),
        scratch_(carve(nullptr)) {
    carve(scratch_.data());
  }

  // Lays the workspace out from base (null: only measures); returns its size in bytes.
  size_t carve(char* base) {
    const int64_t Np = round_up(N_, kVS);
    Carver cv(base);
    reff_ = cv.take<ct>(Np);
    logr_ = cv.take<ct>(Np);
    f0_ = cv.take<ct>(Np);
    A_ = cv.take<ct>(Np);
    shift_ = cv.take<ct>(Np);
    alpha_ = cv.take<ct>(Np);
    ceff_ = cv.take<ct>(Kp_);
    logc_ = cv.take<ct>(Kp_);
    g_ = cv.take<ct>(Kp_);
    B_ = cv.take<ct>(Kp_);
    beta_ = cv.take<ct>(Kp_);
    chunk_ = cv.take<ct>(n_chunks_ * kChunkArrays * Kp_);
    chunk_max_ = cv.take<ct>(n_chunks_);
    chunk_fail_ = cv.take<int32_t>(n_chunks_);
    chunk_valid_ = cv.take<int64_t>(n_chunks_);
    cdef_ = cv.take<ct>(Kp_);
    if (!keep_history_) {
      f_roll_ = cv.take<ct>(2 * Np);
      A_prev_ = cv.take<ct>(Np);
    }
    if (!kPlanIsCompute) P_scratch_ = cv.take<ct>(N_ * K_);
    return cv.size();
  }

  void solve(int64_t b) {
    s_ = static_cast<const in_t*>(a_.scores) + b * N_ * K_;
    out_ = static_cast<in_t*>(a_.plan) + b * N_ * K_;
    if constexpr (kPlanIsCompute) {
      P_ = out_;
    } else {
      P_ = P_scratch_;
    }
    if (keep_history_) {
      hf_ = static_cast<ct*>(a_.log_u) + b * T_ * N_;
      hg_ = static_cast<ct*>(a_.log_v) + b * T_ * K_;
    }
    mask_ = a_.mask ? a_.mask + b * N_ : nullptr;
    r_ = a_.row_marginals ? static_cast<const ct*>(a_.row_marginals) + b * N_ : nullptr;
    c_given_ = a_.col_marginals ? static_cast<const ct*>(a_.col_marginals) + b * K_ : nullptr;
    logr_ready_ = false;  // log r and log c only if a log-domain level runs
    logc_ready_ = false;
    fill(B_, ct(0), Kp_);  // padding lanes stay 0 (dot products)
    int64_t done = run_base();
    if (done < 0) done = run_absorbed(-done);
    if (done < 0) done = run_log_from(-done);
    if (keep_history_) {
      // History rows past the last iteration repeat the final duals (the contract's frozen problems).
      for (int64_t t = done; t < T_; ++t) {
        copy(hf_ + t * N_, hf_ + (done - 1) * N_, N_);
        copy(hg_ + t * K_, hg_ + (done - 1) * K_, K_);
      }
    }
    if (a_.n_done) a_.n_done[b] = done;
  }

 private:
  // Per-chunk arrays (Kp each): column max, column exp-sum, block max, block exp-sum, column
  // accumulator, row scratch.
  static constexpr int64_t kChunkArrays = 6;
  ct* chunk_array(int64_t c, int64_t which) const { return chunk_ + (c * kChunkArrays + which) * Kp_; }

  // Row duals f^t (t >= 1) and column duals g^t: the history rows, or without a history (a forward
  // that no backward will follow) two alternating row buffers, the only ones a fallback level reads
  // (f^{t-1} to redo iteration t); the column duals are then not kept at all.
  ct* f_slot(int64_t t) const { return keep_history_ ? hf_ + (t - 1) * N_ : f_roll_ + ((t - 1) & 1) * round_up(N_, kVS); }
  const ct* f_before(int64_t t) const { return t == 1 ? f0_ : f_slot(t - 1); }
  void store_g(int64_t t, const ct* g) const {
    if (keep_history_) copy(hg_ + (t - 1) * K_, g, K_);
  }

  bool check_at(int64_t t) const { return use_tol_ && t % check_every_ == 0 && t < T_; }

  // ---- level A: the row-shifted kernel ---------------------------------------------------------

  // Rows [i0, i1): K_ij = exp(x_ij - sh_i) into P and, over valid rows (f^0 = 0),
  // acc_j = sum_i exp(sh_i - mrun) K_ij = exp(-mrun) sum_i exp(x_ij): the column sums of the first
  // column step, relative to the running max mrun of the shifts (acc is rescaled when it grows).
  // Shifts go in log2 units (shift_ = sh_i / ln 2): K_ij = 2^(s_ij c - shift_i) with c = log2(e) / eps,
  // so the exponent is rounded once, after the shift (x = s / eps rounded first and then shifted
  // would round twice), and 2^t costs fewer operations than e^x.
  void base_rows(int64_t i0, int64_t i1, ct* acc, ct* mrun_out) const {
    // Locals, not members, in the loops: vector stores may alias anything, so members would be
    // reloaded after each of them.
    const int64_t K = K_, Kp = Kp_;
    const in_t* const scores = s_;
    const ct* const f0 = f0_;
    ct* const P = P_;
    ct* const shift = shift_;
    const ct c = exp2_scale_;
    fill(acc, ct(0), Kp);
    ct mrun = kNegInf;
    // Rows go in blocks, the block's maxima first: one row at a time, the exps of each row would
    // wait for the latency of its max.
    alignas(64) ct M[kBaseRows];
    for (int64_t ib = i0; ib < i1; ib += kBaseRows) {
      const int64_t n = imin(kBaseRows, i1 - ib);
      reduce_rows<ct, true>(n, [&](int64_t r) { return row_max_lanes<ct>(scores + (ib + r) * K, K); }, M);
      ct Mb = kNegInf;
      for (int64_t r = 0; r < n; ++r) {
        // masked (f = -inf for ever), K == 0 or a row of -inf: -inf, a row without mass. The shift
        // need not be the exact max of s c, only close to it.
        M[r] = f0[ib + r] == kNegInf ? kNegInf : M[r] * c;
        Mb = tmax(Mb, M[r]);
      }
      if (Mb > mrun) {
        if (mrun > kNegInf) {
          const V scale = vexp2<ct>(V(mrun - Mb));
          for (int64_t j = 0; j < Kp; j += kVS) (V::loadu(acc + j) * scale).store(acc + j);
        }
        mrun = Mb;
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = ib + r;
        const in_t* row = scores + i * K;
        ct* prow = P + i * K;
        const ct Mr = M[r];
        if (!(Mr > kNegInf)) {
          shift[i] = 0;
          fill(prow, ct(0), K);
          continue;
        }
        // Sharing the running max as the shift saves a scalar exp per row; a row further below
        // gets its own max so that it cannot underflow.
        const bool share = Mr >= mrun - kShareShift;
        const ct sh = share ? mrun : Mr;
        shift[i] = sh;
        if (share) {
          exp_row(row, K, sh, prow, [&](int64_t j, const V& e) { (V::loadu(acc + j) + e).store(acc + j); });
        } else {
          const V w = vexp2<ct>(V(Mr - mrun));
          exp_row(row, K, sh, prow,
                  [&](int64_t j, const V& e) { at::vec::fmadd(e, w, V::loadu(acc + j)).store(acc + j); });
        }
      }
    }
    *mrun_out = mrun;
  }

  // prow_j = 2^(s_j c - sh) for the K scores of a row (c = log2(e) / eps rounded to ct), each vector
  // also passed to add(j, e). The exponent is rounded once, after the shift; its error from c's
  // rounding, |s c| 2^-24 in float, is the reference's own in rounding x = s / eps (|x| 2^-24).
  template <typename F>
  __attribute__((always_inline)) void exp_row(const in_t* row, int64_t K, ct sh, ct* prow, const F& add) const {
    const V vc(exp2_scale_), vsh(sh);
    int64_t j = 0;
    for (; j + kVS <= K; j += kVS) {
      const V e = vexp2<ct>(at::vec::fmsub(load_as<ct>(row + j, kVS), vc, vsh));
      e.store(prow + j);
      add(j, e);
    }
    if (j < K) {
      const int64_t n = K - j;
      const V t = V::set(V(kNegInf), at::vec::fmsub(load_as<ct>(row + j, n), vc, vsh), n);  // padding: 2^-inf
      const V e = vexp2<ct>(t);
      e.store(prow + j, n);
      add(j, e);
    }
  }

  // Level A driver: returns n_done, or -t when iteration t must be redone by a more robust level.
  int64_t run_base() {
    if (!(exp2_scale_ < kInf)) {  // eps so small that log2(e) / eps overflows: the log domain
      c_ = column_marginals<ct>(row_marginals<ct>(0, N_, mask_, r_, reff_, f0_), K_, Kp_, c_given_, ceff_, cdef_);
      return -1;
    }
    for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
      chunk_valid_[c] = row_marginals<ct>(i0, i1, mask_, r_, reff_, f0_);
      base_rows(i0, i1, chunk_array(c, 4), &chunk_max_[c]);
    });
    int64_t n_valid = 0;
    for (int64_t c = 0; c < n_chunks_; ++c) n_valid += chunk_valid_[c];
    c_ = column_marginals<ct>(n_valid, K_, Kp_, c_given_, ceff_, cdef_);
    // Merge the chunks' column sums to the global max of the shifts, Mg (log2 units).
    ct Mg = kNegInf;
    for (int64_t c = 0; c < n_chunks_; ++c) Mg = tmax(Mg, chunk_max_[c]);
    ct* acc = chunk_array(0, 4);
    if (n_chunks_ > 1) {
      for (int64_t c = 0; c < n_chunks_; ++c) {
        const ct w = chunk_max_[c] > kNegInf ? std::exp2(chunk_max_[c] - Mg) : ct(0);
        const ct* part = chunk_array(c, 4);
        for (int64_t j = 0; j < Kp_; ++j) acc[j] = c == 0 ? part[j] * w : acc[j] + part[j] * w;
      }
    }
    // plan = a_i K_ij b_j = exp(x_ij + f_i + g_j) with f_i = log a_i + (Mg - sh_i), g_j = log b_j - Mg;
    // initially (f^0 = 0) a_i = exp(sh_i - Mg) <= 1.
    constexpr double kLn2 = 0.693147180559945309;
    shift_max_ = Mg > kNegInf ? static_cast<double>(Mg) : 0.0;
    alpha_ready_ = false;  // formed when the duals f are (history, or a fallback's start)
    fill(beta_, static_cast<ct>(-shift_max_ * kLn2), Kp_);
    return scaled_iterations(1, ct(1));
  }

  // ---- scaling iterations (levels A and B) -----------------------------------------------------

  // alpha_i = (Mg - sh_i) ln 2, the offset of f^t = alpha + log a^t in level A.
  const ct* alpha() {
    if (!alpha_ready_) {
      constexpr double kLn2 = 0.693147180559945309;
      for (int64_t i = 0; i < N_; ++i) alpha_[i] = static_cast<ct>((shift_max_ - shift_[i]) * kLn2);
      alpha_ready_ = true;
    }
    return alpha_;
  }

  // Iterations t_first..T on the base in P, from the column sums acc = K^T a in chunk 0 (max_a =
  // largest a). Writes history f^t = alpha + log a, g^t = beta + log b; returns n_done or -t.
  int64_t scaled_iterations(int64_t t_first, ct max_a) {
    for (int64_t t = t_first; t <= T_; ++t) {
      ct max_b = 0;
      const bool last = t == T_;
      // Without history f^{t-1} = alpha + log a^{t-1} is formed only if iteration t fails and a
      // fallback level has to redo it from there (f^{t_first - 1} is already in its slot).
      if (!keep_history_) std::swap(A_, A_prev_);
      const auto fail = [&] {
        if (!keep_history_ && t > t_first) log_add<ct>(f_slot(t - 1), alpha(), A_prev_, N_);
        return -t;
      };
      if (!column_scaling(max_a, &max_b)) return fail();
      const ct thr = ct(K_) * std::numeric_limits<ct>::min() * (max_b + 1) / Tuning<ct>::kRel;
      if (!scaling_rows_all(last, thr, &max_a)) return fail();
      if (keep_history_) {
        log_add<ct>(hf_ + (t - 1) * N_, alpha(), A_, N_);
        log_add<ct>(hg_ + (t - 1) * K_, beta_, B_, K_);
      }
      if (last) return t;  // the row pass wrote the plan
      if (check_at(t) && colsum_error(B_) < tol_) {
        write_scaled_plan();
        return t;
      }
    }
    return -T_;  // not reached (T_ >= 1)
  }

  // out = mass / S lane-wise, 0 where the mass is 0. False when a lane with mass breaks the scaling
  // bound: S below thr (the entries of the base that underflowed would not be negligible in it), or
  // S or the quotient not finite, or the quotient below the smallest normal.
  static bool bounded_scaling(const V& mass, const V& S, const V& thr, V* out) {
    const V zero(0), inf(kInf), tiny(std::numeric_limits<ct>::min());
    const V q = mass / S;
    const V ok = (S >= thr) & (S < inf) & (q >= tiny) & (q < inf);
    const V has = mass != zero;
    if (V::blendv(has, zero, ok).zero_mask() != (1 << kVS) - 1) return false;
    *out = V::blendv(zero, q, has);
    return true;
  }

  // Column step: b = c / acc (acc = K^T a). Fails when a column sum is too small for the underflowed
  // entries of the base (absolute error <= tiny each, times at most max_a + 1) to be negligible, or
  // when anything is not finite. Columns without mass get b = 0.
  bool column_scaling(ct max_a, ct* max_b) {
    const ct thr = ct(N_) * std::numeric_limits<ct>::min() * (max_a + 1) / Tuning<ct>::kRel;
    const ct* acc = chunk_array(0, 4);
    const V vthr(thr);
    V vmb(0);
    for (int64_t j = 0; j < Kp_; j += kVS) {  // padding columns: no mass, b = 0
      V bv;
      if (!bounded_scaling(V::loadu(ceff_ + j), V::loadu(acc + j), vthr, &bv)) return false;
      bv.store(B_ + j);
      vmb = vmax<ct>(vmb, bv);
    }
    *max_b = hmax<ct>(vmb);
    return true;
  }

  // Row step on rows [i0, i1): a_i = r_i / (K b)_i, then either the column sums K^T a of the next
  // column step (acc) or, in the last iteration, the plan a_i K_ij b_j written to the output (in
  // place when the output is the base). Same failure bound as column_scaling. Rows go in blocks of
  // kScaleRows, in three phases over the block (which stays in L1 between them): the row sums as
  // independent chains, the block's scalings and bound checks in vector arithmetic, then the axpys
  // into column accumulators held in registers. One row at a time, each row's sum -> divide -> axpy
  // chain made the pass latency-bound. Every sum runs in row order, as a row-by-row pass would.
  bool scaling_rows(int64_t i0, int64_t i1, bool last, ct thr, ct* acc, ct* max_a) const {
    alignas(64) ct sums[kScaleRows];
    alignas(64) ct a[kScaleRows];
    V vma(0);
    for (int64_t ib = i0; ib < i1; ib += kScaleRows) {
      const int64_t n = imin(kScaleRows, i1 - ib);
      row_sums(ib, n, sums);
      for (int64_t r = n; r < round_up(n, kVS); ++r) sums[r] = 1;  // lanes past the block (no mass)
      if (!row_scalings(ib, n, thr, sums, a, &vma)) return false;
      if (last) {
        write_plan_rows(ib, n, a);
      } else {
        axpy_rows(ib, n, a, acc);
      }
    }
    *max_a = hmax<ct>(vma);
    return true;
  }

  // sums_r = sum_j P_(i0+r)j b_j for r < n: per row two chains of products, the horizontal sums of
  // eight rows together.
  void row_sums(int64_t i0, int64_t n, ct* sums) const {
    const int64_t K = K_;
    const ct* const B = B_;  // padded with zeros
    const ct* const P = P_ + i0 * K;
    const auto dot = [&](const ct* p) {
      V s0(0), s1(0);
      int64_t j = 0;
      for (; j + 2 * kVS <= K; j += 2 * kVS) {
        s0 = at::vec::fmadd(V::loadu(p + j), V::loadu(B + j), s0);
        s1 = at::vec::fmadd(V::loadu(p + j + kVS), V::loadu(B + j + kVS), s1);
      }
      if (j + kVS <= K) {
        s0 = at::vec::fmadd(V::loadu(p + j), V::loadu(B + j), s0);
        j += kVS;
      }
      if (j < K) s1 = at::vec::fmadd(V::loadu(p + j, K - j), V::loadu(B + j), s1);
      return s0 + s1;
    };
    if (K % kVS == 0 && K / kVS <= kAxpyVecs) {  // a few whole vectors (PixelCLIP: 64 = 8 or 4): unrolled
      with_vec_count(K / kVS, [&](auto nv) { row_sums_fixed<decltype(nv)::value>(P, n, sums); });
      return;
    }
    reduce_rows<ct, false>(n, [&](int64_t r) { return dot(P + r * K); }, sums);
  }

  template <int NV>
  void row_sums_fixed(const ct* P, int64_t n, ct* sums) const {
    const ct* const B = B_;
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(B + v * kVS);
    reduce_rows<ct, false>(n, [&](int64_t r) {
      const ct* p = P + r * NV * kVS;
      V s0(0), s1(0);
#pragma GCC unroll 8
      for (int v = 0; v + 1 < NV; v += 2) {
        s0 = at::vec::fmadd(V::loadu(p + v * kVS), b[v], s0);
        s1 = at::vec::fmadd(V::loadu(p + (v + 1) * kVS), b[v + 1], s1);
      }
      if constexpr (NV % 2 == 1) s0 = at::vec::fmadd(V::loadu(p + (NV - 1) * kVS), b[NV - 1], s0);
      return s0 + s1;
    }, sums);
  }

  // a_r = r_r / sums_r for the n rows from i0 (0 for rows without mass, whose base row is finite),
  // into a and A_; vma: running lane-wise max of a. False when a sum or a scaling breaks the bound.
  bool row_scalings(int64_t i0, int64_t n, ct thr, const ct* sums, ct* a, V* vma) const {
    const V vthr(thr);
    for (int64_t r = 0; r < n; r += kVS) {
      const int64_t m = imin(kVS, n - r);
      const V ri = m == kVS ? V::loadu(reff_ + i0 + r) : V::loadu(reff_ + i0 + r, m);  // lanes >= m: 0
      const V S = V::loadu(sums + r);
      V av;
      if (!bounded_scaling(ri, S, vthr, &av)) return false;
      av.store(a + r);
      av.store(A_ + i0 + r, m);
      *vma = vmax<ct>(*vma, av);
    }
    return true;
  }

  // acc_j += sum_r P_(i0+r)j a_r over n rows, in row order.
  void axpy_rows(int64_t i0, int64_t n, const ct* a, ct* acc) const {
    const int64_t K = K_, Kfull = K / kVS * kVS;
    const ct* const P = P_ + i0 * K;
    for (int64_t j0 = 0; j0 < Kfull; j0 += kAxpyVecs * kVS) {
      with_vec_count(imin(kAxpyVecs, (Kfull - j0) / kVS),
                     [&](auto nv) { axpy_cols<decltype(nv)::value>(P + j0, n, a, acc + j0); });
    }
    if (Kfull < K) {  // the partial last vector (acc is padded; the padding lanes get + 0)
      V s = V::loadu(acc + Kfull);
      for (int64_t r = 0; r < n; ++r) s = at::vec::fmadd(V::loadu(P + r * K + Kfull, K - Kfull), V(a[r]), s);
      s.store(acc + Kfull);
    }
  }

  // NV column vectors of axpy_rows, their accumulators in registers across the rows.
  template <int NV>
  __attribute__((always_inline)) void axpy_cols(const ct* P, int64_t n, const ct* a, ct* acc) const {
    const int64_t K = K_;
    V s[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) s[v] = V::loadu(acc + v * kVS);
    for (int64_t r = 0; r < n; ++r) {
      const V ar(a[r]);
      const ct* p = P + r * K;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) s[v] = at::vec::fmadd(V::loadu(p + v * kVS), ar, s[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) s[v].store(acc + v * kVS);
  }

  bool scaling_rows_all(bool last, ct thr, ct* max_a) {
    for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
      ct* acc = chunk_array(c, 4);
      if (!last) fill(acc, ct(0), Kp_);
      ct ma = 0;
      chunk_fail_[c] = scaling_rows(i0, i1, last, thr, acc, &ma) ? 0 : 1;
      chunk_max_[c] = ma;
    });
    ct ma = 0;
    for (int64_t c = 0; c < n_chunks_; ++c) {
      if (chunk_fail_[c]) return false;
      ma = tmax(ma, chunk_max_[c]);
    }
    if (!last) reduce_acc();
    *max_a = ma;
    return true;
  }

  // Plan rows [i0, i0 + n): a_r K_ij b_j (zeros for a_r = 0, including base rows that were never
  // written).
  void write_plan_rows(int64_t i0, int64_t n, const ct* a) const {
    if (K_ % kVS == 0 && K_ / kVS <= kAxpyVecs) {
      with_vec_count(K_ / kVS, [&](auto nv) { write_plan_rows_fixed<decltype(nv)::value>(i0, n, a); });
      return;
    }
    for (int64_t r = 0; r < n; ++r) write_plan_row(i0 + r, a[r]);
  }

  // A few whole column vectors: b held in registers. Loaded from memory after every store (which may
  // alias it), b made PixelCLIP's last pass ~1.3x slower.
  template <int NV>
  void write_plan_rows_fixed(int64_t i0, int64_t n, const ct* a) const {
    constexpr int64_t K = NV * kVS;
    in_t* const out = out_ + i0 * K;
    const ct* const P = P_ + i0 * K;
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(B_ + v * kVS);
    for (int64_t r = 0; r < n; ++r) {
      const V va(a[r]);
      const bool zero = a[r] == 0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        store_as<in_t, ct>(out + r * K + v * kVS, zero ? V(0) : V::loadu(P + r * K + v * kVS) * va * b[v], kVS);
      }
    }
  }

  // Plan row i: a K_ij b_j (zeros for a = 0, including base rows that were never written).
  void write_plan_row(int64_t i, ct a) const {
    // Locals: the stores may alias the members.
    const int64_t K = K_;
    in_t* const orow = out_ + i * K;
    const ct* const prow = P_ + i * K;
    const ct* const B = B_;
    const V va(a);
    int64_t j = 0;
    if (a == 0) {
      for (; j < K; j += kVS) store_as<in_t, ct>(orow + j, V(0), imin(kVS, K - j));
      return;
    }
    for (; j + kVS <= K; j += kVS) store_as<in_t, ct>(orow + j, V::loadu(prow + j) * va * V::loadu(B + j), kVS);
    if (j < K) store_as<in_t, ct>(orow + j, V::loadu(prow + j, K - j) * va * V::loadu(B + j), K - j);
  }


  // Plan a_i K_ij b_j (early stop during scaling iterations).
  void write_scaled_plan() {
    for_row_chunks(N_, n_chunks_, [&](int64_t, int64_t i0, int64_t i1) { write_plan_rows(i0, i1 - i0, A_ + i0); });
  }

  // ---- log-domain building blocks (levels B and C) ---------------------------------------------

  // Column logsumexp statistics of z_ij = x_ij + fr_i over rows [i0, i1) with fr_i > -inf:
  // m = column max, s = sum exp(z - m) (m = -inf, s = 0 for a column without rows). Rows are
  // processed in blocks that fit in L2 (max sweep, then exp-sum sweep over the same block), blocks
  // being merged with the usual logsumexp rescaling.
  void col_lse_rows(int64_t i0, int64_t i1, const ct* fr, ct* m, ct* s, ct* bm, ct* bs) const {
    const int64_t K = K_, Kp = Kp_;
    const in_t* const scores = s_;
    const V veps(eps_);
    fill(m, kNegInf, Kp);
    fill(s, ct(0), Kp);
    for (int64_t ib = i0; ib < i1; ib += lse_rows_) {
      const int64_t ie = imin(i1, ib + lse_rows_);
      const bool first = ib == i0;
      ct* mm = first ? m : bm;
      ct* ss = first ? s : bs;
      if (!first) {
        fill(bm, kNegInf, Kp);
        fill(bs, ct(0), Kp);
      }
      // f(j, z) for every column vector j of every row of the block with mass.
      const auto sweep = [&](const auto& f) {
        for (int64_t i = ib; i < ie; ++i) {
          if (fr[i] == kNegInf) continue;
          const V off(fr[i]);
          const in_t* row = scores + i * K;
          for (int64_t j = 0; j < K; j += kVS) f(j, load_as<ct>(row + j, imin(kVS, K - j)) / veps + off);
        }
      };
      sweep([&](int64_t j, const V& z) { vmax<ct>(V::loadu(mm + j), z).store(mm + j); });
      sweep([&](int64_t j, const V& z) {
        (V::loadu(ss + j) + vexp<ct, false>(z - V::loadu(mm + j))).store(ss + j);
      });
      if (!first) merge_lse(m, s, bm, bs);
    }
  }

  // (m, s) <- (m, s) (+) (bm, bs) in the logsumexp sense, one exp per column.
  void merge_lse(ct* m, ct* s, const ct* bm, const ct* bs) const {
    const V zero(0);
    for (int64_t j = 0; j < Kp_; j += kVS) {
      const V ma = V::loadu(m + j), mb = V::loadu(bm + j);
      const V sa = V::loadu(s + j), sb = V::loadu(bs + j);
      const V d = ma - mb;  // NaN only when both are -inf (then both sums are 0)
      const V e = V::blendv(vexp<ct, false>(zero - d.abs()), zero, d != d);
      V::blendv(sa + sb * e, sb + sa * e, ma < mb).store(s + j);
      vmax<ct>(ma, mb).store(m + j);
    }
  }

  // Column lse over all rows with offsets fr, merged into chunk 0's (m, s).
  void col_lse_all(const ct* fr) {
    for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
      col_lse_rows(i0, i1, fr, chunk_array(c, 0), chunk_array(c, 1), chunk_array(c, 2),
                   chunk_array(c, 3));
    });
    for (int64_t c = 1; c < n_chunks_; ++c)
      merge_lse(chunk_array(0, 0), chunk_array(0, 1), chunk_array(c, 0), chunk_array(c, 1));
  }

  // g_j = log c_j - lse_j (-inf for a zero-mass column or an empty lse), padded with -inf.
  void column_duals_from_lse(ct* g) {
    if (!logc_ready_) {
      log_add<ct>(logc_, nullptr, ceff_, Kp_);
      logc_ready_ = true;
    }
    const ct* m = chunk_array(0, 0);
    const ct* s = chunk_array(0, 1);
    log_add<ct>(g, m, s, K_);  // lse = log(s) + m, as the reference's log(total) + shift
    for (int64_t j = 0; j < K_; ++j) {
      const ct lse = g[j];
      g[j] = (logc_[j] > kNegInf && lse > kNegInf) ? logc_[j] - lse : kNegInf;
    }
    fill(g + K_, kNegInf, Kp_ - K_);
  }

  // Log-domain row step for rows [i0, i1): f_out_i = log r_i - lse_j(x_ij + g_j). With want_q it
  // also writes the plan rows q_ij = exp(x_ij + g_j + f_i) into P (computed as e_ij * r_i / S_i,
  // which is more accurate than exponentiating the sum of the large duals) and, with acc, adds
  // their column sums.
  void log_rows(int64_t i0, int64_t i1, const ct* g, ct* f_out, bool want_q, ct* acc, ct* tmp) const {
    const int64_t K = K_;
    const in_t* const scores = s_;
    const ct* const logr = logr_;
    const ct* const reff = reff_;
    ct* const P = P_;
    const V veps(eps_);
    for (int64_t i = i0; i < i1; ++i) {
      ct* prow = P + i * K;
      if (logr[i] == kNegInf) {
        f_out[i] = kNegInf;
        if (want_q) fill(prow, ct(0), K);
        continue;
      }
      const in_t* row = scores + i * K;
      V vm(kNegInf);
      for (int64_t j = 0; j < K; j += kVS) {
        // padding lanes: x = 0 and g = -inf, so y = -inf there.
        const V y = load_as<ct>(row + j, imin(kVS, K - j)) / veps + V::loadu(g + j);
        y.store(tmp + j);
        vm = vmax<ct>(vm, y);
      }
      const ct M = hmax<ct>(vm);
      if (!(M > kNegInf)) {  // no column with mass: the row gets no mass either
        f_out[i] = kNegInf;
        if (want_q) fill(prow, ct(0), K);
        continue;
      }
      const V vM(M);
      V vs(0);
      for (int64_t j = 0; j < K; j += kVS) {
        const V e = vexp<ct, false>(V::loadu(tmp + j) - vM);
        e.store(tmp + j);
        vs = vs + e;
      }
      const ct S = hsum<ct>(vs);  // >= 1: the max term is exp(0)
      f_out[i] = logr[i] - (std::log(S) + M);
      if (!want_q) continue;
      const V w(reff[i] / S);
      for (int64_t j = 0; j < K; j += kVS) {
        const V q = V::loadu(tmp + j) * w;
        q.store(prow + j, imin(kVS, K - j));
        if (acc) (V::loadu(acc + j) + q).store(acc + j);
      }
    }
  }

  // Log-domain row step over all rows; column sums of the written plan (if want_acc) end up in
  // chunk 0's accumulator.
  void log_rows_all(const ct* g, ct* f_out, bool want_q, bool want_acc) {
    if (!logr_ready_) {
      log_add<ct>(logr_, nullptr, reff_, N_);
      logr_ready_ = true;
    }
    for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
      ct* acc = want_acc ? chunk_array(c, 4) : nullptr;
      if (acc) fill(acc, ct(0), Kp_);
      log_rows(i0, i1, g, f_out, want_q, acc, chunk_array(c, 5));
    });
    if (want_acc) reduce_acc();
  }

  void reduce_acc() {
    ct* acc = chunk_array(0, 4);
    for (int64_t c = 1; c < n_chunks_; ++c) {
      const ct* part = chunk_array(c, 4);
      for (int64_t j = 0; j < Kp_; ++j) acc[j] += part[j];
    }
  }

  // max_j |colsum_j - c_j| with colsum = scale_j * acc_j (scale = b) or acc_j (scale = nullptr).
  ct colsum_error(const ct* scale) const {
    const ct* acc = chunk_array(0, 4);
    ct err = 0;
    for (int64_t j = 0; j < K_; ++j) {
      const ct colsum = scale ? scale[j] * acc[j] : acc[j];
      const ct e = std::abs(colsum - c_[j]);
      err = (e > err || e != e) ? e : err;
    }
    return err;
  }

  // Plan = P (already final) converted to the output dtype when the two differ.
  void finish_plan_from_P() {
    if constexpr (!kPlanIsCompute) {
      for_row_chunks(N_, n_chunks_, [&](int64_t, int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const ct* prow = P_ + i * K_;
          in_t* orow = out_ + i * K_;
          for (int64_t j = 0; j < K_; j += kVS) {
            const int64_t n = imin(kVS, K_ - j);
            store_as<in_t, ct>(orow + j, V::loadu(prow + j, n), n);
          }
        }
      });
    }
  }


  // Level B: log-domain iteration t0 from f^{t0-1}; its plan becomes the base of scaling iterations
  // t0+1.. (a = 1, b = 1, alpha = f^{t0}, beta = g^{t0}). Returns n_done or -t.
  int64_t run_absorbed(int64_t t0) {
    col_lse_all(f_before(t0));
    column_duals_from_lse(g_);
    ct* ft = f_slot(t0);
    log_rows_all(g_, ft, /*want_q=*/true, /*want_acc=*/true);
    store_g(t0, g_);
    if (t0 == T_ || (check_at(t0) && colsum_error(nullptr) < tol_)) {
      finish_plan_from_P();
      return t0;
    }
    copy(alpha_, ft, N_);
    alpha_ready_ = true;
    copy(beta_, g_, Kp_);
    return scaled_iterations(t0 + 1, ct(1));
  }

  // Level C: pure log-domain iterations t0..T from f^{t0-1}. Always succeeds.
  int64_t run_log_from(int64_t t0) {
    int64_t done = t0 - 1;
    for (int64_t t = t0; t <= T_; ++t) {
      col_lse_all(f_before(t));
      column_duals_from_lse(g_);
      const bool check = check_at(t);
      const bool want_q = check || t == T_;
      log_rows_all(g_, f_slot(t), want_q, check);
      store_g(t, g_);
      done = t;
      if (check && colsum_error(nullptr) < tol_) break;
    }
    finish_plan_from_P();
    return done;
  }

  const sinkhorn::ForwardArgs& a_;
  const int64_t N_, K_, Kp_, T_, n_chunks_;
  const bool keep_history_;
  const ct eps_;
  const ct exp2_scale_;  // log2(e) / eps
  const ct tol_;
  const bool use_tol_;
  const int64_t check_every_;
  const int64_t lse_rows_;
  Scratch scratch_;
  // workspace
  bool logr_ready_ = false;
  bool logc_ready_ = false;
  bool alpha_ready_ = false;
  double shift_max_ = 0;  // Mg: the largest row shift (log2 units)
  ct *reff_, *logr_, *f0_, *A_, *shift_, *alpha_;
  ct *ceff_, *logc_, *g_, *B_, *beta_;
  ct* chunk_;
  ct* chunk_max_;
  int32_t* chunk_fail_;
  int64_t* chunk_valid_;
  ct* cdef_;
  ct* f_roll_ = nullptr;  // without history: f^t of the last two iterations
  ct* A_prev_ = nullptr;  // without history: the row scalings a of the previous iteration
  ct* P_scratch_ = nullptr;
  // current problem
  const in_t* s_ = nullptr;
  const bool* mask_ = nullptr;
  const ct* r_ = nullptr;        // row marginals as given (null: the defaults)
  const ct* c_given_ = nullptr;  // column marginals as given (null: the defaults)
  const ct* c_ = nullptr;        // column marginals as given or the defaults, once the first pass has run
  in_t* out_ = nullptr;
  ct* P_ = nullptr;  // the base of the scaling iterations / the log-domain plan (compute dtype)
  ct* hf_ = nullptr;
  ct* hg_ = nullptr;
};

// =============================================================================================
// Backward
// =============================================================================================
//
// Reverse sweep of sinkhorn_backward_reference. With A^t = softmax_j(x + g^t) (row step t) and
// B^t = softmax_i(x + f^{t-1}) (column step t):
//   dx = G*Q - sum_t (F^t_i A^t_ij + Gg^t_j B^t_ij), F^T = rowsum(G*Q), Gg^T = colsum(G*Q - F^T A^T),
//   F^{t-1} = -rowsum(Gg^t B^t), Gg^{t-1} = -colsum(F^{t-1} A^{t-1}).
// Factored path: with the row-shifted kernel K_ij = exp(x_ij - M_i) (one exp per element),
//   A^t_ij = K_ij w^t_j / S^t_i,  S^t = K w^t,          w^t_j = exp(g^t_j + C^t),
//   B^t_ij = K_ij p^{t-1}_i / Sig^t_j,  Sig^t = K^T p^{t-1},  p^t_i = exp(M_i + f^t_i - C^t),
// (normalised by their actual sums, as the reference's softmaxes are), so the recursion is only
// matrix-vector products with K and K^T: F^{t-1}_i = -p^{t-1}_i (K y^t)_i with y^t = Gg^t / Sig^t,
// and Gg^{t-1}_j = -w^{t-1}_j (K^T z^{t-1})_j with z^{t-1} = F^{t-1} / S^{t-1}: one pass over K per
// reverse iteration (two dot products, then two axpys per row), and dx is assembled once at the end:
//   dx_ij = K_ij (p^T_i w^T_j G_ij - sum_t (z^t_i w^t_j + p^{t-1}_i y^t_j)).
// C^t = -max_j g^t_j keeps w <= 1. The factorisation is exact unless entries of K
// that underflowed matter once scaled (or a factor over/underflows); the same kind of bound as in
// the forward is checked on every S^t and Sig^t, and on failure the problem is redone by the direct
// path: one pass per reverse iteration computing E = exp(x + f^{t-1} + g^{t-1}) per element
// (B^t = E * exp(g^t - g^{t-1}) / c and A^{t-1} = E / rowsum(E)), or separate exps for A and B when
// even those factors are too large.

template <typename in_t, typename ct>
class BackwardSolver {
  using V = Vec<ct>;
  static constexpr int64_t kVS = V::size();
  static constexpr ct kNegInf = -std::numeric_limits<ct>::infinity();
  static constexpr ct kInf = std::numeric_limits<ct>::infinity();
  static constexpr bool kOutIsCompute = std::is_same_v<in_t, ct>;
  // Column tile of the final assembly pass: its 2T column-factor vectors stay in L1/L2.
  static constexpr int64_t kTileCols = 512;

 public:
  BackwardSolver(const sinkhorn::BackwardArgs& a, int64_t n_chunks)
      : a_(a),
        N_(a.n),
        K_(a.k),
        Kp_(round_up(a.k, kVS)),
        Np_(round_up(a.n, kVS)),
        Ttot_(a.n_iters),
        n_chunks_(n_chunks < 1 ? 1 : n_chunks),
        eps_(static_cast<ct>(a.epsilon)),
        inv_eps_(ct(1) / eps_),
        scratch_(carve(nullptr)) {
    carve(scratch_.data());
  }

  // Lays the workspace out from base (null: only measures); returns its size in bytes.
  size_t carve(char* base) {
    Carver cv(base);
    reff_ = cv.take<ct>(Np_);
    logr_ = cv.take<ct>(Np_);
    f0_ = cv.take<ct>(Np_);
    phi_ = cv.take<ct>(Np_);
    M_ = cv.take<ct>(Np_);
    Pt_ = cv.take<ct>((Ttot_ + 1) * Np_);
    Zt_ = cv.take<ct>((Ttot_ + 1) * Np_);
    St_ = cv.take<ct>((Ttot_ + 1) * Np_);
    ceff_ = cv.take<ct>(Kp_);
    logc_ = cv.take<ct>(Kp_);
    gprev_ = cv.take<ct>(Kp_);
    h_ = cv.take<ct>(Kp_);
    gamma_ = cv.take<ct>(Kp_);
    gg_ = cv.take<ct>(Kp_);
    sig_ = cv.take<ct>(Kp_);
    Wt_ = cv.take<ct>((Ttot_ + 1) * Kp_);
    Yt_ = cv.take<ct>((Ttot_ + 1) * Kp_);
    Ct_ = cv.take<ct>(Ttot_ + 1);
    chunk_ = cv.take<ct>(n_chunks_ * kChunkArrays * Kp_);
    chunk_coef_ = cv.take<ct>(n_chunks_ * 2 * (Ttot_ + 1));
    if (!kOutIsCompute) buf_scratch_ = cv.take<ct>(N_ * K_);
    return cv.size();
  }

  void solve(int64_t b) {
    s_ = static_cast<const in_t*>(a_.scores) + b * N_ * K_;
    G_ = static_cast<const in_t*>(a_.grad_plan) + b * N_ * K_;
    mask_ = a_.mask + b * N_;
    const int64_t n_valid = row_marginals<ct>(0, N_, mask_, static_cast<const ct*>(a_.row_marginals) + b * N_, reff_, f0_);
    log_add<ct>(logr_, nullptr, reff_, N_);
    column_marginals<ct>(n_valid, K_, Kp_, static_cast<const ct*>(a_.col_marginals) + b * K_, ceff_, nullptr);
    log_add<ct>(logc_, nullptr, ceff_, Kp_);
    hf_ = static_cast<const ct*>(a_.log_u) + b * Ttot_ * N_;
    hg_ = static_cast<const ct*>(a_.log_v) + b * Ttot_ * K_;
    out_ = static_cast<in_t*>(a_.grad_scores) + b * N_ * K_;
    if constexpr (kOutIsCompute) {
      buf_ = out_;
    } else {
      buf_ = buf_scratch_;
    }
    const int64_t T = a_.n_done[b];
    if (!solve_factored(T)) solve_direct(T);
  }

 private:
  // Per-chunk arrays (Kp each): two column accumulators, row scratch.
  static constexpr int64_t kChunkArrays = 3;
  ct* chunk_array(int64_t c, int64_t which) const { return chunk_ + (c * kChunkArrays + which) * Kp_; }

  V load_x(const in_t* p, int64_t n) const { return load_as<ct>(p, n) / V(eps_); }
  const ct* f_at(int64_t t) const { return t == 0 ? f0_ : hf_ + (t - 1) * N_; }
  const ct* g_at(int64_t t) const { return hg_ + (t - 1) * K_; }  // t >= 1
  ct* P_at(int64_t t) const { return Pt_ + t * Np_; }
  ct* Z_at(int64_t t) const { return Zt_ + t * Np_; }
  ct* S_at(int64_t t) const { return St_ + t * Np_; }
  ct* W_at(int64_t t) const { return Wt_ + t * Kp_; }
  ct* Y_at(int64_t t) const { return Yt_ + t * Kp_; }

  void reduce_chunks(int64_t which, ct* dst) {
    copy(dst, chunk_array(0, which), Kp_);
    for (int64_t c = 1; c < n_chunks_; ++c) {
      const ct* part = chunk_array(c, which);
      for (int64_t j = 0; j < Kp_; ++j) dst[j] += part[j];
    }
  }

  // ---- factored path ----------------------------------------------------------------------------

  // p^t_i = exp(M_i + f^t_i - C^t) for all rows (0 on rows without dual). False if one overflows,
  // or, for t >= 1, underflows although the row has a dual (after a row step p^t_i S^t_i ~ r_i, so
  // that cannot be negligible). p^0 (f^0 = 0, rows not normalised) may underflow: such a row weighs
  // exp(-87) or less against the top row in every column-step-1 normaliser Sig^1, and where it would
  // still dominate a column, that column's Sig^1 underflows too and fails set_y.
  bool set_p(int64_t t, ct C) {
    const ct* f = f_at(t);
    ct* p = P_at(t);
    for (int64_t i = 0; i < N_; i += kVS) {
      const int64_t n = imin(kVS, N_ - i);
      (V::loadu(M_ + i, n) + V::loadu(f + i, n) - V(C)).exp().store(p + i, n);
    }
    for (int64_t i = 0; i < N_; ++i) {
      if (!(f[i] > kNegInf) || !(M_[i] > kNegInf)) {
        p[i] = 0;
      } else if (!(p[i] < kInf) || (t > 0 && !(p[i] >= std::numeric_limits<ct>::min()))) {
        return false;
      }
    }
    return true;
  }

  // One row of K: S_i = sum_j K_ij w_j (into *S) and z_i = -p_i (sum_j K_ij y_j) / S_i (0 for S_i = 0).
  ct row_z(const ct* krow, const ct* y, const ct* w, ct p, ct* S) const {
    V vd(0), vs(0);
    for (int64_t j = 0; j < K_; j += kVS) {
      const V k = V::loadu(krow + j, imin(kVS, K_ - j));
      vd = at::vec::fmadd(k, V::loadu(y + j), vd);
      vs = at::vec::fmadd(k, V::loadu(w + j), vs);
    }
    *S = hsum<ct>(vs);
    return *S > 0 ? -p * hsum<ct>(vd) / *S : ct(0);
  }

  // Pass 0 on rows [i0, i1): K = exp(x - M) into buf_, p^T, p^{T-1}; S^T = K w^T,
  // F^T_i = p^T_i sum_j G_ij K_ij w^T_j, z^T = F^T / S^T; accumulates sum_i (p^T_i G_ij - z^T_i) K_ij
  // (Gg^T / w^T) and, if T >= 2, sum_i p^{T-1}_i K_ij (Sig^T).
  void top_rows_factored(int64_t i0, int64_t i1, int64_t T, ct CT, ct CTm1, ct* accG, ct* accS, ct* tmp) const {
    const int64_t K = K_;
    const in_t* const scores = s_;
    const in_t* const grad = G_;
    const bool* const mask = mask_;
    ct* const Kbuf = buf_;
    ct* const Mrow = M_;
    const ct* const fT = f_at(T);
    const ct* const fTm1 = f_at(T - 1);
    const ct* const wT = W_at(T);
    ct* const pT_out = P_at(T);
    ct* const pTm1_out = P_at(T - 1);
    ct* const zT_out = Z_at(T);
    ct* const ST_out = S_at(T);
    for (int64_t i = i0; i < i1; ++i) {
      Mrow[i] = kNegInf;
      pT_out[i] = 0;
      if (T >= 2) pTm1_out[i] = 0;
      zT_out[i] = 0;
      ST_out[i] = 0;
      if (!mask[i]) continue;  // every dual of a masked row is -inf: no term at all
      const ct M = scaled_row<ct>(scores + i * K, K, eps_, inv_eps_, tmp);
      Mrow[i] = M;
      if (!(M > kNegInf)) continue;  // K == 0
      ct* krow = Kbuf + i * K;
      const ct pT = fT[i] > kNegInf ? std::exp(M + fT[i] - CT) : ct(0);
      const ct pTm1 = (T >= 2 && fTm1[i] > kNegInf) ? std::exp(M + fTm1[i] - CTm1) : ct(0);
      pT_out[i] = pT;
      if (T >= 2) pTm1_out[i] = pTm1;
      const in_t* grow = grad + i * K;
      // K's row (stored, and kept in tmp for the next sweep), S^T = K w^T and sum_j G K w^T.
      const V vM(M);
      V vd(0), vs(0);
      for (int64_t j = 0; j < K; j += kVS) {
        const int64_t n = imin(kVS, K - j);
        const V k = vexp<ct, false>(V::loadu(tmp + j) - vM);
        k.store(tmp + j);
        k.store(krow + j, n);
        const V kw = k * V::loadu(wT + j);
        vs = vs + kw;
        vd = at::vec::fmadd(load_as<ct>(grow + j, n), kw, vd);
      }
      ct z = 0;
      if (pT > 0) {
        const ct S = hsum<ct>(vs);
        ST_out[i] = S;
        z = S > 0 ? pT * hsum<ct>(vd) / S : ct(0);
        zT_out[i] = z;
      }
      if (pT > 0 && pTm1 > 0) {
        const V vp(pT), vz(z), vq(pTm1);
        for (int64_t j = 0; j < K; j += kVS) {
          const int64_t n = imin(kVS, K - j);
          const V k = V::loadu(tmp + j);
          const V coef = at::vec::fmsub(load_as<ct>(grow + j, n), vp, vz);  // p^T G - z^T
          at::vec::fmadd(coef, k, V::loadu(accG + j)).store(accG + j);
          at::vec::fmadd(vq, k, V::loadu(accS + j)).store(accS + j);
        }
      } else if (pT > 0) {
        const V vp(pT), vz(z);
        for (int64_t j = 0; j < K; j += kVS) {
          const V coef = at::vec::fmsub(load_as<ct>(grow + j, imin(kVS, K - j)), vp, vz);
          at::vec::fmadd(coef, V::loadu(tmp + j), V::loadu(accG + j)).store(accG + j);
        }
      } else if (pTm1 > 0) {
        const V vq(pTm1);
        for (int64_t j = 0; j < K; j += kVS)
          at::vec::fmadd(vq, V::loadu(tmp + j), V::loadu(accS + j)).store(accS + j);
      }
    }
  }

  // Reverse pass for column step t (t >= 2) and row step t-1 on rows [i0, i1):
  // F^{t-1}_i = -p^{t-1}_i (K y^t)_i, S^{t-1} = K w^{t-1}, z^{t-1} = F^{t-1} / S^{t-1};
  // accumulates sum_i -z^{t-1}_i K_ij (Gg^{t-1} / w^{t-1}) and sum_i p^{t-2}_i K_ij (Sig^{t-1}).
  void mid_rows_factored(int64_t i0, int64_t i1, int64_t t, ct* accG, ct* accS) const {
    const int64_t K = K_;
    const ct* const Kbuf = buf_;
    const ct* const Mrow = M_;
    const ct* const p1 = P_at(t - 1);
    const ct* const p2 = P_at(t - 2);
    const ct* const yt = Y_at(t);
    const ct* const w1 = W_at(t - 1);
    ct* const z1 = Z_at(t - 1);
    ct* const s1 = S_at(t - 1);
    for (int64_t i = i0; i < i1; ++i) {
      z1[i] = 0;
      s1[i] = 0;
      if (!(Mrow[i] > kNegInf)) continue;
      const ct* krow = Kbuf + i * K;
      ct z = 0;
      if (p1[i] > 0) {
        z = row_z(krow, yt, w1, p1[i], &s1[i]);
        z1[i] = z;
      }
      const ct q = p2[i];
      if (z != 0 && q > 0) {
        const V vz(-z), vq(q);
        for (int64_t j = 0; j < K; j += kVS) {
          const V k = V::loadu(krow + j, imin(kVS, K - j));
          at::vec::fmadd(vz, k, V::loadu(accG + j)).store(accG + j);
          at::vec::fmadd(vq, k, V::loadu(accS + j)).store(accS + j);
        }
      } else if (z != 0 || q > 0) {
        const V vc(z != 0 ? -z : q);
        ct* acc = z != 0 ? accG : accS;
        for (int64_t j = 0; j < K; j += kVS)
          at::vec::fmadd(vc, V::loadu(krow + j, imin(kVS, K - j)), V::loadu(acc + j)).store(acc + j);
      }
    }
  }

  // Sig^1 = K^T p^0 when T == 1 (pass 0 could not know p^0's normalisation yet).
  void sigma_rows(int64_t i0, int64_t i1, const ct* p, ct* accS) const {
    const int64_t K = K_;
    const ct* const Kbuf = buf_;
    for (int64_t i = i0; i < i1; ++i) {
      if (!(p[i] > 0)) continue;
      const ct* krow = Kbuf + i * K;
      const V vq(p[i]);
      for (int64_t j = 0; j < K; j += kVS)
        at::vec::fmadd(vq, V::loadu(krow + j, imin(kVS, K - j)), V::loadu(accS + j)).store(accS + j);
    }
  }

  // Final pass on rows [i0, i1) and columns [j0, j1):
  // grad_ij = K_ij (p^T_i w^T_j G_ij - sum_t (z^t_i w^t_j + p^{t-1}_i y^t_j)) / eps, in place over K.
  // Products are ordered so that no intermediate exceeds the size of a term of the result.
  void assemble_rows(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t T, ct* coef) const {
    const int64_t K = K_, Np = Np_, Kp = Kp_;
    const ct* const Kbuf = buf_;
    const ct* const Mrow = M_;
    const in_t* const grad = G_;
    in_t* const out = out_;
    const ct* const pT = P_at(T);
    const ct* const W = Wt_;
    const ct* const Y = Yt_;
    const ct* const Z = Zt_;
    const ct* const Pm = Pt_;
    const ct* const wT = W + T * Kp;
    // grad = dx / eps: one multiply by 1/eps instead of a division per element (<= 1 ulp apart).
    const V vinv(ct(1) / eps_);
    for (int64_t i = i0; i < i1; ++i) {
      ct* krow = const_cast<ct*>(Kbuf) + i * K;
      in_t* orow = out + i * K;
      if (!(Mrow[i] > kNegInf)) {  // masked row: no gradient
        for (int64_t j = j0; j < j1; j += kVS) store_as<in_t, ct>(orow + j, V(0), imin(kVS, j1 - j));
        continue;
      }
      // This row's coefficients (z^t_i, p^{t-1}_i), t = 1..T, contiguous for the inner loop.
      for (int64_t t = 1; t <= T; ++t) {
        coef[2 * t - 2] = Z[t * Np + i];
        coef[2 * t - 1] = Pm[(t - 1) * Np + i];
      }
      const in_t* grow = grad + i * K;
      const V vpT(pT[i]);
      for (int64_t j = j0; j < j1; j += kVS) {
        const int64_t n = imin(kVS, j1 - j);
        const V k = V::loadu(krow + j, n);
        V d = load_as<ct>(grow + j, n) * vpT * (k * V::loadu(wT + j));
        const ct* wt = W + Kp + j;
        const ct* yt = Y + Kp + j;
        for (int64_t t = 0; t < T; ++t, wt += Kp, yt += Kp) {
          d = d - V(coef[2 * t]) * (k * V::loadu(wt));
          d = d - (k * V(coef[2 * t + 1])) * V::loadu(yt);
        }
        store_as<in_t, ct>(orow + j, d * vinv, n);
      }
    }
  }

  // Sig^t check and y^t = Gg^t / Sig^t (0 on columns without mass). False when a live column's
  // normaliser is too small for the underflowed entries of K (times max p^{t-1}) to be negligible.
  bool set_y(int64_t t) {
    const ct* p = P_at(t - 1);
    ct pmax = 0;
    for (int64_t i = 0; i < N_; ++i) pmax = tmax(pmax, p[i]);
    const ct thr = ct(N_) * std::numeric_limits<ct>::min() * (pmax + 1) / Tuning<ct>::kRel;
    const ct* w = W_at(t);
    ct* y = Y_at(t);
    for (int64_t j = 0; j < K_; ++j) {
      if (!(w[j] > 0)) {
        y[j] = 0;
        continue;
      }
      if (!(sig_[j] >= thr && sig_[j] < kInf)) return false;
      y[j] = gg_[j] / sig_[j];
      if (!(std::abs(y[j]) < kInf)) return false;
    }
    fill(y + K_, ct(0), Kp_ - K_);
    return true;
  }

  // S^t check (row normalisers of A^t), same bound with max w^t.
  bool check_S(int64_t t) const {
    const ct* w = W_at(t);
    ct wmax = 0;
    for (int64_t j = 0; j < K_; ++j) wmax = tmax(wmax, w[j]);
    const ct thr = ct(K_) * std::numeric_limits<ct>::min() * (wmax + 1) / Tuning<ct>::kRel;
    const ct* p = P_at(t);
    const ct* S = S_at(t);
    for (int64_t i = 0; i < N_; ++i)
      if (p[i] > 0 && !(S[i] >= thr && S[i] < kInf)) return false;
    return true;
  }

  // ---- factored path, cache-resident problems ---------------------------------------------------
  // The passes split into phases over all rows: per-row work that ends in horizontal sums, then the
  // row factors vectorised over rows, then the column sums with register accumulators. Requires
  // every row of K in buf_ to be finite.

  // accA_j = sum_i cA_i K_ij with cA_i = ga_i G_ij - ca_i (kWithG) or ca_i, and
  // accB_j = sum_i cb_i K_ij, four column vectors at a time, then the remaining ones (the last one
  // partial: padding lanes -> 0) one at a time.
  template <bool kWithA, bool kWithG, bool kWithB>
  void colsums_in_cache(const ct* ga, const ct* ca, const ct* cb, ct* accA, ct* accB) const {
    int64_t jb = 0;
    for (; jb + 4 * kVS <= K_; jb += 4 * kVS)
      colsum_vectors<4, kWithA, kWithG, kWithB>(jb, kVS, ga, ca, cb, accA, accB);
    for (; jb < K_; jb += kVS)
      colsum_vectors<1, kWithA, kWithG, kWithB>(jb, imin(kVS, K_ - jb), ga, ca, cb, accA, accB);
  }

  // The U column vectors from jb of colsums_in_cache, accumulated in registers over all rows; the
  // last one has n_last valid lanes.
  template <int U, bool kWithA, bool kWithG, bool kWithB>
  __attribute__((always_inline)) void colsum_vectors(int64_t jb, int64_t n_last, const ct* ga, const ct* ca,
                                                     const ct* cb, ct* accA, ct* accB) const {
    const int64_t N = N_, K = K_;
    const ct* const Kb = buf_;
    const in_t* const grad = G_;
    V a[U], b[U];
    for (int u = 0; u < U; ++u) a[u] = b[u] = V(0);
    for (int64_t i = 0; i < N; ++i) {
      V k[U];
      for (int u = 0; u < U; ++u) k[u] = V::loadu(Kb + i * K + jb + u * kVS, u == U - 1 ? n_last : kVS);
      if constexpr (kWithA) {
        const V vc(ca[i]);
        if constexpr (kWithG) {
          const in_t* g = grad + i * K + jb;
          const V vg(ga[i]);
          for (int u = 0; u < U; ++u) {
            const V gu = load_as<ct>(g + u * kVS, u == U - 1 ? n_last : kVS);
            a[u] = at::vec::fmadd(at::vec::fmsub(gu, vg, vc), k[u], a[u]);
          }
        } else {
          for (int u = 0; u < U; ++u) a[u] = at::vec::fmadd(vc, k[u], a[u]);
        }
      }
      if constexpr (kWithB) {
        const V vq(cb[i]);
        for (int u = 0; u < U; ++u) b[u] = at::vec::fmadd(vq, k[u], b[u]);
      }
    }
    for (int u = 0; u < U; ++u) {
      if constexpr (kWithA) a[u].store(accA + jb + u * kVS);
      if constexpr (kWithB) b[u].store(accB + jb + u * kVS);
    }
  }

  // Pass 0 for a cache-resident problem: accG = chunk 0 / 0, accS = chunk 0 / 1.
  bool top_in_cache(int64_t T, ct CT, ct CTm1) {
    const int64_t N = N_, K = K_;
    const in_t* const scores = s_;
    const in_t* const grad = G_;
    const bool* const mask = mask_;
    ct* const Kbuf = buf_;
    ct* const Mrow = M_;
    const ct* const wT = W_at(T);
    ct* const S = S_at(T);
    ct* const Z = Z_at(T);
    ct* const tmp = chunk_array(0, 2);
    for (int64_t i = 0; i < N; ++i) {
      ct* krow = Kbuf + i * K;
      const in_t* grow = grad + i * K;
      const ct M = mask[i] ? scaled_row<ct>(scores + i * K, K, eps_, inv_eps_, tmp) : kNegInf;
      Mrow[i] = M;
      if (!(M > kNegInf)) {  // masked (or empty) row: zero K row, no terms
        fill(krow, ct(0), K);
        S[i] = 0;
        Z[i] = 0;
        continue;
      }
      const V vM(M);
      V vd(0), vs(0);
      for (int64_t j = 0; j < K; j += kVS) {
        const int64_t n = imin(kVS, K - j);
        const V k = vexp<ct, false>(V::loadu(tmp + j) - vM);
        k.store(krow + j, n);
        const V kw = k * V::loadu(wT + j);
        vs = vs + kw;
        vd = at::vec::fmadd(load_as<ct>(grow + j, n), kw, vd);
      }
      S[i] = hsum<ct>(vs);
      Z[i] = hsum<ct>(vd);  // sum_j G K w^T for now; z^T below
    }
    if (!set_p(T, CT)) return false;
    if (T >= 2 && !set_p(T - 1, CTm1)) return false;
    const ct* const pT = P_at(T);
    for (int64_t i = 0; i < N; ++i) Z[i] = (pT[i] > 0 && S[i] > 0) ? pT[i] * Z[i] / S[i] : ct(0);
    if (T >= 2) {
      colsums_in_cache<true, true, true>(pT, Z, P_at(T - 1), chunk_array(0, 0), chunk_array(0, 1));
    } else {
      colsums_in_cache<true, true, false>(pT, Z, nullptr, chunk_array(0, 0), nullptr);
    }
    return true;
  }

  // Reverse pass t (>= 2) for a cache-resident problem.
  void mid_in_cache(int64_t t) {
    const int64_t N = N_, K = K_;
    const ct* const Kbuf = buf_;
    const ct* const p1 = P_at(t - 1);
    const ct* const yt = Y_at(t);
    const ct* const w1 = W_at(t - 1);
    ct* const z1 = Z_at(t - 1);
    ct* const s1 = S_at(t - 1);
    for (int64_t i = 0; i < N; ++i) {
      z1[i] = 0;
      s1[i] = 0;
      if (!(p1[i] > 0)) continue;
      const ct* krow = Kbuf + i * K;
      z1[i] = row_z(krow, yt, w1, p1[i], &s1[i]);
    }
    // accG_j = -sum_i z^{t-1}_i K_ij: accumulate with +z and negate (exact).
    colsums_in_cache<true, false, true>(nullptr, z1, P_at(t - 2), chunk_array(0, 0), chunk_array(0, 1));
    ct* accG = chunk_array(0, 0);
    for (int64_t j = 0; j < Kp_; ++j) accG[j] = -accG[j];
  }

  bool solve_factored(int64_t T) {
    // Column factors w^t = exp(g^t + C^t) <= 1 (C^t = -max g^t); live columns must not underflow.
    ct* C = Ct_;
    for (int64_t t = 1; t <= T; ++t) {
      const ct* g = g_at(t);
      ct gmax = kNegInf;
      for (int64_t j = 0; j < K_; ++j) gmax = tmax(gmax, g[j]);
      C[t] = gmax > kNegInf ? -gmax : ct(0);
      ct* w = W_at(t);
      for (int64_t j = 0; j < K_; j += kVS) {
        const int64_t n = imin(kVS, K_ - j);
        (V::loadu(g + j, n) + V(C[t])).exp().store(w + j, n);
      }
      for (int64_t j = 0; j < K_; ++j) {
        if (!(g[j] > kNegInf)) w[j] = 0;
        else if (!(w[j] >= std::numeric_limits<ct>::min() && w[j] < kInf)) return false;
      }
      fill(w + K_, ct(0), Kp_ - K_);
    }
    // Pass 0: K, M, p^T, p^{T-1}, z^T, Gg^T, Sig^T.
    const ct CTm1 = T >= 2 ? C[T - 1] : ct(0);
    const bool in_cache = n_chunks_ == 1 && N_ * K_ <= kCacheResidentElements;
    if (in_cache) {
      if (!top_in_cache(T, C[T], CTm1)) return false;
    } else {
      for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
        fill(chunk_array(c, 0), ct(0), Kp_);
        fill(chunk_array(c, 1), ct(0), Kp_);
        top_rows_factored(i0, i1, T, C[T], CTm1, chunk_array(c, 0), chunk_array(c, 1), chunk_array(c, 2));
      });
    }
    for (int64_t i = 0; i < N_; ++i) {
      const ct pT = P_at(T)[i], pTm1 = T >= 2 ? P_at(T - 1)[i] : ct(0);
      if (!(pT < kInf) || !(pTm1 < kInf)) return false;
      if (f_at(T)[i] > kNegInf && M_[i] > kNegInf && !(pT >= std::numeric_limits<ct>::min())) return false;
      if (T >= 2 && f_at(T - 1)[i] > kNegInf && M_[i] > kNegInf && !(pTm1 >= std::numeric_limits<ct>::min()))
        return false;
    }
    reduce_chunks(0, gg_);
    for (int64_t j = 0; j < Kp_; ++j) gg_[j] *= W_at(T)[j];
    // Remaining row factors: C^0 = max M (f^0 = 0), C^t for 1 <= t <= T-2 as above.
    ct Mmax = kNegInf;
    for (int64_t i = 0; i < N_; ++i) Mmax = tmax(Mmax, M_[i]);
    C[0] = Mmax > kNegInf ? Mmax : ct(0);
    for (int64_t t = 0; t <= T - 2; ++t)
      if (!set_p(t, C[t])) return false;
    if (T == 1) {
      if (!set_p(0, C[0])) return false;
      if (in_cache) {
        colsums_in_cache<false, false, true>(nullptr, nullptr, P_at(0), nullptr, chunk_array(0, 1));
      } else {
        for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
          fill(chunk_array(c, 1), ct(0), Kp_);
          sigma_rows(i0, i1, P_at(0), chunk_array(c, 1));
        });
      }
    }
    reduce_chunks(1, sig_);
    // Reverse passes t = T..2.
    for (int64_t t = T; t >= 2; --t) {
      if (!set_y(t)) return false;
      if (in_cache) {
        mid_in_cache(t);
      } else {
        for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
          fill(chunk_array(c, 0), ct(0), Kp_);
          fill(chunk_array(c, 1), ct(0), Kp_);
          mid_rows_factored(i0, i1, t, chunk_array(c, 0), chunk_array(c, 1));
        });
      }
      reduce_chunks(0, gg_);
      for (int64_t j = 0; j < Kp_; ++j) gg_[j] *= W_at(t - 1)[j];
      reduce_chunks(1, sig_);
    }
    if (!set_y(1)) return false;
    for (int64_t t = 1; t <= T; ++t)
      if (!check_S(t)) return false;
    // Final assembly, column tiles so that the 2T factor vectors of a tile stay in cache.
    for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
      ct* coef = chunk_coef_ + c * 2 * (Ttot_ + 1);
      for (int64_t j0 = 0; j0 < K_; j0 += kTileCols)
        assemble_rows(i0, i1, j0, imin(K_, j0 + kTileCols), T, coef);
    });
    return true;
  }

  // ---- direct path ------------------------------------------------------------------------------

  void set_padded(ct* dst, const ct* src) const {
    copy(dst, src, K_);
    fill(dst + K_, kNegInf, Kp_ - K_);
  }

  // Row-step factors for the duals f (after a row step): phi_i = f_i - log r_i, the exponent offset
  // of A = softmax_j(x + g) = exp(x + g + phi) used by direct exps (-inf on rows without mass), and
  // rho_max_ = max 1 / r_i: E = exp(x + f + g) is r_i * A, so an entry of E that underflowed is an
  // error of up to 1 / r_i times the smallest normal in A, which decides direct mode.
  void set_row_factors(const ct* f) {
    rho_max_ = 0;
    for (int64_t i = 0; i < N_; ++i) {
      const bool ok = f[i] > kNegInf && reff_[i] > 0;
      phi_[i] = ok ? f[i] - logr_[i] : kNegInf;
      if (ok) rho_max_ = tmax(rho_max_, ct(1) / reff_[i]);
    }
  }

  // Column-step factors of iteration t from g^t: h = g^t - log c (-inf on zero-mass columns), and
  // gamma = exp(h - g^{t-1}) (B^t = E * gamma). Returns max gamma (inf when a column gained mass
  // from -inf, which forces direct exps).
  ct set_column_factors(const ct* gt, bool with_gamma) {
    for (int64_t j = 0; j < K_; ++j)
      h_[j] = (gt[j] > kNegInf && logc_[j] > kNegInf) ? gt[j] - logc_[j] : kNegInf;
    fill(h_ + K_, kNegInf, Kp_ - K_);
    if (!with_gamma) return 0;
    for (int64_t j = 0; j < Kp_; j += kVS) {
      const V h = V::loadu(h_ + j);
      const V e = vexp<ct>(h - V::loadu(gprev_ + j));
      V::blendv(e, V(0), h == V(kNegInf)).store(gamma_ + j);
    }
    ct gmax = 0;
    for (int64_t j = 0; j < K_; ++j) gmax = (gamma_[j] > gmax || gamma_[j] != gamma_[j]) ? gamma_[j] : gmax;
    return gmax;
  }

  // Q's gradient and row step T: dx = G Q - F_i A^T_ij with F = rowsum(G Q), and the column sums of
  // dx (Gg of column step T). gT is in gprev_ (padded -inf). A^T = Q / rowsum(Q), the exact
  // normalisation (Q / r_i would carry the rounding of the saved f^T).
  void top_rows_direct(int64_t i0, int64_t i1, const ct* fT, bool direct, ct* acc, ct* tmpA) const {
    for (int64_t i = i0; i < i1; ++i) {
      ct* dxr = buf_ + i * K_;
      if (!(fT[i] > kNegInf)) {  // Q row is 0: so are dx and the row-step term
        fill(dxr, ct(0), K_);
        continue;
      }
      const in_t* srow = s_ + i * K_;
      const in_t* grow = G_ + i * K_;
      const V vf(fT[i]), vphi(phi_[i]);
      V vF(0), vS(0);
      for (int64_t j = 0; j < K_; j += kVS) {
        const int64_t n = imin(kVS, K_ - j);
        const V x = load_x(srow + j, n);
        const V gj = V::loadu(gprev_ + j);
        const V E = vexp<ct>(x + vf + gj);
        const V a = direct ? vexp<ct>(x + gj + vphi) : E;
        a.store(tmpA + j);
        vS = vS + a;
        const V w = load_as<ct>(grow + j, n) * E;
        w.store(dxr + j, n);
        vF = vF + w;
      }
      const ct S = hsum<ct>(vS);
      const V coef(S > 0 ? hsum<ct>(vF) / S : ct(0));
      for (int64_t j = 0; j < K_; j += kVS) {
        const int64_t n = imin(kVS, K_ - j);
        const V d = V::loadu(dxr + j, n) - V::loadu(tmpA + j) * coef;
        d.store(dxr + j, n);
        (V::loadu(acc + j) + d).store(acc + j);
      }
    }
  }

  // Reverse iteration t >= 2: column step t (dx -= Gg_j B^t_ij, F_i = -sum_j Gg_j B^t_ij) then row
  // step t-1 (dx -= F_i A^{t-1}_ij, acc_j -= F_i A^{t-1}_ij). gprev_ = g^{t-1}, gg_ = Gg of column
  // step t. E = exp(x + f^{t-1} + g^{t-1}) gives B^t = E * gamma_j and A^{t-1} = E / rowsum(E); in
  // direct mode B and A get their own exps.
  void mid_rows_direct(int64_t i0, int64_t i1, const ct* fprev, bool direct, ct* acc, ct* tmpA) const {
    for (int64_t i = i0; i < i1; ++i) {
      if (!(fprev[i] > kNegInf)) continue;  // E, A and B rows are all 0
      ct* dxr = buf_ + i * K_;
      const in_t* srow = s_ + i * K_;
      const V vf(fprev[i]), vphi(phi_[i]);
      V vF(0), vS(0);
      for (int64_t j = 0; j < K_; j += kVS) {
        const int64_t n = imin(kVS, K_ - j);
        const V x = load_x(srow + j, n);
        const V gj = V::loadu(gprev_ + j);
        V Bm, a;
        if (!direct) {
          a = vexp<ct>(x + vf + gj);
          Bm = a * V::loadu(gamma_ + j);
        } else {
          Bm = vexp<ct>(x + vf + V::loadu(h_ + j));
          a = vexp<ct>(x + gj + vphi);
        }
        a.store(tmpA + j);
        vS = vS + a;
        const V gb = V::loadu(gg_ + j) * Bm;
        (V::loadu(dxr + j, n) - gb).store(dxr + j, n);
        vF = vF + gb;
      }
      const ct S = hsum<ct>(vS);
      const V coef(S > 0 ? -hsum<ct>(vF) / S : ct(0));
      for (int64_t j = 0; j < K_; j += kVS) {
        const int64_t n = imin(kVS, K_ - j);
        const V fa = V::loadu(tmpA + j) * coef;
        (V::loadu(dxr + j, n) - fa).store(dxr + j, n);
        (V::loadu(acc + j) - fa).store(acc + j);
      }
    }
  }

  // Column step 1 (valid rows: f^0 = 0, including zero-mass ones) and grad = dx / eps.
  void bottom_rows_direct(int64_t i0, int64_t i1) const {
    const V veps(eps_);
    for (int64_t i = i0; i < i1; ++i) {
      ct* dxr = buf_ + i * K_;
      in_t* orow = out_ + i * K_;
      const in_t* srow = s_ + i * K_;
      const bool valid = f0_[i] > kNegInf;
      for (int64_t j = 0; j < K_; j += kVS) {
        const int64_t n = imin(kVS, K_ - j);
        V d = V::loadu(dxr + j, n);
        if (valid) d = d - V::loadu(gg_ + j) * vexp<ct>(load_x(srow + j, n) + V::loadu(h_ + j));
        store_as<in_t, ct>(orow + j, d / veps, n);
      }
    }
  }

  void solve_direct(int64_t T) {
    set_row_factors(f_at(T));
    set_padded(gprev_, g_at(T));
    bool direct = rho_max_ > Tuning<ct>::kLimit;
    for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
      ct* acc = chunk_array(c, 0);
      fill(acc, ct(0), Kp_);
      top_rows_direct(i0, i1, f_at(T), direct, acc, chunk_array(c, 2));
    });
    reduce_chunks(0, gg_);
    for (int64_t t = T; t >= 2; --t) {
      const ct* fprev = f_at(t - 1);
      set_row_factors(fprev);
      set_padded(gprev_, g_at(t - 1));
      const ct gmax = set_column_factors(g_at(t), /*with_gamma=*/true);
      direct = !(gmax <= Tuning<ct>::kLimit) || rho_max_ > Tuning<ct>::kLimit;
      for_row_chunks(N_, n_chunks_, [&](int64_t c, int64_t i0, int64_t i1) {
        ct* acc = chunk_array(c, 0);
        fill(acc, ct(0), Kp_);
        mid_rows_direct(i0, i1, fprev, direct, acc, chunk_array(c, 2));
      });
      reduce_chunks(0, gg_);
    }
    set_column_factors(g_at(1), /*with_gamma=*/false);
    for_row_chunks(N_, n_chunks_, [&](int64_t, int64_t i0, int64_t i1) { bottom_rows_direct(i0, i1); });
  }

  const sinkhorn::BackwardArgs& a_;
  const int64_t N_, K_, Kp_, Np_, Ttot_, n_chunks_;
  const ct eps_, inv_eps_;
  Scratch scratch_;
  ct *reff_, *logr_, *f0_, *phi_, *M_;
  ct *Pt_, *Zt_, *St_;
  ct *ceff_, *logc_, *gprev_, *h_, *gamma_, *gg_, *sig_;
  ct *Wt_, *Yt_, *Ct_;
  ct* chunk_;
  ct* chunk_coef_;
  ct* buf_scratch_ = nullptr;
  ct rho_max_ = 0;
  // current problem
  const in_t* s_ = nullptr;
  const in_t* G_ = nullptr;
  const bool* mask_ = nullptr;
  const ct* hf_ = nullptr;
  const ct* hg_ = nullptr;
  in_t* out_ = nullptr;
  ct* buf_ = nullptr;  // K (factored path) or dx (direct path), compute dtype; the output when possible
};

// =============================================================================================
// Scheduling
// =============================================================================================

// Problems [0, bulk) are spread over threads whole; the remaining ones (only large problems, fewer
// than the threads) run one after the other with their passes parallel over row chunks.
template <typename Solver, typename Args>
void run_batch(const Args& a) {
  const int64_t B = a.batch;
  if (B <= 0) return;
  const int64_t threads = at::in_parallel_region() ? 1 : tmax<int64_t>(1, at::get_num_threads());
  const bool large = a.n * a.k >= kRowParallelMinElements;
  int64_t bulk = B;
  if (threads > 1 && large) bulk = B / threads * threads;
  if (bulk > 0) {
    // At least ~kRowParallelMinElements elements per task: tiny batches stay on the calling thread.
    const int64_t grain = tmax<int64_t>(1, kRowParallelMinElements / tmax<int64_t>(1, a.n * a.k));
    at::parallel_for(0, bulk, grain, [&](int64_t b0, int64_t b1) {
      Solver solver(a, 1);
      for (int64_t b = b0; b < b1; ++b) solver.solve(b);
    });
  }
  if (bulk < B) {
    Solver solver(a, imin(threads, tmax<int64_t>(1, a.n)));
    for (int64_t b = bulk; b < B; ++b) solver.solve(b);
  }
}

// The solver for the dtype of the arguments (16-bit types compute in float32).
template <template <typename, typename> class Solver, typename Args>
void run_for_dtype(const Args& a) {
  using sinkhorn::DType;
  switch (a.dtype) {
    case DType::Float: return run_batch<Solver<float, float>>(a);
    case DType::Double: return run_batch<Solver<double, double>>(a);
    case DType::BFloat16: return run_batch<Solver<c10::BFloat16, float>>(a);
    case DType::Half: return run_batch<Solver<c10::Half, float>>(a);
  }
}

}  // namespace

void sinkhorn_forward_kernel(const sinkhorn::ForwardArgs& a) { run_for_dtype<ForwardSolver>(a); }
void sinkhorn_backward_kernel(const sinkhorn::BackwardArgs& a) { run_for_dtype<BackwardSolver>(a); }

}  // namespace CPU_CAPABILITY
}  // namespace ovseg_fast

// =============================================================================================
// Root compilation: argument checks, output allocation, dispatch and registration.
// =============================================================================================
#ifdef OVSEG_DISPATCH_ROOT

#include <ATen/ATen.h>
#include <torch/library.h>

OVSEG_DECLARE_KERNEL(void, sinkhorn_forward_kernel, (const ::ovseg_fast::sinkhorn::ForwardArgs&))
OVSEG_DECLARE_KERNEL(void, sinkhorn_backward_kernel, (const ::ovseg_fast::sinkhorn::BackwardArgs&))

namespace ovseg_fast {
namespace {

using at::Tensor;

sinkhorn::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return sinkhorn::DType::Float;
    case at::kDouble: return sinkhorn::DType::Double;
    case at::kBFloat16: return sinkhorn::DType::BFloat16;
    case at::kHalf: return sinkhorn::DType::Half;
    default: break;
  }
  TORCH_CHECK(false, "sinkhorn: scores must be float32, float64, bfloat16 or float16, got ", t);
  return sinkhorn::DType::Float;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks shared by forward and backward; returns (B, N, K). A null mask or marginal is absent.
std::tuple<int64_t, int64_t, int64_t> check_problem(const char* op, const Tensor& scores, const Tensor* mask,
                                                    const Tensor* row_marginals, const Tensor* col_marginals,
                                                    double epsilon) {
  TORCH_CHECK(scores.device().is_cpu() && scores.layout() == at::kStrided, op, ": scores must be a dense CPU tensor");
  TORCH_CHECK(scores.dim() == 3, op, ": scores must be (B, N, K), got ", scores.sizes());
  kernel_dtype(scores.scalar_type());
  const int64_t B = scores.size(0), N = scores.size(1), K = scores.size(2);
  const auto ct = compute_dtype(scores.scalar_type());
  if (mask) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool, op, ": mask must be a CPU bool tensor");
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == N, op, ": mask must be (B, N) = (", B,
                ", ", N, "), got ", mask->sizes());
  }
  const auto check_marginal = [&](const Tensor* t, const char* name, int64_t size, const char* dims) {
    if (!t) return;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == ct, op, ": ", name, " must be a CPU tensor of dtype ",
                ct, ", got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == size, op, ": ", name, " must be ", dims, " = (",
                B, ", ", size, "), got ", t->sizes());
  };
  check_marginal(row_marginals, "row_marginals", N, "(B, N)");
  check_marginal(col_marginals, "col_marginals", K, "(B, K)");
  TORCH_CHECK(std::isfinite(epsilon) && epsilon > 0, op, ": epsilon must be positive and finite, got ", epsilon);
  return {B, N, K};
}

void run_forward(const Tensor& scores, const Tensor* mask, const Tensor* row_marginals, const Tensor* col_marginals,
                 double epsilon, int64_t n_iters, double tol, int64_t check_every, Tensor& plan, Tensor* log_u,
                 Tensor* log_v, Tensor* n_done) {
  const char* op = log_u ? "sinkhorn_cpu_forward" : "sinkhorn_cpu_plan";
  TORCH_CHECK(n_iters >= 1, op, ": n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK(check_every >= 1, op, ": check_every must be >= 1, got ", check_every);
  // expect_contiguous: no copy (not even a refcount bump) when the input is already contiguous.
  const auto s = scores.expect_contiguous();
  const auto contiguous = [](const Tensor* t) { return t ? t->contiguous() : Tensor(); };
  const Tensor m = contiguous(mask), r = contiguous(row_marginals), c = contiguous(col_marginals);
  sinkhorn::ForwardArgs args{};
  args.dtype = kernel_dtype(scores.scalar_type());
  args.scores = s->data_ptr();
  args.mask = m.defined() ? m.data_ptr<bool>() : nullptr;
  args.row_marginals = r.defined() ? r.data_ptr() : nullptr;
  args.col_marginals = c.defined() ? c.data_ptr() : nullptr;
  args.plan = plan.data_ptr();
  args.log_u = log_u ? log_u->data_ptr() : nullptr;
  args.log_v = log_v ? log_v->data_ptr() : nullptr;
  args.n_done = n_done ? n_done->data_ptr<int64_t>() : nullptr;
  args.batch = scores.size(0);
  args.n = scores.size(1);
  args.k = scores.size(2);
  args.n_iters = n_iters;
  args.check_every = check_every;
  args.epsilon = ovseg_fast::planted_bug("sinkhorn") ? 1.5 * epsilon : epsilon;
  args.tol = tol;
  OVSEG_DISPATCH_KERNEL(sinkhorn_forward_kernel, args);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sinkhorn_cpu_forward(const Tensor& scores, const Tensor& mask,
                                                               const Tensor& row_marginals,
                                                               const Tensor& col_marginals, double epsilon,
                                                               int64_t n_iters, double tol, int64_t check_every) {
  const auto [B, N, K] =
      check_problem("sinkhorn_cpu_forward", scores, &mask, &row_marginals, &col_marginals, epsilon);
  const auto ct_opts = scores.options().dtype(compute_dtype(scores.scalar_type()));
  Tensor plan = at::empty({B, N, K}, scores.options());
  Tensor log_u = at::empty({B, n_iters, N}, ct_opts);
  Tensor log_v = at::empty({B, n_iters, K}, ct_opts);
  Tensor n_done = at::empty({B}, scores.options().dtype(at::kLong));
  run_forward(scores, &mask, &row_marginals, &col_marginals, epsilon, n_iters, tol, check_every, plan, &log_u,
              &log_v, &n_done);
  return {plan, log_u, log_v, n_done};
}

// The plan alone (no duals for a backward); absent mask / marginals take default_marginals' values.
Tensor sinkhorn_cpu_plan(const Tensor& scores, const std::optional<Tensor>& mask,
                         const std::optional<Tensor>& row_marginals, const std::optional<Tensor>& col_marginals,
                         double epsilon, int64_t n_iters, double tol, int64_t check_every) {
  const auto ptr = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; };
  const auto [B, N, K] =
      check_problem("sinkhorn_cpu_plan", scores, ptr(mask), ptr(row_marginals), ptr(col_marginals), epsilon);
  Tensor plan = at::empty({B, N, K}, scores.options());
  if (plan.numel() == 0) return plan.zero_();
  run_forward(scores, ptr(mask), ptr(row_marginals), ptr(col_marginals), epsilon, n_iters, tol, check_every, plan,
              nullptr, nullptr, nullptr);
  return plan;
}

Tensor sinkhorn_cpu_backward(const Tensor& grad_plan, const Tensor& scores, const Tensor& mask,
                             const Tensor& row_marginals, const Tensor& col_marginals, const Tensor& log_u,
                             const Tensor& log_v, const Tensor& n_done, double epsilon) {
  const auto [B, N, K] =
      check_problem("sinkhorn_cpu_backward", scores, &mask, &row_marginals, &col_marginals, epsilon);
  const auto ct = compute_dtype(scores.scalar_type());
  TORCH_CHECK(grad_plan.device().is_cpu() && grad_plan.scalar_type() == scores.scalar_type() &&
                  grad_plan.sizes() == scores.sizes(),
              "sinkhorn_cpu_backward: grad_plan must be a CPU tensor with the dtype and shape of scores");
  TORCH_CHECK(log_u.device().is_cpu() && log_u.scalar_type() == ct && log_u.dim() == 3 && log_u.size(0) == B &&
                  log_u.size(2) == N,
              "sinkhorn_cpu_backward: log_u must be (B, n_iters, N) of dtype ", ct, ", got ", log_u.sizes(), " ",
              log_u.scalar_type());
  const int64_t T = log_u.size(1);
  TORCH_CHECK(log_v.device().is_cpu() && log_v.scalar_type() == ct && log_v.dim() == 3 && log_v.size(0) == B &&
                  log_v.size(1) == T && log_v.size(2) == K,
              "sinkhorn_cpu_backward: log_v must be (B, n_iters, K) = (", B, ", ", T, ", ", K, ") of dtype ", ct,
              ", got ", log_v.sizes(), " ", log_v.scalar_type());
  TORCH_CHECK(n_done.device().is_cpu() && n_done.scalar_type() == at::kLong && n_done.dim() == 1 &&
                  n_done.size(0) == B,
              "sinkhorn_cpu_backward: n_done must be a (B,) int64 CPU tensor");
  const auto nd = n_done.expect_contiguous();
  const int64_t* ndp = nd->data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ndp[b] >= 1 && ndp[b] <= T, "sinkhorn_cpu_backward: n_done[", b, "] = ", ndp[b],
                " is outside [1, n_iters = ", T, "]");
  const auto g = grad_plan.expect_contiguous();
  const auto s = scores.expect_contiguous();
  const auto m = mask.expect_contiguous();
  const auto r = row_marginals.expect_contiguous();
  const auto c = col_marginals.expect_contiguous();
  const auto lu = log_u.expect_contiguous();
  const auto lv = log_v.expect_contiguous();
  Tensor grad = at::empty({B, N, K}, scores.options());

  sinkhorn::BackwardArgs args{};
  args.dtype = kernel_dtype(scores.scalar_type());
  args.grad_plan = g->data_ptr();
  args.scores = s->data_ptr();
  args.mask = m->data_ptr<bool>();
  args.row_marginals = r->data_ptr();
  args.col_marginals = c->data_ptr();
  args.log_u = lu->data_ptr();
  args.log_v = lv->data_ptr();
  args.n_done = ndp;
  args.grad_scores = grad.data_ptr();
  args.batch = B;
  args.n = N;
  args.k = K;
  args.n_iters = T;
  args.epsilon = epsilon;
  OVSEG_DISPATCH_KERNEL(sinkhorn_backward_kernel, args);
  return grad;
}

}  // namespace
}  // namespace ovseg_fast

TORCH_LIBRARY_FRAGMENT(ovseg_fast, m) {
  m.def(
      "sinkhorn_cpu_forward(Tensor scores, Tensor mask, Tensor row_marginals, Tensor col_marginals, float epsilon, "
      "int n_iters, float tol, int check_every) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sinkhorn_cpu_backward(Tensor grad_plan, Tensor scores, Tensor mask, Tensor row_marginals, Tensor "
      "col_marginals, Tensor log_u, Tensor log_v, Tensor n_done, float epsilon) -> Tensor");
  m.def(
      "sinkhorn_cpu_plan(Tensor scores, Tensor? mask, Tensor? row_marginals, Tensor? col_marginals, float epsilon, "
      "int n_iters, float tol, int check_every) -> Tensor");
}

TORCH_LIBRARY_IMPL(ovseg_fast, CPU, m) {
  m.impl("sinkhorn_cpu_forward", &ovseg_fast::sinkhorn_cpu_forward);
  m.impl("sinkhorn_cpu_backward", &ovseg_fast::sinkhorn_cpu_backward);
  m.impl("sinkhorn_cpu_plan", &ovseg_fast::sinkhorn_cpu_plan);
}

#endif  // OVSEG_DISPATCH_ROOT

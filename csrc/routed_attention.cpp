// Routed top-k window attention (BiFormer's bi-level routing attention), fused forward and backward.
//
// Kernel contract (see ovseg_fast/ops/routed_attention_reference.py): q, k, v are (B, Hh, H, W, D)
// with any strides; indices (B, G, P, topk) int64, G = 1 (shared routing) or Hh; windows are
// wh x ww = ceil(H/nh) x ceil(W/nw) tokens, clipped at the bottom/right. Every query of window p
// attends to the valid keys of the windows indices[b, g, p, :]. Forward returns out (contiguous,
// dtype of q) and lse (float32; float64 for float64 inputs), backward recomputes the softmax from lse.
//
// Design. Two layouts, chosen per problem by the window size M = wh * ww against the vector width L
// (key_lanes_forward/backward): every product below is a broadcast GEMM, C[r][lanes] += X(r, k) *
// Y[k][lanes], one scalar of X broadcast per FMA row against a row of lane vectors; the layouts
// differ in what the lanes are. Neither ever builds a gathered copy of K/V: the selected windows are read through the
// index, from the input in place or from a per-head packing of it (the size of one head's K or V).
//
// Lane tile (forward: windows of more than L/2 tokens that are not one or two whole vectors, e.g.
// 3x3 or 7x7; backward: more than L, LDVC's 4x4 with AVX2). One
// window's tokens are the lanes (token-transposed, tile[d][lane], in L1) and X is read straight from
// the input through its strides.
//   forward, parallel over (b, head, query window): the query window is the lane tile (scale folded
//     in); S^T = K_sel . Q^T over the concatenated keys of the top-k windows, kept in cache (topk*wh*ww
//     rows x lanes), one max/exp/sum over it per lane, O^T = V_sel^T . P^T, then out = O / l and
//     lse = max + log l.
//   backward, pass 1 (dQ), parallel over (b, head, query window): recomputes P^T = exp(S^T - lse),
//     dP^T = V_sel . dO^T, dS = P (dP - Delta), dQ^T = scale K_sel^T . dS^T.
//   backward, pass 2 (dK, dV), parallel over (b, head, key window): the key window is the lane tile;
//     the inverse index (histogram + prefix sum of indices: which query windows chose this key
//     window) lists the query windows whose queries are streamed in, so dK and dV are accumulated by
//     exactly one thread each: no locks, no atomics, no scatter.
//   Delta = rowsum(dO * O) is computed once before both passes.
// Padded lanes are zero in the tiles, and in pass 2 masked out of P, so they never touch a result.
//
// Key lanes (forward: windows of at most L/2 tokens, BiFormer's 2x2 = 4 would fill a quarter of an
// AVX-512 lane tile, or of one or two whole vectors, LDVC's 4x4 = 16; backward: at most L). The lanes
// are keys, or head_dim, never a window's few tokens. A task packs each (b, head) it reaches once,
// window-major (KeyLaneLayout): K^T (and V^T) per window for the key lanes, and K, V, Q, dO as rows
// padded to Dp (head_dim rounded up to L) where they are needed. Windows smaller than a vector: per
// query window, Selection::gather copies the selected windows' K^T blocks into an L1 buffer of
// D x n_keys (BiFormer: 32 x 64 floats, a GEMM micro-kernel's packing buffer), so S = (scale Q) .
// K_sel^T has the n keys as lanes. Windows of whole vectors (whole_windows): every window's keys
// already are whole vectors of its packed block, so lane_gemm_windows reads the selected blocks in
// place (no gather: for LDVC it would copy 64 KB per query window) and a clipped window's padding
// keys are masked. Then a row softmax over the keys (padding -inf) and O = P . V_sel with head_dim
// as lanes, V's rows read through the index (from the input in place when they are float rows of
// whole vectors, so the forward's scratch is one head's K^T per thread: LDVC's forward memory budget).
//   backward, parallel over (b, head), one pass over its query windows: S and dP = dO . V_sel^T as in
//     the forward, P = exp(S - lse), dS = P (dP - Delta), dQ = scale dS . K_sel (head_dim lanes), and
//     dV_j += P^T dO, dK_j += dS^T (scale Q) into the head's dK/dV rows, picked through the index.
//     The task owns its head's dK and dV, so this too needs no locks, atomics or inverse index, and
//     S and dP are computed once instead of once per pass. Taken unless there are so few heads that
//     one task per head would idle more threads than the lane tile idles lanes
//     (key_lane_backward_pays).
// Accumulation is in float32 (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"
#include "planted_bug.h"
#include "parallel_tasks.h"
#include "prefetch.h"

namespace ovseg_fast {

using RoutedForwardResult = std::tuple<at::Tensor, at::Tensor>;
using RoutedBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

namespace CPU_CAPABILITY {
namespace {

template <typename A>
using VecT = at::vec::Vectorized<A>;

#if defined(CPU_CAPABILITY_AVX512)
// c[0] + c[1] r + ... + c[5] r^5 by Horner's rule, 5 FMAs.
inline __m512 horner5(const float (&c)[6], __m512 r) {
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(c[5]), r, _mm512_set1_ps(c[4]));
  for (int i = 3; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
  return p;
}

// exp(x) = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, so r is exact to float
// rounding whatever n) in [-ln2/2, ln2/2], e^r by a degree-5 fit (2.2e-7 relative error in float32,
// about 2 ulp, where ATen's exp_u20 allows 20) and 2^n by vscalefps, which also underflows to 0 and
// overflows to inf. 11 instructions where exp_u20 takes 19: the softmax's exponentials are a seventh
// of the LDVC forward. x is clamped below at -110 (e^-110 is 0 in float32), so -inf (padding keys)
// gives 0, not the NaN of -inf - (-inf); NaN stays NaN.
inline VecT<float> vexp(const VecT<float>& x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-110.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(6.93145752e-1f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  constexpr float c[6] = {1.000000119f, 9.999996424e-1f, 4.999890029e-1f, 1.666766256e-1f, 4.191502929e-2f,
                          8.291716687e-3f};
  return _mm512_scalef_ps(horner5(c, r), n);
}

// 2^x: n = round(x), 2^(x - n) by a degree-5 fit on [-1/2, 1/2] (2.2e-7 relative error in float32),
// 2^n by vscalefps. 9 instructions: the forward's softmax works in base 2 with log2 e folded into the
// query scale (FlashAttention's exp2 form), which saves exp's multiply and its two-part reduction. x is
// clamped at -160 (2^-160 is 0 in float32), so -inf gives 0; NaN stays NaN.
inline VecT<float> vexp2(const VecT<float>& x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(xc, n);
  constexpr float c[6] = {1.0000001192f, 6.9314694404e-1f, 2.4022121727e-1f, 5.5507425218e-2f, 9.6754599362e-3f,
                          1.3266970636e-3f};
  return _mm512_scalef_ps(horner5(c, r), n);
}

// The 16 rows of 16 floats r[0 .. 16) to their transpose, in registers: 64 shuffles (unpack pairs of
// rows, then pairs of pairs, then 128-bit lanes) where a scalar transpose is 256 loads and stores.
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4 g + c], 128-bit lane L: column 4 L + c of rows 4 g .. 4 g + 3
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 lo01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), hi01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 lo23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 hi23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(lo01, lo23, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(hi01, hi23, 0xDD);
  }
}
#else
inline VecT<float> vexp(const VecT<float>& x) { return x.exp_u20(); }
inline VecT<float> vexp2(const VecT<float>& x) { return (x * VecT<float>(0.693147181f)).exp_u20(); }
#endif
inline VecT<double> vexp(const VecT<double>& x) { return x.exp(); }
inline VecT<double> vexp2(const VecT<double>& x) { return (x * VecT<double>(0.69314718055994531)).exp(); }

template <typename A>
constexpr A kLog2e = A(1.4426950408889634);
template <typename A>
constexpr A kLn2 = A(0.69314718055994531);

struct Geometry {
  int64_t B, Hh, H, W, D, nh, nw, wh, ww, P, topk, G;
};

struct Strides {  // element strides of a (B, Hh, H, W, D) tensor
  int64_t b, h, y, x, d;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), y(t.stride(2)), x(t.stride(3)), d(t.stride(4)) {}
  Strides(int64_t b_, int64_t h_, int64_t y_, int64_t x_, int64_t d_) : b(b_), h(h_), y(y_), x(x_), d(d_) {}
  static Strides plane(const Geometry& g) { return {0, 0, g.W, 1, 0}; }  // offsets = token index y * W + x
};

// Tokens of window p in row-major order: their offsets in a tensor of strides s (relative to the
// (b, head) base) and, optionally, their index y * W + x in the (H, W) plane. Returns the count.
inline int64_t window_tokens(const Geometry& g, int64_t p, const Strides& s, int64_t* off, int64_t* plane) {
  const int64_t y0 = (p / g.nw) * g.wh, x0 = (p % g.nw) * g.ww;
  const int64_t y1 = std::min(y0 + g.wh, g.H), x1 = std::min(x0 + g.ww, g.W);
  int64_t n = 0;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) {
      off[n] = y * s.y + x * s.x;
      if (plane != nullptr) plane[n] = y * g.W + x;
      ++n;
    }
  }
  return n;
}

// C[r][0 .. NV*VS) (+)= sum_k x[roff[r] + koff[k]] * Y[k][0 .. NV*VS), for R rows at once: R x NV
// accumulators stay in registers, Y's row is loaded once per k and X's entries are broadcast.
template <int R, int NV, typename T, typename A>
inline void bgemm_rows(const T* x, const int64_t* roff, const int64_t* koff, int64_t K, const A* y,
                       int64_t ldy, A* c, int64_t ldc, bool accumulate) {
  using Vec = VecT<A>;
  constexpr int VS = Vec::size();
  Vec acc[R][NV];
  const T* xr[R];
  for (int r = 0; r < R; ++r) {
    xr[r] = x + roff[r];
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(A(0));
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const int64_t o = koff[kk];
    const A* yk = y + kk * ldy;
    Vec yv[NV];
    for (int v = 0; v < NV; ++v) yv[v] = Vec::loadu(yk + v * VS);
    for (int r = 0; r < R; ++r) {
      const Vec xv(static_cast<A>(xr[r][o]));
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(xv, yv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      A* cp = c + r * ldc + v * VS;
      Vec out = acc[r][v];
      if (accumulate) out = out + Vec::loadu(cp);
      out.store(cp);
    }
  }
}

template <int NV>
constexpr int row_block() {
  return NV == 1 ? 8 : 6;  // accumulators + Y row + broadcast fit the 16 registers of AVX2
}

template <int R, int NV, typename T, typename A>
inline void bgemm_tail(int64_t rows, const T* x, const int64_t* roff, const int64_t* koff, int64_t K,
                       const A* y, int64_t ldy, A* c, int64_t ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) {
      bgemm_rows<R, NV>(x, roff, koff, K, y, ldy, c, ldc, accumulate);
    } else {
      bgemm_tail<R - 1, NV>(rows, x, roff, koff, K, y, ldy, c, ldc, accumulate);
    }
  }
}

// All `rows` rows of C (ldc apart): C (+)= X . Y with X(r, k) = x[roff[r] + koff[k]].
template <int NV, typename T, typename A>
void bgemm(const T* x, const int64_t* roff, int64_t rows, const int64_t* koff, int64_t K, const A* y,
           int64_t ldy, A* c, int64_t ldc, bool accumulate) {
  constexpr int RB = row_block<NV>();
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) bgemm_rows<RB, NV>(x, roff + r, koff, K, y, ldy, c + r * ldc, ldc, accumulate);
  if (r < rows) bgemm_tail<RB - 1, NV>(rows - r, x, roff + r, koff, K, y, ldy, c + r * ldc, ldc, accumulate);
}

template <typename T, typename A>
void bgemm_nv(int nv, const T* x, const int64_t* roff, int64_t rows, const int64_t* koff, int64_t K,
              const A* y, int64_t ldy, A* c, int64_t ldc, bool accumulate) {
  if (nv == 1) {
    bgemm<1>(x, roff, rows, koff, K, y, ldy, c, ldc, accumulate);
  } else {
    bgemm<2>(x, roff, rows, koff, K, y, ldy, c, ldc, accumulate);
  }
}

// Lane tile tile[d][lane] = alpha * x[off[lane] + d * sd] for lane < n, 0 for the padded lanes.
template <typename T, typename A>
void load_tile(A* tile, int64_t L, const T* x, const int64_t* off, int64_t n, int64_t D, int64_t sd, A alpha) {
  for (int64_t d = 0; d < D; ++d) {
    A* row = tile + d * L;
    for (int64_t i = 0; i < n; ++i) row[i] = alpha * static_cast<A>(x[off[i] + d * sd]);
    for (int64_t i = n; i < L; ++i) row[i] = A(0);
  }
}

// dst[plane[lane] * D + d] = alpha * tile[d][lane] (* inv[lane]) for the n valid lanes.
template <typename T, typename A>
void store_tile(T* dst, const int64_t* plane, int64_t n, const A* tile, int64_t L, int64_t D, A alpha, const A* inv) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = dst + plane[i] * D;
    const A f = inv == nullptr ? alpha : alpha * inv[i];
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(f * tile[d * L + i]);
  }
}

struct Scratch {
  template <typename U>
  static U* grab(std::vector<U>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};

// Items per parallel chunk so that each chunk carries at least ~2^16 multiply-adds: tiny problems run
// inline (waking the OpenMP team costs more than they do, and far more on a loaded machine).
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_item));
}

template <typename A>
constexpr int64_t max_lanes() {
  return 2 * VecT<A>::size();
}

// ---------------------------------------------------------------------------------------------------
// Key-lane layout, for windows of fewer tokens than a vector (see the design comment at the top).

// Rows x vectors of one micro-kernel block: 6 x 4 accumulators + 4 B vectors + a broadcast are 29 of
// AVX-512's 32 registers, 6 x 2 + 2 + 1 are 15 of AVX2's 16. Six rows rather than four load each B
// vector for 1.5x the FMAs: in interleaved A/B runs LDVC's forward ran 3-4% faster on AVX-512 (2-3% on
// AVX2) and its backward 10%.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kKeyLaneVecs = 4;
#else
constexpr int kKeyLaneVecs = 2;
#endif
constexpr int kKeyLaneRows = 6;

// C(r)[v] (+)= sum_k a[r * ars + k * aks] * B(k, v) for R rows and NV lane vectors v: a's entries are
// broadcast, B's vectors (bvec(k, v)) and C's rows (c[r]) are lane vectors anywhere in memory, which is
// how one micro-kernel serves products against the packed keys of the selected windows, against V/K
// rows picked through the index, and the dK/dV scatter into rows picked through it. C's rows come as
// pointers computed before the loop: a call to look one up after it would spill every accumulator
// (all vector registers are caller-saved). With row_max (a vector per row), the rows' results are
// also folded into it by lane-wise max.
template <int R, int NV, typename A, typename BVec>
inline void lane_block(int64_t K, const A* a, int64_t ars, int64_t aks, const BVec& bvec, A* const* c,
                       bool accumulate, A* row_max) {
  using Vec = VecT<A>;
  constexpr int VS = Vec::size();
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec::loadu(c[r] + v * VS) : Vec(A(0));
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const A* ak = a + kk * aks;
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(bvec(kk, v));
    for (int r = 0; r < R; ++r) {
      const Vec xv(ak[r * ars]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(xv, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v].store(c[r] + v * VS);
  }
  if (row_max != nullptr) {
    for (int r = 0; r < R; ++r) {
      Vec mx = Vec::loadu(row_max + r * VS);
      for (int v = 0; v < NV; ++v) mx = at::vec::maximum(mx, acc[r][v]);
      mx.store(row_max + r * VS);
    }
  }
}

template <int R, int NV, typename A, typename BVec>
inline void lane_block_tail(int rows, int nvec, int64_t K, const A* a, int64_t ars, int64_t aks, const BVec& bvec,
                            A* const* c, bool accumulate, A* row_max) {
  if constexpr (R > 1) {
    if (rows < R) return lane_block_tail<R - 1, NV>(rows, nvec, K, a, ars, aks, bvec, c, accumulate, row_max);
  }
  if constexpr (NV > 1) {
    if (nvec < NV) return lane_block_tail<R, NV - 1>(rows, nvec, K, a, ars, aks, bvec, c, accumulate, row_max);
  }
  lane_block<R, NV>(K, a, ars, aks, bvec, c, accumulate, row_max);
}

// All `rows` rows of C against nv (<= kKeyLaneVecs) lane vectors, the vectors v0 .. v0 + nv of C's
// rows: C(r)[v0 + v] (+)= sum_k a[r * ars + k * aks] * bvec(k, v).
template <typename A, typename BVec, typename CRow>
void lane_rows(int64_t rows, int64_t v0, int nv, int64_t K, const A* a, int64_t ars, int64_t aks, const BVec& bvec,
               const CRow& crow, bool accumulate, A* row_max = nullptr) {
  constexpr int VS = VecT<A>::size();
  for (int64_t r0 = 0; r0 < rows; r0 += kKeyLaneRows) {
    const int rb = static_cast<int>(std::min<int64_t>(kKeyLaneRows, rows - r0));
    A* c[kKeyLaneRows];
    for (int r = 0; r < rb; ++r) c[r] = crow(r0 + r) + v0 * VS;
    lane_block_tail<kKeyLaneRows, kKeyLaneVecs>(rb, nv, K, a + r0 * ars, ars, aks, bvec, c, accumulate,
                                                row_max == nullptr ? nullptr : row_max + r0 * VS);
  }
}

// All `rows` rows and `nvec` lane vectors: C(r) (+)= sum_k a[r * ars + k * aks] * B(k), B's rows
// (brow(k)) being nvec contiguous vectors.
template <typename A, typename BRow, typename CRow>
void lane_gemm(int64_t rows, int64_t nvec, int64_t K, const A* a, int64_t ars, int64_t aks, const BRow& brow,
               const CRow& crow, bool accumulate) {
  constexpr int VS = VecT<A>::size();
  for (int64_t v0 = 0; v0 < nvec; v0 += kKeyLaneVecs) {
    const int nv = static_cast<int>(std::min<int64_t>(kKeyLaneVecs, nvec - v0));
    const auto b = [&](int64_t kk, int v) { return brow(kk) + (v0 + v) * VS; };
    lane_rows(rows, v0, nv, K, a, ars, aks, b, crow, accumulate);
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether the selected windows' keys can be read in place from the packed lanes blocks: every
// window's M keys are whole vectors there, so the products against K^T and V^T need no per-query-
// window gather (which copies D x topk x M values per query window: LDVC's 4x4 windows, 64 KB,
// as many bytes as the two products read from L1).
template <typename A>
bool whole_windows(const Geometry& g) {
  return g.wh * g.ww % VecT<A>::size() == 0;
}

// Which layout a problem gets. The lane tile wastes 1 - M / L of every vector when a window holds
// M < L tokens, L the vector width (BiFormer's 2x2 windows: 3/4 of an AVX-512 vector); the key lanes
// fill every vector whatever the window size but pack the selection per query window and each head
// they visit. Measured (AVX-512 and AVX2, fp32): the key-lane forward wins once the lane tile is at
// most half full and ties at a full one, where the lane tile is kept, as it reads K/V in place with
// no per-thread head packing (LDVC's forward memory budget); the key-lane backward, one pass instead
// of two, wins up to a full vector (LDVC: 27% faster).
template <typename A>
bool key_lanes_forward(const Geometry& g) {
  const int64_t M = g.wh * g.ww, vs = VecT<A>::size();
  return 2 * M <= vs || (whole_windows<A>(g) && M <= 2 * vs);
}

template <typename A>
bool key_lanes_backward(const Geometry& g) {
  return g.wh * g.ww <= VecT<A>::size();
}

// Window-major slots: token t of window c (window_tokens' order) sits in slot c * M + t. Per
// (batch, head), the key-lane kernels pack rows[slot * Dp + d] (rows of Dp, zero beyond D: Q and dO
// as broadcast operands, K and V as B rows read through the index) and lanes[(c * D + d) * M + t]
// (each window's keys transposed, D x M: the blocks Selection::gather builds key vectors from). A
// task packs a whole head when it reaches it, walking the tensor in its own token order, so each
// head streams in once, prefetched, instead of a window at a time in routing order, and every later
// access hits L1/L2.
struct KeyLaneLayout {
  int64_t M, D, Dp, slots, lanes_size;
  std::vector<int64_t> count, plane;  // tokens of every window; token (y * W + x) of every slot, -1 past them

  KeyLaneLayout(const Geometry& g, int64_t vs)
      : M(g.wh * g.ww),
        D(g.D),
        Dp(round_up(g.D, vs)),
        slots(g.P * g.wh * g.ww),
        lanes_size(g.P * g.wh * g.ww * g.D + vs),  // + vs: Selection::gather reads a chunk past the last block
        count(g.P),
        plane(g.P * g.wh * g.ww, -1) {
    for (int64_t c = 0; c < g.P; ++c) count[c] = window_tokens(g, c, Strides::plane(g), plane.data() + c * M, nullptr);
  }

  template <typename T, typename A>
  void pack(const Geometry& g, const T* base, const Strides& s, A alpha, A* lanes, A* rows) const {
    bool full_done = false;  // whether the full windows are packed already
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
      if (lanes != nullptr && M == 16 && s.d == 1 && D % 16 == 0) {
        pack_full_windows_transposed(g, base, s, alpha, lanes, rows);
        full_done = true;
      }
    }
#endif
    for (int64_t y = 0; y < g.H; ++y) {
      const int64_t wy = y / g.wh, ty = y - wy * g.wh;
      for (int64_t x = 0; x < g.W; ++x) {
        const int64_t wx = x / g.ww, tx = x - wx * g.ww;
        const int64_t c = wy * g.nw + wx, t = ty * std::min(g.ww, g.W - wx * g.ww) + tx;  // window_tokens' order
        if (full_done && count[c] == M) continue;
        const T* src = base + y * s.y + x * s.x;
        A* lane = lanes == nullptr ? nullptr : lanes + c * D * M + t;
        A* row = rows == nullptr ? nullptr : rows + (c * M + t) * Dp;
        for (int64_t d = 0; d < D; ++d) {
          const A val = alpha * static_cast<A>(src[d * s.d]);
          if (lane != nullptr) lane[d * M] = val;
          if (row != nullptr) row[d] = val;
        }
      }
    }
  }

#if defined(CPU_CAPABILITY_AVX512)
  // pack() for the windows of 16 tokens (LDVC's 4x4, one AVX-512 vector) with rows of whole vectors:
  // each 16 tokens x 16 channels block is loaded as 16 vectors, copied to the rows as they are and
  // transposed in registers for the lanes, instead of 256 scalar stores 64 bytes apart.
  void pack_full_windows_transposed(const Geometry& g, const float* base, const Strides& s, float alpha,
                                    float* lanes, float* rows) const {
    int64_t off[16];
    const __m512 scale = _mm512_set1_ps(alpha);
    for (int64_t c = 0; c < g.P; ++c) {
      if (count[c] != M) continue;
      window_tokens(g, c, s, off, nullptr);
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 r[16];
        for (int t = 0; t < 16; ++t) {
          r[t] = _mm512_mul_ps(scale, _mm512_loadu_ps(base + off[t] + d0));
          if (rows != nullptr) _mm512_storeu_ps(rows + (c * M + t) * Dp + d0, r[t]);
        }
        transpose16x16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(lanes + (c * D + d0 + i) * M, r[i]);
      }
    }
  }
#endif
};

// The selection of one query window: its windows, their token counts, and the slot of every key.
// Compact keys (the default) are the selected windows' valid tokens one after another, for
// gather(). Whole-window keys (`whole`, for windows of a multiple of VS tokens): key t * M + u is
// token u of selected window t, read in place from the packed lanes blocks by lane_gemm_windows;
// the keys past a clipped window's tokens are padding, their slot the dummy `kl.slots` (a zero row:
// the forward's zero_row, the backward's extra row of each buffer; never a real row, so padding keys
// never collide with a real one in a dK/dV block), and `partial` says whether there are any.
struct Selection {
  std::vector<int64_t> win, cnt, slot;
  int64_t n = 0;
  bool partial = false;

  explicit Selection(const Geometry& g) : win(g.topk), cnt(g.topk), slot(g.topk * g.wh * g.ww) {}

  void build(const Geometry& g, const KeyLaneLayout& kl, const int64_t* sel, const char* fn, bool whole = false) {
    const int64_t M = kl.M;
    int64_t* out = slot.data();  // locals: stores through slot must not make n and M reload every key
    int64_t total = 0;
    bool clipped = false;
    for (int64_t t = 0; t < g.topk; ++t) {
      const int64_t c = sel[t];
      TORCH_CHECK(c >= 0 && c < g.P, fn, ": index ", c, " out of range [0, ", g.P, ")");
      const int64_t nc = kl.count[c];
      win[t] = c;
      cnt[t] = nc;
      for (int64_t u = 0; u < nc; ++u) out[total + u] = c * M + u;
      if (whole) {
        for (int64_t u = nc; u < M; ++u) out[total + u] = kl.slots;
        clipped |= nc < M;
        total += M;
      } else {
        total += nc;
      }
    }
    n = total;
    partial = clipped;
  }

  // Sets row[j] = value for the padding keys j of a whole-window selection.
  template <typename A>
  void fill_padding(A* row, int64_t M, A value) const {
    for (size_t t = 0; t < win.size(); ++t) {
      for (int64_t u = cnt[t]; u < M; ++u) row[t * M + u] = value;
    }
  }

  // dst[d * lds + j] = key j's entry d, from the packed lanes blocks. Each (window, d) is one
  // fixed-size copy of C >= M entries (a single load and store, where a loop over the window's
  // tokens would be M scalar ones); the next window's copy overwrites the C - cnt extra entries, so
  // rows of dst need C spare lanes.
  template <int C, typename A>
  void gather_chunks(const A* lanes, int64_t D, int64_t M, A* dst, int64_t lds) const {
    int64_t pos = 0;
    for (size_t t = 0; t < win.size(); ++t) {
      const A* src = lanes + win[t] * D * M;
      for (int64_t d = 0; d < D; ++d) std::memcpy(dst + d * lds + pos, src + d * M, C * sizeof(A));
      pos += cnt[t];
    }
  }

  template <typename A>
  void gather(const A* lanes, int64_t D, int64_t M, A* dst, int64_t lds) const {
    // key_lanes_* keep M <= VS <= 16, so the chunk (a power of two) never exceeds the spare VS lanes
    if (M == 1) return gather_chunks<1>(lanes, D, M, dst, lds);
    if (M == 2) return gather_chunks<2>(lanes, D, M, dst, lds);
    if (M <= 4) return gather_chunks<4>(lanes, D, M, dst, lds);
    if (M <= 8) return gather_chunks<8>(lanes, D, M, dst, lds);
    TORCH_CHECK(M <= 16, "routed_attention: key-lane window of ", M, " tokens");
    gather_chunks<16>(lanes, D, M, dst, lds);
  }
};

// S(r)[t M + u] = sum_d a[r * ars + d * aks] * lanes[(win[t] D + d) M + u] for the windows of a
// whole-window selection, the packed blocks read in place.
template <typename A, typename CRow>
void lane_gemm_windows(int64_t rows, const Selection& sel, const A* lanes, int64_t D, int64_t M, const A* a,
                       int64_t ars, int64_t aks, const CRow& crow, A* row_max = nullptr) {
  constexpr int VS = VecT<A>::size();
  const int64_t per = M / VS, nvec = static_cast<int64_t>(sel.win.size()) * per;
  for (int64_t v0 = 0; v0 < nvec; v0 += kKeyLaneVecs) {
    const int nv = static_cast<int>(std::min<int64_t>(kKeyLaneVecs, nvec - v0));
    const A* base[kKeyLaneVecs];
    for (int v = 0; v < nv; ++v) base[v] = lanes + sel.win[(v0 + v) / per] * D * M + ((v0 + v) % per) * VS;
    const auto b = [&](int64_t d, int v) { return base[v] + d * M; };
    lane_rows(rows, v0, nv, D, a, ars, aks, b, crow, false, row_max);
  }
}

// Rows of s (m x np, scores in base 2; keys n .. np are padding, set to -inf here) to 2^(s - max) in
// place, with each row's max and sum; `row_max`, when given, holds a vector per row whose max is the
// row's (lane_rows' epilogue), which saves the pass that finds it. Phase by phase over all rows rather
// than row by row: the rows' dependency chains (reductions, exp2) are independent and interleave
// instead of serializing.
template <typename A>
void softmax_rows(A* s, int64_t m, int64_t n, int64_t np, A* rmax, A* rsum, const A* row_max = nullptr) {
  using Vec = VecT<A>;
  constexpr int VS = Vec::size();
  const auto vmax = [](Vec& x, Vec& y) { return at::vec::maximum(x, y); };
  const auto vadd = [](Vec& x, Vec& y) { return x + y; };
  for (int64_t i = 0; i < m; ++i) {
    A* si = s + i * np;
    std::fill(si + n, si + np, -std::numeric_limits<A>::infinity());
    Vec mx;
    if (row_max != nullptr) {
      mx = Vec::loadu(row_max + i * VS);
    } else {
      mx = Vec::loadu(si);
      for (int64_t j = VS; j < np; j += VS) mx = at::vec::maximum(mx, Vec::loadu(si + j));
    }
    rmax[i] = at::vec::vec_reduce_all<A>(vmax, mx);
  }
  for (int64_t i = 0; i < m; ++i) {
    A* si = s + i * np;
    const Vec mv(rmax[i]);
    Vec sum(A(0));
    for (int64_t j = 0; j < np; j += VS) {
      const Vec e = vexp2(Vec::loadu(si + j) - mv);
      e.store(si + j);
      sum = sum + e;
    }
    rsum[i] = at::vec::vec_reduce_all<A>(vadd, sum);
  }
}

// Asks for the output rows of a coming window ahead of time, for writing: a window's rows are short
// runs scattered over the plane, which the hardware prefetchers do not follow, and without this every
// store of a result waits for its line's read-for-ownership.
template <typename T>
inline void prefetch_rows(T* base, const int64_t* plane, int64_t m, int64_t D) {
  for (int64_t i = 0; i < m; ++i) prefetch_row<true>(base + plane[i] * D, D);
}

// Asks for the rows (D contiguous values at base + off[i]) of m tokens ahead of time, for reading.
template <typename T>
inline void prefetch_read(const T* base, const int64_t* off, int64_t m, int64_t D) {
  for (int64_t i = 0; i < m; ++i) prefetch_row<false>(base + off[i], D);
}

// The forward's tasks: whole heads (each packs its K^T once), except the last `slots` heads, which
// are cut into kPieces runs of query windows. With heads only, the threads' last heads end up to a
// head's time apart while the others wait at the join (and fewer heads than threads leave threads
// idle); the pieces let them finish together, for at most `slots` extra packings of a head. LDVC's
// forward, 16 heads on 2 threads: 1-2% faster in interleaved A/B runs.
struct HeadTasks {
  static constexpr int64_t kPieces = 4;
  int64_t heads, P, whole, pieces;

  HeadTasks(int64_t heads_, int64_t P_, int64_t slots)
      : heads(heads_),
        P(P_),
        whole(slots > 1 ? std::max<int64_t>(0, heads_ - slots) : heads_),
        pieces(std::min<int64_t>(kPieces, std::max<int64_t>(P_, 1))) {}

  int64_t count() const { return whole + (heads - whole) * pieces; }

  struct Range {
    int64_t bh, p_begin, p_end;
  };
  Range range(int64_t t) const {
    if (t < whole) return {t, 0, P};
    const int64_t bh = whole + (t - whole) / pieces, piece = (t - whole) % pieces;
    return {bh, piece * P / pieces, (piece + 1) * P / pieces};
  }
};

template <typename T, typename A>
void forward_key_lanes(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const int64_t* idx, double scale_d, T* out, A* lse) {
  using Vec = VecT<A>;
  constexpr int VS = Vec::size();
  const Strides sq(q), sk(k), sv(v);
  const T* qd = q.data_ptr<T>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  const A qscale = static_cast<A>(scale_d) * kLog2e<A>;  // scores in base 2 (softmax_rows)
  const int64_t M = g.wh * g.ww, D = g.D, HW = g.H * g.W;
  const int64_t np_max = round_up(g.topk * M, VS), lds = np_max + VS;
  // Whole windows read K^T in place from the head's packed blocks (no gather); V's rows are read in
  // place from the input when they are rows of whole vectors of the accumulation type, so the
  // forward's scratch is one head's K^T per thread (LDVC: 256 KB).
  const bool whole = whole_windows<A>(g);
  const bool v_in_place = std::is_same_v<T, A> && sv.d == 1 && D % VS == 0;
  // Tasks are heads (each packs its K^T once), handed out one at a time (parallel_tasks.h); tiny
  // problems run inline.
  const int64_t heads = g.B * g.Hh;
  const int64_t max_slots = std::max<int64_t>(1, heads * g.P / grain_for(M * g.topk * M * D));
  const HeadTasks tasks(heads, g.P, task_slots(heads * g.P, max_slots));
  parallel_tasks(tasks.count(), [&](int64_t, const auto& claim) {
    const KeyLaneLayout kl(g, VS);
    const int64_t Dp = kl.Dp;
    std::vector<A> kt(kl.lanes_size), vr(v_in_place ? 0 : kl.slots * Dp), ksel(whole ? 0 : D * lds);
    std::vector<A> qw(M * Dp), s(M * np_max), ot(M * Dp), rmax(M), linv(M), zero_row(Dp), row_max(M * VS);
    std::vector<int64_t> qoff(M), voff(v_in_place ? kl.slots : 0);
    std::vector<const A*> vrow(g.topk * M);
    if (v_in_place) {
      for (int64_t j = 0; j < kl.slots; ++j) {
        const int64_t pl = std::max<int64_t>(kl.plane[j], 0);
        voff[j] = (pl / g.W) * sv.y + (pl % g.W) * sv.x;
      }
    }
    Selection sel(g);
    int64_t packed = -1;  // the head whose K (and V) the scratch holds
    for (int64_t t; (t = claim()) >= 0;) {
      const auto [bh, p_begin, p_end] = tasks.range(t);
      const int64_t b = bh / g.Hh, h = bh % g.Hh;
      if (bh != packed) {
        kl.pack(g, kd + b * sk.b + h * sk.h, sk, A(1), kt.data(), static_cast<A*>(nullptr));
        if (!v_in_place) kl.pack(g, vd + b * sv.b + h * sv.h, sv, A(1), static_cast<A*>(nullptr), vr.data());
        packed = bh;
      }
      for (int64_t p = p_begin; p < p_end; ++p) {
        const int64_t m = kl.count[p];
        if (m == 0) continue;
        sel.build(g, kl, idx + ((b * g.G + (g.G == 1 ? 0 : h)) * g.P + p) * g.topk, "routed_attention_cpu_forward",
                  whole);
        const int64_t n = sel.n;
        const int64_t* qplane = kl.plane.data() + p * M;
        T* ob = out + bh * HW * D;
        A* lb = lse + bh * HW;
        if (n == 0) {  // only reachable with invalid (empty-window) indices: nothing to attend to
          for (int64_t i = 0; i < m; ++i) {
            std::fill(ob + qplane[i] * D, ob + qplane[i] * D + D, T(0));
            lb[qplane[i]] = -std::numeric_limits<A>::infinity();
          }
          continue;
        }
        if (p + 2 < g.P) prefetch_rows(ob, kl.plane.data() + (p + 2) * M, kl.count[p + 2], D);
        // The next head's K and V stream in from memory while this one computes, a window's rows per
        // query window (its K would otherwise stall the packing, its V rows the products that read
        // them in place, in routing order).
        if (bh + 1 < heads && sk.d == 1 && sv.d == 1) {
          const int64_t nb = (bh + 1) / g.Hh, nh = (bh + 1) % g.Hh;
          window_tokens(g, p, sk, qoff.data(), nullptr);
          prefetch_read(kd + nb * sk.b + nh * sk.h, qoff.data(), m, D);
          window_tokens(g, p, sv, qoff.data(), nullptr);
          prefetch_read(vd + nb * sv.b + nh * sv.h, qoff.data(), m, D);
        }
        // The query window's rows, scale * log2 e folded in (scores in base 2, see softmax_rows).
        const T* qb = qd + b * sq.b + h * sq.h;
        window_tokens(g, p, sq, qoff.data(), nullptr);
        for (int64_t i = 0; i < m; ++i) {
          const T* qrow = qb + qoff[i];
          A* dst = qw.data() + i * Dp;
          if (sq.d == 1) {  // the common layout gets a loop the compiler vectorises
            for (int64_t d = 0; d < D; ++d) dst[d] = qscale * static_cast<A>(qrow[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) dst[d] = qscale * static_cast<A>(qrow[d * sq.d]);
          }
        }
        // The next query window's rows, which would otherwise stall this load on the next turn.
        if (p + 1 < g.P && sq.d == 1) {
          window_tokens(g, p + 1, sq, qoff.data(), nullptr);
          prefetch_read(qb, qoff.data(), kl.count[p + 1], D);
        }
        const int64_t np = round_up(n, VS);
        // S[i][keys] = (scale q_i) . K^T, the selected keys as lanes
        const auto s_row = [&](int64_t i) { return s.data() + i * np; };
        // Each row's max comes out of the product's epilogue (the accumulators are still in registers)
        // instead of a pass over S; not with padding keys, whose scores are only set to -inf after it.
        const bool fused_max = whole && !sel.partial;
        if (fused_max) std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<A>::infinity());
        if (whole) {
          lane_gemm_windows(m, sel, kt.data(), D, M, qw.data(), Dp, 1, s_row, fused_max ? row_max.data() : nullptr);
          if (sel.partial)
            for (int64_t i = 0; i < m; ++i) sel.fill_padding(s_row(i), M, -std::numeric_limits<A>::infinity());
        } else {
          sel.gather(kt.data(), D, M, ksel.data(), lds);
          lane_gemm(m, np / VS, D, qw.data(), Dp, 1, [&](int64_t d) { return ksel.data() + d * lds; }, s_row, false);
        }
        softmax_rows(s.data(), m, n, np, rmax.data(), linv.data(), fused_max ? row_max.data() : nullptr);
        for (int64_t i = 0; i < m; ++i) {
          lb[qplane[i]] = rmax[i] * kLn2<A> + std::log(linv[i]);
          linv[i] = A(1) / linv[i];
        }
        // O[i][d] = sum_j P[i][j] v_j[d], V rows picked through the index
        const A* vbh = v_in_place ? reinterpret_cast<const A*>(vd + b * sv.b + h * sv.h) : nullptr;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t sl = sel.slot[j];
          vrow[j] = sl == kl.slots ? zero_row.data() : v_in_place ? vbh + voff[sl] : vr.data() + sl * Dp;
        }
        lane_gemm(m, Dp / VS, n, s.data(), np, 1, [&](int64_t j) { return vrow[j]; },
                  [&](int64_t i) { return ot.data() + i * Dp; }, false);
        for (int64_t i = 0; i < m; ++i) {
          T* row = ob + qplane[i] * D;
          const A f = linv[i];
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(f * ot[i * Dp + d]);
        }
      }
    }
  }, max_slots);
}

// One task per (batch, head): it owns every dK and dV row of that head, so it accumulates them in
// place (dK_j += dS^T Q, dV_j += P^T dO, rows picked through the index) in one pass over the query
// windows that also yields dQ: no inverse index, no second recomputation of S and dP, no locks.
template <typename T, typename A>
void backward_key_lanes(const Geometry& g, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const T* out, const A* lse, const int64_t* idx, double scale_d, T* dq,
                        T* dk, T* dv) {
  using Vec = VecT<A>;
  constexpr int VS = Vec::size();
  const Strides sg(go), sq(q), sk(k), sv(v);
  const T* gd = go.data_ptr<T>();
  const T* qd = q.data_ptr<T>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  const A scale = static_cast<A>(scale_d);
  const int64_t M = g.wh * g.ww, D = g.D, HW = g.H * g.W;
  const int64_t np_max = round_up(g.topk * M, VS), lds = np_max + VS;
  const bool whole = whole_windows<A>(g);
  // Tasks are heads, handed out one at a time (parallel_tasks.h); tiny problems run inline.
  const int64_t heads = g.B * g.Hh;
  const int64_t max_slots = std::max<int64_t>(1, heads / grain_for(g.P * 5 * M * g.topk * M * D));
  parallel_tasks(heads, [&](int64_t, const auto& claim) {
    const KeyLaneLayout kl(g, VS);
    const int64_t Dp = kl.Dp, rows = (kl.slots + 1) * Dp;  // + the dummy row of whole-window padding keys
    std::vector<A> kt(kl.lanes_size), vt(kl.lanes_size), kr(rows), qr(rows), gr(rows), dkr(rows), dvr(rows);
    std::vector<A> ksel(whole ? 0 : D * lds), vsel(whole ? 0 : D * lds), s(M * np_max), dp(M * np_max), acc(M * Dp);
    std::vector<A> lsew(kl.slots), delw(kl.slots);
    Selection sel(g);
    for (int64_t bh; (bh = claim()) >= 0;) {
      const int64_t b = bh / g.Hh, h = bh % g.Hh;
      kl.pack(g, kd + b * sk.b + h * sk.h, sk, A(1), kt.data(), kr.data());
      kl.pack(g, vd + b * sv.b + h * sv.h, sv, A(1), vt.data(), static_cast<A*>(nullptr));
      kl.pack(g, qd + b * sq.b + h * sq.h, sq, scale, static_cast<A*>(nullptr), qr.data());
      kl.pack(g, gd + b * sg.b + h * sg.h, sg, A(1), static_cast<A*>(nullptr), gr.data());
      const T* obh = out + bh * HW * D;
      const A* lb = lse + bh * HW;
      for (int64_t j = 0; j < kl.slots; ++j) {  // lse and Delta = dO . O of every query, by slot
        if (kl.plane[j] < 0) continue;
        const T* orow = obh + kl.plane[j] * D;
        A delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += gr[j * Dp + d] * static_cast<A>(orow[d]);
        lsew[j] = lb[kl.plane[j]];
        delw[j] = delta;
      }
      std::fill(dkr.begin(), dkr.end(), A(0));
      std::fill(dvr.begin(), dvr.end(), A(0));
      T* dqb = dq + bh * HW * D;
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t m = kl.count[p];
        if (m == 0) continue;
        const int64_t* qplane = kl.plane.data() + p * M;
        sel.build(g, kl, idx + ((b * g.G + (g.G == 1 ? 0 : h)) * g.P + p) * g.topk, "routed_attention_cpu_backward",
                  whole);
        const int64_t n = sel.n;
        if (n == 0) {
          for (int64_t i = 0; i < m; ++i) std::fill(dqb + qplane[i] * D, dqb + qplane[i] * D + D, T(0));
          continue;
        }
        const A* qt = qr.data() + p * M * Dp;
        const A* gt = gr.data() + p * M * Dp;
        const int64_t np = round_up(n, VS), nvd = Dp / VS;
        const auto s_row = [&](int64_t i) { return s.data() + i * np; };
        const auto dp_row = [&](int64_t i) { return dp.data() + i * np; };
        if (whole) {
          lane_gemm_windows(m, sel, kt.data(), D, M, qt, Dp, 1, s_row);
          lane_gemm_windows(m, sel, vt.data(), D, M, gt, Dp, 1, dp_row);
        } else {
          sel.gather(kt.data(), D, M, ksel.data(), lds);
          sel.gather(vt.data(), D, M, vsel.data(), lds);
          lane_gemm(m, np / VS, D, qt, Dp, 1, [&](int64_t d) { return ksel.data() + d * lds; }, s_row, false);
          lane_gemm(m, np / VS, D, gt, Dp, 1, [&](int64_t d) { return vsel.data() + d * lds; }, dp_row, false);
        }
        // P = exp(S - lse), dS = P (dP - Delta); compact lanes past n are never read below, whole-window
        // padding keys get P = dS = 0.
        for (int64_t i = 0; i < m; ++i) {
          const Vec lv(lsew[p * M + i]), dl(delw[p * M + i]);
          for (int64_t j = 0; j < np; j += VS) {
            const Vec pr = vexp(Vec::loadu(s_row(i) + j) - lv);
            pr.store(s_row(i) + j);
            (pr * (Vec::loadu(dp_row(i) + j) - dl)).store(dp_row(i) + j);
          }
          if (sel.partial) {
            sel.fill_padding(s_row(i), M, A(0));
            sel.fill_padding(dp_row(i), M, A(0));
          }
        }
        // dQ[i][d] = scale sum_j dS[i][j] k_j[d]
        lane_gemm(m, nvd, n, dp.data(), np, 1, [&](int64_t j) { return kr.data() + sel.slot[j] * Dp; },
                  [&](int64_t i) { return acc.data() + i * Dp; }, false);
        for (int64_t i = 0; i < m; ++i) {
          T* row = dqb + qplane[i] * D;
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(scale * acc[i * Dp + d]);
        }
        // dV_j += sum_i P[i][j] dO_i;  dK_j += sum_i dS[i][j] (scale q_i)
        lane_gemm(n, nvd, m, s.data(), 1, np, [&](int64_t i) { return gt + i * Dp; },
                  [&](int64_t j) { return dvr.data() + sel.slot[j] * Dp; }, true);
        lane_gemm(n, nvd, m, dp.data(), 1, np, [&](int64_t i) { return qt + i * Dp; },
                  [&](int64_t j) { return dkr.data() + sel.slot[j] * Dp; }, true);
      }
      // Every token of the head gets its dK and dV, zero for windows no query window selected.
      T* dkb = dk + bh * HW * D;
      T* dvb = dv + bh * HW * D;
      for (int64_t j = 0; j < kl.slots; ++j) {
        if (kl.plane[j] < 0) continue;
        for (int64_t d = 0; d < D; ++d) {
          dkb[kl.plane[j] * D + d] = static_cast<T>(dkr[j * Dp + d]);
          dvb[kl.plane[j] * D + d] = static_cast<T>(dvr[j * Dp + d]);
        }
      }
    }
  }, max_slots);
}

template <typename T, typename A>
void forward_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const int64_t* idx, double scale_d, T* out, A* lse) {
  if (key_lanes_forward<A>(g)) return forward_key_lanes<T, A>(g, q, k, v, idx, scale_d, out, lse);
  using Vec = VecT<A>;
  constexpr int VS = Vec::size();
  constexpr int64_t LMAX = max_lanes<A>();
  const Strides sq(q), sk(k), sv(v);
  const T* qd = q.data_ptr<T>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  const A scale = static_cast<A>(scale_d);
  const int64_t M = g.wh * g.ww, D = g.D, HW = g.H * g.W;
  at::parallel_for(0, g.B * g.Hh * g.P, grain_for(M * g.topk * M * D), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> qoff(M), qplane(M), koff(g.topk * M), voff(g.topk * M), dk(D), dv(D), dq(D);
    std::vector<A> qt(D * LMAX), ot(D * LMAX), sbuf, linv(LMAX);
    for (int64_t d = 0; d < D; ++d) {
      dk[d] = d * sk.d;
      dv[d] = d * sv.d;
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item % g.P, h = (item / g.P) % g.Hh, b = item / (g.P * g.Hh);
      const int64_t* sel = idx + ((b * g.G + (g.G == 1 ? 0 : h)) * g.P + p) * g.topk;
      const int64_t m = window_tokens(g, p, sq, qoff.data(), qplane.data());
      if (m == 0) continue;
      int64_t n = 0;
      for (int64_t t = 0; t < g.topk; ++t) {
        const int64_t c = sel[t];
        TORCH_CHECK(c >= 0 && c < g.P, "routed_attention_cpu_forward: index ", c, " out of range [0, ", g.P, ")");
        const int64_t nk = window_tokens(g, c, sk, koff.data() + n, nullptr);
        window_tokens(g, c, sv, voff.data() + n, nullptr);
        n += nk;
      }
      const T* qb = qd + b * sq.b + h * sq.h;
      const T* kb = kd + b * sk.b + h * sk.h;
      const T* vb = vd + b * sv.b + h * sv.h;
      T* ob = out + (b * g.Hh + h) * HW * D;
      A* lb = lse + (b * g.Hh + h) * HW;
      for (int64_t i0 = 0; i0 < m; i0 += LMAX) {
        const int64_t mb = std::min(LMAX, m - i0);
        const int nv = mb <= VS ? 1 : 2;
        const int64_t L = nv * VS;
        if (n == 0) {  // only reachable with invalid (empty-window) indices: nothing to attend to
          for (int64_t i = 0; i < mb; ++i) {
            std::fill(ob + qplane[i0 + i] * D, ob + qplane[i0 + i] * D + D, T(0));
            lb[qplane[i0 + i]] = -std::numeric_limits<A>::infinity();
          }
          continue;
        }
        load_tile(qt.data(), L, qb, qoff.data() + i0, mb, D, sq.d, scale);
        A* s = Scratch::grab(sbuf, n * L);
        // S^T[j][lanes] = k_j . (scale q)[lanes]
        bgemm_nv(nv, kb, koff.data(), n, dk.data(), D, qt.data(), L, s, L, false);
        for (int vi = 0; vi < nv; ++vi) {
          Vec mx(-std::numeric_limits<A>::infinity());
          for (int64_t j = 0; j < n; ++j) mx = at::vec::maximum(mx, Vec::loadu(s + j * L + vi * VS));
          Vec sum(A(0));
          for (int64_t j = 0; j < n; ++j) {
            A* sp = s + j * L + vi * VS;
            const Vec e = vexp(Vec::loadu(sp) - mx);
            e.store(sp);
            sum = sum + e;
          }
          A mxa[VS], suma[VS];
          mx.store(mxa);
          sum.store(suma);
          for (int l = 0; l < VS; ++l) {
            const int64_t i = vi * VS + l;
            if (i >= mb) break;
            linv[i] = A(1) / suma[l];
            lb[qplane[i0 + i]] = mxa[l] + std::log(suma[l]);
          }
        }
        // O^T[d][lanes] = sum_j v_j[d] P^T[j][lanes]
        bgemm_nv(nv, vb, dv.data(), D, voff.data(), n, s, L, ot.data(), L, false);
        store_tile(ob, qplane.data() + i0, mb, ot.data(), L, D, A(1), linv.data());
      }
    }
  });
}

// The key-lane backward has one task per (batch, head), the lane tile one per (batch, head, window):
// take the key lanes unless their share of busy threads falls below the lane tile's share of busy
// lanes (few heads on many cores).
template <typename A>
bool key_lane_backward_pays(const Geometry& g) {
  const int64_t threads = at::get_num_threads(), items = g.B * g.Hh;
  const int64_t rounds = (items + threads - 1) / threads;
  return items * VecT<A>::size() >= g.wh * g.ww * rounds * threads;
}

// Delta[b, h, token] = sum_d dO * O, and the inverse index: for (b, g, key window c), the query
// windows that selected c are inv_list[inv_start[c] .. inv_start[c + 1]) (histogram + prefix sum).
template <typename T, typename A>
void backward_impl(const Geometry& g, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const T* out, const A* lse, const int64_t* idx, double scale_d, T* dq,
                   T* dk, T* dv) {
  if (key_lanes_backward<A>(g) && key_lane_backward_pays<A>(g)) {
    return backward_key_lanes<T, A>(g, go, q, k, v, out, lse, idx, scale_d, dq, dk, dv);
  }
  using Vec = VecT<A>;
  constexpr int VS = Vec::size();
  constexpr int64_t LMAX = max_lanes<A>();
  const Strides sg(go), sq(q), sk(k), sv(v);
  const T* gd = go.data_ptr<T>();
  const T* qd = q.data_ptr<T>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  const A scale = static_cast<A>(scale_d);
  const int64_t M = g.wh * g.ww, D = g.D, HW = g.H * g.W, P = g.P;

  std::vector<A> delta(g.B * g.Hh * HW);
  at::parallel_for(0, g.B * g.Hh * g.H, grain_for(g.W * D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % g.H, h = (row / g.H) % g.Hh, b = row / (g.H * g.Hh);
      for (int64_t x = 0; x < g.W; ++x) {
        const T* gp = gd + b * sg.b + h * sg.h + y * sg.y + x * sg.x;
        const int64_t plane = (b * g.Hh + h) * HW + y * g.W + x;
        const T* op = out + plane * D;
        A acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<A>(gp[d * sg.d]) * static_cast<A>(op[d]);
        delta[plane] = acc;
      }
    }
  });

  std::vector<int64_t> inv_start(g.B * g.G * (P + 1)), inv_list(g.B * g.G * P * g.topk);
  at::parallel_for(0, g.B * g.G, grain_for(P * g.topk), [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t* sel = idx + bg * P * g.topk;
      int64_t* start = inv_start.data() + bg * (P + 1);
      int64_t* list = inv_list.data() + bg * P * g.topk;
      std::fill(start, start + P + 1, 0);
      for (int64_t e = 0; e < P * g.topk; ++e) {
        TORCH_CHECK(sel[e] >= 0 && sel[e] < P, "routed_attention_cpu_backward: index ", sel[e], " out of range [0, ", P, ")");
        ++start[sel[e] + 1];
      }
      for (int64_t c = 0; c < P; ++c) start[c + 1] += start[c];
      std::vector<int64_t> fill(start, start + P);
      for (int64_t p = 0; p < P; ++p) {  // in increasing p: the accumulation order is deterministic
        for (int64_t t = 0; t < g.topk; ++t) list[fill[sel[p * g.topk + t]]++] = p;
      }
    }
  });

  const int64_t grain = grain_for(3 * M * g.topk * M * D);
  // Pass 1: dQ, lanes = the queries of one window.
  at::parallel_for(0, g.B * g.Hh * P, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> qoff(M), goff(M), qplane(M), koff(g.topk * M), voff(g.topk * M), dko(D), dvo(D);
    std::vector<A> qt(D * LMAX), gt(D * LMAX), acc(D * LMAX), sbuf, pbuf, lsel(LMAX), dell(LMAX);
    for (int64_t d = 0; d < D; ++d) {
      dko[d] = d * sk.d;
      dvo[d] = d * sv.d;
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item % P, h = (item / P) % g.Hh, b = item / (P * g.Hh);
      const int64_t* sel = idx + ((b * g.G + (g.G == 1 ? 0 : h)) * P + p) * g.topk;
      const int64_t m = window_tokens(g, p, sq, qoff.data(), qplane.data());
      window_tokens(g, p, sg, goff.data(), nullptr);
      if (m == 0) continue;
      int64_t n = 0;
      for (int64_t t = 0; t < g.topk; ++t) {
        const int64_t nk = window_tokens(g, sel[t], sk, koff.data() + n, nullptr);
        window_tokens(g, sel[t], sv, voff.data() + n, nullptr);
        n += nk;
      }
      const T* qb = qd + b * sq.b + h * sq.h;
      const T* gb = gd + b * sg.b + h * sg.h;
      const T* kb = kd + b * sk.b + h * sk.h;
      const T* vb = vd + b * sv.b + h * sv.h;
      const A* lb = lse + (b * g.Hh + h) * HW;
      const A* db = delta.data() + (b * g.Hh + h) * HW;
      T* dqb = dq + (b * g.Hh + h) * HW * D;
      for (int64_t i0 = 0; i0 < m; i0 += LMAX) {
        const int64_t mb = std::min(LMAX, m - i0);
        const int nv = mb <= VS ? 1 : 2;
        const int64_t L = nv * VS;
        if (n == 0) {
          for (int64_t i = 0; i < mb; ++i) std::fill(dqb + qplane[i0 + i] * D, dqb + qplane[i0 + i] * D + D, T(0));
          continue;
        }
        load_tile(qt.data(), L, qb, qoff.data() + i0, mb, D, sq.d, scale);
        load_tile(gt.data(), L, gb, goff.data() + i0, mb, D, sg.d, A(1));
        // Padded lanes: lse = Delta = 0 and dO = 0, so their dS is exactly 0.
        for (int64_t i = 0; i < L; ++i) {
          lsel[i] = i < mb ? lb[qplane[i0 + i]] : A(0);
          dell[i] = i < mb ? db[qplane[i0 + i]] : A(0);
        }
        A* s = Scratch::grab(sbuf, n * L);
        A* dp = Scratch::grab(pbuf, n * L);
        bgemm_nv(nv, kb, koff.data(), n, dko.data(), D, qt.data(), L, s, L, false);
        bgemm_nv(nv, vb, voff.data(), n, dvo.data(), D, gt.data(), L, dp, L, false);
        for (int vi = 0; vi < nv; ++vi) {
          const Vec lv = Vec::loadu(lsel.data() + vi * VS), dl = Vec::loadu(dell.data() + vi * VS);
          for (int64_t j = 0; j < n; ++j) {
            A* sp = s + j * L + vi * VS;
            const Vec pr = vexp(Vec::loadu(sp) - lv);
            (pr * (Vec::loadu(dp + j * L + vi * VS) - dl)).store(sp);
          }
        }
        // dQ^T[d][lanes] = sum_j k_j[d] dS^T[j][lanes]
        bgemm_nv(nv, kb, dko.data(), D, koff.data(), n, s, L, acc.data(), L, false);
        store_tile(dqb, qplane.data() + i0, mb, acc.data(), L, D, scale, static_cast<const A*>(nullptr));
      }
    }
  });

  // Pass 2: dK and dV, lanes = the keys of one window, streaming the queries that selected it.
  at::parallel_for(0, g.B * g.Hh * P, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> koff(M), voff(M), kplane(M), qoff(M), goff(M), qplane(M), dqo(D), dgo(D);
    std::vector<A> kt(D * LMAX), vt(D * LMAX), dkt(D * LMAX), dvt(D * LMAX), sbuf(M * LMAX), pbuf(M * LMAX);
    for (int64_t d = 0; d < D; ++d) {
      dqo[d] = d * sq.d;
      dgo[d] = d * sg.d;
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item % P, h = (item / P) % g.Hh, b = item / (P * g.Hh);
      const int64_t bg = b * g.G + (g.G == 1 ? 0 : h);
      const int64_t* start = inv_start.data() + bg * (P + 1);
      const int64_t* list = inv_list.data() + bg * P * g.topk;
      const int64_t m = window_tokens(g, c, sk, koff.data(), kplane.data());
      window_tokens(g, c, sv, voff.data(), nullptr);
      if (m == 0) continue;
      const T* qb = qd + b * sq.b + h * sq.h;
      const T* gb = gd + b * sg.b + h * sg.h;
      const T* kb = kd + b * sk.b + h * sk.h;
      const T* vb = vd + b * sv.b + h * sv.h;
      const A* lb = lse + (b * g.Hh + h) * HW;
      const A* db = delta.data() + (b * g.Hh + h) * HW;
      T* dkb = dk + (b * g.Hh + h) * HW * D;
      T* dvb = dv + (b * g.Hh + h) * HW * D;
      for (int64_t j0 = 0; j0 < m; j0 += LMAX) {
        const int64_t mb = std::min(LMAX, m - j0);
        const int nv = mb <= VS ? 1 : 2;
        const int64_t L = nv * VS;
        load_tile(kt.data(), L, kb, koff.data() + j0, mb, D, sk.d, scale);
        load_tile(vt.data(), L, vb, voff.data() + j0, mb, D, sv.d, A(1));
        std::fill(dkt.begin(), dkt.begin() + D * L, A(0));
        std::fill(dvt.begin(), dvt.begin() + D * L, A(0));
        for (int64_t e = start[c]; e < start[c + 1]; ++e) {
          const int64_t p = list[e];
          const int64_t mq = window_tokens(g, p, sq, qoff.data(), qplane.data());
          window_tokens(g, p, sg, goff.data(), nullptr);
          A* s = sbuf.data();
          A* dp = pbuf.data();
          bgemm_nv(nv, qb, qoff.data(), mq, dqo.data(), D, kt.data(), L, s, L, false);
          bgemm_nv(nv, gb, goff.data(), mq, dgo.data(), D, vt.data(), L, dp, L, false);
          for (int64_t i = 0; i < mq; ++i) {
            const Vec lv(lb[qplane[i]]), dl(db[qplane[i]]);
            for (int vi = 0; vi < nv; ++vi) {
              A* sp = s + i * L + vi * VS;
              A* dpp = dp + i * L + vi * VS;
              // Padded key lanes hold exp(0 - lse), possibly inf: blend them to exact zeros.
              const int64_t valid = std::min<int64_t>(VS, mb - vi * VS);
              Vec pr = vexp(Vec::loadu(sp) - lv);
              if (valid < VS) pr = Vec::set(Vec(A(0)), pr, valid);
              pr.store(sp);
              (pr * (Vec::loadu(dpp) - dl)).store(dpp);
            }
          }
          // dV^T[d][lanes] += sum_i dO_i[d] P[i][lanes];  dK^T[d][lanes] += sum_i q_i[d] dS[i][lanes]
          bgemm_nv(nv, gb, dgo.data(), D, goff.data(), mq, s, L, dvt.data(), L, true);
          bgemm_nv(nv, qb, dqo.data(), D, qoff.data(), mq, dp, L, dkt.data(), L, true);
        }
        store_tile(dkb, kplane.data() + j0, mb, dkt.data(), L, D, scale, static_cast<const A*>(nullptr));
        store_tile(dvb, kplane.data() + j0, mb, dvt.data(), L, D, A(1), static_cast<const A*>(nullptr));
      }
    }
  });
}

Geometry make_geometry(const at::Tensor& q, const at::Tensor& indices, int64_t nh, int64_t nw) {
  Geometry g{};
  g.B = q.size(0);
  g.Hh = q.size(1);
  g.H = q.size(2);
  g.W = q.size(3);
  g.D = q.size(4);
  g.nh = nh;
  g.nw = nw;
  g.wh = (g.H + nh - 1) / nh;
  g.ww = (g.W + nw - 1) / nw;
  g.P = nh * nw;
  g.G = indices.size(1);
  g.topk = indices.size(3);
  return g;
}

void check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& indices, int64_t nh, int64_t nw) {
  TORCH_CHECK(q.dim() == 5, fn, ": q must be (B, heads, H, W, head_dim), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), fn, ": q, k and v must have the same shape");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
              ": q, k and v must have the same dtype");
  TORCH_CHECK(nh >= 1 && nw >= 1, fn, ": nh and nw must be >= 1");
  TORCH_CHECK(indices.dim() == 4 && indices.scalar_type() == at::kLong, fn, ": indices must be (B, G, P, topk) int64");
  TORCH_CHECK(indices.size(0) == q.size(0) && (indices.size(1) == 1 || indices.size(1) == q.size(1)) &&
                  indices.size(2) == nh * nw,
              fn, ": indices has shape ", indices.sizes(), ", expected (B, 1 or heads, nh * nw, topk)");
}

// The contract on the indices (ValueError, worded as ovseg_fast.ops.routed_attention's own check for
// the other backends): window ids in [0, P), distinct within a row, naming windows that hold a token.
// One serial pass over the B * G * P rows before any work: a few microseconds where the same check
// as tensor ops costs tens per call (BiFormer's sizes take a millisecond or two in all).
void validate_indices(const Geometry& g, const int64_t* idx) {
  const int64_t n = g.B * g.G * g.P * g.topk;
  if (n == 0) return;
  const auto [lo, hi] = std::minmax_element(idx, idx + n);
  TORCH_CHECK_VALUE(*lo >= 0 && *hi < g.P, "routed_attention: indices must be window ids in [0, ", g.P,
                    ") (nh * nw), got values in [", *lo, ", ", *hi, "]");
  std::vector<int64_t> seen(g.P, -1);  // the last row that named each window
  for (int64_t row = 0; row < g.B * g.G * g.P; ++row) {
    const int64_t b = row / (g.G * g.P), gi = (row / g.P) % g.G, p = row % g.P;
    for (int64_t t = 0; t < g.topk; ++t) {
      const int64_t c = idx[row * g.topk + t];
      TORCH_CHECK_VALUE(seen[c] != row, "routed_attention: indices[", b, ", ", gi, ", ", p,
                        "] repeats a window; each row must hold distinct windows");
      seen[c] = row;
      TORCH_CHECK_VALUE((c / g.nw) * g.wh < g.H && (c % g.nw) * g.ww < g.W, "routed_attention: indices[", b, ", ", gi,
                        ", ", p, "] selects window ", c, ", which holds no token (a ", g.H, "x", g.W, " grid in ", g.nh,
                        "x", g.nw, " windows leaves it all padding)");
    }
  }
}

template <typename A>
at::ScalarType acc_type() {
  return std::is_same_v<A, double> ? at::kDouble : at::kFloat;
}

#define OVSEG_ROUTED_TYPES(scalar, ...)                                                                      \
  switch (scalar) {                                                                                          \
    case at::kFloat: { using T = float; using A = float; __VA_ARGS__; break; }                             \
    case at::kDouble: { using T = double; using A = double; __VA_ARGS__; break; }                          \
    case at::kBFloat16: { using T = c10::BFloat16; using A = float; __VA_ARGS__; break; }                   \
    case at::kHalf: { using T = c10::Half; using A = float; __VA_ARGS__; break; }                          \
    default: TORCH_CHECK(false, "routed_attention: unsupported dtype ", scalar);                           \
  }

}  // namespace

RoutedForwardResult routed_attention_forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& indices_in, int64_t nh, int64_t nw,
                                                    double scale) {
  check_inputs("routed_attention_cpu_forward", q, k, v, indices_in, nh, nw);
  const at::Tensor indices = indices_in.contiguous();
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Every token belongs to exactly one window and every window is written, so no zero-fill is needed.
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(lse_type));
  const Geometry g = make_geometry(q, indices, nh, nw);
  validate_indices(g, indices.data_ptr<int64_t>());
  if (q.numel() == 0) return {out, lse};
  OVSEG_ROUTED_TYPES(q.scalar_type(), forward_impl<T, A>(g, q, k, v, indices.data_ptr<int64_t>(), scale,
                                                         out.data_ptr<T>(), lse.data_ptr<A>()));
  return {out, lse};
}

RoutedBackwardResult routed_attention_backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& indices_in, int64_t nh, int64_t nw,
    double scale) {
  check_inputs("routed_attention_cpu_backward", q, k, v, indices_in, nh, nw);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out_in.sizes() == q.sizes(),
              "routed_attention_cpu_backward: grad_out and out must have the shape of q");
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor go = grad_out.to(q.scalar_type());
  const at::Tensor out = out_in.to(q.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(lse_type).contiguous();
  auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), opts), dk = at::empty(q.sizes(), opts), dv = at::empty(q.sizes(), opts);
  if (q.numel() == 0) return {dq, dk, dv};
  const Geometry g = make_geometry(q, indices, nh, nw);
  OVSEG_ROUTED_TYPES(q.scalar_type(), backward_impl<T, A>(g, go, q, k, v, out.data_ptr<T>(), lse.data_ptr<A>(),
                                                          indices.data_ptr<int64_t>(), scale, dq.data_ptr<T>(),
                                                          dk.data_ptr<T>(), dv.data_ptr<T>()));
  return {dq, dk, dv};
}

}  // namespace CPU_CAPABILITY
}  // namespace ovseg_fast

#ifdef OVSEG_DISPATCH_ROOT
OVSEG_DECLARE_KERNEL(RoutedForwardResult, routed_attention_forward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                      double))
OVSEG_DECLARE_KERNEL(RoutedBackwardResult, routed_attention_backward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, int64_t, int64_t, double))

namespace {

ovseg_fast::RoutedForwardResult routed_attention_cpu_forward(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& indices,
                                                             int64_t nh, int64_t nw, double scale) {
  if (ovseg_fast::planted_bug("routed_attention")) scale *= 1.5;
  return OVSEG_DISPATCH_KERNEL(routed_attention_forward_kernel, q, k, v, indices, nh, nw, scale);
}

ovseg_fast::RoutedBackwardResult routed_attention_cpu_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               const at::Tensor& indices, int64_t nh, int64_t nw,
                                                               double scale) {
  return OVSEG_DISPATCH_KERNEL(routed_attention_backward_kernel, grad_out, q, k, v, out, lse, indices, nh, nw, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ovseg_fast, m) {
  m.def("routed_attention_cpu_forward(Tensor q, Tensor k, Tensor v, Tensor indices, int nh, int nw, float scale) "
        "-> (Tensor out, Tensor lse)");
  m.def("routed_attention_cpu_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor indices, int nh, int nw, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(ovseg_fast, CPU, m) {
  m.impl("routed_attention_cpu_forward", &routed_attention_cpu_forward);
  m.impl("routed_attention_cpu_backward", &routed_attention_cpu_backward);
}
#endif

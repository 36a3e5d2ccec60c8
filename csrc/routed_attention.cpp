// Routed top-k window attention (BiFormer's bi-level routing attention), fused forward and backward.
//
// Kernel contract (see ovseg_fast/ops/routed_attention_reference.py): q, k, v are (B, Hh, H, W, D)
// with any strides; indices (B, G, P, topk) int64, G = 1 (shared routing) or Hh; windows are
// wh x ww = ceil(H/nh) x ceil(W/nw) tokens, clipped at the bottom/right. Every query of window p
// attends to the valid keys of the windows indices[b, g, p, :]. Forward returns out (contiguous,
// dtype of q) and lse (float32; float64 for float64 inputs), backward recomputes the softmax from lse.
//
// Design. A "lane tile" holds one window's tokens as the SIMD lanes (token-transposed: tile[d][lane]).
// Every product is then a broadcast GEMM: C[r][lanes] = sum_k X(r, k) * Y[k][lanes], where X is read
// straight from the input tensor through its strides (one scalar broadcast per FMA row) and Y is the
// small lane tile in L1. So K and V are never copied, gathered or transposed: the kernels read the
// selected windows in place through the index.
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
// Accumulation is in float32 (float64 for float64). Padded lanes are zero in the tiles, and in pass 2
// masked out of P, so they never touch a result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"

namespace ovseg_fast {

using RoutedForwardResult = std::tuple<at::Tensor, at::Tensor>;
using RoutedBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

namespace CPU_CAPABILITY {
namespace {

template <typename A>
using VecT = at::vec::Vectorized<A>;

inline VecT<float> vexp(const VecT<float>& x) { return x.exp_u20(); }
inline VecT<double> vexp(const VecT<double>& x) { return x.exp(); }

struct Geometry {
  int64_t B, Hh, H, W, D, nh, nw, wh, ww, P, topk, G;
};

struct Strides {  // element strides of a (B, Hh, H, W, D) tensor
  int64_t b, h, y, x, d;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), y(t.stride(2)), x(t.stride(3)), d(t.stride(4)) {}
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

inline int64_t window_count(const Geometry& g, int64_t p) {
  const int64_t y0 = (p / g.nw) * g.wh, x0 = (p % g.nw) * g.ww;
  return std::max<int64_t>(0, std::min(y0 + g.wh, g.H) - y0) * std::max<int64_t>(0, std::min(x0 + g.ww, g.W) - x0);
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

template <typename T, typename A>
void forward_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const int64_t* idx, double scale_d, T* out, A* lse) {
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

// Delta[b, h, token] = sum_d dO * O, and the inverse index: for (b, g, key window c), the query
// windows that selected c are inv_list[inv_start[c] .. inv_start[c + 1]) (histogram + prefix sum).
template <typename T, typename A>
void backward_impl(const Geometry& g, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const T* out, const A* lse, const int64_t* idx, double scale_d, T* dq,
                   T* dk, T* dv) {
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
  if (q.numel() == 0) return {out, lse};
  const Geometry g = make_geometry(q, indices, nh, nw);
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

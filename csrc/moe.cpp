// Fused CPU kernels of mixture-of-experts gating, dispatch and combine (ovseg_fast.ops.moe).
//
// The maths and the kernel contracts are those of ovseg_fast/ops/moe_reference.py.
//
// Gating: ONE pass over the logits per chunk of rows, one row per SIMD lane. A chunk (rows_per_chunk,
// about 4096 logits) is transposed (ATen's in-register block transpose) into L1/L2-resident columns
// (expert-major: column e holds expert e's logit of every row), so that a vector holds one expert
// of 16 rows and all per-row work is plain vector arithmetic over the E experts, whatever E is
// (E = 4 or 8 would leave most of a row-major vector empty). Per group of lanes: the running
// top-(k+1) (an insertion list in registers, strict '>' so ties keep the lower expert index), the
// softmax sum, the logsumexps, the k weights straight from the top values (no gather), and the
// partial sums of every loss (sum of probabilities, smooth load via a fast erfc, sum of lse^2);
// counts and importance are accumulated from the written indices. The noise scale uses a series
// log1p (Sleef's log1p and erfc were most of the time). Chunk partials are reduced in chunk order
// after the parallel loop, so the results do not depend on the thread count. The backward
// recomputes the probabilities from the saved row logsumexps in the same columns: the dense terms
// per lane, then the sparse ones (the k selected experts and the two threshold experts) per row.
//
// Dispatch: a stable counting sort of the T*k (token, slot) pairs: per-chunk expert histograms
// (parallel), an exclusive prefix sum over (expert, chunk), then every chunk scatters its pairs to
// their places with its own cursors and copies the corresponding rows of x in the same loop; no
// argsort, no atomics. Combine: the inverse permutation of `order` is built (and checked to be a
// permutation: N writes into N slots leave no hole iff there is no repeat), then every token
// gathers its k rows and accumulates them weighted: scatter-free, so parallel over tokens without
// atomics, and deterministic. The backward passes are gathers as well.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"
#include "planted_bug.h"
#include "prefetch.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace ovseg_fast {
namespace CPU_CAPABILITY {

using at::Tensor;

namespace {

constexpr double kNoiseEps = 1e-2;
constexpr double kCvEps = 1e-10;
// Elements of work below which a loop stays on the calling thread: waking the other threads costs
// more than it saves (and on a busy machine a sleeping thread can take a scheduler tick to wake).
constexpr int64_t kMinWork = 32768;
// Every lane count divides it (16 floats in AVX-512, 8 doubles).
constexpr int64_t kLaneAlign = 16;

// Rows per gating chunk: about 4096 logits, so that a chunk's column buffers stay in L1/L2, a
// multiple of every lane count, and fixed for a given E (not thread-dependent) so that the chunk
// partial sums are reduced in the same order on any machine.
int64_t rows_per_chunk(int64_t E) { return std::clamp<int64_t>(4096 / E / kLaneAlign * kLaneAlign, kLaneAlign, 256); }

// Rows of the per-thread buffers: a chunk's, or fewer when the whole batch is smaller (RPN: T = 16),
// where allocating and zeroing full chunk buffers cost as much as the work.
int64_t buffer_rows(int64_t T, int64_t R) { return std::min(R, (T + kLaneAlign - 1) / kLaneAlign * kLaneAlign); }

template <typename T>
void vec_exp_inplace(T* buf, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map([](Vec v) { return v.exp(); }, buf, buf, n);
}

// exp of a lane of values. The AVX2 copy takes ATen's inlined exp_u20 for float (a degree-5
// polynomial, about 20 ulp: far inside the ops' float32 tolerances, and the kernel has checked the
// inputs finite) instead of Sleef's out-of-line u10 call, which took a third of the gating forward's
// time on Zen 3 (4 exps per logit). The AVX-512 copy keeps Sleef, as measured there.
template <typename T>
inline at::vec::Vectorized<T> lane_exp(const at::vec::Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return x.exp_u20();
#endif
  return x.exp();
}

// log1p(u) for u in [0, 1]. In float, 2 atanh(u / (2 + u)) as its odd series in s = u / (2 + u) <= 1/3
// (relative error < 2e-8, no cancellation): Sleef's log1p (double-float arithmetic) took a third
// of the forward. Double keeps Sleef's.
template <typename T>
inline at::vec::Vectorized<T> log1p_unit(const at::vec::Vectorized<T>& u) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    const Vec s = u / (Vec(2.f) + u);
    const Vec s2 = s * s;
    Vec p(2.f / 13.f);
    for (const float c : {2.f / 11.f, 2.f / 9.f, 2.f / 7.f, 2.f / 5.f, 2.f / 3.f, 2.f})
      p = at::vec::fmadd(p, s2, Vec(c));
    return s * p;
  } else {
    return u.log1p();
  }
}

// The noise scale softplus(x) + eps = max(x, 0) + log1p(exp(-|x|)) + eps (finite for every finite
// x) and, when `sig` is given, sigmoid(x) = 1 / (1 + u) or u / (1 + u) from the same u = exp(-|x|).
template <typename T>
void vec_noise_scale(const T* src, T* dst, T* sig, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0)), one(T(1)), eps(static_cast<T>(kNoiseEps));
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), n - i);
    const Vec x = Vec::loadu(src + i, m);
    const Vec u = lane_exp(zero - x.abs());
    (at::vec::maximum(x, zero) + log1p_unit(u) + eps).store(dst + i, m);
    if (sig != nullptr) {
      const Vec r = one / (one + u);
      Vec::blendv(r, u * r, x < zero).store(sig + i, m);
    }
  }
}

template <typename src_t, typename dst_t>
void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, n * sizeof(dst_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst[e * R + r] = src[r * E + e] for the nr rows of a chunk, 0 for the padding rows nr <= r < R
// (so that every lane computes on finite values). The gating kernels work on these columns: a lane
// is a row, so the per-row work (top-k, softmax, losses) is plain vector arithmetic over experts.
// ATen's block transpose (16x16 in registers with AVX-512): element-wise strided copies were a
// third of the forward. Other dtypes go through `scratch` (nr * E) in the accumulation type.
template <typename src_t, typename T>
void to_columns(const src_t* src, int64_t nr, int64_t E, int64_t R, T* dst, T* scratch) {
  const T* rows = nullptr;
  if constexpr (std::is_same_v<src_t, T>) {
    rows = src;
  } else {
    convert_row(src, scratch, nr * E);
    rows = scratch;
  }
  at::vec::transpose_mxn<T>(rows, E, dst, R, static_cast<int>(nr), static_cast<int>(E));
  for (int64_t e = 0; e < E; ++e) std::fill(dst + e * R + nr, dst + (e + 1) * R, T(0));
}

// The inverse of to_columns for the nr real rows.
template <typename T, typename dst_t>
void to_rows(const T* src, int64_t nr, int64_t E, int64_t R, dst_t* dst, T* scratch) {
  if constexpr (std::is_same_v<dst_t, T>) {
    at::vec::transpose_mxn<T>(src, R, dst, E, static_cast<int>(E), static_cast<int>(nr));
  } else {
    at::vec::transpose_mxn<T>(src, R, scratch, E, static_cast<int>(E), static_cast<int>(nr));
    convert_row(scratch, dst, nr * E);
  }
}

// Non-finite check that the compiler vectorises (an integer AND of compare masks).
template <typename T>
bool all_finite(const T* v, int64_t n) {
  const T lim = std::numeric_limits<T>::max();
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) ok &= (std::abs(v[i]) <= lim);
  return ok != 0;
}

template <typename T>
T cv_squared(const T* v, int64_t n) {
  if (n == 0) return T(0);
  T m = 0;
  for (int64_t i = 0; i < n; ++i) m += v[i];
  m /= T(n);
  T var = 0;
  for (int64_t i = 0; i < n; ++i) var += (v[i] - m) * (v[i] - m);
  var /= T(n);
  return var / (m * m + T(kCvEps));
}

template <typename T>
void cv_squared_grad(const T* v, int64_t n, T scale, T* out) {
  T m = 0;
  for (int64_t i = 0; i < n; ++i) m += v[i];
  m /= T(n);
  T var = 0;
  for (int64_t i = 0; i < n; ++i) var += (v[i] - m) * (v[i] - m);
  var /= T(n);
  const T den = m * m + T(kCvEps);
  for (int64_t i = 0; i < n; ++i) out[i] = scale * (T(2) * (v[i] - m) / (T(n) * den) - T(2) * m * var / (T(n) * den * den));
}

template <typename T>
T lane_sum(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](auto a, auto b) { return a + b; }, v);
}

// 1 in the lanes of real rows, 0 in the padding lanes of the last group of a chunk.
template <typename T>
at::vec::Vectorized<T> lane_mask(int64_t valid) {
  using Vec = at::vec::Vectorized<T>;
  T m[Vec::size()];
  for (int64_t i = 0; i < Vec::size(); ++i) m[i] = i < valid ? T(1) : T(0);
  return Vec::loadu(m);
}

// The K1 largest of each lane's E values (column e at H + e * R), in decreasing order, ties to the
// lower expert: an insertion list in registers, expert e entering at every slot where it is
// strictly greater. `gt` is scratch of K1 vectors; expert ids are kept as values of T (exact).
template <typename T>
inline void lane_top_k1(const T* H, int64_t R, int64_t E, int64_t K1, at::vec::Vectorized<T>* tv,
                        at::vec::Vectorized<T>* ti, at::vec::Vectorized<T>* gt) {
  using Vec = at::vec::Vectorized<T>;
  const Vec all = Vec(T(0)) == Vec(T(0));
  for (int64_t e = 0; e < E; ++e) {
    const Vec v = Vec::loadu(H + e * R);
    const Vec ve = Vec(static_cast<T>(e));
    const int64_t filled = std::min(e, K1);
    for (int64_t j = 0; j < filled; ++j) gt[j] = v > tv[j];
    if (filled < K1) gt[filled] = all;  // the first empty slot
    // gt is monotone (the list is sorted): v takes slot j where gt[j] and not gt[j - 1], and the
    // slots below it shift down by one.
    for (int64_t j = std::min(filled, K1 - 1); j > 0; --j) {
      tv[j] = Vec::blendv(tv[j], Vec::blendv(v, tv[j - 1], gt[j - 1]), gt[j]);
      ti[j] = Vec::blendv(ti[j], Vec::blendv(ve, ti[j - 1], gt[j - 1]), gt[j]);
    }
    tv[0] = Vec::blendv(tv[0], v, gt[0]);
    ti[0] = Vec::blendv(ti[0], ve, gt[0]);
  }
}

// erfc. In float the Chebyshev fit of Numerical Recipes (erfcc, fractional error < 1.2e-7 for
// every x): a reciprocal, nine multiply-adds and an exp, several times cheaper than Sleef's erfc,
// which dominated the forward. Double keeps Sleef's erfc (float64 is the accuracy reference).
template <typename T>
inline at::vec::Vectorized<T> lane_erfc(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    const Vec one(1.f);
    const Vec t = one / at::vec::fmadd(x.abs(), Vec(0.5f), one);
    Vec p(0.17087277f);
    for (const float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f, 0.09678418f,
                          0.37409196f, 1.00002368f, -1.26551223f})
      p = at::vec::fmadd(p, t, Vec(c));
    const Vec y = t * lane_exp(p - x * x);
    return Vec::blendv(y, Vec(2.f) - y, x < Vec(0.f));
  } else {
    return x.erfc();
  }
}

// Whether expert e is among a lane's top k: (h_e, -e) >= (k-th value, -its expert), i.e. the
// order of the top-k (decreasing value, ties to the lower expert).
template <typename T>
inline at::vec::Vectorized<T> lane_selected(const at::vec::Vectorized<T>& h, int64_t e,
                                            const at::vec::Vectorized<T>& kth,
                                            const at::vec::Vectorized<T>& kth_index) {
  using Vec = at::vec::Vectorized<T>;
  return (h > kth) | ((h == kth) & (Vec(static_cast<T>(e)) <= kth_index));
}

// The columns of one gating chunk (see to_columns): logits l, and when noisy the noise scale s,
// the drawn noise eps, the selection logits h = l + eps s (h = l otherwise); false if l or
// noise_logits has a non-finite value. `sig` (when given, noisy only) gets sigmoid(noise_logits);
// `scratch` is to_columns' (for dtypes other than acc_t).
template <typename scalar_t, typename acc_t>
bool gating_columns(const scalar_t* lp, const scalar_t* nlp, const acc_t* np, int64_t r0, int64_t nr, int64_t E,
                    int64_t R, acc_t* L, acc_t* S, acc_t* EPS, acc_t* H, acc_t* sig, acc_t* scratch) {
  const int64_t n = R * E;
  to_columns(lp + r0 * E, nr, E, R, L, scratch);
  bool ok = all_finite(L, n);
  if (nlp == nullptr) return ok;
  to_columns(nlp + r0 * E, nr, E, R, H, scratch);  // noise_logits, as scratch until h is formed
  ok = ok && all_finite(H, n);
  vec_noise_scale(H, S, sig, n);
  to_columns(np + r0 * E, nr, E, R, EPS, scratch);
  for (int64_t i = 0; i < n; ++i) H[i] = L[i] + EPS[i] * S[i];
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Gating forward

template <typename scalar_t>
void gating_forward_impl(const Tensor& logits, const Tensor* noise, const Tensor* noise_logits, int64_t k,
                         bool normalize, Tensor& weights, Tensor& indices, Tensor& counts, Tensor& losses,
                         Tensor& row_lse, Tensor& stats, Tensor& next_index) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t T = logits.size(0), E = logits.size(1);
  const bool noisy = noise != nullptr;
  const int64_t K1 = std::min(k + 1, E);
  const bool has_next = k < E;
  const bool need_load = noisy && has_next;
  const scalar_t* lp = logits.data_ptr<scalar_t>();
  const acc_t* np = noisy ? noise->data_ptr<acc_t>() : nullptr;
  const scalar_t* nlp = noisy ? noise_logits->data_ptr<scalar_t>() : nullptr;
  scalar_t* wp = weights.data_ptr<scalar_t>();
  int64_t* ip = indices.data_ptr<int64_t>();
  acc_t* rlp = row_lse.data_ptr<acc_t>();
  int64_t* nxp = next_index.data_ptr<int64_t>();

  const int64_t R = rows_per_chunk(E);
  const int64_t n_chunks = (T + R - 1) / R;
  // Per chunk: [sum p (E), importance (E), load (E), counts (E), sum lse_l^2 (1)].
  const int64_t stride = 4 * E + 1;
  std::vector<acc_t> partial(std::max<int64_t>(n_chunks, 1) * stride, acc_t(0));
  std::vector<char> finite(std::max<int64_t>(n_chunks, 1), 1);

  const int64_t chunk_grain = std::max<int64_t>(1, kMinWork / (R * E));
  at::parallel_for(0, n_chunks, chunk_grain, [&](int64_t c0, int64_t c1) {
    const int64_t rows = buffer_rows(T, R), cap = rows * E;
    std::vector<acc_t> L(cap), S(noisy ? cap : 0), EPS(noisy ? cap : 0), Hbuf(noisy ? cap : 0);
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : cap);
    std::vector<Vec> P(E), psum(E), load(need_load ? E : 0), tv(K1), ti(K1), gt(K1), ek(k);
    // Per lane of a group: k weights, k experts, lse_h, lse_l, the (k+1)-th expert.
    std::vector<acc_t> lanes((2 * k + 3) * V), wacc(rows * k);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * R, nr = std::min(T, r0 + R) - r0;
      const int64_t Rp = (nr + V - 1) / V * V;  // the chunk's columns, padded to whole lanes
      acc_t* part = partial.data() + c * stride;
      if (!gating_columns<scalar_t, acc_t>(lp, nlp, np, r0, nr, E, Rp, L.data(), S.data(), EPS.data(), Hbuf.data(),
                                           nullptr, scratch.data())) {
        finite[c] = 0;
        continue;
      }
      const acc_t* H = noisy ? Hbuf.data() : L.data();
      std::fill(psum.begin(), psum.end(), Vec(acc_t(0)));
      std::fill(load.begin(), load.end(), Vec(acc_t(0)));
      Vec zsum(acc_t(0));
      for (int64_t g = 0; g < nr; g += V) {
        const int64_t nv = std::min(V, nr - g);
        const Vec valid = lane_mask<acc_t>(nv);
        const acc_t* Hg = H + g;
        const acc_t* Lg = L.data() + g;
        lane_top_k1(Hg, Rp, E, K1, tv.data(), ti.data(), gt.data());
        const Vec mx = tv[0];
        Vec sum(acc_t(0));
        for (int64_t e = 0; e < E; ++e) {
          P[e] = lane_exp(Vec::loadu(Hg + e * Rp) - mx);
          sum = sum + P[e];
        }
        const Vec inv = Vec(acc_t(1)) / sum;
        const Vec pscale = inv * valid;
        for (int64_t e = 0; e < E; ++e) psum[e] = at::vec::fmadd(P[e], pscale, psum[e]);
        const Vec lse_h = mx + sum.log();
        Vec lse_l = lse_h;
        if (noisy) {
          Vec ml = Vec::loadu(Lg);
          for (int64_t e = 1; e < E; ++e) ml = at::vec::maximum(ml, Vec::loadu(Lg + e * Rp));
          Vec sq(acc_t(0));
          for (int64_t e = 0; e < E; ++e) sq = sq + lane_exp(Vec::loadu(Lg + e * Rp) - ml);
          lse_l = ml + sq.log();
        }
        zsum = at::vec::fmadd(lse_l * lse_l, valid, zsum);
        // The kept probabilities from the top-k values themselves: no gather.
        Vec kept(acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          ek[j] = lane_exp(tv[j] - mx);
          kept = kept + ek[j];
        }
        const Vec wscale = normalize ? Vec(acc_t(1)) / kept : inv;
        for (int64_t j = 0; j < k; ++j) {
          (ek[j] * wscale).store(lanes.data() + j * V);
          ti[j].store(lanes.data() + (k + j) * V);
        }
        lse_h.store(lanes.data() + 2 * k * V);
        lse_l.store(lanes.data() + (2 * k + 1) * V);
        if (has_next) ti[k].store(lanes.data() + (2 * k + 2) * V);
        for (int64_t r = 0; r < nv; ++r) {
          const int64_t row = r0 + g + r;
          for (int64_t j = 0; j < k; ++j) {
            const acc_t w = lanes[j * V + r];
            wacc[(g + r) * k + j] = w;
            wp[row * k + j] = static_cast<scalar_t>(w);
            ip[row * k + j] = static_cast<int64_t>(lanes[(k + j) * V + r]);
          }
          rlp[2 * row] = lanes[2 * k * V + r];
          rlp[2 * row + 1] = lanes[(2 * k + 1) * V + r];
          nxp[row] = has_next ? static_cast<int64_t>(lanes[(2 * k + 2) * V + r]) : -1;
        }
        if (need_load) {
          // Shazeer's smooth load, Phi((l - thr) / s) = erfc((thr - l) / (s sqrt 2)) / 2, with the
          // (k+1)-th value as the threshold of the selected experts and the k-th for the others.
          const Vec kth = tv[k - 1], kth_index = ti[k - 1], next = tv[k];
          const Vec c = Vec(acc_t(M_SQRT1_2));
          const Vec half_valid = Vec(acc_t(0.5)) * valid;
          const acc_t* Sg = S.data() + g;
          for (int64_t e = 0; e < E; ++e) {
            const Vec h = Vec::loadu(Hg + e * Rp);
            const Vec thr = Vec::blendv(kth, next, lane_selected(h, e, kth, kth_index));
            const Vec z = (thr - Vec::loadu(Lg + e * Rp)) / Vec::loadu(Sg + e * Rp) * c;
            load[e] = at::vec::fmadd(lane_erfc(z), half_valid, load[e]);
          }
        }
      }
      acc_t* imp = part + E;
      acc_t* cnt = part + 3 * E;
      const int64_t* ic = ip + r0 * k;
      for (int64_t i = 0; i < nr * k; ++i) {
        cnt[ic[i]] += acc_t(1);
        imp[ic[i]] += wacc[i];
      }
      for (int64_t e = 0; e < E; ++e) {
        part[e] = lane_sum(psum[e]);
        if (need_load) part[2 * E + e] = lane_sum(load[e]);
      }
      part[4 * E] = lane_sum(zsum);
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c)
    TORCH_CHECK_VALUE(finite[c], "topk_gating: logits and noise_logits must be finite (got inf or NaN)");

  // Deterministic reduction of the chunk partials, then the O(E) loss formulas.
  std::vector<acc_t> tot(stride, acc_t(0));
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t i = 0; i < stride; ++i) tot[i] += partial[c * stride + i];
  acc_t* sp = stats.data_ptr<acc_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  const acc_t* cnt = tot.data() + 3 * E;
  for (int64_t e = 0; e < E; ++e) {
    cp[e] = static_cast<int64_t>(cnt[e]);
    sp[e] = tot[e];
    sp[E + e] = tot[E + e];
    sp[2 * E + e] = !noisy ? cnt[e] : (has_next ? tot[2 * E + e] : acc_t(T));
  }
  acc_t* lo = losses.data_ptr<acc_t>();
  if (T == 0) {
    for (int i = 0; i < 4; ++i) lo[i] = 0;
    return;
  }
  acc_t lb = 0;
  for (int64_t e = 0; e < E; ++e) lb += cnt[e] / acc_t(T * k) * (tot[e] / acc_t(T));
  lo[0] = acc_t(E) * lb;
  lo[1] = cv_squared(sp + E, E);
  lo[2] = cv_squared(sp + 2 * E, E);
  lo[3] = tot[4 * E] / acc_t(T);
}

// ---------------------------------------------------------------------------------------------
// Gating backward
//
// Per chunk, in the same columns as the forward: a scalar pass per row over its k experts (the
// kept probabilities, the gradient reaching them, the thresholds of the load), a lane pass over
// the experts for the dense terms (softmax, z-loss, load), then per row the sparse corrections at
// the k selected experts and the two threshold experts, and the columns back to rows.

template <typename scalar_t>
void gating_backward_impl(const Tensor& grad_weights, const Tensor& grad_losses, const Tensor& logits,
                          const Tensor* noise, const Tensor* noise_logits, const Tensor& weights,
                          const Tensor& indices, const Tensor& counts, const Tensor& row_lse, const Tensor& stats,
                          const Tensor& next_index, int64_t k, bool normalize, Tensor& grad_logits,
                          Tensor& grad_noise) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t T = logits.size(0), E = logits.size(1);
  if (T == 0) return;
  const bool noisy = noise != nullptr;
  const bool has_next = k < E;
  const acc_t* gl = grad_losses.data_ptr<acc_t>();
  const acc_t g_lb = gl[0], g_imp = gl[1], g_load = gl[2], g_z = gl[3];
  // With g_load = 0 the load term is exactly 0 (phi / s is finite): skipped.
  const bool need_load = noisy && has_next && g_load != acc_t(0);
  const scalar_t* lp = logits.data_ptr<scalar_t>();
  const acc_t* np = noisy ? noise->data_ptr<acc_t>() : nullptr;
  const scalar_t* nlp = noisy ? noise_logits->data_ptr<scalar_t>() : nullptr;
  const scalar_t* gwp = grad_weights.data_ptr<scalar_t>();
  const scalar_t* wp = weights.data_ptr<scalar_t>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const acc_t* rlp = row_lse.data_ptr<acc_t>();
  const acc_t* sp = stats.data_ptr<acc_t>();
  const int64_t* nxp = next_index.data_ptr<int64_t>();
  scalar_t* dlp = grad_logits.data_ptr<scalar_t>();
  scalar_t* dnp = noisy ? grad_noise.data_ptr<scalar_t>() : nullptr;

  // Per-expert coefficients of the losses (O(E), shared by all rows).
  std::vector<acc_t> c_imp(E), c_load(E, acc_t(0)), dp_lb(E);
  cv_squared_grad(sp + E, E, g_imp, c_imp.data());
  if (need_load) cv_squared_grad(sp + 2 * E, E, g_load, c_load.data());
  for (int64_t e = 0; e < E; ++e) dp_lb[e] = g_lb * acc_t(E) * acc_t(cp[e]) / acc_t(T * k) / acc_t(T);
  const acc_t zc = g_z * acc_t(2) / acc_t(T);

  const int64_t R = rows_per_chunk(E);
  const int64_t n_chunks = (T + R - 1) / R;
  const int64_t chunk_grain = std::max<int64_t>(1, kMinWork / (R * E));
  at::parallel_for(0, n_chunks, chunk_grain, [&](int64_t c0, int64_t c1) {
    const int64_t rows = buffer_rows(T, R), cap = rows * E;
    std::vector<acc_t> L(cap), S(noisy ? cap : 0), EPS(noisy ? cap : 0), Hbuf(noisy ? cap : 0);
    std::vector<acc_t> sig(noisy ? cap : 0), DL(cap), DS(noisy ? cap : 0);
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : cap);
    // Per row: the k selected experts' p_tj dkept_tj, and the lanes' per-row scalars.
    std::vector<acc_t> dsel(rows * k), lse_h(rows), lse_l(rows), dot_sel(rows), kth(rows), kth_index(rows),
        next(rows), a_in(rows), a_out(rows);
    std::vector<acc_t> G(k);
    std::vector<Vec> P(E);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * R, nr = std::min(T, r0 + R) - r0;
      const int64_t Rp = (nr + V - 1) / V * V;
      gating_columns<scalar_t, acc_t>(lp, nlp, np, r0, nr, E, Rp, L.data(), S.data(), EPS.data(), Hbuf.data(),
                                      sig.data(), scratch.data());
      const acc_t* H = noisy ? Hbuf.data() : L.data();
      // Rows: kept probabilities p_tj = exp(h_tj - lse_h) (one vectorised exp for the chunk).
      for (int64_t r = 0; r < Rp; ++r) {
        const bool real = r < nr;
        lse_h[r] = real ? rlp[2 * (r0 + r)] : acc_t(0);
        lse_l[r] = real ? rlp[2 * (r0 + r) + 1] : acc_t(0);
        dot_sel[r] = kth[r] = kth_index[r] = next[r] = acc_t(0);
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < k; ++j) dsel[r * k + j] = H[ip[(r0 + r) * k + j] * Rp + r] - lse_h[r];
      vec_exp_inplace(dsel.data(), nr * k);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        const int64_t* ti = ip + row * k;
        acc_t* ps = dsel.data() + r * k;
        acc_t gw_dot = 0, kept = 0;
        for (int64_t j = 0; j < k; ++j) {
          G[j] = acc_t(gwp[row * k + j]) + c_imp[ti[j]];
          gw_dot += G[j] * acc_t(wp[row * k + j]);
          kept += ps[j];
        }
        const acc_t inv = acc_t(1) / kept;
        acc_t dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          ps[j] *= normalize ? (G[j] - gw_dot) * inv : G[j];  // p_tj dp_tj, the selected part
          dot += ps[j];
        }
        dot_sel[r] = dot;
        if (need_load) {
          kth[r] = H[ti[k - 1] * Rp + r];
          kth_index[r] = static_cast<acc_t>(ti[k - 1]);
          next[r] = H[nxp[row] * Rp + r];
        }
      }
      // Lanes: the dense terms of dl and ds.
      for (int64_t g = 0; g < nr; g += V) {
        const acc_t* Hg = H + g;
        const acc_t* Lg = L.data() + g;
        const Vec lse = Vec::loadu(lse_h.data() + g);
        Vec dot = Vec::loadu(dot_sel.data() + g);
        for (int64_t e = 0; e < E; ++e) {
          P[e] = lane_exp(Vec::loadu(Hg + e * Rp) - lse);
          dot = at::vec::fmadd(P[e], Vec(dp_lb[e]), dot);
        }
        const Vec ll = Vec::loadu(lse_l.data() + g);
        const Vec zl = Vec(zc) * ll;
        const Vec kv = Vec::loadu(kth.data() + g), kiv = Vec::loadu(kth_index.data() + g);
        const Vec next_v = Vec::loadu(next.data() + g);
        Vec ain(acc_t(0)), aout(acc_t(0));
        for (int64_t e = 0; e < E; ++e) {
          const Vec dh = P[e] * (Vec(dp_lb[e]) - dot);
          Vec dl = dh;
          if (zc != acc_t(0)) {
            // z-loss: softmax of the clean logits (p itself without noise).
            const Vec q = noisy ? lane_exp(Vec::loadu(Lg + e * Rp) - ll) : P[e];
            dl = at::vec::fmadd(zl, q, dl);
          }
          if (noisy) {
            Vec ds = dh * Vec::loadu(EPS.data() + g + e * Rp);
            if (need_load) {
              const Vec h = Vec::loadu(Hg + e * Rp);
              const Vec sel = lane_selected(h, e, kv, kiv);
              const Vec s = Vec::loadu(S.data() + g + e * Rp);
              const Vec z = (Vec::loadu(Lg + e * Rp) - Vec::blendv(kv, next_v, sel)) / s;
              const Vec a = Vec(c_load[e] * acc_t(0.3989422804014327)) * lane_exp(Vec(acc_t(-0.5)) * z * z) / s;
              dl = dl + a;
              ds = ds - a * z;
              ain = ain + Vec::blendv(Vec(acc_t(0)), a, sel);
              aout = aout + Vec::blendv(a, Vec(acc_t(0)), sel);
            }
            ds.store(DS.data() + g + e * Rp);
          }
          dl.store(DL.data() + g + e * Rp);
        }
        if (need_load) {
          ain.store(a_in.data() + g);
          aout.store(a_out.data() + g);
        }
      }
      // Rows: the sparse terms, at the selected experts and at the thresholds' experts.
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        const int64_t* ti = ip + row * k;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t pos = ti[j] * Rp + r;
          DL[pos] += dsel[r * k + j];
          if (noisy) DS[pos] += dsel[r * k + j] * EPS[pos];
        }
        if (need_load) {
          const int64_t at_in = nxp[row] * Rp + r, at_out = ti[k - 1] * Rp + r;
          DL[at_in] -= a_in[r];
          DS[at_in] -= a_in[r] * EPS[at_in];
          DL[at_out] -= a_out[r];
          DS[at_out] -= a_out[r] * EPS[at_out];
        }
      }
      to_rows(DL.data(), nr, E, Rp, dlp + r0 * E, scratch.data());
      if (noisy) {
        for (int64_t i = 0; i < Rp * E; ++i) DS[i] *= sig[i];
        to_rows(DS.data(), nr, E, Rp, dnp + r0 * E, scratch.data());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Dispatch and combine

int64_t n_chunks_for(int64_t n, int64_t grain) {
  if (n == 0) return 0;
  const int64_t by_size = (n + grain - 1) / grain;
  return std::max<int64_t>(1, std::min<int64_t>(by_size, 4 * at::get_num_threads()));
}

// Outputs larger than this are written with streaming stores (copy_row_streaming).
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

// dst = src (bytes), with non-temporal stores when the alignment allows. For an output far larger
// than the caches (dispatch's T*k rows, combine's T rows at scale) ordinary stores read every
// destination line before writing it and evict the source rows; streaming stores write straight to
// memory, which removes a third of the memory traffic. Callers issue stream_fence() before
// another thread may read the rows.
inline void copy_row_streaming(char* dst, const char* src, int64_t bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(dst);
#if defined(__AVX512F__)
  if ((addr & 63) == 0 && (bytes & 63) == 0) {
    for (int64_t b = 0; b < bytes; b += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + b), _mm512_loadu_si512(src + b));
    return;
  }
#endif
#if defined(__AVX__)
  if ((addr & 31) == 0 && (bytes & 31) == 0) {
    for (int64_t b = 0; b < bytes; b += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + b),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b)));
    return;
  }
#endif
#if defined(__SSE2__)
  if ((addr & 15) == 0 && (bytes & 15) == 0) {
    for (int64_t b = 0; b < bytes; b += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + b), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b)));
    return;
  }
#endif
  (void)addr;
  std::memcpy(dst, src, bytes);
}

// Orders this thread's streaming stores before whatever follows (the end of a parallel region).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Rows are moved as bytes: dispatch is a copy, independent of the dtype.
void dispatch_forward_impl(const Tensor& x, const Tensor& indices, int64_t E, Tensor& x_sorted, Tensor& offsets,
                           Tensor& order, Tensor& inverse) {
  const int64_t T = indices.size(0), k = indices.size(1), N = T * k;
  const int64_t row_bytes = x.size(1) * x.element_size();
  const int64_t* flat = indices.data_ptr<int64_t>();
  int64_t* op = offsets.data_ptr<int64_t>();
  int64_t* ordp = order.data_ptr<int64_t>();
  int64_t* invp = inverse.data_ptr<int64_t>();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* xsp = static_cast<char*>(x_sorted.data_ptr());
  // Chunks sized so a chunk's pairs are worth a few hundred KiB of copies.
  const int64_t grain = std::max<int64_t>(4096, (int64_t(1) << 18) / std::max<int64_t>(row_bytes, 1));
  const int64_t n_chunks = n_chunks_for(N, grain);
  const int64_t chunk = n_chunks ? (N + n_chunks - 1) / n_chunks : 0;
  std::vector<int64_t> hist(std::max<int64_t>(n_chunks, 1) * E, 0);
  std::vector<char> bad(std::max<int64_t>(n_chunks, 1), 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hc = hist.data() + c * E;
      for (int64_t p = c * chunk, end = std::min(N, (c + 1) * chunk); p < end; ++p) {
        const int64_t e = flat[p];
        if (e < 0 || e >= E) {
          bad[c] = 1;
          break;
        }
        ++hc[e];
      }
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c)
    TORCH_CHECK_VALUE(!bad[c], "moe_dispatch: indices must lie in [0, ", E, ")");
  // Exclusive prefix sum in (expert, chunk) order: hist becomes each chunk's first slot per expert.
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    op[e] = run;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t h = hist[c * E + e];
      hist[c * E + e] = run;
      run += h;
    }
  }
  op[E] = run;
  const bool streaming = N * row_bytes > kStreamingBytes;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cursor = hist.data() + c * E;
      for (int64_t p = c * chunk, end = std::min(N, (c + 1) * chunk); p < end; ++p) {
        const int64_t pos = cursor[flat[p]]++;
        ordp[pos] = p;
        invp[p] = pos;
        if (streaming) {
          copy_row_streaming(xsp + pos * row_bytes, xp + (p / k) * row_bytes, row_bytes);
        } else {
          std::memcpy(xsp + pos * row_bytes, xp + (p / k) * row_bytes, row_bytes);
        }
      }
    }
    if (streaming) stream_fence();
  });
}

template <typename scalar_t>
void dispatch_backward_impl(const Tensor& grad_sorted, const Tensor& inverse, int64_t T, int64_t k, Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = grad_sorted.size(1);
  const scalar_t* gp = grad_sorted.data_ptr<scalar_t>();
  const int64_t* invp = inverse.data_ptr<int64_t>();
  scalar_t* outp = grad_x.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(D * k, 1));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      scalar_t* out = outp + t * D;
      if (k == 1) {
        std::memcpy(out, gp + invp[t] * D, D * sizeof(scalar_t));
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* src = gp + invp[t * k + j] * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += acc_t(src[d]);
      }
      convert_row(acc.data(), out, D);
    }
  });
}

// inverse[order[r]] = r, and a check that order is a permutation of range(N).
void build_inverse(const Tensor& order, Tensor& inverse) {
  const int64_t N = order.numel();
  const int64_t* ordp = order.data_ptr<int64_t>();
  int64_t* invp = inverse.data_ptr<int64_t>();
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, N, kMinWork, [&](int64_t a, int64_t b) {
    std::fill(invp + a, invp + b, int64_t(-1));
  });
  at::parallel_for(0, N, kMinWork, [&](int64_t a, int64_t b) {
    bool bad = false;
    for (int64_t r = a; r < b; ++r) bad |= (ordp[r] < 0) | (ordp[r] >= N);
    if (bad) out_of_range = true;
  });
  TORCH_CHECK_VALUE(!out_of_range, "moe_combine: order must be a permutation of range(", N, "), got values outside it");
  at::parallel_for(0, N, kMinWork, [&](int64_t a, int64_t b) {
    // With a valid order every slot is written once; a repeated value leaves a hole (checked below).
    for (int64_t r = a; r < b; ++r) invp[ordp[r]] = r;
  });
  std::atomic<bool> hole{false};
  at::parallel_for(0, N, kMinWork, [&](int64_t a, int64_t b) {
    bool h = false;
    for (int64_t r = a; r < b; ++r) h |= invp[r] < 0;
    if (h) hole = true;
  });
  TORCH_CHECK_VALUE(!hole, "moe_combine: order must be a permutation of range(", N, ") (it repeats a value)");
}

constexpr int64_t kGatherAhead = 2;  // tokens between a row's prefetch and its use

template <typename scalar_t>
void combine_forward_impl(const Tensor& y, const Tensor& weights, const Tensor& inverse, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = weights.size(0), k = weights.size(1), D = y.size(1);
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  const int64_t* invp = inverse.data_ptr<int64_t>();
  scalar_t* outp = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(D * k, 1));
  const bool streaming = T * D * static_cast<int64_t>(sizeof(scalar_t)) > kStreamingBytes;
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    // Streaming: each row is summed in L1 (acc) and then streamed out whole.
    const bool in_place = std::is_same_v<scalar_t, acc_t> && !streaming;
    std::vector<acc_t> acc(in_place ? 0 : D);
    std::vector<scalar_t> row(streaming && !std::is_same_v<scalar_t, acc_t> ? D : 0);
    for (int64_t t = t0; t < t1; ++t) {
      // The rows a token gathers lie anywhere in y_sorted (expert order), beyond the prefetchers'
      // reach: ask for those of the token after next while this one is summed.
      if (t + kGatherAhead < t1) {
        for (int64_t j = 0; j < k; ++j) prefetch_row<false>(yp + invp[(t + kGatherAhead) * k + j] * D, D);
      }
      acc_t* a = in_place ? reinterpret_cast<acc_t*>(outp + t * D) : acc.data();
      if (k == 0) {
        std::fill(a, a + D, acc_t(0));
      }
      for (int64_t j = 0; j < k; ++j) {
        const acc_t w = wp[t * k + j];
        const scalar_t* src = yp + invp[t * k + j] * D;
        if (j == 0) {
          for (int64_t d = 0; d < D; ++d) a[d] = w * acc_t(src[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) a[d] += w * acc_t(src[d]);
        }
      }
      if (streaming) {
        const void* src = acc.data();
        if constexpr (!std::is_same_v<scalar_t, acc_t>) {
          convert_row(acc.data(), row.data(), D);
          src = row.data();
        }
        copy_row_streaming(reinterpret_cast<char*>(outp + t * D), static_cast<const char*>(src),
                           D * static_cast<int64_t>(sizeof(scalar_t)));
      } else if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        convert_row(acc.data(), outp + t * D, D);
      }
    }
    if (streaming) stream_fence();
  });
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec s0(T(0)), s1(T(0));
  int64_t d = 0;
  for (; d + 2 * V <= n; d += 2 * V) {
    s0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + d + V), Vec::loadu(b + d + V), s1);
  }
  for (; d + V <= n; d += V) s0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s0);
  T s = at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, s0 + s1);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename scalar_t>
void combine_backward_impl(const Tensor& grad_out, const Tensor& y, const Tensor& weights, const Tensor& order,
                           const Tensor& inverse, Tensor& grad_y, Tensor& grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = weights.size(0), k = weights.size(1), D = y.size(1), N = T * k;
  const scalar_t* gp = grad_out.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  const int64_t* ordp = order.data_ptr<int64_t>();
  const int64_t* invp = inverse.data_ptr<int64_t>();
  scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  acc_t* gwp = grad_w.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(D, 1));
  // grad_y[r] = w[order[r]] * grad_out[order[r] / k]: one gather per row.
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t p = ordp[r];
      const acc_t w = wp[p];
      const scalar_t* src = gp + (p / k) * D;
      scalar_t* dst = gyp + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(w * acc_t(src[d]));
    }
  });
  // grad_w[t, j] = <grad_out[t], y[inverse[t k + j]]>: per token.
  at::parallel_for(0, T, std::max<int64_t>(1, grain / std::max<int64_t>(k, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> ga(std::is_same_v<scalar_t, acc_t> ? 0 : D), ya(std::is_same_v<scalar_t, acc_t> ? 0 : D);
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* g;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        g = gp + t * D;
      } else {
        convert_row(gp + t * D, ga.data(), D);
        g = ga.data();
      }
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* src = yp + invp[t * k + j] * D;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          gwp[t * k + j] = dot(g, src, D);
        } else {
          convert_row(src, ya.data(), D);
          gwp[t * k + j] = dot(g, static_cast<const acc_t*>(ya.data()), D);
        }
      }
    }
  });
}

}  // namespace

// Entry points of this capability's copy (outputs allocated by the root).

void topk_gating_forward_kernel(const Tensor& logits, const c10::optional<Tensor>& noise,
                                const c10::optional<Tensor>& noise_logits, int64_t k, bool normalize, Tensor& weights,
                                Tensor& indices, Tensor& counts, Tensor& losses, Tensor& row_lse, Tensor& stats,
                                Tensor& next_index) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_cpu_forward", [&] {
    gating_forward_impl<scalar_t>(logits, noise ? &*noise : nullptr, noise_logits ? &*noise_logits : nullptr, k,
                                  normalize, weights, indices, counts, losses, row_lse, stats, next_index);
  });
}

void topk_gating_backward_kernel(const Tensor& grad_weights, const Tensor& grad_losses, const Tensor& logits,
                                 const c10::optional<Tensor>& noise, const c10::optional<Tensor>& noise_logits,
                                 const Tensor& weights, const Tensor& indices, const Tensor& counts,
                                 const Tensor& row_lse, const Tensor& stats, const Tensor& next_index, int64_t k,
                                 bool normalize, Tensor& grad_logits, Tensor& grad_noise) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "topk_gating_cpu_backward", [&] {
    gating_backward_impl<scalar_t>(grad_weights, grad_losses, logits, noise ? &*noise : nullptr,
                                   noise_logits ? &*noise_logits : nullptr, weights, indices, counts, row_lse, stats,
                                   next_index, k, normalize, grad_logits, grad_noise);
  });
}

void moe_dispatch_forward_kernel(const Tensor& x, const Tensor& indices, int64_t num_experts, Tensor& x_sorted,
                                 Tensor& offsets, Tensor& order, Tensor& inverse) {
  dispatch_forward_impl(x, indices, num_experts, x_sorted, offsets, order, inverse);
}

void moe_dispatch_backward_kernel(const Tensor& grad_sorted, const Tensor& inverse, int64_t tokens, int64_t k,
                                  Tensor& grad_x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_sorted.scalar_type(), "moe_dispatch_cpu_backward",
                                  [&] { dispatch_backward_impl<scalar_t>(grad_sorted, inverse, tokens, k, grad_x); });
}

void moe_combine_forward_kernel(const Tensor& y, const Tensor& weights, const Tensor& order, Tensor& out,
                                Tensor& inverse) {
  build_inverse(order, inverse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_combine_cpu_forward",
                                  [&] { combine_forward_impl<scalar_t>(y, weights, inverse, out); });
}

void moe_combine_backward_kernel(const Tensor& grad_out, const Tensor& y, const Tensor& weights, const Tensor& order,
                                 const Tensor& inverse, Tensor& grad_y, Tensor& grad_w) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_combine_cpu_backward", [&] {
    combine_backward_impl<scalar_t>(grad_out, y, weights, order, inverse, grad_y, grad_w);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace ovseg_fast

#ifdef OVSEG_DISPATCH_ROOT
#include <torch/library.h>

OVSEG_DECLARE_KERNEL(void, topk_gating_forward_kernel,
                     (const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                      bool, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&))
OVSEG_DECLARE_KERNEL(void, topk_gating_backward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                      const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, at::Tensor&, at::Tensor&))
OVSEG_DECLARE_KERNEL(void, moe_dispatch_forward_kernel,
                     (const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&))
OVSEG_DECLARE_KERNEL(void, moe_dispatch_backward_kernel,
                     (const at::Tensor&, const at::Tensor&, int64_t, int64_t, at::Tensor&))
OVSEG_DECLARE_KERNEL(void, moe_combine_forward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&))
OVSEG_DECLARE_KERNEL(void, moe_combine_backward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      at::Tensor&, at::Tensor&))

namespace ovseg_fast {
namespace {

using at::Tensor;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "ovseg_fast moe: ", name, " must be 2-D, got ", t.sizes());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> topk_gating_cpu_forward(
    const Tensor& logits_in, const c10::optional<Tensor>& noise_in, const c10::optional<Tensor>& noise_logits_in,
    int64_t k, bool normalize) {
  check_2d(logits_in, "logits");
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  TORCH_CHECK_VALUE(E >= 1 && k >= 1 && k <= E, "topk_gating: need 1 <= k <= E, got k=", k, ", E=", E);
  TORCH_CHECK_VALUE(noise_in.has_value() == noise_logits_in.has_value(),
                    "topk_gating: noise and noise_logits go together");
  const auto act = acc_type(logits_in.scalar_type());
  Tensor logits = logits_in.contiguous();
  c10::optional<Tensor> noise, noise_logits;
  if (noise_in.has_value()) {
    TORCH_CHECK_VALUE(noise_in->sizes() == logits.sizes() && noise_logits_in->sizes() == logits.sizes(),
                      "topk_gating: noise and noise_logits must have the shape of logits");
    noise = noise_in->to(act).contiguous();
    noise_logits = noise_logits_in->to(logits.scalar_type()).contiguous();
  }
  auto opts = logits.options();
  Tensor weights = at::empty({T, k}, opts);
  Tensor indices = at::empty({T, k}, opts.dtype(at::kLong));
  Tensor counts = at::empty({E}, opts.dtype(at::kLong));
  Tensor losses = at::empty({4}, opts.dtype(act));
  Tensor row_lse = at::empty({T, 2}, opts.dtype(act));
  Tensor stats = at::empty({3, E}, opts.dtype(act));
  Tensor next_index = at::empty({T}, opts.dtype(at::kLong));
  OVSEG_DISPATCH_KERNEL(topk_gating_forward_kernel, logits, noise, noise_logits, k, normalize, weights, indices,
                        counts, losses, row_lse, stats, next_index);
  plant_bug_in("topk_gating", weights);
  return {weights, indices, counts, losses, row_lse, stats, next_index};
}

std::tuple<Tensor, Tensor> topk_gating_cpu_backward(const Tensor& grad_weights, const Tensor& grad_losses,
                                                    const Tensor& logits_in, const c10::optional<Tensor>& noise_in,
                                                    const c10::optional<Tensor>& noise_logits_in,
                                                    const Tensor& weights, const Tensor& indices,
                                                    const Tensor& counts, const Tensor& row_lse, const Tensor& stats,
                                                    const Tensor& next_index, int64_t k, bool normalize) {
  check_2d(logits_in, "logits");
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  TORCH_CHECK_VALUE(noise_in.has_value() == noise_logits_in.has_value(),
                    "topk_gating: noise and noise_logits go together");
  const auto st = logits_in.scalar_type();
  const auto act = acc_type(st);
  Tensor logits = logits_in.contiguous();
  c10::optional<Tensor> noise, noise_logits;
  if (noise_in.has_value()) {
    noise = noise_in->to(act).contiguous();
    noise_logits = noise_logits_in->to(st).contiguous();
  }
  Tensor grad_logits = at::empty({T, E}, logits.options());
  Tensor grad_noise = at::empty({noise.has_value() ? T : 0, E}, logits.options());
  OVSEG_DISPATCH_KERNEL(topk_gating_backward_kernel, grad_weights.to(st).contiguous(),
                        grad_losses.to(act).contiguous(), logits, noise, noise_logits, weights.to(st).contiguous(),
                        indices.to(at::kLong).contiguous(), counts.to(at::kLong).contiguous(),
                        row_lse.to(act).contiguous(), stats.to(act).contiguous(),
                        next_index.to(at::kLong).contiguous(), k, normalize, grad_logits, grad_noise);
  return {grad_logits, grad_noise};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_dispatch_cpu_forward(const Tensor& x_in, const Tensor& indices_in,
                                                                    int64_t num_experts) {
  check_2d(x_in, "x");
  check_2d(indices_in, "indices");
  TORCH_CHECK_VALUE(x_in.size(0) == indices_in.size(0), "moe_dispatch: x and indices must have the same rows");
  TORCH_CHECK_VALUE(num_experts >= 1, "moe_dispatch: num_experts must be >= 1");
  Tensor x = x_in.contiguous();
  Tensor indices = indices_in.to(at::kLong).contiguous();
  const int64_t N = indices.numel();
  Tensor x_sorted = at::empty({N, x.size(1)}, x.options());
  Tensor offsets = at::empty({num_experts + 1}, indices.options());
  Tensor order = at::empty({N}, indices.options());
  Tensor inverse = at::empty({N}, indices.options());
  OVSEG_DISPATCH_KERNEL(moe_dispatch_forward_kernel, x, indices, num_experts, x_sorted, offsets, order, inverse);
  plant_bug_in("moe_dispatch", x_sorted);
  return {x_sorted, offsets, order, inverse};
}

Tensor moe_dispatch_cpu_backward(const Tensor& grad_sorted, const Tensor& inverse, int64_t tokens, int64_t k) {
  check_2d(grad_sorted, "grad_sorted");
  TORCH_CHECK_VALUE(grad_sorted.size(0) == tokens * k && inverse.numel() == tokens * k,
                    "moe_dispatch backward: sizes disagree");
  Tensor grad_x = at::empty({tokens, grad_sorted.size(1)}, grad_sorted.options());
  if (k == 0) return grad_x.zero_();
  OVSEG_DISPATCH_KERNEL(moe_dispatch_backward_kernel, grad_sorted.contiguous(), inverse.to(at::kLong).contiguous(),
                        tokens, k, grad_x);
  return grad_x;
}

std::tuple<Tensor, Tensor> moe_combine_cpu_forward(const Tensor& y_in, const Tensor& weights_in,
                                                   const Tensor& order_in) {
  check_2d(y_in, "y_sorted");
  check_2d(weights_in, "weights");
  TORCH_CHECK_VALUE(y_in.size(0) == weights_in.numel() && order_in.numel() == weights_in.numel(),
                    "moe_combine: y_sorted and order must have T * k rows");
  Tensor y = y_in.contiguous();
  Tensor weights = weights_in.to(acc_type(y.scalar_type())).contiguous();
  Tensor order = order_in.to(at::kLong).contiguous();
  Tensor out = at::empty({weights.size(0), y.size(1)}, y.options());
  Tensor inverse = at::empty({order.numel()}, order.options());
  OVSEG_DISPATCH_KERNEL(moe_combine_forward_kernel, y, weights, order, out, inverse);
  plant_bug_in("moe_combine", out);
  return {out, inverse};
}

std::tuple<Tensor, Tensor> moe_combine_cpu_backward(const Tensor& grad_out, const Tensor& y_in,
                                                    const Tensor& weights_in, const Tensor& order,
                                                    const Tensor& inverse) {
  check_2d(y_in, "y_sorted");
  check_2d(weights_in, "weights");
  Tensor y = y_in.contiguous();
  const auto act = acc_type(y.scalar_type());
  Tensor weights = weights_in.to(act).contiguous();
  Tensor grad_y = at::empty_like(y);
  Tensor grad_w = at::empty(weights.sizes(), weights.options());
  OVSEG_DISPATCH_KERNEL(moe_combine_backward_kernel, grad_out.to(y.scalar_type()).contiguous(), y, weights,
                        order.to(at::kLong).contiguous(), inverse.to(at::kLong).contiguous(), grad_y, grad_w);
  return {grad_y, grad_w.to(weights_in.scalar_type())};
}

}  // namespace
}  // namespace ovseg_fast

TORCH_LIBRARY_FRAGMENT(ovseg_fast, m) {
  m.def("topk_gating_cpu_forward(Tensor logits, Tensor? noise, Tensor? noise_logits, int k, bool normalize) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk_gating_cpu_backward(Tensor grad_weights, Tensor grad_losses, Tensor logits, Tensor? noise, "
        "Tensor? noise_logits, Tensor weights, Tensor indices, Tensor counts, Tensor row_lse, Tensor expert_stats, "
        "Tensor next_index, int k, bool normalize) -> (Tensor, Tensor)");
  m.def("moe_dispatch_cpu_forward(Tensor x, Tensor indices, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_dispatch_cpu_backward(Tensor grad_sorted, Tensor inverse, int tokens, int k) -> Tensor");
  m.def("moe_combine_cpu_forward(Tensor y_sorted, Tensor weights, Tensor order) -> (Tensor, Tensor)");
  m.def("moe_combine_cpu_backward(Tensor grad_out, Tensor y_sorted, Tensor weights, Tensor order, Tensor inverse) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ovseg_fast, CPU, m) {
  m.impl("topk_gating_cpu_forward", &ovseg_fast::topk_gating_cpu_forward);
  m.impl("topk_gating_cpu_backward", &ovseg_fast::topk_gating_cpu_backward);
  m.impl("moe_dispatch_cpu_forward", &ovseg_fast::moe_dispatch_cpu_forward);
  m.impl("moe_dispatch_cpu_backward", &ovseg_fast::moe_dispatch_cpu_backward);
  m.impl("moe_combine_cpu_forward", &ovseg_fast::moe_combine_cpu_forward);
  m.impl("moe_combine_cpu_backward", &ovseg_fast::moe_combine_cpu_backward);
}
#endif  // OVSEG_DISPATCH_ROOT

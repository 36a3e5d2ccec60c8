// Fused CPU kernels of mixture-of-experts gating, dispatch and combine (ovseg_fast.ops.moe).
//
// The maths and the kernel contracts are those of ovseg_fast/ops/moe_reference.py.
//
// Gating: ONE pass over the logits per chunk of rows. A chunk (kRowsPerChunk rows) is converted to
// the accumulation type into an L1/L2-resident buffer, then, per row, the max and the running
// top-(k+1) (an insertion list, strict '>' so ties keep the lower expert index) are taken and the
// shifted logits written back; the exponentials of the whole chunk are one vectorised
// at::vec::map (Sleef exp), the row sums, probabilities, renormalised weights, per-expert counts and
// every loss's partial sum (sum of probabilities, importance, smooth load, sum of lse^2) are then
// accumulated per chunk. Chunk partials are reduced in chunk order after the parallel loop, so the
// results do not depend on the thread count. The backward recomputes the probabilities from the
// saved row logsumexps in the same chunked way.
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
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"

namespace ovseg_fast {
namespace CPU_CAPABILITY {

using at::Tensor;

namespace {

constexpr double kNoiseEps = 1e-2;
constexpr double kCvEps = 1e-10;
// Elements of work below which a loop stays on the calling thread: waking the other threads costs
// more than it saves (and on a busy machine a sleeping thread can take a scheduler tick to wake).
constexpr int64_t kMinWork = 32768;
// Fixed (not thread-dependent) so that partial sums are reduced in the same order on any machine.
constexpr int64_t kRowsPerChunk = 256;

template <typename T>
void vec_exp_inplace(T* buf, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map([](Vec v) { return v.exp(); }, buf, buf, n);
}

template <typename T>
void vec_erfc_inplace(T* buf, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map([](Vec v) { return v.erfc(); }, buf, buf, n);
}

// exp(-x^2 / 2) / sqrt(2 pi), the standard normal density.
template <typename T>
void vec_normal_pdf_inplace(T* buf, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec c = Vec(T(-0.5));
  const Vec inv = Vec(T(0.3989422804014327));
  at::vec::map([&](Vec v) { return (c * v * v).exp() * inv; }, buf, buf, n);
}

template <typename T>
void vec_sigmoid_inplace(T* buf, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec one = Vec(T(1));
  at::vec::map([&](Vec v) { return one / (one + v.neg().exp()); }, buf, buf, n);
}

// softplus(x) + eps = max(x, 0) + log1p(exp(-|x|)) + eps, finite for every finite x.
template <typename T>
void vec_noise_scale_inplace(T* buf, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero = Vec(T(0));
  const Vec eps = Vec(static_cast<T>(kNoiseEps));
  at::vec::map([&](Vec v) { return at::vec::maximum(v, zero) + (zero - v.abs()).exp().log1p() + eps; }, buf, buf, n);
}

template <typename src_t, typename dst_t>
void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, n * sizeof(dst_t));
  } else {
    at::vec::convert(src, dst, n);
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

// The k+1 largest of row[0..E) in decreasing order, ties to the lower index (strict '>' on insert).
template <typename T>
inline void top_k1(const T* row, int64_t E, int64_t K1, T* tv, int64_t* ti) {
  int64_t cnt = 0;
  for (int64_t e = 0; e < E; ++e) {
    const T v = row[e];
    if (cnt == K1 && !(v > tv[cnt - 1])) continue;
    int64_t pos = cnt < K1 ? cnt : K1 - 1;
    while (pos > 0 && v > tv[pos - 1]) {
      tv[pos] = tv[pos - 1];
      ti[pos] = ti[pos - 1];
      --pos;
    }
    tv[pos] = v;
    ti[pos] = e;
    if (cnt < K1) ++cnt;
  }
}

// ---------------------------------------------------------------------------------------------
// Gating forward

template <typename scalar_t>
void gating_forward_impl(const Tensor& logits, const Tensor* noise, const Tensor* noise_logits, int64_t k,
                         bool normalize, Tensor& weights, Tensor& indices, Tensor& counts, Tensor& losses,
                         Tensor& row_lse, Tensor& stats, Tensor& next_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = logits.size(0), E = logits.size(1);
  const bool noisy = noise != nullptr;
  const int64_t K1 = std::min(k + 1, E);
  const bool has_next = k < E;
  const scalar_t* lp = logits.data_ptr<scalar_t>();
  const acc_t* np = noisy ? noise->data_ptr<acc_t>() : nullptr;
  const scalar_t* nlp = noisy ? noise_logits->data_ptr<scalar_t>() : nullptr;
  scalar_t* wp = weights.data_ptr<scalar_t>();
  int64_t* ip = indices.data_ptr<int64_t>();
  acc_t* rlp = row_lse.data_ptr<acc_t>();
  int64_t* nxp = next_index.data_ptr<int64_t>();

  const int64_t n_chunks = (T + kRowsPerChunk - 1) / kRowsPerChunk;
  // Per chunk: [sum p (E), importance (E), load (E), counts (E), sum lse_l^2 (1)].
  const int64_t stride = 4 * E + 1;
  std::vector<acc_t> partial(std::max<int64_t>(n_chunks, 1) * stride, acc_t(0));
  std::vector<char> finite(std::max<int64_t>(n_chunks, 1), 1);

  const int64_t chunk_grain = std::max<int64_t>(1, kMinWork / (kRowsPerChunk * E));
  at::parallel_for(0, n_chunks, chunk_grain, [&](int64_t c0, int64_t c1) {
    const int64_t cap = kRowsPerChunk * E;
    std::vector<acc_t> lbuf(cap), hbuf(noisy ? cap : 0), sbuf(noisy ? cap : 0), pbuf(cap), qbuf(noisy ? cap : 0);
    std::vector<acc_t> zbuf(noisy && has_next ? cap : 0);
    std::vector<acc_t> mx(kRowsPerChunk), mxl(kRowsPerChunk), tv(K1);
    std::vector<int64_t> tidx(kRowsPerChunk * K1);
    std::vector<char> sel(E);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kRowsPerChunk, r1 = std::min(T, r0 + kRowsPerChunk), nr = r1 - r0, n = nr * E;
      acc_t* part = partial.data() + c * stride;
      convert_row(lp + r0 * E, lbuf.data(), n);
      bool ok = all_finite(lbuf.data(), n);
      const acc_t* h = lbuf.data();
      if (noisy) {
        convert_row(nlp + r0 * E, sbuf.data(), n);
        ok = ok && all_finite(sbuf.data(), n);
        vec_noise_scale_inplace(sbuf.data(), n);
        const acc_t* eps = np + r0 * E;
        for (int64_t i = 0; i < n; ++i) hbuf[i] = lbuf[i] + eps[i] * sbuf[i];
        h = hbuf.data();
      }
      if (!ok) {
        finite[c] = 0;
        continue;
      }
      // Pass 1 per row: max, top-(k+1), shifted logits.
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t* hr = h + r * E;
        int64_t* ti = tidx.data() + r * K1;
        top_k1(hr, E, K1, tv.data(), ti);
        const acc_t m = tv[0];
        mx[r] = m;
        acc_t* pr = pbuf.data() + r * E;
        for (int64_t e = 0; e < E; ++e) pr[e] = hr[e] - m;
        if (noisy) {
          const acc_t* lr = lbuf.data() + r * E;
          acc_t ml = lr[0];
          for (int64_t e = 1; e < E; ++e) ml = std::max(ml, lr[e]);
          mxl[r] = ml;
          acc_t* qr = qbuf.data() + r * E;
          for (int64_t e = 0; e < E; ++e) qr[e] = lr[e] - ml;
        }
      }
      // Pass 2: the chunk's exponentials in one vectorised sweep.
      vec_exp_inplace(pbuf.data(), n);
      if (noisy) vec_exp_inplace(qbuf.data(), n);
      // Pass 3 per row: probabilities, weights, counts and the losses' partial sums.
      acc_t* psum = part;
      acc_t* imp = part + E;
      acc_t* load = part + 2 * E;
      acc_t* cnt = part + 3 * E;
      acc_t zsum = 0;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        acc_t* pr = pbuf.data() + r * E;
        acc_t sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += pr[e];
        const acc_t inv = acc_t(1) / sum;
        for (int64_t e = 0; e < E; ++e) {
          pr[e] *= inv;
          psum[e] += pr[e];
        }
        const acc_t lse_h = mx[r] + std::log(sum);
        acc_t lse_l = lse_h;
        if (noisy) {
          const acc_t* qr = qbuf.data() + r * E;
          acc_t sq = 0;
          for (int64_t e = 0; e < E; ++e) sq += qr[e];
          lse_l = mxl[r] + std::log(sq);
        }
        rlp[2 * row] = lse_h;
        rlp[2 * row + 1] = lse_l;
        zsum += lse_l * lse_l;
        const int64_t* ti = tidx.data() + r * K1;
        acc_t kept = 0;
        for (int64_t j = 0; j < k; ++j) kept += pr[ti[j]];
        const acc_t scale = normalize ? acc_t(1) / kept : acc_t(1);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = ti[j];
          const acc_t w = pr[e] * scale;
          wp[row * k + j] = static_cast<scalar_t>(w);
          ip[row * k + j] = e;
          cnt[e] += acc_t(1);
          imp[e] += w;
        }
        nxp[row] = has_next ? ti[k] : -1;
        if (noisy && has_next) {
          std::fill(sel.begin(), sel.end(), 0);
          for (int64_t j = 0; j < k; ++j) sel[ti[j]] = 1;
          const acc_t* hr = h + r * E;
          const acc_t thr_in = hr[ti[k]], thr_out = hr[ti[k - 1]];
          const acc_t* lr = lbuf.data() + r * E;
          const acc_t* sr = sbuf.data() + r * E;
          // Phi(z) = erfc(-z / sqrt 2) / 2, the erfc done for the whole chunk below.
          acc_t* zr = zbuf.data() + r * E;
          for (int64_t e = 0; e < E; ++e) zr[e] = (sel[e] ? thr_in : thr_out) - lr[e];
          for (int64_t e = 0; e < E; ++e) zr[e] = zr[e] / sr[e] * acc_t(M_SQRT1_2);
        }
      }
      if (noisy && has_next) {
        vec_erfc_inplace(zbuf.data(), n);
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t e = 0; e < E; ++e) load[e] += acc_t(0.5) * zbuf[r * E + e];
      }
      part[4 * E] = zsum;
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

template <typename scalar_t>
void gating_backward_impl(const Tensor& grad_weights, const Tensor& grad_losses, const Tensor& logits,
                          const Tensor* noise, const Tensor* noise_logits, const Tensor& weights,
                          const Tensor& indices, const Tensor& counts, const Tensor& row_lse, const Tensor& stats,
                          const Tensor& next_index, int64_t k, bool normalize, Tensor& grad_logits,
                          Tensor& grad_noise) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = logits.size(0), E = logits.size(1);
  if (T == 0) return;
  const bool noisy = noise != nullptr;
  const bool has_next = k < E;
  const acc_t* gl = grad_losses.data_ptr<acc_t>();
  const acc_t g_lb = gl[0], g_imp = gl[1], g_load = gl[2], g_z = gl[3];
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
  if (noisy && has_next) cv_squared_grad(sp + 2 * E, E, g_load, c_load.data());
  for (int64_t e = 0; e < E; ++e) dp_lb[e] = g_lb * acc_t(E) * acc_t(cp[e]) / acc_t(T * k) / acc_t(T);
  const acc_t zc = g_z * acc_t(2) / acc_t(T);
  const bool need_q = noisy && g_z != acc_t(0);

  const int64_t n_chunks = (T + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t chunk_grain = std::max<int64_t>(1, kMinWork / (kRowsPerChunk * E));
  at::parallel_for(0, n_chunks, chunk_grain, [&](int64_t c0, int64_t c1) {
    const int64_t cap = kRowsPerChunk * E;
    std::vector<acc_t> lbuf(cap), hbuf(noisy ? cap : 0), sbuf(noisy ? cap : 0), pbuf(cap), qbuf(need_q ? cap : 0);
    std::vector<acc_t> zbuf(noisy && has_next ? cap : 0), phibuf(noisy && has_next ? cap : 0), sigbuf(noisy ? cap : 0);
    std::vector<acc_t> dp(E), dl(E), ds(E), G(k);
    std::vector<char> sel(E);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kRowsPerChunk, r1 = std::min(T, r0 + kRowsPerChunk), nr = r1 - r0, n = nr * E;
      convert_row(lp + r0 * E, lbuf.data(), n);
      const acc_t* h = lbuf.data();
      if (noisy) {
        convert_row(nlp + r0 * E, sbuf.data(), n);
        vec_noise_scale_inplace(sbuf.data(), n);
        const acc_t* eps = np + r0 * E;
        for (int64_t i = 0; i < n; ++i) hbuf[i] = lbuf[i] + eps[i] * sbuf[i];
        h = hbuf.data();
      }
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t lse = rlp[2 * (r0 + r)];
        for (int64_t e = 0; e < E; ++e) pbuf[r * E + e] = h[r * E + e] - lse;
        if (need_q) {
          const acc_t lse_l = rlp[2 * (r0 + r) + 1];
          for (int64_t e = 0; e < E; ++e) qbuf[r * E + e] = lbuf[r * E + e] - lse_l;
        }
      }
      vec_exp_inplace(pbuf.data(), n);
      if (need_q) vec_exp_inplace(qbuf.data(), n);
      if (noisy) {
        convert_row(nlp + r0 * E, sigbuf.data(), n);
        vec_sigmoid_inplace(sigbuf.data(), n);
      }
      if (noisy && has_next) {
        // z = (l - thr) / s of the smooth load, and its density, for the whole chunk.
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t* ti = ip + (r0 + r) * k;
          std::fill(sel.begin(), sel.end(), 0);
          for (int64_t j = 0; j < k; ++j) sel[ti[j]] = 1;
          const acc_t* hr = h + r * E;
          const acc_t thr_in = hr[nxp[r0 + r]], thr_out = hr[ti[k - 1]];
          for (int64_t e = 0; e < E; ++e)
            zbuf[r * E + e] = (lbuf[r * E + e] - (sel[e] ? thr_in : thr_out)) / sbuf[r * E + e];
        }
        std::copy(zbuf.begin(), zbuf.begin() + n, phibuf.begin());
        vec_normal_pdf_inplace(phibuf.data(), n);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        const acc_t* pr = pbuf.data() + r * E;
        const acc_t* qr = need_q ? qbuf.data() + r * E : pr;
        const int64_t* ti = ip + row * k;
        for (int64_t e = 0; e < E; ++e) dp[e] = dp_lb[e];
        acc_t gw_dot = 0, kept = 0;
        for (int64_t j = 0; j < k; ++j) {
          G[j] = acc_t(gwp[row * k + j]) + c_imp[ti[j]];
          gw_dot += G[j] * acc_t(wp[row * k + j]);
          kept += pr[ti[j]];
        }
        if (normalize) {
          const acc_t inv = acc_t(1) / kept;
          for (int64_t j = 0; j < k; ++j) dp[ti[j]] += (G[j] - gw_dot) * inv;
        } else {
          for (int64_t j = 0; j < k; ++j) dp[ti[j]] += G[j];
        }
        acc_t dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += pr[e] * dp[e];
        const acc_t zrow = zc * rlp[2 * row + 1];
        for (int64_t e = 0; e < E; ++e) {
          const acc_t dh = pr[e] * (dp[e] - dot);
          dl[e] = dh + zrow * qr[e];
          ds[e] = dh;  // times eps below (noisy only)
        }
        if (noisy) {
          const acc_t* er = np + row * E;
          const acc_t* sr = sbuf.data() + r * E;
          for (int64_t e = 0; e < E; ++e) ds[e] *= er[e];
          if (has_next) {
            std::fill(sel.begin(), sel.end(), 0);
            for (int64_t j = 0; j < k; ++j) sel[ti[j]] = 1;
            const int64_t i_in = nxp[row], i_out = ti[k - 1];
            acc_t a_in = 0, a_out = 0;
            const acc_t* zr = zbuf.data() + r * E;
            const acc_t* phr = phibuf.data() + r * E;
            for (int64_t e = 0; e < E; ++e) {
              const acc_t z = zr[e];
              const acc_t a = c_load[e] * phr[e] / sr[e];
              dl[e] += a;
              ds[e] -= a * z;
              (sel[e] ? a_in : a_out) += a;
            }
            dl[i_in] -= a_in;
            ds[i_in] -= a_in * er[i_in];
            dl[i_out] -= a_out;
            ds[i_out] -= a_out * er[i_out];
          }
          const acc_t* sig = sigbuf.data() + r * E;
          for (int64_t e = 0; e < E; ++e) dnp[row * E + e] = static_cast<scalar_t>(ds[e] * sig[e]);
        }
        for (int64_t e = 0; e < E; ++e) dlp[row * E + e] = static_cast<scalar_t>(dl[e]);
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
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cursor = hist.data() + c * E;
      for (int64_t p = c * chunk, end = std::min(N, (c + 1) * chunk); p < end; ++p) {
        const int64_t pos = cursor[flat[p]]++;
        ordp[pos] = p;
        invp[p] = pos;
        std::memcpy(xsp + pos * row_bytes, xp + (p / k) * row_bytes, row_bytes);
      }
    }
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

template <typename scalar_t>
void combine_forward_impl(const Tensor& y, const Tensor& weights, const Tensor& inverse, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = weights.size(0), k = weights.size(1), D = y.size(1);
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  const int64_t* invp = inverse.data_ptr<int64_t>();
  scalar_t* outp = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(D * k, 1));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(std::is_same_v<scalar_t, acc_t> ? 0 : D);
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* a = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(outp + t * D) : acc.data();
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
      if constexpr (!std::is_same_v<scalar_t, acc_t>) convert_row(acc.data(), outp + t * D, D);
    }
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

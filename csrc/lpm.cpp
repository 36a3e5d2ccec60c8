// Fused C++ CPU kernels of RPN's Linear Projection Module (ovseg_fast.ops.lpm).
//
// Design. The heavy products are GEMMs and ATen's MKL-backed at::mm / at::addmm_out run them on
// *views* (narrowed weight halves, row chunks, strided pixel layouts), so no operand is copied;
// everything between the GEMMs is fused here into vectorised, parallel row passes that touch a
// chunk while it is still in cache:
//
// * hadamard_concat_linear: Linear(cat(t * c_b, t)) = (t * c_b) W1^T + t W2^T (split-K over the two
//   halves of W). The shared half t W2^T (+ nothing per image) is one GEMM for all B when the text is
//   shared; the Hadamard half is formed on the fly per image, on whichever operand is smaller:
//   the (C, D) text rows scaled by c_b, or W1's columns scaled by c_b ((D_out, D)), into a buffer
//   reused across images (never t * c for all B, never the concatenation). The per-image GEMM
//   accumulates onto the shared half (addmm, beta = 1). Bias and LayerNorm run in one epilogue pass
//   per row. The backward recomputes t * c_b per image the same way.
// * lpm_logits: per image and per chunk of pixel rows (sized to stay in L2), the projection GEMM
//   writes the chunk, the LayerNorm epilogue normalises it in place (xhat; gamma and beta are folded
//   into the class side: logits = (scale * e * gamma) xhat^T + scale * e . beta), and the logits GEMM
//   consumes the chunk at once, writing its columns of the (B, C, N) logits in place. Inference
//   keeps only one chunk; training saves xhat (B, N, D_out) and rstd, nothing else (no un-normalised
//   projection, no affine output). Without LayerNorm the projection is re-associated when that is
//   cheaper ((e V) x^T: C-sized instead of N-sized), and its backward is entirely C-sized.
//   The backward recomputes, per chunk, d p = G^T (e * gamma), runs the LayerNorm backward in place
//   and feeds d x = d y V and d V += d y^T x straight from the chunk, with Z = G xhat taken from the
//   same chunk. d x is written channel-first ((B, D, N) storage), the layout of the (B, N, D) view of
//   a (B, D, H, W) map, so autograd hands it to the map without a transposing copy.
//   When C is small, d V skips the N-sized d y^T x: with d y_n = rstd_n (u_n - m1_n - m2_n xhat_n),
//   u_n = (e * gamma)^T g_n and xhat_n = rstd_n (Vc x_n + v0c) (Vc, v0c as below),
//       d V = (e * gamma)^T [(G * rstd) x] - 1 (sum_n rstd m1 x_n)^T - Vc S - v0c s^T,
//   S = sum_n w_n x_n x_n^T, s = sum_n w_n x_n, w_n = rstd_n^2 m2_n: a C-sized GEMM plus the symmetric
//   S, of which only the lower block triangle is computed (about D^2 / 2 multiply-adds per pixel).
// * lpm_logits in inference with LayerNorm, when cheaper (always at RPN's sizes): the LayerNorm folded
//   into the weights, which removes the N-sized projection GEMM. With Vc = V minus its mean over the
//   output features and v0c likewise, y - mean(y) = Vc x + v0c exactly, so
//       logits = rstd * (A x + a0) + scale e . beta,   A = scale (e * gamma) Vc (C x D, per image),
//   a C-sized GEMM, and rstd needs only |Vc x + v0c|. That is |R [x; 1]| with R the triangular factor
//   of the QR of [Vc | v0c]: a triangular product (about D^2 / 2 instead of D * D_out multiply-adds
//   per pixel for D_out = D). For channel-first pixels (RPN's map) our own broadcast micro-kernel
//   (panel_product) runs it fused with its norm (z never reaches memory, R's zeros are skipped row by
//   row), and then A x from the same block of pixels while it is in cache (an MKL GEMM of C rows
//   would re-pack all of x: a third slower at C = 20); other layouts run the triangular product as
//   MKL GEMMs K-split in column blocks that skip R's zero blocks, and A x^T as one GEMM. The
//   centring happens on the weights, before any product, so a large mean of y costs no accuracy.
//   The QR runs on one thread while the other builds the C-sized numerators, and is memoised on the
//   exact weights (QrCache), so repeated inference with the same head pays it once.
// Work is handed out to the threads one task at a time (parallel_tasks.h): on a machine shared with
// other jobs a static split makes every region wait for its slowest thread.
//
// Accumulation dtype: float32 (bfloat16 / float16 inputs are converted once), float64 for float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"
#include "planted_bug.h"
#include "parallel_tasks.h"

namespace ovseg_fast {

using LpmTensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LpmTensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

namespace CPU_CAPABILITY {

namespace {

template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {
  T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<T>::size(); ++i) s += buf[i];
  return s;
}

// One row of the forward epilogue: y += bias; y = (y - mean) * rstd in place; returns rstd.
template <typename T>
inline T ln_forward_row(T* y, int64_t n, const T* bias, double eps) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc(T(0));
  int64_t k = 0;
  T tail = 0;
  if (bias != nullptr) {
    for (; k + W <= n; k += W) {
      Vec v = Vec::loadu(y + k) + Vec::loadu(bias + k);
      v.store(y + k);
      acc = acc + v;
    }
    for (; k < n; ++k) { y[k] += bias[k]; tail += y[k]; }
  } else {
    for (; k + W <= n; k += W) acc = acc + Vec::loadu(y + k);
    for (; k < n; ++k) tail += y[k];
  }
  const T mean = (hsum(acc) + tail) / T(n);
  // Two passes over an L1-resident row: the centred variance has no cancellation for large means.
  const Vec vmean(mean);
  Vec acc2(T(0));
  T tail2 = 0;
  for (k = 0; k + W <= n; k += W) {
    Vec d = Vec::loadu(y + k) - vmean;
    acc2 = at::vec::fmadd(d, d, acc2);
  }
  for (; k < n; ++k) { T d = y[k] - mean; tail2 += d * d; }
  const T var = (hsum(acc2) + tail2) / T(n);
  const T rstd = T(1) / std::sqrt(var + T(eps));
  const Vec vr(rstd);
  for (k = 0; k + W <= n; k += W) ((Vec::loadu(y + k) - vmean) * vr).store(y + k);
  for (; k < n; ++k) y[k] = (y[k] - mean) * rstd;
  return rstd;
}

// One row of the LayerNorm backward, in place: u <- rstd * (u - mean(u) - xhat * mean(u * xhat));
// the two means are stored to *mean_u and *mean_ux when given.
template <typename T>
inline void ln_backward_row(T* u, const T* xhat, int64_t n, T rstd, T* mean_u = nullptr, T* mean_ux = nullptr) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec a1(T(0)), a2(T(0));
  int64_t k = 0;
  T t1 = 0, t2 = 0;
  for (; k + W <= n; k += W) {
    Vec uv = Vec::loadu(u + k);
    a1 = a1 + uv;
    a2 = at::vec::fmadd(uv, Vec::loadu(xhat + k), a2);
  }
  for (; k < n; ++k) { t1 += u[k]; t2 += u[k] * xhat[k]; }
  const T m1 = (hsum(a1) + t1) / T(n);
  const T m2 = (hsum(a2) + t2) / T(n);
  if (mean_u) *mean_u = m1;
  if (mean_ux) *mean_ux = m2;
  const Vec vm1(m1), vm2(m2), vr(rstd);
  for (k = 0; k + W <= n; k += W) {
    Vec r = (Vec::loadu(u + k) - vm1 - Vec::loadu(xhat + k) * vm2) * vr;
    r.store(u + k);
  }
  for (; k < n; ++k) u[k] = (u[k] - m1 - xhat[k] * m2) * rstd;
}

// dst[i] = a[i] * s[i] for n elements (the Hadamard product formed on the fly).
template <typename T>
inline void mul_row(T* dst, const T* a, const T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t k = 0;
  for (; k + W <= n; k += W) (Vec::loadu(a + k) * Vec::loadu(s + k)).store(dst + k);
  for (; k < n; ++k) dst[k] = a[k] * s[k];
}

// dst[i] += a[i] * s[i]
template <typename T>
inline void fma_row(T* dst, const T* a, const T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t k = 0;
  for (; k + W <= n; k += W) at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(s + k), Vec::loadu(dst + k)).store(dst + k);
  for (; k < n; ++k) dst[k] += a[k] * s[k];
}

// dst[i] += a[i]
template <typename T>
inline void add_row(T* dst, const T* a, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t k = 0;
  for (; k + W <= n; k += W) (Vec::loadu(dst + k) + Vec::loadu(a + k)).store(dst + k);
  for (; k < n; ++k) dst[k] += a[k];
}

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  return t.scalar_type() == ct ? t : t.to(ct);
}

// Pixel rows per chunk: the (rows, D_out) chunk and its logits stay in a core's L2.
int64_t chunk_rows(int64_t n, int64_t d_out) {
  int64_t r = std::max<int64_t>(64, (int64_t(1) << 18) / std::max<int64_t>(d_out, 1));
  return std::min<int64_t>(std::max<int64_t>(n, 1), r);
}

// Runs fn with ATen's intra-op parallelism off (as inside a parallel region): for the small tensor ops
// around the heavy regions, which do not pay for a fork/join of their own (on a shared machine each
// join can wait a scheduler time slice for a descheduled thread).
template <typename F>
void serial(const F& fn) {
  at::parallel_for(0, 1, 1, [&](int64_t, int64_t) { fn(); });
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// hadamard_concat_linear

// The epilogue of rows [r0, r1) of y (row length n): bias, LayerNorm into xhat (in place) and the
// affine output, or just the bias.
template <typename T>
void hcl_epilogue_rows(T* y, T* out, T* rstd, int64_t r0, int64_t r1, int64_t n, const T* bias, const T* gamma,
                       const T* beta, bool norm, double eps) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t r = r0; r < r1; ++r) {
    T* row = y + r * n;
    if (norm) {
      rstd[r] = ln_forward_row<T>(row, n, bias, eps);
      T* o = out + r * n;
      int64_t k = 0;
      for (; k + W <= n; k += W) {
        Vec v = Vec::loadu(row + k) * Vec::loadu(gamma + k);
        if (beta) v = v + Vec::loadu(beta + k);
        v.store(o + k);
      }
      for (; k < n; ++k) o[k] = row[k] * gamma[k] + (beta ? beta[k] : T(0));
    } else if (bias) {
      int64_t k = 0;
      for (; k + W <= n; k += W) (Vec::loadu(row + k) + Vec::loadu(bias + k)).store(row + k);
      for (; k < n; ++k) row[k] += bias[k];
    }
  }
}

// Parallel structure: the GEMMs that are shared by all images use MKL's own threads; everything per
// image (Hadamard buffer, GEMM, epilogue) is one task of a single parallel region over the images,
// whose GEMMs then run single-threaded on that core. One synchronisation per phase instead of one per
// operation: on a loaded machine every fork/join of a parallel region costs a scheduler slice.
LpmTensor3 hcl_forward_kernel(const at::Tensor& text_in, const at::Tensor& cls_in, const at::Tensor& weight_in,
                              const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& nw_in,
                              const std::optional<at::Tensor>& nb_in, int64_t mode, double eps) {
  const auto dt = text_in.scalar_type();
  const auto ct = compute_type(dt);
  const at::Tensor text = as_compute(text_in, ct).contiguous(), cls = as_compute(cls_in, ct).contiguous();
  const at::Tensor w = as_compute(weight_in, ct);
  const int64_t B = cls.size(0), T = text.size(0), C = text.size(1), D = text.size(2), Do = w.size(0);
  const bool shared = T == 1 && B != 1;
  const bool norm = nw_in.has_value();
  auto opts = text.options().dtype(ct);
  const at::Tensor bias = bias_in.has_value() ? as_compute(*bias_in, ct).contiguous() : at::Tensor();
  const at::Tensor gamma = norm ? as_compute(*nw_in, ct).contiguous() : at::Tensor();
  const at::Tensor beta = nb_in.has_value() ? as_compute(*nb_in, ct).contiguous() : at::Tensor();
  const int64_t G = (mode == 0 && shared) ? 1 : B;  // mode a, shared text: computed once, broadcast
  at::Tensor y = at::empty({G, C, Do}, opts);       // un-normalised, then xhat in place
  at::Tensor out = norm ? at::empty({G, C, Do}, opts) : y;
  at::Tensor rstd = norm ? at::empty({G, C}, opts) : at::empty({0}, opts);
  at::Tensor shared_half;  // t W2^T (C, Do), once for shared text
  if (mode == 0) {
    at::Tensor y2 = y.view({G * C, Do});
    at::mm_out(y2, text.expand({G, C, D}).reshape({G * C, D}), w.t());
  } else if (mode == 2) {
    const at::Tensor w2 = w.narrow(1, D, D);
    if (shared) {
      shared_half = at::mm(text[0], w2.t());
    } else {
      at::Tensor y2 = y.view({B * C, Do});
      at::mm_out(y2, text.reshape({B * C, D}), w2.t());
    }
  }
  // The cheaper operand to scale by c_b: the text rows (C x D) or W1's columns (D_out x D).
  const bool scale_text = C <= Do;
  const at::Tensor w1 = mode == 0 ? at::Tensor() : w.narrow(1, 0, D);
  const at::Tensor w1c = (mode == 0 || scale_text) ? at::Tensor() : w1.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "hcl_forward", [&] {
    const scalar_t* pb = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pg = norm ? gamma.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pbe = beta.defined() ? beta.data_ptr<scalar_t>() : nullptr;
    scalar_t* py = y.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    scalar_t* pr = norm ? rstd.data_ptr<scalar_t>() : nullptr;
    if (mode == 0) {
      at::parallel_for(0, G * C, 16, [&](int64_t r0, int64_t r1) {
        hcl_epilogue_rows<scalar_t>(py, po, pr, r0, r1, Do, pb, pg, pbe, norm, eps);
      });
      return;
    }
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      // ATen ops on worker threads: the caller's below-autograd dispatch state is thread-local.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor buf = scale_text ? at::empty({C, D}, opts) : at::empty({Do, D}, opts);
      scalar_t* pbuf = buf.data_ptr<scalar_t>();
      for (int64_t b = b0; b < b1; ++b) {
        const at::Tensor tb = text[shared ? 0 : b];
        const scalar_t* pc = cls.data_ptr<scalar_t>() + b * D;
        const int64_t rows = scale_text ? C : Do;
        const scalar_t* src = scale_text ? tb.data_ptr<scalar_t>() : w1c.data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r) mul_row<scalar_t>(pbuf + r * D, src + r * D, pc, D);
        at::Tensor yb = y[b];
        const at::Tensor lhs = scale_text ? buf : tb;
        const at::Tensor rhs = scale_text ? w1.t() : buf.t();
        if (mode == 1) {
          at::mm_out(yb, lhs, rhs);
        } else if (shared) {
          at::addmm_out(yb, shared_half, lhs, rhs);
        } else {
          yb.addmm_(lhs, rhs);
        }
        hcl_epilogue_rows<scalar_t>(py + b * C * Do, po + b * C * Do, pr ? pr + b * C : nullptr, 0, C, Do, pb, pg,
                                    pbe, norm, eps);
      }
    });
  });
  at::Tensor xhat = norm ? y : at::empty({0}, opts);
  if (G != B) {
    out = out.expand({B, C, Do}).contiguous();
    if (norm) {
      xhat = xhat.expand({B, C, Do}).contiguous();
      rstd = rstd.expand({B, C}).contiguous();
    }
  }
  return {out.to(dt), xhat, rstd};
}

LpmTensor6 hcl_backward_kernel(const at::Tensor& grad_in, const at::Tensor& text_in, const at::Tensor& cls_in,
                               const at::Tensor& weight_in, const std::optional<at::Tensor>& nw_in,
                               const at::Tensor& xhat, const at::Tensor& rstd, int64_t mode, bool has_bias,
                               bool has_norm_bias) {
  const auto dt = text_in.scalar_type();
  const auto ct = compute_type(dt);
  const at::Tensor text = as_compute(text_in, ct), cls = as_compute(cls_in, ct), w = as_compute(weight_in, ct);
  const at::Tensor g_out = as_compute(grad_in, ct);
  const int64_t B = cls.size(0), T = text.size(0), C = text.size(1), D = text.size(2), Do = w.size(0);
  const bool shared = T == 1 && B != 1;
  auto opts = text.options().dtype(ct);
  auto empty = [&]() { return at::empty({0}, text_in.options()); };  // outputs may not alias
  at::Tensor g, g_nw = empty(), g_nb = empty();
  if (nw_in.has_value()) {
    g_nw = (g_out * xhat).sum({0, 1}).to(dt);
    if (has_norm_bias) g_nb = g_out.sum({0, 1}).to(dt);
    g = (g_out * as_compute(*nw_in, ct)).contiguous();
    const at::Tensor xh = xhat.contiguous(), rs = rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "hcl_ln_backward", [&] {
      scalar_t* pg = g.data_ptr<scalar_t>();
      const scalar_t* px = xh.data_ptr<scalar_t>();
      const scalar_t* pr = rs.data_ptr<scalar_t>();
      at::parallel_for(0, B * C, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) ln_backward_row<scalar_t>(pg + r * Do, px + r * Do, Do, pr[r]);
      });
    });
  } else {
    g = g_out.contiguous();
  }
  at::Tensor g_bias = has_bias ? g.sum({0, 1}).to(dt) : empty();
  const at::Tensor g2 = g.view({B * C, Do});
  // The sum over images of the gradient: all the shared half (t W2^T) needs when text is shared.
  at::Tensor gsum = shared ? g.sum(0) : at::Tensor();
  at::Tensor g_text, g_cls, g_w;
  if (mode == 0) {
    if (shared) {
      g_text = at::mm(gsum, w).unsqueeze(0);
      g_w = at::mm(gsum.t(), text[0]);
    } else {
      g_text = at::mm(g2, w).view({B, C, D});
      g_w = at::mm(g2.t(), text.reshape({B * C, D}));
    }
    g_cls = at::zeros({B, D}, opts);
  } else {
    const at::Tensor w1 = w.narrow(1, 0, D);
    const at::Tensor h = at::mm(g2, w1);  // (B * C, D): d(t * c_b)
    g_text = at::empty({T, C, D}, opts);
    g_cls = at::empty({B, D}, opts);
    g_w = at::empty({Do, mode == 2 ? 2 * D : D}, opts);
    at::Tensor g_w1 = g_w.narrow(1, 0, D);
    const at::Tensor tc = text.contiguous(), cc = cls.contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "hcl_backward", [&] {
      const scalar_t* ph = h.data_ptr<scalar_t>();
      const scalar_t* pt = tc.data_ptr<scalar_t>();
      const scalar_t* pc = cc.data_ptr<scalar_t>();
      scalar_t* pgt = g_text.data_ptr<scalar_t>();
      scalar_t* pgc = g_cls.data_ptr<scalar_t>();
      // d text: H_b * c_b (summed over b for shared text), parallel over class rows.
      at::parallel_for(0, C, 4, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          if (shared) {
            scalar_t* dst = pgt + c * D;
            std::fill(dst, dst + D, scalar_t(0));
            for (int64_t b = 0; b < B; ++b) fma_row<scalar_t>(dst, ph + (b * C + c) * D, pc + b * D, D);
          } else {
            for (int64_t b = 0; b < B; ++b) mul_row<scalar_t>(pgt + (b * C + c) * D, ph + (b * C + c) * D, pc + b * D, D);
          }
        }
      });
      // d cls_b = sum_c H_bc * t_c, parallel over images.
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      // ATen ops on worker threads: the caller's below-autograd dispatch state is thread-local.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* dst = pgc + b * D;
          std::fill(dst, dst + D, scalar_t(0));
          const scalar_t* tb = pt + (shared ? 0 : b) * C * D;
          for (int64_t c = 0; c < C; ++c) fma_row<scalar_t>(dst, ph + (b * C + c) * D, tb + c * D, D);
        }
      });
      // d W1 = sum_b g_b^T (t_b * c_b): the Hadamard product re-formed per image for one block of
      // columns at a time; a task owns its column block of d W1, so no partial sums are needed.
      constexpr int64_t KB = 64;
      at::parallel_for(0, (D + KB - 1) / KB, 1, [&](int64_t k0, int64_t k1) {
        // ATen ops on worker threads: the caller's below-autograd dispatch state is thread-local.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor blockbuf = at::empty({C, KB}, opts);
        scalar_t* pbuf = blockbuf.data_ptr<scalar_t>();
        for (int64_t kb = k0; kb < k1; ++kb) {
          const int64_t lo = kb * KB, width = std::min(KB, D - lo);
          at::Tensor dst = g_w1.narrow(1, lo, width);
          at::Tensor bb = blockbuf.narrow(1, 0, width);
          for (int64_t b = 0; b < B; ++b) {
            const scalar_t* tb = pt + (shared ? 0 : b) * C * D;
            for (int64_t c = 0; c < C; ++c) mul_row<scalar_t>(pbuf + c * KB, tb + c * D + lo, pc + b * D + lo, width);
            if (b == 0) {
              at::mm_out(dst, g[b].t(), bb);
            } else {
              dst.addmm_(g[b].t(), bb);
            }
          }
        }
      });
    });
    if (mode == 2) {
      const at::Tensor w2 = w.narrow(1, D, D);
      at::Tensor g_w2 = g_w.narrow(1, D, D);
      if (shared) {
        g_text.add_(at::mm(gsum, w2).unsqueeze(0));
        at::mm_out(g_w2, gsum.t(), text[0]);
      } else {
        g_text.view({B * C, D}).addmm_(g2, w2);
        at::mm_out(g_w2, g2.t(), text.reshape({B * C, D}));
      }
    }
  }
  return {g_text.to(dt), g_cls.to(dt), g_w.to(dt), g_bias, g_nw, g_nb};
}

// ------------------------------------------------------------------------------------------------
// lpm_logits

// True when (e V) x^T (C-sized) costs less than e (x V^T)^T (N-sized); only used without LayerNorm.
inline bool reassociate(int64_t C, int64_t N, int64_t D, int64_t Do) {
  return C * Do * D + C * N * D < N * D * Do + C * N * Do;
}

// Column block of the MKL form of the triangular product z = R x' of the folded LayerNorm (pixels not
// channel-first; see the top comment), and of the FLOP count both forms report. Each block also
// multiplies the zero half of its diagonal block (kTriBlock / D more than the triangle): at D = 512,
// 32 wastes 6% and ran 5% faster than 64 (12.5%), 16 slower again (rank-16 updates run below GEMM rate).
constexpr int64_t kTriBlock = 32;
// Column block of the backward's lower block triangle of S = X^T diag(w) X, and the row block of the
// d V assembly that uses it.
constexpr int64_t kGramBlock = 64;

// Multiply-adds per pixel of z = R[:, :D] x with R (K, D + 1) upper trapezoidal, K-split in blocks of
// kTriBlock columns: block [k, k + kw) meets rows [0, min(k + kw, K)) only.
inline int64_t triangular_fmas(int64_t D, int64_t K) {
  int64_t s = 0;
  for (int64_t k = 0; k < D; k += kTriBlock) {
    const int64_t kw = std::min(kTriBlock, D - k);
    s += kw * std::min(k + kw, K);
  }
  return s;
}

// Multiply-adds of the Householder QR of an (m, n) matrix (half of LAPACK's geqrf FLOP count).
inline int64_t qr_fmas(int64_t m, int64_t n) {
  return m >= n ? m * n * n - n * n * n / 3 : n * m * m - m * m * m / 3;
}

// Multiply-adds per pixel of the lower block triangle of the symmetric S = X^T diag(w) X (D x D) in
// column blocks of kGramBlock: block [j, j + jw) takes rows [j, D).
inline int64_t gram_fmas(int64_t D) {
  int64_t s = 0;
  for (int64_t j = 0; j < D; j += kGramBlock) s += std::min(kGramBlock, D - j) * (D - j);
  return s;
}

// Backward with LayerNorm: d V through the Gram form (see the top comment) when it costs less than
// d y^T x. Mirrored by lpm_logits_flops in Python.
inline bool gram_weight_grad(int64_t B, int64_t C, int64_t N, int64_t D, int64_t Do) {
  return B * N * (C * D + gram_fmas(D)) + Do * D * D + B * C * Do * D < B * N * D * Do;
}

// Inference with LayerNorm: the folded form (K-split triangular product, C-sized logits GEMM, one QR)
// against the plain one (projection, then logits). The QR is weighted 4x: LAPACK's panel
// factorisation runs far below GEMM rate at these sizes. Mirrored by lpm_logits_flops in Python.
inline bool fold_layer_norm(int64_t B, int64_t C, int64_t N, int64_t D, int64_t Do) {
  const int64_t K = std::min(Do, D + 1);
  const int64_t folded = B * C * Do * D + B * C * N * D + B * N * triangular_fmas(D, K) + 4 * qr_fmas(Do, D + 1);
  return folded < B * N * D * Do + B * C * N * Do;
}

// The triangular factor R of the QR of [Vc | v0c], memoised on the exact contents of that matrix: in
// inference the weights are the same call after call, and the QR (LAPACK's panel steps, on one
// thread) would otherwise cost a quarter of the call at RPN's sizes (3.4 ms of ~14 for D = 512). A hit
// costs one compare of the Do x (D + 1) values; any change of the weights or the bias, in place or
// not, is a miss. A few entries, so that several heads (or scales) each keep theirs.
class QrCache {
 public:
  at::Tensor r_of(const at::Tensor& aug) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const Entry& e : entries_)
        if (same(e.key, aug)) return e.r;
    }
    at::Tensor r = std::get<1>(at::linalg_qr(aug, "r")).contiguous();  // rows read as broadcast operands
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() == kEntries) entries_.erase(entries_.begin());
    entries_.push_back({aug, r});  // aug is the caller's fresh matrix, never written after this
    return r;
  }

 private:
  struct Entry {
    at::Tensor key, r;
  };
  static constexpr size_t kEntries = 4;
  static bool same(const at::Tensor& a, const at::Tensor& b) {
    return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
           std::memcmp(a.const_data_ptr(), b.const_data_ptr(), a.nbytes()) == 0;
  }
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

QrCache& qr_cache() {
  static QrCache cache;
  return cache;
}

// The broadcast micro-kernel of the folded inference, for channel-first pixels (x^T rows contiguous
// over n, RPN's (B, D, H, W) map): a packed matrix (R, or A) times a block of pixels, each product
// consumed by an epilogue as it leaves the registers (|R [x; 1]|^2, or the finished logits), so
// z = R [x; 1] never reaches memory and no GEMM re-packs x (MKL's packing copies were an eighth of
// the blocked addmm form). Rows i of the matrix (kTriRows at a time, one entry broadcast per FMA row)
// against the block's x^T rows (kTriVecs vectors of pixels, packed contiguous, in L2); for R over
// l >= i only: R is upper trapezoidal with exact zeros below the diagonal, so a row block wastes at
// most kTriRows^2 / 2 multiply-adds (under 1% at D = 512) against the 6-12% of the column-blocked form.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTriRows = 6, kTriVecs = 4;  // 24 accumulators + 4 x vectors + a broadcast of 32 zmm
#else
constexpr int kTriRows = 3, kTriVecs = 4;  // 12 accumulators + a broadcast + 3 x vectors (the FMAs read the 4th)
#endif

// Rows of a matrix M (rows x D, leading dimension ld) in the micro-kernel's order, row block by row
// block (blocks of kTriRows rows, the last one shorter): a block of rb rows starting at row i0 holds
// its rb initial values init[i], then for each l in [l0, D) its rb entries M[i, l] side by side
// (l0 = i0 for an upper trapezoidal M, whose entries left of the diagonal are zeros, else 0), so the
// kernel's broadcasts walk one pointer. Read through one pointer per row instead, the rows' pointers
// and the x vectors outgrow the registers.
template <typename T>
void pack_panels(const T* m, int64_t ld, int64_t rows, int64_t D, const T* init, int64_t init_stride,
                 bool upper, T* out) {
  for (int64_t i0 = 0; i0 < rows; i0 += kTriRows) {
    const int64_t rb = std::min<int64_t>(kTriRows, rows - i0);
    for (int64_t q = 0; q < rb; ++q) *out++ = init ? init[(i0 + q) * init_stride] : T(0);
    for (int64_t l = upper ? i0 : 0; l < D; ++l)
      for (int64_t q = 0; q < rb; ++q) *out++ = m[(i0 + q) * ld + l];
  }
}

// Floats that pack_panels writes.
inline int64_t panels_size(int64_t rows, int64_t D, bool upper) {
  int64_t n = 0;
  for (int64_t i0 = 0; i0 < rows; i0 += kTriRows)
    n += std::min<int64_t>(kTriRows, rows - i0) * (1 + D - (upper ? i0 : 0));
  return n;
}

// One row block: acc[q] = init_q + sum_{l < n_l} panel_l[q] x_l for the kTriVecs * VS pixels whose
// x^T rows are xt[l * ldx ..], then epi(q, v, acc[q][v]) for each accumulator, by value: an array
// whose address reached the epilogue would be kept in memory, every FMA then loading and storing it.
template <int RB, typename T, typename Epi>
__attribute__((always_inline)) inline void panel_block(const T* panel, int64_t n_l, const T* xt, int64_t ldx,
                                                       const Epi& epi) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int VS = Vec::size();
  Vec acc[RB][kTriVecs];
  for (int q = 0; q < RB; ++q)
    for (int v = 0; v < kTriVecs; ++v) acc[q][v] = Vec(panel[q]);
  panel += RB;
  for (int64_t l = 0; l < n_l; ++l, panel += RB, xt += ldx) {
    Vec xv[kTriVecs];
    for (int v = 0; v < kTriVecs; ++v) xv[v] = Vec::loadu(xt + v * VS);
    for (int q = 0; q < RB; ++q) {
      const Vec rv(panel[q]);
      for (int v = 0; v < kTriVecs; ++v) acc[q][v] = at::vec::fmadd(rv, xv[v], acc[q][v]);
    }
  }
  for (int q = 0; q < RB; ++q)
    for (int v = 0; v < kTriVecs; ++v) epi(q, v, acc[q][v]);
}

template <int RB, typename T, typename Epi>
inline void panel_block_tail(int rows, const T* panel, int64_t n_l, const T* xt, int64_t ldx, const Epi& epi) {
  if constexpr (RB > 1) {
    if (rows < RB) return panel_block_tail<RB - 1>(rows, panel, n_l, xt, ldx, epi);
  }
  panel_block<RB>(panel, n_l, xt, ldx, epi);
}

// The product of a packed matrix (pack_panels) with a block of kTriVecs * VS pixels: epi(i, v, z) receives
// vector v of the pixels' row i of the product.
template <typename T, typename Epi>
void panel_product(const T* panels, int64_t rows, int64_t D, bool upper, const T* xt, int64_t ldx, const Epi& epi) {
  for (int64_t i0 = 0; i0 < rows; i0 += kTriRows) {
    const int rb = static_cast<int>(std::min<int64_t>(kTriRows, rows - i0));
    const int64_t l0 = upper ? i0 : 0;
    panel_block_tail<kTriRows>(rb, panels, D - l0, xt + l0 * ldx, ldx,
                               [&](int q, int v, const auto z) { epi(i0 + q, v, z); });
    panels += rb * (1 + D - l0);
  }
}

// Inference logits with the LayerNorm folded into the weights (B, C, N); x (B, N, D) any strides, e
// (B, C, Do), bias and beta possibly undefined, all in the compute dtype.
at::Tensor folded_logits(const at::Tensor& x, const at::Tensor& e_in, const at::Tensor& w_in, const at::Tensor& bias,
                         const at::Tensor& gamma_in, const at::Tensor& beta, double eps, double scale) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), C = e_in.size(1), Do = w_in.size(0);
  auto opts = x.options();
  const at::Tensor e = e_in.contiguous(), w = w_in.contiguous(), gamma = gamma_in.contiguous();
  const at::Tensor bc = bias.defined() ? bias.contiguous() : bias, betac = beta.defined() ? beta.contiguous() : beta;
  // [Vc | v0c]: the weights and bias with their mean over the output features removed, so that
  // y - mean(y) = Vc x + v0c exactly (no cancellation however large the mean of y).
  at::Tensor aug = at::empty({Do, D + 1}, opts);
  at::Tensor logits = at::empty({B, C, N}, opts);
  at::Tensor a0 = at::empty({B, C}, opts), cb = at::empty({B, C}, opts);
  at::Tensor r;  // (K, D + 1) upper trapezoidal, K = min(Do, D + 1): |Vc x + v0c| = |R [x; 1]|
  const int64_t R = chunk_rows(N, Do);
  const int64_t chunks = (N + R - 1) / R;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lpm_folded_logits", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    const scalar_t* pw = w.data_ptr<scalar_t>();
    const scalar_t* pb = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pg = gamma.data_ptr<scalar_t>();
    const scalar_t* pbeta = betac.defined() ? betac.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pe = e.data_ptr<scalar_t>();
    scalar_t* paug = aug.data_ptr<scalar_t>();
    scalar_t* pa0 = a0.data_ptr<scalar_t>();
    scalar_t* pcb = cb.data_ptr<scalar_t>();
    scalar_t* pl = logits.data_ptr<scalar_t>();
    // Serial: (Do, D) elementwise work is not worth a fork/join of its own.
    std::vector<scalar_t> colmean(D, scalar_t(0));
    for (int64_t o = 0; o < Do; ++o) add_row<scalar_t>(colmean.data(), pw + o * D, D);
    for (auto& m : colmean) m /= scalar_t(Do);
    // In double: a rounding error of the mean would shift every centred entry alike, i.e. un-centre y.
    scalar_t bmean = 0;
    if (pb) bmean = static_cast<scalar_t>(std::accumulate(pb, pb + Do, 0.0) / static_cast<double>(Do));
    for (int64_t o = 0; o < Do; ++o) {
      scalar_t* row = paug + o * (D + 1);
      int64_t k = 0;
      for (; k + W <= D; k += W) (Vec::loadu(pw + o * D + k) - Vec::loadu(colmean.data() + k)).store(row + k);
      for (; k < D; ++k) row[k] = pw[o * D + k] - colmean[k];
      row[D] = pb ? pb[o] - bmean : scalar_t(0);
    }
    const at::Tensor vc = aug.narrow(1, 0, D), v0c = aug.select(1, D);
    // Phase 1, scheduled dynamically: the QR (LAPACK's many panel steps run single-threaded, without
    // a fork/join per step; memoised, see QrCache) alongside the C-sized numerators
    // logits_b = A_b x_b^T with A_b = scale (e_b * gamma) Vc, a0_b = scale (e_b * gamma) v0c and
    // cb_b = scale e_b beta: for channel-first pixels A_b is packed for phase 2's micro-kernel, which
    // multiplies it with each block of pixels it already holds (MKL would pack x_b^T again for a
    // GEMM of only C rows); else its product is written raw into the logits.
    const bool channel_first = x.stride(1) == 1;
    const int64_t a_size = channel_first ? panels_size(C, D, false) : 0;
    std::vector<scalar_t> a_panels(B * a_size);
    parallel_tasks(B + 1, [&](int64_t, const auto& claim) {
      at::Tensor ep = at::empty({C, Do}, opts), a = at::empty({C, D}, opts);
      scalar_t* pep = ep.data_ptr<scalar_t>();
      for (int64_t task; (task = claim()) >= 0;) {
        if (task == 0) {
          r = qr_cache().r_of(aug);
          continue;
        }
        const int64_t b = task - 1;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* erow = pe + (b * C + c) * Do;
          scalar_t* row = pep + c * Do;
          mul_row<scalar_t>(row, erow, pg, Do);
          Vec acc1(scalar_t(0));
          int64_t k = 0;
          scalar_t t0 = 0, t1 = 0;
          for (; k + W <= Do; k += W) {
            const Vec v = Vec::loadu(row + k) * Vec(scalar_t(scale));
            v.store(row + k);
            if (pbeta) acc1 = at::vec::fmadd(Vec::loadu(erow + k), Vec::loadu(pbeta + k), acc1);
          }
          for (; k < Do; ++k) {
            row[k] *= scalar_t(scale);
            if (pbeta) t1 += erow[k] * pbeta[k];
          }
          for (int64_t o = 0; o < Do; ++o) t0 += row[o] * paug[o * (D + 1) + D];  // v0c: a strided column
          pa0[b * C + c] = t0;
          pcb[b * C + c] = scalar_t(scale) * (hsum(acc1) + t1);
        }
        at::mm_out(a, ep, vc);
        if (channel_first) {
          pack_panels(a.data_ptr<scalar_t>(), D, C, D, pa0 + b * C, 1, false, a_panels.data() + b * a_size);
        } else {
          at::Tensor lb = logits[b];
          at::mm_out(lb, a, x[b].t());
        }
      }
    });
    const int64_t K = r.size(0);
    // (raw + a0) * rstd + cb for the logits columns [n0, n0 + rows) of image b.
    const auto finish = [&](int64_t b, int64_t n0, int64_t rows, const scalar_t* rs) {
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* row = pl + (b * C + c) * N + n0;
        const scalar_t s0 = pa0[b * C + c], s1 = pcb[b * C + c];
        const Vec va0(s0), vcb(s1);
        int64_t i = 0;
        for (; i + W <= rows; i += W) at::vec::fmadd(Vec::loadu(row + i) + va0, Vec::loadu(rs + i), vcb).store(row + i);
        for (; i < rows; ++i) row[i] = (row[i] + s0) * rs[i] + s1;
      }
    };
    if (channel_first) {
      // Phase 2 for channel-first pixels, per block of P pixels whose x^T rows are packed contiguous
      // (zero past N, so every block, the last one included, reads whole vectors): the squared norms
      // |R [x; 1]|^2 from R's packed triangle (z never reaches memory, R's zeros are skipped), then
      // the block's logits a0 + A x from A's panels, finished as they leave the registers.
      constexpr int64_t P = kTriVecs * W;
      const int64_t blocks = (N + P - 1) / P;
      const scalar_t* px = x.data_ptr<scalar_t>();
      const int64_t sb = x.stride(0), sd = x.stride(2);
      const scalar_t* pr = r.data_ptr<scalar_t>();
      std::vector<scalar_t> r_panels(panels_size(K, D, true));
      pack_panels(pr, D + 1, K, D, pr + D, D + 1, true, r_panels.data());
      parallel_tasks(B * blocks, [&](int64_t, const auto& claim) {
        std::vector<scalar_t> xt(D * P), ss(P), rs(P), tail(N % P ? C * P : 0);
        for (int64_t task; (task = claim()) >= 0;) {
          const int64_t b = task / blocks, n0 = (task % blocks) * P, rows = std::min(P, N - n0);
          for (int64_t l = 0; l < D; ++l) {
            const scalar_t* src = px + b * sb + l * sd + n0;
            std::copy(src, src + rows, xt.data() + l * P);
            std::fill(xt.data() + l * P + rows, xt.data() + (l + 1) * P, scalar_t(0));
          }
          // The epilogues keep their operands in memory (ss, rs): vectors live across the micro-kernel's
          // loop would push its accumulators out of the registers.
          std::fill(ss.begin(), ss.end(), scalar_t(0));
          scalar_t* const pss = ss.data();
          panel_product(r_panels.data(), K, D, true, xt.data(), P, [&](int64_t, int v, const Vec z) {
            at::vec::fmadd(z, z, Vec::loadu(pss + v * W)).store(pss + v * W);
          });
          for (int64_t i = 0; i < P; ++i) rs[i] = scalar_t(1) / std::sqrt(ss[i] / scalar_t(Do) + scalar_t(eps));
          const scalar_t* const prs = rs.data();
          // Whole vectors only: with a partial store in the epilogue the compiler kept the accumulators on
          // the stack (AVX2, C = 171: 28 -> 33 ms). The last, partial block goes through tail.
          const bool whole = rows == P;
          scalar_t* const dst = whole ? pl + b * C * N + n0 : tail.data();
          const int64_t ld = whole ? N : P;
          const scalar_t* const cbb = pcb + b * C;
          panel_product(a_panels.data() + b * a_size, C, D, false, xt.data(), P, [&](int64_t c, int v, const Vec z) {
            at::vec::fmadd(z, Vec::loadu(prs + v * W), Vec(cbb[c])).store(dst + c * ld + v * W);
          });
          if (!whole) {
            for (int64_t c = 0; c < C; ++c) std::copy(dst + c * P, dst + c * P + rows, pl + (b * C + c) * N + n0);
          }
        }
      });
      return;
    }
    const at::Tensor r_bias = r.select(1, D).contiguous();
    const scalar_t* prb = r_bias.data_ptr<scalar_t>();
    // Phase 2, per image and chunk of pixels: z = R [x; 1] by K-split blocks (block [k, k + kw) of
    // x's features meets only R's first k + kw rows), its squared norm gives rstd, and the chunk's
    // logits columns are finished in place: (raw + a0) * rstd + cb.
    parallel_tasks(B * chunks, [&](int64_t, const auto& claim) {
      at::Tensor z = at::empty({R, K}, opts);
      std::vector<scalar_t> rs(R);
      scalar_t* pz = z.data_ptr<scalar_t>();
      for (int64_t task; (task = claim()) >= 0;) {
        const int64_t b = task / chunks, n0 = (task % chunks) * R, rows = std::min(R, N - n0);
        const at::Tensor xb = x[b].narrow(0, n0, rows);
        for (int64_t i = 0; i < rows; ++i) std::copy(prb, prb + K, pz + i * K);
        for (int64_t k = 0; k < D; k += kTriBlock) {
          const int64_t kw = std::min(kTriBlock, D - k), re = std::min(k + kw, K);
          z.narrow(0, 0, rows).narrow(1, 0, re).addmm_(xb.narrow(1, k, kw), r.narrow(0, 0, re).narrow(1, k, kw).t());
        }
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t* zi = pz + i * K;
          Vec acc(scalar_t(0));
          int64_t k = 0;
          scalar_t tail = 0;
          for (; k + W <= K; k += W) {
            const Vec v = Vec::loadu(zi + k);
            acc = at::vec::fmadd(v, v, acc);
          }
          for (; k < K; ++k) tail += zi[k] * zi[k];
          rs[i] = scalar_t(1) / std::sqrt((hsum(acc) + tail) / scalar_t(Do) + scalar_t(eps));
        }
        finish(b, n0, rows, rs.data());
      }
    });
  });
  return logits;
}

LpmTensor3 logits_forward_kernel(const at::Tensor& pixels_in, const at::Tensor& emb_in, const at::Tensor& weight_in,
                                 const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& nw_in,
                                 const std::optional<at::Tensor>& nb_in, double eps, double scale, bool save) {
  const auto dt = pixels_in.scalar_type();
  const auto ct = compute_type(dt);
  const at::Tensor x = as_compute(pixels_in, ct), e = as_compute(emb_in, ct), w = as_compute(weight_in, ct);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), C = e.size(1), Do = w.size(0);
  auto opts = x.options().dtype(ct);
  auto empty = [&]() { return at::empty({0}, opts); };  // outputs may not alias
  const bool norm = nw_in.has_value();
  at::Tensor bias = bias_in.has_value() ? as_compute(*bias_in, ct).contiguous() : at::Tensor();
  at::Tensor logits = at::empty({B, C, N}, opts);
  if (!norm) {
    at::Tensor cb = bias_in.has_value() ? at::matmul(e, bias).mul_(scale) : at::zeros({B, C}, opts);
    if (reassociate(C, N, D, Do)) {
      const at::Tensor a = at::mm(e.reshape({B * C, Do}), w).mul_(scale).view({B, C, D});
      at::baddbmm_out(logits, cb.unsqueeze(2), a, x.transpose(1, 2));
    } else {
      at::Tensor p = at::matmul(x, w.t());
      if (bias_in.has_value()) p.add_(bias);
      at::baddbmm_out(logits, cb.unsqueeze(2), e, p.transpose(1, 2), 1.0, scale);
    }
    return {logits.to(dt), empty(), empty()};
  }
  const at::Tensor gamma = as_compute(*nw_in, ct);
  if (!save && fold_layer_norm(B, C, N, D, Do)) {
    return {folded_logits(x, e, w, bias, gamma, nb_in.has_value() ? as_compute(*nb_in, ct) : at::Tensor(), eps, scale)
                .to(dt),
            empty(), empty()};
  }
  // gamma and beta move to the class side: logits = (scale e * gamma) xhat^T + scale e . beta.
  const at::Tensor ep = (e * gamma).mul_(scale);
  const at::Tensor cb = nb_in.has_value() ? at::matmul(e, as_compute(*nb_in, ct)).mul_(scale) : at::zeros({B, C}, opts);
  at::Tensor xhat = save ? at::empty({B, N, Do}, opts) : empty();
  at::Tensor rstd = save ? at::empty({B, N}, opts) : empty();
  const int64_t R = chunk_rows(N, Do);
  const int64_t chunks = (N + R - 1) / R;
  const at::Tensor wt = w.t();
  // One parallel region over (image, chunk) tasks; each task's GEMMs run single-threaded on its core
  // while its chunk stays in that core's L2.
  AT_DISPATCH_FLOATING_TYPES(ct, "lpm_logits_forward", [&] {
    const scalar_t* pb = bias_in.has_value() ? bias.data_ptr<scalar_t>() : nullptr;
    parallel_tasks(B * chunks, [&](int64_t, const auto& claim) {
      at::Tensor scratch = save ? at::Tensor() : at::empty({R, Do}, opts);
      for (int64_t task; (task = claim()) >= 0;) {
        const int64_t b = task / chunks, n0 = (task % chunks) * R, r = std::min(R, N - n0);
        at::Tensor chunk = save ? xhat[b].narrow(0, n0, r) : scratch.narrow(0, 0, r);
        at::mm_out(chunk, x[b].narrow(0, n0, r), wt);
        scalar_t* pc = chunk.data_ptr<scalar_t>();
        scalar_t* pr = save ? rstd.data_ptr<scalar_t>() + b * N + n0 : nullptr;
        for (int64_t i = 0; i < r; ++i) {
          const scalar_t rs = ln_forward_row<scalar_t>(pc + i * Do, Do, pb, eps);
          if (pr) pr[i] = rs;
        }
        at::Tensor lb = logits[b].narrow(1, n0, r);
        at::addmm_out(lb, cb[b].unsqueeze(1), ep[b], chunk.t());
      }
    });
  });
  return {logits.to(dt), xhat, rstd};
}

LpmTensor6 logits_backward_kernel(const at::Tensor& grad_in, const at::Tensor& pixels_in, const at::Tensor& emb_in,
                                  const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                                  const std::optional<at::Tensor>& nw_in, const std::optional<at::Tensor>& nb_in,
                                  const at::Tensor& xhat_in, const at::Tensor& rstd_in, double scale) {
  const auto dt = pixels_in.scalar_type();
  const auto ct = compute_type(dt);
  const at::Tensor x = as_compute(pixels_in, ct), e = as_compute(emb_in, ct), w = as_compute(weight_in, ct);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), C = e.size(1), Do = w.size(0);
  auto opts = x.options().dtype(ct);
  auto empty = [&]() { return at::empty({0}, pixels_in.options()); };  // outputs may not alias
  at::Tensor g, rows;
  serial([&] {
    g = as_compute(grad_in, ct).mul(scale);  // (B, C, N), scale folded in once
    rows = g.sum(2);                          // (B, C)
  });
  if (!nw_in.has_value()) {
    const at::Tensor a = at::mm(e.reshape({B * C, Do}), w).view({B, C, D});
    const at::Tensor m = at::bmm(g, x);  // (B, C, D)
    at::Tensor g_x = at::empty({B, D, N}, opts).transpose(1, 2);  // channel-first, see below
    at::bmm_out(g_x, g.transpose(1, 2), a);
    at::Tensor g_e = at::mm(m.reshape({B * C, D}), w.t()).view({B, C, Do});
    at::Tensor g_b = empty();
    if (bias_in.has_value()) {
      g_e.add_(rows.unsqueeze(2) * as_compute(*bias_in, ct));
      g_b = at::mv(e.reshape({B * C, Do}).t(), rows.reshape({B * C})).to(dt);
    }
    at::Tensor g_w = at::mm(e.reshape({B * C, Do}).t(), m.reshape({B * C, D}));
    return {g_x.to(dt), g_e.to(dt), g_w.to(dt), g_b, empty(), empty()};
  }
  const at::Tensor gamma = as_compute(*nw_in, ct);
  const at::Tensor xhat = xhat_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor ep;
  serial([&] { ep = e * gamma; });
  // d x stored channel-first, (B, D, N): the layout of the (B, N, D) view of a (B, D, H, W) map, which
  // autograd then hands to the map as it is, without a transposing copy. Fixed by the shape alone (the
  // fake kernel's contract), whatever the strides of the pixels.
  at::Tensor g_x = at::empty({B, D, N}, opts).transpose(1, 2);
  const int64_t R = chunk_rows(N, Do);
  const int64_t chunks = (N + R - 1) / R;
  // d V and d v0 are sums over all tasks: one partial per thread, reduced once at the end. In the Gram
  // form the partials are S (D x D, lower block triangle), s = sum_n w_n x_n and t = sum_n q_n x_n, and
  // per image and chunk T1 = (G * rstd) x.
  const int64_t P = task_slots(B * chunks);
  const bool gram = gram_weight_grad(B, C, N, D, Do);
  // Z = G xhat (B, C, Do), per chunk while the chunk of xhat is in cache for the LayerNorm backward. The
  // Gram form needs none: xhat_n = rstd_n (Vc x_n + v0c), so Z = T1 Vc^T + (G rstd) v0c^T from the T1
  // it computes anyway (C-sized per image instead of C * Do multiply-adds per pixel).
  at::Tensor z_part = gram ? at::Tensor() : at::empty({B, chunks, C, Do}, opts);
  at::Tensor g_w_part, g_b_part, s_part;
  serial([&] {
    g_w_part = at::zeros({P, gram ? D : Do, D}, opts);
    g_b_part = at::zeros({P, Do}, opts);
    if (gram) s_part = at::zeros({P, 2, D}, opts);
  });
  at::Tensor t1_part = gram ? at::empty({B, chunks, C, D}, opts) : at::Tensor();
  const bool has_bias = bias_in.has_value();
  AT_DISPATCH_FLOATING_TYPES(ct, "lpm_logits_backward", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size();
    const scalar_t* px = xhat.data_ptr<scalar_t>();
    const scalar_t* pr = rstd.data_ptr<scalar_t>();
    const scalar_t* pxin = x.data_ptr<scalar_t>();
    const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
    parallel_tasks(B * chunks, [&](int64_t slot, const auto& claim) {
      at::Tensor u = at::empty({R, Do}, opts);
      at::Tensor gw = g_w_part[slot];
      scalar_t* pgb = g_b_part.data_ptr<scalar_t>() + slot * Do;
      // Gram form: per row n of the chunk w_n = rstd^2 mean(u xhat), q_n = rstd mean(u); x w as (D, rows).
      at::Tensor xw = gram ? at::empty({D, R}, opts) : at::Tensor();
      at::Tensor gs = gram ? at::empty({C, R}, opts) : at::Tensor();
      std::vector<scalar_t> wq(gram ? 2 * R : 0);
      for (int64_t task; (task = claim()) >= 0;) {
        const int64_t b = task / chunks, n0 = (task % chunks) * R, r = std::min(R, N - n0);
        at::Tensor ub = u.narrow(0, 0, r);
        const at::Tensor gc = g[b].narrow(1, n0, r);
        const at::Tensor xc = x[b].narrow(0, n0, r);
        if (!gram) {
          at::Tensor zc = z_part[b][task % chunks];
          at::mm_out(zc, gc, xhat[b].narrow(0, n0, r));
        }
        at::mm_out(ub, gc.t(), ep[b]);  // d p * gamma for the chunk's pixels
        scalar_t* pu = ub.data_ptr<scalar_t>();
        const scalar_t* pxh = px + (b * N + n0) * Do;
        const scalar_t* prs = pr + b * N + n0;
        scalar_t* pw = wq.data();
        scalar_t* pq = pw + R;
        for (int64_t i = 0; i < r; ++i) {
          ln_backward_row<scalar_t>(pu + i * Do, pxh + i * Do, Do, prs[i], gram ? pq + i : nullptr,
                                    gram ? pw + i : nullptr);
          if (has_bias) add_row<scalar_t>(pgb, pu + i * Do, Do);
        }
        at::Tensor gxb = g_x[b].narrow(0, n0, r);
        at::mm_out(gxb, ub, w);
        if (!gram) {
          gw.addmm_(ub.t(), xc);
          continue;
        }
        for (int64_t i = 0; i < r; ++i) {
          pq[i] *= prs[i];
          pw[i] *= prs[i] * prs[i];
        }
        // x w (D, rows) and the sums s += x^T w, t += x^T q, one feature at a time.
        scalar_t* pxw = xw.data_ptr<scalar_t>();
        scalar_t* ps = s_part.data_ptr<scalar_t>() + slot * 2 * D;
        const scalar_t* xb = pxin + b * xs0 + n0 * xs1;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t* xd = xb + d * xs2;
          scalar_t* dst = pxw + d * R;
          scalar_t sw = 0, sq = 0;
          int64_t i = 0;
          if (xs1 == 1) {
            Vec aw(scalar_t(0)), aq(scalar_t(0));
            for (; i + W <= r; i += W) {
              const Vec v = Vec::loadu(xd + i);
              const Vec vw = v * Vec::loadu(pw + i);
              vw.store(dst + i);
              aw = aw + vw;
              aq = at::vec::fmadd(v, Vec::loadu(pq + i), aq);
            }
            sw = hsum(aw);
            sq = hsum(aq);
          }
          for (; i < r; ++i) {
            const scalar_t v = xd[i * xs1];
            dst[i] = v * pw[i];
            sw += dst[i];
            sq += v * pq[i];
          }
          ps[d] += sw;
          ps[D + d] += sq;
        }
        // S += (x w)^T x on the lower block triangle: column block [j, j + jw) from rows [j, D).
        const at::Tensor xwc = xw.narrow(1, 0, r);
        for (int64_t j = 0; j < D; j += kGramBlock) {
          const int64_t jw = std::min(kGramBlock, D - j);
          gw.narrow(0, j, D - j).narrow(1, j, jw).addmm_(xwc.narrow(0, j, D - j), xc.narrow(1, j, jw));
        }
        // T1 = (G * rstd) x for the chunk.
        at::Tensor gsc = gs.narrow(1, 0, r);
        gsc.copy_(gc).mul_(rstd[b].narrow(0, n0, r));
        at::Tensor t1c = t1_part[b][task % chunks];
        at::mm_out(t1c, gsc, xc);
      }
    });
  });
  at::Tensor g_e, g_gamma, g_beta = empty(), g_w, g_b, sm, sums, t1, vc, v0c, z, gr;
  serial([&] {
    if (gram) {
      t1 = (chunks == 1 ? t1_part.select(1, 0) : t1_part.sum(1)).reshape({B * C, D});
      vc = w - w.mean(0, true);
      if (has_bias) {
        const at::Tensor b0 = as_compute(*bias_in, ct);
        v0c = b0 - b0.mean();
        gr = at::bmm(g, rstd.unsqueeze(2));  // G rstd, (B, C, 1)
      }
    } else {
      z = chunks == 1 ? z_part.select(1, 0) : z_part.sum(1);
    }
  });
  if (gram) {
    z = at::mm(t1, vc.t()).view({B, C, Do});  // B * C * Do * D: worth MKL's threads
    if (has_bias) z.add_(gr * v0c);
  }
  serial([&] {
    g_e = z * gamma;
    if (nb_in.has_value()) {
      g_e.add_(rows.unsqueeze(2) * as_compute(*nb_in, ct));
      g_beta = at::mv(e.reshape({B * C, Do}).t(), rows.reshape({B * C})).to(dt);
    }
    g_gamma = (e * z).sum({0, 1}).to(dt);
    g_w = P == 1 ? g_w_part[0] : g_w_part.sum(0);
    if (has_bias) g_b = P == 1 ? g_b_part[0] : g_b_part.sum(0);
    if (gram) {
      sm = g_w.tril().add_(g_w.tril(-1).t());  // S mirrored from its lower block triangle
      sums = P == 1 ? s_part[0] : s_part.sum(0);
    }
  });
  if (gram) {
    // d V = (e * gamma)^T T1 - 1 t^T - Vc S - v0c s^T, by blocks of rows in one parallel region.
    g_w = at::empty({Do, D}, opts);
    const at::Tensor ept = ep.reshape({B * C, Do}).t();
    const int64_t blocks = (Do + kGramBlock - 1) / kGramBlock;
    parallel_tasks(blocks, [&](int64_t, const auto& claim) {
      for (int64_t task; (task = claim()) >= 0;) {
        const int64_t o0 = task * kGramBlock, ow = std::min(kGramBlock, Do - o0);
        at::Tensor dst = g_w.narrow(0, o0, ow);
        at::mm_out(dst, ept.narrow(0, o0, ow), t1);
        dst.addmm_(vc.narrow(0, o0, ow), sm, 1, -1).sub_(sums[1].unsqueeze(0));
        if (has_bias) dst.sub_(at::outer(v0c.narrow(0, o0, ow), sums[0]));
      }
    });
  }
  return {g_x.to(dt), g_e.to(dt), g_w.to(dt), g_b.defined() ? g_b.to(dt) : empty(), g_gamma, g_beta};
}

}  // namespace CPU_CAPABILITY
}  // namespace ovseg_fast

#ifdef OVSEG_DISPATCH_ROOT

OVSEG_DECLARE_KERNEL(LpmTensor3, hcl_forward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, double))
OVSEG_DECLARE_KERNEL(LpmTensor6, hcl_backward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, bool, bool))
OVSEG_DECLARE_KERNEL(LpmTensor3, logits_forward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double, bool))
OVSEG_DECLARE_KERNEL(LpmTensor6, logits_backward_kernel,
                     (const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double))

namespace {

int64_t mode_index(c10::string_view mode) {
  if (mode == "a") return 0;
  if (mode == "b") return 1;
  TORCH_CHECK(mode == "c", "lpm: mode must be 'a', 'b' or 'c', got '", std::string(mode), "'");
  return 2;
}

void check_float_inputs(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lpm: ", name, " must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "lpm: ", name, " must be floating point");
}

ovseg_fast::LpmTensor3 hcl_cpu_forward(const at::Tensor& text, const at::Tensor& cls, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& norm_weight,
                                       const std::optional<at::Tensor>& norm_bias, c10::string_view mode,
                                       double eps) {
  check_float_inputs(text, "text");
  TORCH_CHECK(text.dim() == 3 && cls.dim() == 2 && weight.dim() == 2, "lpm: bad ranks");
  const int64_t m = mode_index(mode);
  auto out = OVSEG_DISPATCH_KERNEL(hcl_forward_kernel, text, cls, weight, bias, norm_weight, norm_bias, m, eps);
  ovseg_fast::plant_bug_in("lpm_hcl", std::get<0>(out));
  return out;
}

ovseg_fast::LpmTensor6 hcl_cpu_backward(const at::Tensor& grad, const at::Tensor& text, const at::Tensor& cls,
                                        const at::Tensor& weight, const std::optional<at::Tensor>& norm_weight,
                                        const at::Tensor& xhat, const at::Tensor& rstd, c10::string_view mode,
                                        bool has_bias, bool has_norm_bias) {
  check_float_inputs(text, "text");
  const int64_t m = mode_index(mode);
  return OVSEG_DISPATCH_KERNEL(hcl_backward_kernel, grad, text, cls, weight, norm_weight, xhat, rstd, m, has_bias,
                               has_norm_bias);
}

ovseg_fast::LpmTensor3 logits_cpu_forward(const at::Tensor& pixels, const at::Tensor& class_emb,
                                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& norm_weight,
                                          const std::optional<at::Tensor>& norm_bias, double eps, double scale,
                                          bool save) {
  check_float_inputs(pixels, "pixels");
  TORCH_CHECK(pixels.dim() == 3 && class_emb.dim() == 3 && weight.dim() == 2, "lpm: bad ranks");
  auto out = OVSEG_DISPATCH_KERNEL(logits_forward_kernel, pixels, class_emb, weight, bias, norm_weight, norm_bias, eps,
                                   scale, save);
  ovseg_fast::plant_bug_in("lpm_logits", std::get<0>(out));
  return out;
}

ovseg_fast::LpmTensor6 logits_cpu_backward(const at::Tensor& grad, const at::Tensor& pixels,
                                           const at::Tensor& class_emb, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& norm_weight,
                                           const std::optional<at::Tensor>& norm_bias, const at::Tensor& xhat,
                                           const at::Tensor& rstd, double scale) {
  check_float_inputs(pixels, "pixels");
  return OVSEG_DISPATCH_KERNEL(logits_backward_kernel, grad, pixels, class_emb, weight, bias, norm_weight, norm_bias,
                               xhat, rstd, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ovseg_fast, m) {
  m.def(
      "lpm_hcl_cpu_forward(Tensor text, Tensor cls, Tensor weight, Tensor? bias, Tensor? norm_weight, "
      "Tensor? norm_bias, str mode, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lpm_hcl_cpu_backward(Tensor grad_out, Tensor text, Tensor cls, Tensor weight, Tensor? norm_weight, "
      "Tensor xhat, Tensor rstd, str mode, bool has_bias, bool has_norm_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lpm_logits_cpu_forward(Tensor pixels, Tensor class_emb, Tensor weight, Tensor? bias, Tensor? norm_weight, "
      "Tensor? norm_bias, float eps, float scale, bool save) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lpm_logits_cpu_backward(Tensor grad_logits, Tensor pixels, Tensor class_emb, Tensor weight, Tensor? bias, "
      "Tensor? norm_weight, Tensor? norm_bias, Tensor xhat, Tensor rstd, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ovseg_fast, CPU, m) {
  m.impl("lpm_hcl_cpu_forward", &hcl_cpu_forward);
  m.impl("lpm_hcl_cpu_backward", &hcl_cpu_backward);
  m.impl("lpm_logits_cpu_forward", &logits_cpu_forward);
  m.impl("lpm_logits_cpu_backward", &logits_cpu_backward);
}

#endif  // OVSEG_DISPATCH_ROOT

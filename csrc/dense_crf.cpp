// Dense CRF (Kraehenbuehl & Koltun 2011) mean-field inference on the permutohedral lattice
// (Adams, Baek & Davis 2010), with pydensecrf's DenseCRF2D semantics. The readable spec is
// ovseg_fast/ops/dense_crf_reference.py; this is the CPU kernel behind ovseg_fast.ops.dense_crf.
//
// Design, per image of N pixels and C classes (C padded to CP, a multiple of 8, so every row of
// class values is a whole number of 8-float vectors; padded lanes stay exactly 0):
//  * Lattices are built once per image: the elevation/rounding/rank/barycentric maths per pixel runs
//    in parallel, in float32 with the reference implementation's operation order (FP contraction
//    off, so the AVX2/AVX512 copies build the very same lattice as pydensecrf); vertices go into
//    open-addressing hash tables (one per part of the image, one task each, sequential within it,
//    with a one-entry cache per simplex corner because neighbouring pixels mostly share vertices),
//    merged afterwards; then blur neighbours are looked up in parallel.
//  * Layouts: vertex values (M+1, CP) and the unary (N, CP) class-contiguous in 64-byte aligned
//    buffers, so a row is CP/8 aligned 32-byte vectors that never straddle cache lines; per pixel
//    (N, d+1) int32 vertex ids and float splat weights.
//  * The normalisation n_i = 1/sqrt(K1_i) is folded into the splat weights and alpha * compat into
//    one scale per kernel, so an iteration is: reduce the splat buffers and blur (Jacobi along each
//    axis) each lattice, the two lattices as two parallel tasks; then ONE pass over pixels that
//    slices both kernels' messages, adds the unary, takes the softmax (vectorised exp, shuffle-tree
//    max/sum) and splats the new Q_i into the next iteration's buffers. Q never goes to memory
//    between iterations. The pass runs in blocks of kBlock pixels (slice + softmax of the block,
//    then its splats) so the out-of-order core overlaps independent pixels' gathers and softmaxes
//    instead of serialising on each pixel's slice -> softmax -> splat chain.
//  * Splatting is a scatter, so each pixel chunk (one per thread) owns private vertex buffers
//    (vertex counts are small, M << N) that the next iteration sums: no atomics, Q read once.
//  * Threads: over the batch for whole rounds of one image per thread (each image then runs
//    serially: nested at::parallel_for calls run inline), within each image for the rest. Few
//    parallel regions per iteration (blur tasks, pixel pass): on a shared machine each one waits for
//    the slowest thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_dispatch.h"
#include "planted_bug.h"

namespace ovseg_fast {
namespace CPU_CAPABILITY {
namespace {

constexpr float kNormEps = 1e-20f;
// Vertex loops (reduce, blur) are short (M is a few 10k for 512x512 images): below this many
// vertices they run on one thread, because a parallel region per blur axis (9 per iteration) costs
// more in synchronisation than it saves, badly so on a loaded machine.
constexpr int64_t kVertexGrain = 1 << 16;
constexpr int kBlock = 16;


// Rows of class values and batches of lattice points are handled as 8-float vectors (GCC/Clang
// vector extensions: ymm registers in the AVX2/AVX512 copies, xmm pairs in the DEFAULT one). The
// helpers are internal (inlined), so the note that passing 32-byte vectors without AVX changes the
// ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_mem __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));

// ---------------------------------------------------------------------------------------------
// Hash table of lattice vertices (keys: the first d integer coordinates of a vertex)
// ---------------------------------------------------------------------------------------------
// Slots hold the key next to the vertex id, so a probe is one (prefetchable) memory access.
template <int D>
class VertexTable {
 public:
  explicit VertexTable(int64_t expected) {
    int64_t cap = 64;
    while (cap < 2 * expected) cap <<= 1;
    slots_.assign(cap, Slot{-1, {}});
    keys_.reserve(static_cast<size_t>(expected) * D);
  }
  int64_t size() const { return static_cast<int64_t>(keys_.size()) / D; }
  const int32_t* key(int64_t id) const { return keys_.data() + id * D; }

  int32_t find(const int32_t* k) const {
    const uint64_t mask = slots_.size() - 1;
    for (uint64_t h = hash(k) & mask;; h = (h + 1) & mask) {
      const Slot& e = slots_[h];
      if (e.id < 0) return -1;
      if (equal(e.key, k)) return e.id;
    }
  }
  // hk = hash(k), computed ahead (in parallel) so that the sequential insertion can prefetch slots.
  int32_t insert(const int32_t* k, uint64_t hk) {
    if (2 * (size() + 1) > static_cast<int64_t>(slots_.size())) grow();
    const uint64_t mask = slots_.size() - 1;
    for (uint64_t h = hk & mask;; h = (h + 1) & mask) {
      Slot& e = slots_[h];
      if (e.id < 0) {
        e.id = static_cast<int32_t>(size());
        std::copy(k, k + D, e.key);
        keys_.insert(keys_.end(), k, k + D);
        return e.id;
      }
      if (equal(e.key, k)) return e.id;
    }
  }
  void prefetch(uint64_t hk) const { __builtin_prefetch(slots_.data() + (hk & (slots_.size() - 1))); }
  // Independent multiplies (no chain through the coordinates), then a final mix.
  static uint64_t hash(const int32_t* k) {
    constexpr uint64_t kMul[5] = {0x9E3779B97F4A7C15ull, 0xC2B2AE3D27D4EB4Full, 0x165667B19E3779F9ull,
                                  0xD6E8FEB86659FD93ull, 0xFF51AFD7ED558CCDull};
    static_assert(D <= 5);
    uint64_t h = 0;
    for (int i = 0; i < D; ++i) h += static_cast<uint64_t>(static_cast<uint32_t>(k[i])) * kMul[i];
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 32);
  }

 private:
  struct Slot {
    int32_t id;
    int32_t key[D];
  };
  static bool equal(const int32_t* a, const int32_t* b) {
    bool same = true;
    for (int i = 0; i < D; ++i) same &= a[i] == b[i];
    return same;
  }
  void grow() {
    std::vector<Slot> slots(slots_.size() * 2, Slot{-1, {}});
    const uint64_t mask = slots.size() - 1;
    for (int64_t e = 0; e < size(); ++e) {
      uint64_t h = hash(key(e)) & mask;
      while (slots[h].id >= 0) h = (h + 1) & mask;
      slots[h].id = static_cast<int32_t>(e);
      std::copy(key(e), key(e) + D, slots[h].key);
    }
    slots_.swap(slots);
  }
  std::vector<Slot> slots_;
  std::vector<int32_t> keys_;  // by id
};

// Large per-call arrays come from ATen's CPU allocator: 64-byte aligned (rows of CP floats never
// straddle cache lines in 32-byte accesses), and backed by huge pages when PyTorch is set to use them
// (THP_MEM_ALLOC_ENABLE=1), which keeps first-touch page faults of the ~50 MB per image small.
// Uninitialised unless zero() is called.
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t size)
      : t_(at::empty({size}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))), p_(t_.data_ptr<T>()) {}
  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](int64_t i) { return p_[i]; }
  const T& operator[](int64_t i) const { return p_[i]; }
  void zero() { t_.zero_(); }

 private:
  at::Tensor t_;
  T* p_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Lattice construction
// ---------------------------------------------------------------------------------------------
struct Lattice {
  int d = 0;
  int64_t n = 0;
  int64_t m = 0;                 // vertices; row m of every value buffer is the absent neighbour (0)
  Buffer<int32_t> offset;        // (n, d+1) vertex of each simplex corner
  Buffer<float> weight;          // (n, d+1) barycentric weights (times norm_i once normalised)
  std::vector<int32_t> nb;       // (d+1, m, 2) previous / next vertex along each axis
};

// The elevation and rounding must reproduce pydensecrf's float32 arithmetic exactly (the lattice is
// not rotation invariant and vertex choices flip on rounding), so no FMA contraction here.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// Scale factors of the elevation matrix times the expected std (Adams et al. 2010, pp. 5-6), rounded
// as pydensecrf rounds them.
template <int D>
void elevation_scale(float* scale) {
  const float inv_std = static_cast<float>(std::sqrt(2.0 / 3.0) * (D + 1));
  for (int i = 0; i < D; ++i)
    scale[i] = static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) * inv_std);
}

// Simplices of 8 feature vectors (lane i: point i; f[j] holds feature j): the keys of their D+1
// vertices, keys[(i * (D+1) + r) * D + k], and barycentric weights bary[i * (D+1) + r], for the first
// cnt lanes. Lane-parallel, because the scalar version's data-dependent rank comparisons and the
// scatter by rank kept the embedding of the bilateral lattice at ~130 ns per pixel. Every lane does
// exactly the scalar operations in the same order (IEEE float ops are per lane; no contraction), the
// rank scatter becomes exact selects, so the lattice is bit-identical.
template <int D>
inline void embed_points8(const v8f* f, const float* scale, int32_t* keys, float* bary, int cnt) {
  constexpr int DP1 = D + 1;
  const float inv = 1.0f / DP1;
  v8f elevated[DP1], rem0[DP1], diff[DP1], vs[DP1];
  v8i rank[DP1];
  v8f sm = v8f{};
  for (int j = D; j > 0; --j) {
    const v8f cf = f[j - 1] * scale[j - 1];
    elevated[j] = sm - static_cast<float>(j) * cf;
    sm += cf;
  }
  elevated[0] = sm;
  v8i sum = v8i{};
  for (int i = 0; i < DP1; ++i) {
    // nearbyint (half to even, as SSE's cvtps2dq): adding and subtracting 2^23 rounds |x| < 2^23 to
    // an integer in the default rounding mode; larger floats are integers already.
    const v8f x = elevated[i] * inv;
    const v8i xi = __builtin_bit_cast(v8i, x);
    const v8f ax = __builtin_bit_cast(v8f, xi & 0x7fffffff);
    const v8f r = (ax + 8388608.0f) - 8388608.0f;
    const v8f v = __builtin_bit_cast(v8f, ax < 8388608.0f ? __builtin_bit_cast(v8i, r) | (xi & INT32_MIN) : xi);
    rem0[i] = v * static_cast<float>(DP1);
    sum += __builtin_convertvector(v, v8i);
    rank[i] = v8i{};
  }
  for (int i = 0; i < DP1; ++i) diff[i] = elevated[i] - rem0[i];
  for (int i = 0; i < D; ++i) {
    for (int j = i + 1; j < DP1; ++j) {
      const v8i less = diff[i] < diff[j];  // -1 where true
      rank[i] -= less;
      rank[j] -= ~less;
    }
  }
  for (int i = 0; i < DP1; ++i) {
    rank[i] += sum;
    const v8i lo = rank[i] < 0, hi = rank[i] > D;
    rank[i] += (lo & DP1) - (hi & DP1);
    rem0[i] += __builtin_convertvector((lo & DP1) - (hi & DP1), v8f);
  }
  for (int i = 0; i < DP1; ++i) vs[i] = v8f{};
  for (int i = 0; i < DP1; ++i) {
    const v8f val = (elevated[i] - rem0[i]) * inv;
    for (int k = 0; k < DP1; ++k) vs[k] = rank[i] == D - k ? val : vs[k];
  }
  alignas(32) float b[DP1][8];
  alignas(32) int32_t kk[DP1][D][8];
  v8f b0 = vs[0] + (1.0f - vs[D]);
  std::memcpy(b[0], &b0, sizeof(b0));
  for (int p = 1; p < DP1; ++p) {
    const v8f bp = vs[p] - vs[p - 1];
    std::memcpy(b[p], &bp, sizeof(bp));
  }
  for (int r = 0; r < DP1; ++r)
    for (int i = 0; i < D; ++i) {
      const v8i k = __builtin_convertvector(rem0[i], v8i) + r - ((rank[i] > D - r) & DP1);
      std::memcpy(kk[r][i], &k, sizeof(k));
    }
  for (int l = 0; l < cnt; ++l)
    for (int r = 0; r < DP1; ++r) {
      bary[l * DP1 + r] = b[r][l];
      for (int i = 0; i < D; ++i) keys[(l * DP1 + r) * D + i] = kk[r][i][l];
    }
}

// Features of pixels p0.. p0+7 (clamped to the last pixel) = (y, x): (x/sxy, y/sxy[, r/srgb,
// g/srgb, b/srgb]), as float32 divisions.
template <int D>
inline void pixel_features8(int64_t p0, int64_t width, int64_t npix, float sxy, float srgb, const uint8_t* rgb,
                            v8f* f) {
  alignas(32) float a[D][8];
  for (int l = 0; l < 8; ++l) {
    const int64_t p = std::min(p0 + l, npix - 1);
    const int64_t y = p / width;
    a[0][l] = static_cast<float>(p - y * width);
    a[1][l] = static_cast<float>(y);
    if constexpr (D == 5) {
      for (int c = 0; c < 3; ++c) a[2 + c][l] = static_cast<float>(rgb[c * npix + p]);
    }
  }
  for (int j = 0; j < D; ++j) {
    std::memcpy(&f[j], a[j], sizeof(v8f));
    f[j] = f[j] / (j < 2 ? sxy : srgb);
  }
}

#pragma GCC pop_options

// A lattice built from `parts` ranges of pixels whose vertices are found independently (find_part,
// one task each: the hash insertion is sequential, and as one task the bilateral lattice's would set
// the pace of the whole set-up), then merged into the first part's table (finish). Vertex ids do not
// influence the result (every sum below runs in pixel or axis order), so neither do the parts.
template <int D>
class LatticeBuild {
 public:
  static constexpr int DP1 = D + 1;

  LatticeBuild(int64_t height, int64_t width, float sxy, float srgb, const uint8_t* rgb, int parts)
      : n_(height * width), width_(width), sxy_(sxy), srgb_(srgb), rgb_(rgb), parts_(parts), lat_(new Lattice) {
    lat_->d = D;
    lat_->n = n_;
    lat_->offset = Buffer<int32_t>(n_ * DP1);
    lat_->weight = Buffer<float>(n_ * DP1);
    elevation_scale<D>(scale_);
    for (int q = 0; q < parts_; ++q)
      tables_.emplace_back(new VertexTable<D>(std::max<int64_t>((end(q) - begin(q)) / 4, 64)));
  }

  int parts() const { return parts_; }

  // Part q's pixels: their corners' keys into table q (ids local to it), the ids into lat.offset
  // and the barycentric weights into lat.weight. The embedding runs in parallel (inline within a
  // task), the insertion sequentially, chunk by chunk, so the keys of only one chunk are ever stored
  // (all n * (d+1) keys would be 30 MB for a 512x512 bilateral lattice). The previous pixel's corner
  // r is usually the same vertex, which saves most hash lookups.
  void find_part(int q) {
    VertexTable<D>& table = *tables_[q];
    Lattice& lat = *lat_;
    const int64_t p_begin = begin(q), p_end = end(q), n = n_, width = width_;
    constexpr int64_t kChunk = 1 << 12;
    constexpr int kAhead = 8;  // pixels between a slot prefetch and its probe
    std::vector<int32_t> keys(kChunk * DP1 * D);
    std::vector<uint64_t> hashes(kChunk * DP1);
    int32_t prev_id[DP1];
    for (int64_t c0 = p_begin; c0 < p_end; c0 += kChunk) {
      const int64_t c1 = std::min(p_end, c0 + kChunk);
      at::parallel_for(0, (c1 - c0 + 7) / 8, 256, [&](int64_t g0, int64_t g1) {
        v8f f[D];
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t p = c0 + 8 * g;
          const int cnt = static_cast<int>(std::min<int64_t>(8, c1 - p));
          int32_t* k = keys.data() + (p - c0) * DP1 * D;
          pixel_features8<D>(p, width, n, sxy_, srgb_, rgb_, f);
          embed_points8<D>(f, scale_, k, lat.weight.data() + p * DP1, cnt);
          for (int e = 0; e < cnt * DP1; ++e) hashes[(p - c0) * DP1 + e] = table.hash(k + e * D);
        }
      });
      for (int64_t p = c0; p < c1; ++p) {
        const int64_t i = p - c0;
        if (i + kAhead < c1 - c0)
          for (int r = 0; r < DP1; ++r) table.prefetch(hashes[(i + kAhead) * DP1 + r]);
        for (int r = 0; r < DP1; ++r) {
          const int32_t* k = keys.data() + (i * DP1 + r) * D;
          // The previous pixel's corner r is usually the same vertex.
          const int32_t* pk = i > 0 ? k - DP1 * D : p > p_begin ? table.key(prev_id[r]) : k;
          bool same = p > p_begin;
          for (int j = 0; j < D; ++j) same &= pk[j] == k[j];
          if (!same) {
            // Else the pixel above's (a vertex is always the same corner r of its simplices).
            if (p - width >= p_begin) {
              const int32_t id = lat.offset[(p - width) * DP1 + r];
              const int32_t* ak = table.key(id);
              same = true;
              for (int j = 0; j < D; ++j) same &= ak[j] == k[j];
              if (same) prev_id[r] = id;
            }
            if (!same) {
              prev_id[r] = table.insert(k, hashes[i * DP1 + r]);
            }
          }
          lat.offset[p * DP1 + r] = prev_id[r];
        }
      }
    }
  }

  // After every find_part: the parts' vertices merged into table 0 (their pixels' ids remapped),
  // and the blur neighbours of every vertex.
  std::unique_ptr<Lattice> finish() {
    VertexTable<D>& table = *tables_[0];
    Lattice& lat = *lat_;
    for (int q = 1; q < parts_; ++q) {
      const VertexTable<D>& part = *tables_[q];
      std::vector<int32_t> ids(part.size());
      for (int64_t v = 0; v < part.size(); ++v) ids[v] = table.insert(part.key(v), table.hash(part.key(v)));
      at::parallel_for(begin(q) * DP1, end(q) * DP1, 1 << 14, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) lat.offset[e] = ids[lat.offset[e]];
      });
    }
    const int64_t m = table.size();
    lat.m = m;
    // Along axis j, u = v + (1, ..., 1, -D, 1, ..., 1) (-D at j) is v's next neighbour exactly when v
    // is u's previous one, so one lookup per vertex and axis fills both (each u has one previous).
    lat.nb.assign(DP1 * m * 2, static_cast<int32_t>(m));
    at::parallel_for(0, m, 1024, [&](int64_t v0, int64_t v1) {
      int32_t k2[D];
      for (int j = 0; j < DP1; ++j) {
        int32_t* nb = lat.nb.data() + j * m * 2;
        for (int64_t v = v0; v < v1; ++v) {
          const int32_t* k = table.key(v);
          for (int i = 0; i < D; ++i) k2[i] = k[i] + 1;
          if (j < D) k2[j] = k[j] - D;
          const int32_t u = table.find(k2);
          if (u >= 0) {
            nb[v * 2 + 1] = u;
            nb[static_cast<int64_t>(u) * 2] = static_cast<int32_t>(v);
          }
        }
      }
    });
    tables_.clear();
    return std::move(lat_);
  }

 private:
  int64_t begin(int q) const { return n_ * q / parts_; }
  int64_t end(int q) const { return n_ * (q + 1) / parts_; }

  const int64_t n_, width_;
  const float sxy_, srgb_;
  const uint8_t* rgb_;
  const int parts_;
  float scale_[D];
  std::unique_ptr<Lattice> lat_;
  std::vector<std::unique_ptr<VertexTable<D>>> tables_;
};

// ---------------------------------------------------------------------------------------------
// Mean-field inference
// ---------------------------------------------------------------------------------------------

// The hot loops need horizontal max/sum and exp, which the compiler does not vectorise on its own
// without -ffast-math.

inline v8f load8(const float* p) { return *reinterpret_cast<const v8f_mem*>(p); }
inline void store8(float* p, v8f v) { *reinterpret_cast<v8f_mem*>(p) = v; }

// exp for x <= 0 (max-subtracted logits): Cody-Waite reduction by ln 2 and a degree-6 polynomial
// (Cephes' expf coefficients), ~1 ulp; below -87 it returns ~1e-38 (the caller masks padded lanes).
template <class V, class VI>
inline V exp_nonpositive(V x) {
  const V lo = V{} - 87.0f;  // (not x * 0 - 87: padded lanes hold -inf)
  x = x < lo ? lo : x;
  // floor(x log2 e + 1/2) by truncation of a positive number (x log2 e >= -126).
  const VI t = __builtin_convertvector(x * 1.44269504088896341f + 128.5f, VI) - 128;
  const V fx = __builtin_convertvector(t, V);
  x = x - fx * 0.693359375f - fx * -2.12194440e-4f;
  const V z = x * x;
  V y = V{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const VI e = (t + 127) << 23;
  return y * __builtin_bit_cast(V, e);
}

// Horizontal max / sum as log-depth shuffle trees whose result fills every lane: the softmax sits
// on each pixel's dependency chain (slice -> max -> exp -> sum -> splat), and lane-by-lane scalar
// reductions made that chain, not the arithmetic, bound the pixel pass.
inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }
inline v8f allmax(v8f x) {
  x = vmax(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3));
  x = vmax(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5));
  return vmax(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
}
inline v8f allsum(v8f x) {
  x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
  return x + __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
}

// One pixel's row of CP class values in registers, as CP/8 8-float vectors (ymm; pairs of xmm in the
// DEFAULT copy). Not 16-float vectors even in the AVX512 copy: rows are CP floats apart, so for C=21
// (CP=24) every other row would start mid-cache-line and half the 64-byte accesses would straddle two
// lines, while 32-byte accesses never do (the buffers are 64-byte aligned).
template <int CP>
struct Row {
  static constexpr int kN = CP / 8;
  v8f a[kN];
  explicit Row(int /*cp*/) {}
  void zero() {
    for (int k = 0; k < kN; ++k) a[k] = v8f{};
  }
  void load(const float* p) {
    for (int k = 0; k < kN; ++k) a[k] = load8(p + 8 * k);
  }
  void store(float* p) const {
    for (int k = 0; k < kN; ++k) store8(p + 8 * k, a[k]);
  }
  void add(float w, const Row& o) {  // row += w * o
    for (int k = 0; k < kN; ++k) a[k] += w * o.a[k];
  }
  void fma(float w, const float* p) {  // row += w * p
    for (int k = 0; k < kN; ++k) a[k] += w * load8(p + 8 * k);
  }
  void scatter(float* p, float w) const {  // p += w * row
    for (int k = 0; k < kN; ++k) store8(p + 8 * k, load8(p + 8 * k) + w * a[k]);
  }
  // softmax over the lanes, padded lanes (mask 0) set to exactly 0.
  void softmax(const float* mask) {
    v8f m = a[0];
    for (int k = 1; k < kN; ++k) m = vmax(m, a[k]);
    m = allmax(m);
    v8f s = v8f{};
    for (int k = 0; k < kN; ++k) {
      a[k] = exp_nonpositive<v8f, v8i>(a[k] - m) * load8(mask + 8 * k);
      s += a[k];
    }
    const v8f inv = 1.0f / allsum(s);
    for (int k = 0; k < kN; ++k) a[k] *= inv;
  }
};

#if defined(__AVX512F__)
// 24 classes (C = 17..24, e.g. VOC's 21) in the AVX512 copy: a 16-float and an 8-float vector, so
// every row operation is two instructions instead of three. Zen 4 splits the 64-byte half that
// straddles a cache line (odd rows) cheaply; the saved uops win.
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_mem __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t v16i __attribute__((vector_size(64)));
inline v16f load16(const float* p) { return *reinterpret_cast<const v16f_mem*>(p); }
inline void store16(float* p, v16f v) { *reinterpret_cast<v16f_mem*>(p) = v; }

template <>
struct Row<24> {
  v16f a;
  v8f b;
  explicit Row(int /*cp*/ = 24) {}
  void zero() {
    a = v16f{};
    b = v8f{};
  }
  void load(const float* p) {
    a = load16(p);
    b = load8(p + 16);
  }
  void store(float* p) const {
    store16(p, a);
    store8(p + 16, b);
  }
  void add(float w, const Row& o) {
    a += w * o.a;
    b += w * o.b;
  }
  void fma(float w, const float* p) {
    a += w * load16(p);
    b += w * load8(p + 16);
  }
  void scatter(float* p, float w) const {
    store16(p, load16(p) + w * a);
    store8(p + 16, load8(p + 16) + w * b);
  }
  static v16f wide(v8f x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7); }
  void softmax(const float* mask) {
    const v8f lo = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7);
    const v8f hi = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    const v8f m = allmax(vmax(vmax(lo, hi), b));
    a = exp_nonpositive<v16f, v16i>(a - wide(m));  // mask[0..16) is all ones (C > 16)
    b = exp_nonpositive<v8f, v8i>(b - m) * load8(mask + 16);
    const v8f s = allsum(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                         __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15) + b);
    const v8f inv = 1.0f / s;
    a *= wide(inv);
    b *= inv;
  }
};
#endif

// Any number of classes (a multiple of 8 known at run time only): 8-float vectors in memory.
template <>
struct Row<0> {
  int nv;
  std::vector<v8f> a;
  explicit Row(int cp) : nv(cp / 8), a(nv) {}
  void zero() {
    for (int k = 0; k < nv; ++k) a[k] = v8f{};
  }
  void load(const float* p) {
    for (int k = 0; k < nv; ++k) a[k] = load8(p + 8 * k);
  }
  void store(float* p) const {
    for (int k = 0; k < nv; ++k) store8(p + 8 * k, a[k]);
  }
  void add(float w, const Row& o) {
    for (int k = 0; k < nv; ++k) a[k] += w * o.a[k];
  }
  void fma(float w, const float* p) {
    for (int k = 0; k < nv; ++k) a[k] += w * load8(p + 8 * k);
  }
  void scatter(float* p, float w) const {
    for (int k = 0; k < nv; ++k) store8(p + 8 * k, load8(p + 8 * k) + w * a[k]);
  }
  void softmax(const float* mask) {
    v8f m = a[0];
    for (int k = 1; k < nv; ++k) m = vmax(m, a[k]);
    m = allmax(m);
    v8f s = v8f{};
    for (int k = 0; k < nv; ++k) {
      a[k] = exp_nonpositive<v8f, v8i>(a[k] - m) * load8(mask + 8 * k);
      s += a[k];
    }
    const v8f inv = 1.0f / allsum(s);
    for (int k = 0; k < nv; ++k) a[k] *= inv;
  }
};

struct Pairwise {
  const Lattice* lat;
  float slice_scale;      // alpha * compat: a slice is this times the splat weights' sum
  Buffer<float> val, tmp;  // (m+1, cp) blurred values (row m: zero)
  Buffer<float> priv;      // (chunks, m+1, cp) splat buffers of the pixel chunks
};

// Both lattices have a fixed simplex size (3 or 6 corners), so the corner loops unroll.
template <int CP, int DP1>
inline void slice(Row<CP>& msg, const Pairwise& pw, int64_t p, int cp) {
  const int32_t* off = pw.lat->offset.data() + p * DP1;
  const float* w = pw.lat->weight.data() + p * DP1;
  msg.zero();
  for (int r = 0; r < DP1; ++r) msg.fma(w[r], pw.val.data() + static_cast<int64_t>(off[r]) * cp);
}
template <int CP, int DP1>
inline void splat(const Row<CP>& row, const Pairwise& pw, float* buf, int64_t p, int cp) {
  const int32_t* off = pw.lat->offset.data() + p * DP1;
  const float* w = pw.lat->weight.data() + p * DP1;
  for (int r = 0; r < DP1; ++r) row.scatter(buf + static_cast<int64_t>(off[r]) * cp, w[r]);
}

// n_i = 1 / sqrt(K 1)_i, by filtering a constant 1 through the lattice (scalar values), folded into
// the barycentric weights, which are then the splat weights: w_ir n_i.
void normalise_weights(Lattice& lat) {
  const int dp1 = lat.d + 1;
  const int64_t n = lat.n, m = lat.m;
  std::vector<float> a(m + 1, 0.0f), b(m + 1, 0.0f);
  for (int64_t e = 0; e < n * dp1; ++e) a[lat.offset[e]] += lat.weight[e];
  for (int j = 0; j < dp1; ++j) {
    const int32_t* nb = lat.nb.data() + j * m * 2;
    at::parallel_for(0, m, kVertexGrain, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) b[v] = a[v] + 0.5f * (a[nb[2 * v]] + a[nb[2 * v + 1]]);
    });
    std::swap(a, b);
  }
  const float alpha = 1.0f / (1.0f + std::pow(2.0f, -static_cast<float>(lat.d)));
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* w = lat.weight.data() + p * dp1;
      const int32_t* off = lat.offset.data() + p * dp1;
      float s = 0.0f;
      for (int r = 0; r < dp1; ++r) s += w[r] * alpha * a[off[r]];
      const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s) + kNormEps));
      for (int r = 0; r < dp1; ++r) w[r] *= norm;
    }
  });
}

// Runs every task on up to `threads` threads, each thread taking the next task when done with its
// last (the tasks' costs differ too much for a static split).
void run_tasks(const std::vector<std::function<void()>>& tasks, int threads) {
  const int64_t count = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, count), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < count; i = next++) tasks[i]();
  });
}

struct ImageArgs {
  const float* probs;  // (C, H, W)
  const uint8_t* rgb;  // (3, H, W)
  float* out;          // (C, H, W)
  int64_t c, h, w;
  int64_t n_iters;
  float gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat, clip;
  int chunks;  // pixel chunks = threads used within the image (1 when the batch is parallel)
};

// CP: padded class count known at compile time (0: use cp_rt) so the per-row loops unroll into a
// few SIMD vectors with accumulators in registers.
template <int CP>
void crf_image(const ImageArgs& args, int cp_rt) {
  const int cp = CP > 0 ? CP : cp_rt;  // a multiple of 8
  const int64_t c = args.c, n = args.h * args.w;
  const int chunks = args.chunks;

  std::vector<int> dims;
  std::vector<float> compats;
  if (args.gaussian_compat != 0.0f) {
    dims.push_back(2);
    compats.push_back(args.gaussian_compat);
  }
  if (args.bilateral_compat != 0.0f) {
    dims.push_back(5);
    compats.push_back(args.bilateral_compat);
  }
  std::vector<std::unique_ptr<Lattice>> lattices(dims.size());
  std::vector<Pairwise> kernels(dims.size());
  Buffer<float> logp(n * cp);

  // -U = log(clip(P)), pixel-major, padded lanes -inf so they get probability exactly 0. Clamp and
  // log (ATen's vectorised log) on the way: no (C, H, W) temporaries to allocate and page in.
  // The class planes are n floats apart (a multiple of the L1 set stride for power-of-two images), so
  // visiting all C planes per pixel would thrash L1: transpose in runs of kRun pixels per plane
  // instead (the output is written back in runs of kBlock).
  // unary(q, parts): part q of `parts` of the pixels.
  auto unary = [&](int q, int parts) {
    using Vec = at::vec::Vectorized<float>;
    const Vec lo(args.clip), hi(1.0f);
    constexpr int64_t kRun = 64;  // pixels per plane run: whole cache lines, prefetcher-friendly
    const int64_t runs = (n + kRun - 1) / kRun;
    at::parallel_for(runs * q / parts, runs * (q + 1) / parts, 64, [&](int64_t b0, int64_t b1) {
      float tmp[Vec::size()];
      for (int64_t p0 = b0 * kRun; p0 < std::min(n, b1 * kRun); p0 += kRun) {
        const int64_t p1 = std::min(n, p0 + kRun);
        for (int64_t l = 0; l < c; ++l)
          for (int64_t q = p0; q < p1; q += Vec::size()) {
            const int cnt = static_cast<int>(std::min<int64_t>(Vec::size(), p1 - q));
            at::vec::clamp(Vec::loadu(args.probs + l * n + q, cnt), lo, hi).log().store(tmp, cnt);
            for (int i = 0; i < cnt; ++i) logp[(q + i) * cp + l] = tmp[i];
          }
        for (int64_t p = p0; p < p1; ++p)
          for (int l = c; l < cp; ++l) logp[p * cp + l] = -std::numeric_limits<float>::infinity();
      }
    });
  };

  // The set-up is two parallel regions of independent tasks (instead of dozens of regions, each of
  // which would wait for the slowest thread, costly when other processes share the cores), whose
  // inner parallel loops then run inline: first the lattices' vertices and the unary, each in
  // `chunks` parts of the image; then each lattice's merge, neighbours, normalisation and buffers.
  // The threads take the tasks largest first (the bilateral lattice's parts, the unary's, the
  // Gaussian lattice's), each the next one when done.
  std::unique_ptr<LatticeBuild<2>> gaussian;
  std::unique_ptr<LatticeBuild<5>> bilateral;
  for (int k = 0; k < static_cast<int>(dims.size()); ++k) {
    if (dims[k] == 2)
      gaussian.reset(new LatticeBuild<2>(args.h, args.w, args.gaussian_sxy, 1.0f, nullptr, chunks));
    else
      bilateral.reset(new LatticeBuild<5>(args.h, args.w, args.bilateral_sxy, args.bilateral_srgb, args.rgb, chunks));
  }
  std::vector<std::function<void()>> tasks;
  if (bilateral)
    for (int q = 0; q < bilateral->parts(); ++q) tasks.push_back([&, q] { bilateral->find_part(q); });
  for (int q = 0; q < chunks; ++q) tasks.push_back([&, q] { unary(q, chunks); });
  if (gaussian)
    for (int q = 0; q < gaussian->parts(); ++q) tasks.push_back([&, q] { gaussian->find_part(q); });
  run_tasks(tasks, chunks);
  tasks.clear();
  for (int k = 0; k < static_cast<int>(dims.size()); ++k)
    tasks.push_back([&, k] {
      lattices[k] = dims[k] == 2 ? gaussian->finish() : bilateral->finish();
      Pairwise& pw = kernels[k];
      Lattice& lat = *lattices[k];
      pw.lat = &lat;
      normalise_weights(lat);
      pw.slice_scale = compats[k] / (1.0f + std::pow(2.0f, -static_cast<float>(lat.d)));
      pw.val = Buffer<float>((lat.m + 1) * cp);
      pw.tmp = Buffer<float>((lat.m + 1) * cp);
      pw.priv = Buffer<float>(chunks * (lat.m + 1) * cp);
      pw.val.zero();
      pw.tmp.zero();
      pw.priv.zero();
    });
  run_tasks(tasks, chunks);
  std::vector<float> lane_mask(cp);
  for (int l = 0; l < cp; ++l) lane_mask[l] = l < c ? 1.0f : 0.0f;

  // One pass over the pixels: messages (if any) + unary, softmax, then splat or write out.
  auto pixel_pass = [&](bool messages, bool last) {
    at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
      Buffer<float> blk_store(kBlock * cp);
      float* blk = blk_store.data();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t begin = n * t / chunks, end = n * (t + 1) / chunks;
        Row<CP> row(cp), msg(cp);
        const float* mask = lane_mask.data();
        for (int64_t p0 = begin; p0 < end; p0 += kBlock) {
          const int nb = static_cast<int>(std::min<int64_t>(kBlock, end - p0));
          for (int i = 0; i < nb; ++i) {
            const int64_t p = p0 + i;
            row.load(logp.data() + p * cp);
            if (messages) {
              for (const Pairwise& pw : kernels) {
                if (pw.lat->d == 2)
                  slice<CP, 3>(msg, pw, p, cp);
                else
                  slice<CP, 6>(msg, pw, p, cp);
                row.add(pw.slice_scale, msg);
              }
            }
            row.softmax(mask);
            row.store(blk + i * cp);
          }
          if (last) {
            for (int64_t l = 0; l < c; ++l)
              for (int i = 0; i < nb; ++i) args.out[l * n + p0 + i] = blk[i * cp + l];
            continue;
          }
          for (int i = 0; i < nb; ++i) {
            const int64_t p = p0 + i;
            row.load(blk + i * cp);
            for (Pairwise& pw : kernels) {
              float* buf = pw.priv.data() + t * (pw.lat->m + 1) * cp;
              if (pw.lat->d == 2)
                splat<CP, 3>(row, pw, buf, p, cp);
              else
                splat<CP, 6>(row, pw, buf, p, cp);
            }
          }
        }
      }
    });
  };

  // Sum the chunks' splat buffers (and clear them), then blur along the d+1 axes.
  auto reduce_and_blur = [&](Pairwise& pw) {
    const int64_t m = pw.lat->m;
    const int64_t stride = (m + 1) * cp;
    if (chunks == 1) {  // the only splat buffer becomes the values; the old values are the next buffer
      std::swap(pw.val, pw.priv);
      std::fill(pw.priv.data(), pw.priv.data() + m * cp, 0.0f);
    } else {
      at::parallel_for(0, m, kVertexGrain, [&](int64_t begin, int64_t end) {
        for (int64_t v = begin; v < end; ++v) {
          float* dst = pw.val.data() + v * cp;
          float* src = pw.priv.data() + v * cp;
          for (int l = 0; l < cp; ++l) {
            dst[l] = src[l];
            src[l] = 0.0f;
          }
          for (int t = 1; t < chunks; ++t) {
            float* s = src + t * stride;
            for (int l = 0; l < cp; ++l) {
              dst[l] += s[l];
              s[l] = 0.0f;
            }
          }
        }
      });
    }
    for (int j = 0; j <= pw.lat->d; ++j) {
      const int32_t* nb = pw.lat->nb.data() + j * m * 2;
      const float* src = pw.val.data();
      float* dst = pw.tmp.data();
      at::parallel_for(0, m, kVertexGrain, [&](int64_t begin, int64_t end) {
        for (int64_t v = begin; v < end; ++v) {
          const float* x = src + v * cp;
          const float* y1 = src + static_cast<int64_t>(nb[2 * v]) * cp;
          const float* y2 = src + static_cast<int64_t>(nb[2 * v + 1]) * cp;
          float* o = dst + v * cp;
          for (int l = 0; l < cp; ++l) o[l] = x[l] + 0.5f * (y1[l] + y2[l]);
        }
      });
      std::swap(pw.val, pw.tmp);
    }
  };

  pixel_pass(false, args.n_iters == 0);
  for (int64_t it = 1; it <= args.n_iters; ++it) {
    // The two lattices' blurs are independent and cost about the same (Gaussian: 3 axes of ~1.5x as
    // many vertices as the bilateral lattice's 6 axes), so they run as two tasks.
    at::parallel_for(0, static_cast<int64_t>(kernels.size()), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) reduce_and_blur(kernels[k]);
    });
    pixel_pass(true, it == args.n_iters);
  }
}

}  // namespace

at::Tensor dense_crf_forward(const at::Tensor& probs, const at::Tensor& image, int64_t n_iters, double gaussian_sxy,
                             double gaussian_compat, double bilateral_sxy, double bilateral_srgb,
                             double bilateral_compat, double clip) {
  const at::Tensor p = probs.contiguous();
  const at::Tensor im = image.contiguous();
  const int64_t b = p.size(0), c = p.size(1), h = p.size(2), w = p.size(3);
  at::Tensor out = at::empty_like(p);
  if (p.numel() == 0) return out;
  const int cp = static_cast<int>((c + 7) / 8 * 8);
  const int threads = at::get_num_threads();
  // Whole rounds of one image per thread run over the batch; the images left over (b % threads) then
  // run one after another on all threads instead of leaving threads idle for a whole image (B = 3 on
  // 2 threads: 1.5 image times instead of 2).
  const int64_t over_batch = b > 1 && b >= threads ? b / threads * threads : 0;
  auto run = [&](int64_t i, int chunks) {
    ImageArgs args{p.data_ptr<float>() + i * c * h * w,
                   im.data_ptr<uint8_t>() + i * 3 * h * w,
                   out.data_ptr<float>() + i * c * h * w,
                   c, h, w, n_iters,
                   static_cast<float>(gaussian_sxy), static_cast<float>(gaussian_compat),
                   static_cast<float>(bilateral_sxy), static_cast<float>(bilateral_srgb),
                   static_cast<float>(bilateral_compat), static_cast<float>(clip), chunks};
    switch (cp) {
      case 8: crf_image<8>(args, cp); break;
      case 16: crf_image<16>(args, cp); break;
      case 24: crf_image<24>(args, cp); break;
      case 32: crf_image<32>(args, cp); break;
      case 40: crf_image<40>(args, cp); break;
      case 48: crf_image<48>(args, cp); break;
      case 56: crf_image<56>(args, cp); break;
      case 64: crf_image<64>(args, cp); break;
      default: crf_image<0>(args, cp); break;
    }
  };
  if (over_batch > 0) {
    at::parallel_for(0, over_batch, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) run(i, 1);
    });
  }
  for (int64_t i = over_batch; i < b; ++i) run(i, threads);
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace ovseg_fast

#ifdef OVSEG_DISPATCH_ROOT
OVSEG_DECLARE_KERNEL(at::Tensor, dense_crf_forward,
                     (const at::Tensor&, const at::Tensor&, int64_t, double, double, double, double, double, double))

namespace {

at::Tensor dense_crf_cpu(const at::Tensor& probs, const at::Tensor& image, int64_t n_iters, double gaussian_sxy,
                         double gaussian_compat, double bilateral_sxy, double bilateral_srgb, double bilateral_compat,
                         double clip) {
  TORCH_CHECK(probs.dim() == 4 && probs.scalar_type() == at::kFloat && probs.device().is_cpu(),
              "dense_crf_cpu: probs must be a (B, C, H, W) float32 CPU tensor, got ", probs.sizes(), " ",
              probs.scalar_type());
  TORCH_CHECK(image.dim() == 4 && image.scalar_type() == at::kByte && image.size(0) == probs.size(0) &&
                  image.size(1) == 3 && image.size(2) == probs.size(2) && image.size(3) == probs.size(3),
              "dense_crf_cpu: image must be a (B, 3, H, W) uint8 tensor matching probs, got ", image.sizes(), " ",
              image.scalar_type());
  TORCH_CHECK(n_iters >= 0, "dense_crf_cpu: n_iters must be >= 0");
  TORCH_CHECK(gaussian_sxy > 0 && bilateral_sxy > 0 && bilateral_srgb > 0 && clip > 0 && clip <= 1,
              "dense_crf_cpu: sxy, srgb must be > 0 and clip in (0, 1]");
  TORCH_CHECK(probs.size(2) * probs.size(3) * 6 < std::numeric_limits<int32_t>::max(),
              "dense_crf_cpu: images of more than 357M pixels are not supported");
  if (ovseg_fast::planted_bug("dense_crf")) bilateral_compat *= 1.5;
  return OVSEG_DISPATCH_KERNEL(dense_crf_forward, probs, image, n_iters, gaussian_sxy, gaussian_compat, bilateral_sxy,
                               bilateral_srgb, bilateral_compat, clip);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ovseg_fast, m) {
  m.def(
      "dense_crf_cpu_forward(Tensor probs, Tensor image, int n_iters, float gaussian_sxy, float gaussian_compat, "
      "float bilateral_sxy, float bilateral_srgb, float bilateral_compat, float clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(ovseg_fast, CPU, m) { m.impl("dense_crf_cpu_forward", &dense_crf_cpu); }
#endif

// Paged decode attention on CPU: each (sequence, KV head) stream reads its own pages in
// place through the block table, with an online softmax page by page; all query heads of
// the stream's group are served from each page while it is in cache. With a merge delay
// the stream's exact ring (its W newest tokens, pre-RoPE keys read in place from the
// ring's layer slab) is one more block of the same softmax, each key rotated on the fly
// with its position's RoPE table. The pages are taken kBlockPages at a time: the scores of
// the block, one softmax update (one rescale per block, exp vectorised), then the values;
// the next page's keys and the block's values are prefetched while scoring. No copy of the
// KV cache and no allocation proportional to it (per-thread scratch of
// group * (2 * dim + max(kBlockPages * page, ring) + 2) + ring * dim).
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Pages of a stream scored before one softmax update (the scores of a block stay in L1).
constexpr int64_t kBlockPages = 8;
// Pages ahead whose keys are prefetched while a page is scored: pages taken during decode
// interleave between streams, and the hardware prefetcher stops at each 4 KiB page.
constexpr int64_t kPrefetchPages = 4;

struct Shape {
  int64_t group, dim, page, width, ring;
  int64_t block;  // score columns per query head: max(kBlockPages * page, ring)
};

template <typename acc_t>
struct Scratch {
  acc_t *q, *out, *scores, *max_s, *sum_s, *key;
};

// The ring of one stream: pre-RoPE keys / values [W, D] and the RoPE tables [W, D] of the
// position each ring index holds; the first `length` entries are valid.
template <typename scalar_t>
struct Ring {
  const scalar_t *k, *v, *cos, *sin;
  int64_t length;
};

// exp(x) of n scores in place. float: a Cephes-style polynomial the compiler vectorises
// (relative error below 1e-7; x <= 0 here, x < -87 gives 0, NaN stays NaN), rounding by
// adding 1.5 * 2^23 and building 2^n from the sum's bits; double: std::exp.
inline void exp_inplace(float* __restrict x, int64_t n) {
  constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  constexpr float magic = 12582912.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float c = xi < -87.0f ? -87.0f : xi;
    const float t = c * log2e + magic;
    const float fx = t - magic;
    const float r = c - fx * ln2_hi - fx * ln2_lo;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t t_bits;
    std::memcpy(&t_bits, &t, sizeof(t_bits));
    const int32_t bits = (t_bits - 0x4B400000 + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    x[i] = xi < -87.0f ? 0.0f : y * scale;
  }
}

inline void exp_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

inline void prefetch(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

// Scores of every query head of the group against `filled` keys [filled, D] into
// w.scores[h * s.block + first + j].
template <int kDim, typename key_t, typename acc_t>
void score_keys(const key_t* k, int64_t filled, int64_t first, const Shape& s,
                Scratch<acc_t>& w) {
  const int64_t dim = kDim > 0 ? kDim : s.dim;
  for (int64_t j = 0; j < filled; ++j) {
    const key_t* kj = k + j * dim;
    for (int64_t h = 0; h < s.group; ++h) {
      const acc_t* qh = w.q + h * dim;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qh[d] * static_cast<acc_t>(kj[d]);
      w.scores[h * s.block + first + j] = dot;
    }
  }
}

// out[h] += sum_j p[h, first + j] * v_j for `filled` values [filled, D].
template <int kDim, typename scalar_t, typename acc_t>
void accumulate_values(const scalar_t* v, int64_t filled, int64_t first, const Shape& s,
                       Scratch<acc_t>& w) {
  const int64_t dim = kDim > 0 ? kDim : s.dim;
  for (int64_t j = 0; j < filled; ++j) {
    const scalar_t* vj = v + j * dim;
    for (int64_t h = 0; h < s.group; ++h) {
      const acc_t p = w.scores[h * s.block + first + j];
      acc_t* oh = w.out + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) oh[d] += p * static_cast<acc_t>(vj[d]);
    }
  }
}

// The block's scores w.scores[h, 0:count] into the running softmax: new max, rescale of
// the running sum and output, scores -> exp(score - max).
template <typename acc_t>
void softmax_block(int64_t count, const Shape& s, Scratch<acc_t>& w) {
  for (int64_t h = 0; h < s.group; ++h) {
    acc_t* sh = w.scores + h * s.block;
    acc_t block_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < count; ++j) block_max = std::max(block_max, sh[j]);
    const acc_t new_max = std::max(w.max_s[h], block_max);
    const acc_t rescale = std::exp(w.max_s[h] - new_max);
    acc_t* oh = w.out + h * s.dim;
    if (rescale != acc_t(1)) {
      for (int64_t d = 0; d < s.dim; ++d) oh[d] *= rescale;
    }
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) sh[j] -= new_max;
    exp_inplace(sh, count);
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < count; ++j) total += sh[j];
    w.sum_s[h] = w.sum_s[h] * rescale + total;
    w.max_s[h] = new_max;
  }
}

// Rotate-half RoPE of the ring's valid keys into w.key [length, D].
template <typename scalar_t, typename acc_t>
void rotate_ring(const Ring<scalar_t>& ring, const Shape& s, Scratch<acc_t>& w) {
  const int64_t half = s.dim / 2;
  for (int64_t j = 0; j < ring.length; ++j) {
    const scalar_t* k = ring.k + j * s.dim;
    const scalar_t* c = ring.cos + j * s.dim;
    const scalar_t* n = ring.sin + j * s.dim;
    acc_t* out = w.key + j * s.dim;
    for (int64_t d = 0; d < half; ++d) {
      out[d] = static_cast<acc_t>(k[d]) * static_cast<acc_t>(c[d]) -
               static_cast<acc_t>(k[d + half]) * static_cast<acc_t>(n[d]);
      out[d + half] = static_cast<acc_t>(k[d + half]) * static_cast<acc_t>(c[d + half]) +
                      static_cast<acc_t>(k[d]) * static_cast<acc_t>(n[d + half]);
    }
  }
}

// kDim: the head dim when known at compile time (the inner loops then unroll), else 0.
template <int kDim, typename scalar_t, typename acc_t>
void one_stream(const scalar_t* q, const scalar_t* k_pages, const scalar_t* v_pages,
                const int64_t* table, int64_t length, const Ring<scalar_t>& ring,
                scalar_t* out, const Shape& s, acc_t scale, Scratch<acc_t>& w) {
  const int64_t gd = s.group * s.dim;
  const int64_t page_elems = s.page * s.dim;
  for (int64_t i = 0; i < gd; ++i) w.q[i] = static_cast<acc_t>(q[i]) * scale;
  std::fill(w.out, w.out + gd, acc_t(0));
  std::fill(w.max_s, w.max_s + s.group, -std::numeric_limits<acc_t>::infinity());
  std::fill(w.sum_s, w.sum_s + s.group, acc_t(0));
  const int64_t pages = (length + s.page - 1) / s.page;
  const int64_t page_bytes = page_elems * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t p = 0; p < std::min(pages, kPrefetchPages); ++p) {
    prefetch(k_pages + table[p] * page_elems, page_bytes);
  }
  for (int64_t first = 0; first < pages; first += kBlockPages) {
    const int64_t last = std::min(pages, first + kBlockPages);
    int64_t count = 0;
    for (int64_t p = first; p < last; ++p) {
      const int64_t filled = std::min(s.page, length - p * s.page);
      if (p + kPrefetchPages < pages) {
        prefetch(k_pages + table[p + kPrefetchPages] * page_elems, page_bytes);
      }
      prefetch(v_pages + table[p] * page_elems, page_bytes);
      score_keys<kDim, scalar_t, acc_t>(k_pages + table[p] * page_elems, filled, count, s, w);
      count += filled;
    }
    softmax_block<acc_t>(count, s, w);
    count = 0;
    for (int64_t p = first; p < last; ++p) {
      const int64_t filled = std::min(s.page, length - p * s.page);
      accumulate_values<kDim, scalar_t, acc_t>(v_pages + table[p] * page_elems, filled, count, s, w);
      count += filled;
    }
  }
  if (ring.length > 0) {
    rotate_ring<scalar_t, acc_t>(ring, s, w);
    score_keys<kDim, acc_t, acc_t>(w.key, ring.length, 0, s, w);
    softmax_block<acc_t>(ring.length, s, w);
    accumulate_values<kDim, scalar_t, acc_t>(ring.v, ring.length, 0, s, w);
  }
  for (int64_t h = 0; h < s.group; ++h) {
    const acc_t inv = w.sum_s[h] > 0 ? acc_t(1) / w.sum_s[h] : acc_t(0);
    for (int64_t d = 0; d < s.dim; ++d) {
      out[h * s.dim + d] = static_cast<scalar_t>(w.out[h * s.dim + d] * inv);
    }
  }
}

}  // namespace

// q [R, N, D], k_pages / v_pages [P, PAGE, D], table [R, M] (page ids), lengths [R];
// the exact rings: ring_k / ring_v [X, W, D] (pre-RoPE, read in place; W may be 0),
// ring_rows [R] (stream r's row of the ring slab), ring_cos / ring_sin [B, W, D] (stream r
// belongs to sequence r / (R / B)), ring_lengths [R] (valid prefix of each ring)
// -> out [R, N, D]; R = streams (sequence, KV head), N = query heads per KV head.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pages, torch::Tensor v_pages,
                           torch::Tensor table, torch::Tensor lengths, torch::Tensor ring_k,
                           torch::Tensor ring_v, torch::Tensor ring_rows, torch::Tensor ring_cos,
                           torch::Tensor ring_sin, torch::Tensor ring_lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pages.dim() == 3 && table.dim() == 2 && lengths.dim() == 1,
              "paged_decode: q [R, N, D], pages [P, PAGE, D], table [R, M], lengths [R]");
  const int64_t streams = q.size(0);
  TORCH_CHECK(ring_k.dim() == 3 && ring_k.sizes() == ring_v.sizes() && ring_k.size(2) == q.size(2) &&
                  ring_rows.numel() == streams && ring_lengths.numel() == streams &&
                  ring_cos.dim() == 3 && ring_cos.sizes() == ring_sin.sizes() &&
                  ring_cos.size(1) == ring_k.size(1) && ring_cos.size(2) == q.size(2) &&
                  ring_cos.size(0) > 0 && streams % ring_cos.size(0) == 0,
              "paged_decode: ring_k / ring_v [X, W, D], ring_rows [R], ring_cos / ring_sin "
              "[B, W, D], ring_lengths [R]");
  for (const auto& t : {k_pages, v_pages, ring_k, ring_v, ring_cos, ring_sin}) {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "paged_decode: one dtype for all tensors");
  }
  for (const auto& t : {table, lengths, ring_rows, ring_lengths}) {
    TORCH_CHECK(t.scalar_type() == torch::kLong, "paged_decode: tables and lengths are int64");
  }
  q = q.contiguous();
  table = table.contiguous();
  lengths = lengths.contiguous();
  ring_rows = ring_rows.contiguous();
  ring_cos = ring_cos.contiguous();
  ring_sin = ring_sin.contiguous();
  ring_lengths = ring_lengths.contiguous();
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous() && ring_k.is_contiguous() &&
                  ring_v.is_contiguous(),
              "paged_decode: pages and ring slabs must be contiguous");
  if (ring_k.size(1) > 0 && streams > 0) {
    TORCH_CHECK(ring_lengths.max().item<int64_t>() <= ring_k.size(1) &&
                    ring_rows.min().item<int64_t>() >= 0 &&
                    ring_rows.max().item<int64_t>() < ring_k.size(0),
                "paged_decode: ring_lengths exceed the ring or ring_rows the slab");
  }
  const int64_t block = std::max(kBlockPages * k_pages.size(1), ring_k.size(1));
  const Shape s{q.size(1), q.size(2), k_pages.size(1), table.size(1), ring_k.size(1), block};
  const int64_t per_sequence = streams / ring_cos.size(0);
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_pages.data_ptr<scalar_t>();
    const scalar_t* vp = v_pages.data_ptr<scalar_t>();
    const scalar_t* rkp = ring_k.data_ptr<scalar_t>();
    const scalar_t* rvp = ring_v.data_ptr<scalar_t>();
    const scalar_t* cosp = ring_cos.data_ptr<scalar_t>();
    const scalar_t* sinp = ring_sin.data_ptr<scalar_t>();
    const int64_t* tp = table.data_ptr<int64_t>();
    const int64_t* lp = lengths.data_ptr<int64_t>();
    const int64_t* rrp = ring_rows.data_ptr<int64_t>();
    const int64_t* rlp = ring_lengths.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, streams, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(2 * s.group * s.dim + s.group * s.block + 2 * s.group +
                                 s.ring * s.dim);
      Scratch<acc_t> w;
      w.q = scratch.data();
      w.out = w.q + s.group * s.dim;
      w.scores = w.out + s.group * s.dim;
      w.max_s = w.scores + s.group * s.block;
      w.sum_s = w.max_s + s.group;
      w.key = w.sum_s + s.group;
      const int64_t gd = s.group * s.dim;
      const int64_t rd = s.ring * s.dim;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / per_sequence;
        const Ring<scalar_t> ring{rkp + rrp[r] * rd, rvp + rrp[r] * rd, cosp + b * rd,
                                  sinp + b * rd, s.ring > 0 ? rlp[r] : 0};
        const scalar_t* q_r = qp + r * gd;
        const int64_t* table_r = tp + r * s.width;
        const acc_t scale_t = static_cast<acc_t>(scale);
        if (s.dim == 64) {
          one_stream<64>(q_r, kp, vp, table_r, lp[r], ring, op + r * gd, s, scale_t, w);
        } else if (s.dim == 128) {
          one_stream<128>(q_r, kp, vp, table_r, lp[r], ring, op + r * gd, s, scale_t, w);
        } else {
          one_stream<0>(q_r, kp, vp, table_r, lp[r], ring, op + r * gd, s, scale_t, w);
        }
      }
    });
  });
  return out;
}

// cache_append.cpp
int64_t cache_append(torch::Tensor k_pages, torch::Tensor v_pages, torch::Tensor table,
                     torch::Tensor lengths, torch::Tensor ring_k, torch::Tensor ring_v,
                     torch::Tensor ring_w, torch::Tensor run_len, torch::Tensor seq_ids,
                     torch::Tensor k, torch::Tensor v, torch::Tensor alpha, torch::Tensor omega,
                     torch::Tensor cos, torch::Tensor sin, torch::Tensor free_pages,
                     int64_t num_free, torch::Tensor seen, bool compress, bool channel);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode,
        "paged decode attention, pages and exact rings read in place (CPU)");
  m.def("cache_append", &cache_append,
        "one decode token of Algorithm 1 for every stream of a layer, in place (CPU)");
}

// Paged decode attention on CPU: each (sequence, KV head) stream reads its own pages in
// place through the block table, with an online softmax page by page; all query heads of
// the stream's group are served from each page while it is in cache. With a merge delay
// the stream's exact ring (its W newest tokens, pre-RoPE keys read in place from the
// ring's layer slab) is one more block of the same softmax, each key rotated on the fly
// with its position's RoPE table. No copy of the KV cache and no allocation proportional
// to it (per-thread scratch of group * dim * 2 + max(page, ring) + dim).
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Shape {
  int64_t group, dim, page, width, ring;
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

// One block of `filled` consecutive keys / values [filled, dim] into the running softmax.
// `rope`, when given, holds the block's rotated keys [filled, D] (k is then unused).
template <typename scalar_t, typename acc_t>
void attend_block(const scalar_t* k, const scalar_t* v, int64_t filled, const Shape& s,
                  Scratch<acc_t>& w, const acc_t* rope = nullptr) {
  for (int64_t h = 0; h < s.group; ++h) {
    const acc_t* qh = w.q + h * s.dim;
    acc_t* sh = w.scores;
    acc_t block_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < filled; ++j) {
      acc_t dot = 0;
      if (rope == nullptr) {
        const scalar_t* kj = k + j * s.dim;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < s.dim; ++d) dot += qh[d] * static_cast<acc_t>(kj[d]);
      } else {
        const acc_t* kj = rope + j * s.dim;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < s.dim; ++d) dot += qh[d] * kj[d];
      }
      sh[j] = dot;
      block_max = std::max(block_max, dot);
    }
    const acc_t new_max = std::max(w.max_s[h], block_max);
    const acc_t rescale = std::exp(w.max_s[h] - new_max);
    acc_t* oh = w.out + h * s.dim;
    if (rescale != acc_t(1)) {
      for (int64_t d = 0; d < s.dim; ++d) oh[d] *= rescale;
    }
    acc_t total = w.sum_s[h] * rescale;
    for (int64_t j = 0; j < filled; ++j) {
      const acc_t weight = std::exp(sh[j] - new_max);
      total += weight;
      const scalar_t* vj = v + j * s.dim;
#pragma omp simd
      for (int64_t d = 0; d < s.dim; ++d) oh[d] += weight * static_cast<acc_t>(vj[d]);
    }
    w.sum_s[h] = total;
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

template <typename scalar_t, typename acc_t>
void one_stream(const scalar_t* q, const scalar_t* k_pages, const scalar_t* v_pages,
                const int64_t* table, int64_t length, const Ring<scalar_t>& ring,
                scalar_t* out, const Shape& s, acc_t scale, Scratch<acc_t>& w) {
  const int64_t gd = s.group * s.dim;
  for (int64_t i = 0; i < gd; ++i) w.q[i] = static_cast<acc_t>(q[i]) * scale;
  std::fill(w.out, w.out + gd, acc_t(0));
  std::fill(w.max_s, w.max_s + s.group, -std::numeric_limits<acc_t>::infinity());
  std::fill(w.sum_s, w.sum_s + s.group, acc_t(0));
  for (int64_t p = 0; p * s.page < length; ++p) {
    const int64_t filled = std::min(s.page, length - p * s.page);
    const int64_t offset = table[p] * s.page * s.dim;
    attend_block<scalar_t, acc_t>(k_pages + offset, v_pages + offset, filled, s, w);
  }
  if (ring.length > 0) {
    rotate_ring<scalar_t, acc_t>(ring, s, w);
    attend_block<scalar_t, acc_t>(ring.k, ring.v, ring.length, s, w, w.key);
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
  const Shape s{q.size(1), q.size(2), k_pages.size(1), table.size(1), ring_k.size(1)};
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
      const int64_t block = std::max(s.page, s.ring);
      std::vector<acc_t> scratch(2 * s.group * s.dim + block + 2 * s.group + s.ring * s.dim);
      Scratch<acc_t> w;
      w.q = scratch.data();
      w.out = w.q + s.group * s.dim;
      w.scores = w.out + s.group * s.dim;
      w.max_s = w.scores + block;
      w.sum_s = w.max_s + s.group;
      w.key = w.sum_s + s.group;
      const int64_t gd = s.group * s.dim;
      const int64_t rd = s.ring * s.dim;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / per_sequence;
        const Ring<scalar_t> ring{rkp + rrp[r] * rd, rvp + rrp[r] * rd, cosp + b * rd,
                                  sinp + b * rd, s.ring > 0 ? rlp[r] : 0};
        one_stream<scalar_t, acc_t>(qp + r * gd, kp, vp, tp + r * s.width, lp[r], ring,
                                    op + r * gd, s, static_cast<acc_t>(scale), w);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode,
        "paged decode attention, pages and exact rings read in place (CPU)");
}

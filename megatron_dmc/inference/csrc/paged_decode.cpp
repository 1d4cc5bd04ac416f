// Paged decode attention on CPU: each (sequence, KV head) stream reads its own pages in
// place through the block table, with an online softmax page by page; all query heads of
// the stream's group are served from each page while it is in cache. No copy of the KV
// cache and no allocation proportional to it (per-thread scratch of group * (dim + page)).
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Shape {
  int64_t group, dim, page, width;
};

template <typename scalar_t, typename acc_t>
void one_stream(const scalar_t* q, const scalar_t* k_pages, const scalar_t* v_pages,
                const int64_t* table, int64_t length, scalar_t* out, const Shape& s,
                acc_t scale, acc_t* q_acc, acc_t* out_acc, acc_t* scores, acc_t* max_s,
                acc_t* sum_s) {
  const int64_t gd = s.group * s.dim;
  for (int64_t i = 0; i < gd; ++i) q_acc[i] = static_cast<acc_t>(q[i]) * scale;
  std::fill(out_acc, out_acc + gd, acc_t(0));
  std::fill(max_s, max_s + s.group, -std::numeric_limits<acc_t>::infinity());
  std::fill(sum_s, sum_s + s.group, acc_t(0));
  for (int64_t p = 0; p * s.page < length; ++p) {
    const int64_t filled = std::min(s.page, length - p * s.page);
    const scalar_t* k = k_pages + table[p] * s.page * s.dim;
    const scalar_t* v = v_pages + table[p] * s.page * s.dim;
    for (int64_t h = 0; h < s.group; ++h) {
      const acc_t* qh = q_acc + h * s.dim;
      acc_t* sh = scores + h * s.page;
      acc_t page_max = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < filled; ++j) {
        const scalar_t* kj = k + j * s.dim;
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < s.dim; ++d) dot += qh[d] * static_cast<acc_t>(kj[d]);
        sh[j] = dot;
        page_max = std::max(page_max, dot);
      }
      const acc_t new_max = std::max(max_s[h], page_max);
      const acc_t rescale = std::exp(max_s[h] - new_max);
      acc_t* oh = out_acc + h * s.dim;
      if (rescale != acc_t(1)) {
        for (int64_t d = 0; d < s.dim; ++d) oh[d] *= rescale;
      }
      acc_t total = sum_s[h] * rescale;
      for (int64_t j = 0; j < filled; ++j) {
        const acc_t weight = std::exp(sh[j] - new_max);
        total += weight;
        const scalar_t* vj = v + j * s.dim;
#pragma omp simd
        for (int64_t d = 0; d < s.dim; ++d) oh[d] += weight * static_cast<acc_t>(vj[d]);
      }
      sum_s[h] = total;
      max_s[h] = new_max;
    }
  }
  for (int64_t h = 0; h < s.group; ++h) {
    const acc_t inv = sum_s[h] > 0 ? acc_t(1) / sum_s[h] : acc_t(0);
    for (int64_t d = 0; d < s.dim; ++d) {
      out[h * s.dim + d] = static_cast<scalar_t>(out_acc[h * s.dim + d] * inv);
    }
  }
}

}  // namespace

// q [R, N, D], k_pages / v_pages [P, PAGE, D], table [R, M] (page ids), lengths [R]
// -> out [R, N, D]; R = streams (sequence, KV head), N = query heads per KV head.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pages, torch::Tensor v_pages,
                           torch::Tensor table, torch::Tensor lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pages.dim() == 3 && table.dim() == 2 && lengths.dim() == 1,
              "paged_decode: q [R, N, D], pages [P, PAGE, D], table [R, M], lengths [R]");
  TORCH_CHECK(q.scalar_type() == k_pages.scalar_type() && v_pages.scalar_type() == q.scalar_type(),
              "paged_decode: q, k and v must share one dtype");
  TORCH_CHECK(table.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong,
              "paged_decode: table and lengths must be int64");
  q = q.contiguous();
  table = table.contiguous();
  lengths = lengths.contiguous();
  TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous(), "pages must be contiguous");
  const Shape s{q.size(1), q.size(2), k_pages.size(1), table.size(1)};
  auto out = torch::empty_like(q);
  const int64_t streams = q.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_pages.data_ptr<scalar_t>();
    const scalar_t* vp = v_pages.data_ptr<scalar_t>();
    const int64_t* tp = table.data_ptr<int64_t>();
    const int64_t* lp = lengths.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, streams, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(2 * s.group * s.dim + s.group * s.page + 2 * s.group);
      acc_t* q_acc = scratch.data();
      acc_t* out_acc = q_acc + s.group * s.dim;
      acc_t* scores = out_acc + s.group * s.dim;
      acc_t* max_s = scores + s.group * s.page;
      acc_t* sum_s = max_s + s.group;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t gd = s.group * s.dim;
        one_stream<scalar_t, acc_t>(qp + r * gd, kp, vp, tp + r * s.width, lp[r], op + r * gd, s,
                                    static_cast<acc_t>(scale), q_acc, out_acc, scores, max_s,
                                    sum_s);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention, pages read in place (CPU)");
}

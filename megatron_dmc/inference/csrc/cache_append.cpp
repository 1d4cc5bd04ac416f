// One decode token of Algorithm 1 for every (sequence, KV head) stream of one layer, in
// one call: the window-ring update (a stream that opens a run has its ring cleared, the
// token goes to ring index run_len % W), the open slot's key and value (the token itself,
// or the window's omega-weighted mean after a merge), RoPE as the cache stores keys (channel
// D-1 zeroed before and after in DMC channel mode, plain in heads and vanilla mode), a new
// page from the pool's free stack where a stream crosses a page boundary, the page write
// and the slot count. The plain torch path is PagedKVCache._apply (kv_cache.py).
//
// Layout (X batch rows of the cache, B sequences of the call, G KV heads, W window, D head
// dim, M pages per stream, N tokens per page, P pages): k_pages / v_pages [P, N, D],
// table [X, G, M], lengths / run_len [X, G], ring_k / ring_v [X, G, W, D], ring_w [X, G, W]
// (the layer's slabs, written in place); seq_ids [B]; k / v [B, G, D] (cache dtype), alpha
// [B, G] (bool), omega [B, G], cos / sin [B, D]; free_pages [P] (the pool's stack, the
// top `num_free` entries free); seen [X] (tokens seen per row, +1 for each sequence of the
// call) or empty. One dtype (float or double) for pages, rings and inputs.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

struct Layout {
  int64_t groups, dim, page, width, window;
  bool compress, channel;
};

template <typename scalar_t>
struct Slabs {
  scalar_t *k_pages, *v_pages, *ring_k, *ring_v, *ring_w;
  int64_t *table, *lengths, *run_len;
};

template <typename scalar_t>
struct Token {
  const scalar_t *k, *v, *cos, *sin;
  scalar_t omega;
};

// The open slot's pre-RoPE key and value of stream `row` into key / value; updates its ring.
template <typename scalar_t>
void merge_window(const Layout& s, const Slabs<scalar_t>& m, int64_t row, bool merge,
                  const Token<scalar_t>& t, scalar_t* key, scalar_t* value) {
  const int64_t dim = s.dim, window = s.window;
  scalar_t* ring_k = m.ring_k + row * window * dim;
  scalar_t* ring_v = m.ring_v + row * window * dim;
  scalar_t* ring_w = m.ring_w + row * window;
  std::copy(t.k, t.k + dim, key);
  if (s.channel) key[dim - 1] = 0;
  std::copy(t.v, t.v + dim, value);
  if (!merge) {
    std::fill(ring_k, ring_k + window * dim, scalar_t(0));
    std::fill(ring_v, ring_v + window * dim, scalar_t(0));
    std::fill(ring_w, ring_w + window, scalar_t(0));
  }
  const int64_t index = merge ? m.run_len[row] % window : 0;
  std::copy(key, key + dim, ring_k + index * dim);
  std::copy(value, value + dim, ring_v + index * dim);
  ring_w[index] = t.omega;
  m.run_len[row] = merge ? m.run_len[row] + 1 : 1;
  if (!merge) return;
  scalar_t sum_w = 0;
  std::fill(key, key + dim, scalar_t(0));
  std::fill(value, value + dim, scalar_t(0));
  for (int64_t j = 0; j < window; ++j) {
    const scalar_t w = ring_w[j];
    sum_w += w;
    for (int64_t d = 0; d < dim; ++d) {
      key[d] += w * ring_k[j * dim + d];
      value[d] += w * ring_v[j * dim + d];
    }
  }
  for (int64_t d = 0; d < dim; ++d) {
    key[d] /= sum_w;
    value[d] /= sum_w;
  }
}

// Rotate-half RoPE of x into out; with `channel`, channel D-1 is zero before and after.
template <typename scalar_t>
void rope(const scalar_t* x, const scalar_t* c, const scalar_t* n, int64_t dim, bool channel,
          scalar_t* out) {
  const int64_t half = dim / 2;
  const scalar_t last = channel ? scalar_t(0) : x[dim - 1];
  for (int64_t d = 0; d < half; ++d) {
    const scalar_t hi = d + half == dim - 1 ? last : x[d + half];
    out[d] = x[d] * c[d] - hi * n[d];
    out[d + half] = hi * c[d + half] + x[d] * n[d + half];
  }
  if (channel) out[dim - 1] = 0;
}

template <typename scalar_t>
int64_t append_all(const Layout& s, const Slabs<scalar_t>& m, const int64_t* seq_ids,
                   int64_t batch, const scalar_t* k, const scalar_t* v, const bool* alpha,
                   const scalar_t* omega, const scalar_t* cos, const scalar_t* sin,
                   const int64_t* free_pages, int64_t num_free) {
  const int64_t groups = s.groups, dim = s.dim;
  std::vector<char> merge(batch * groups);
  int64_t needed = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t length = m.lengths[seq_ids[b] * groups + g];
      const bool merges = s.compress && alpha[b * groups + g] && length > 0;
      merge[b * groups + g] = merges;
      if (merges) continue;
      if (length >= s.width * s.page) return -2;
      needed += length % s.page == 0;
    }
  }
  if (needed > num_free) return -1;
  int64_t top = num_free;  // pops the top of the stack first, as PagePool.allocate
  std::vector<scalar_t> key(dim), value(dim), rotated(dim);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t row = seq_ids[b] * groups + g;
      const int64_t bg = b * groups + g;
      const bool merges = merge[bg];
      const Token<scalar_t> t{k + bg * dim, v + bg * dim, cos + b * dim, sin + b * dim,
                              omega[bg]};
      if (s.compress) {
        merge_window<scalar_t>(s, m, row, merges, t, key.data(), value.data());
      } else {
        std::copy(t.k, t.k + dim, key.data());
        std::copy(t.v, t.v + dim, value.data());
      }
      rope<scalar_t>(key.data(), t.cos, t.sin, dim, s.compress && s.channel, rotated.data());
      const int64_t slot = m.lengths[row] - merges;
      int64_t* table = m.table + row * s.width;
      if (!merges && slot % s.page == 0) table[slot / s.page] = free_pages[--top];
      const int64_t offset = (table[slot / s.page] * s.page + slot % s.page) * dim;
      std::copy(rotated.begin(), rotated.end(), m.k_pages + offset);
      std::copy(value.begin(), value.end(), m.v_pages + offset);
      m.lengths[row] = slot + 1;
    }
  }
  return num_free - needed;
}

}  // namespace

// Returns the pool's new count of free pages; -1 (too few free pages) or -2 (a stream would
// outgrow its block-table row) when nothing was written.
int64_t cache_append(torch::Tensor k_pages, torch::Tensor v_pages, torch::Tensor table,
                     torch::Tensor lengths, torch::Tensor ring_k, torch::Tensor ring_v,
                     torch::Tensor ring_w, torch::Tensor run_len, torch::Tensor seq_ids,
                     torch::Tensor k, torch::Tensor v, torch::Tensor alpha, torch::Tensor omega,
                     torch::Tensor cos, torch::Tensor sin, torch::Tensor free_pages,
                     int64_t num_free, torch::Tensor seen, bool compress, bool channel) {
  const auto dtype = k_pages.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kDouble,
              "cache_append: float32 or float64 caches");
  for (const auto& x : {v_pages, ring_k, ring_v, ring_w, k, v, omega, cos, sin}) {
    TORCH_CHECK(x.scalar_type() == dtype, "cache_append: one dtype for pages, rings and inputs");
  }
  for (const auto& x : {table, lengths, run_len, seq_ids, free_pages, seen}) {
    TORCH_CHECK(x.scalar_type() == torch::kLong, "cache_append: tables and ids are int64");
  }
  TORCH_CHECK(alpha.scalar_type() == torch::kBool, "cache_append: alpha is bool");
  for (const auto& x : {k_pages, v_pages, table, lengths, ring_k, ring_v, ring_w, run_len,
                        free_pages, seen}) {
    TORCH_CHECK(x.is_contiguous(), "cache_append: the cache's tensors must be contiguous");
  }
  TORCH_CHECK(k_pages.dim() == 3 && table.dim() == 3 && ring_k.dim() == 4 && k.dim() == 3,
              "cache_append: pages [P, N, D], table [X, G, M], rings [X, G, W, D], k [B, G, D]");
  const int64_t batch = seq_ids.numel(), groups = table.size(1), dim = k_pages.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == groups && k.size(2) == dim &&
                  v.sizes() == k.sizes() && alpha.numel() == batch * groups &&
                  omega.numel() == batch * groups && cos.numel() == batch * dim &&
                  sin.numel() == batch * dim && lengths.numel() == table.size(0) * groups &&
                  run_len.numel() == lengths.numel() && ring_k.sizes() == ring_v.sizes() &&
                  (!compress || (ring_k.size(0) == table.size(0) && ring_k.size(3) == dim &&
                                 ring_k.size(2) > 0 &&
                                 ring_w.numel() == ring_k.numel() / dim)),
              "cache_append: shapes disagree");
  seq_ids = seq_ids.contiguous();
  const int64_t* ids = seq_ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(ids[b] >= 0 && ids[b] < table.size(0), "cache_append: sequence id out of range");
  }
  TORCH_CHECK(num_free >= 0 && num_free <= free_pages.numel(), "cache_append: bad num_free");
  TORCH_CHECK(seen.numel() == 0 || seen.numel() == table.size(0), "cache_append: seen is [X]");
  k = k.contiguous();
  v = v.contiguous();
  alpha = alpha.contiguous();
  omega = omega.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  const Layout s{groups, dim, k_pages.size(1), table.size(2), ring_k.size(2), compress, channel};
  int64_t result = 0;
  AT_DISPATCH_FLOATING_TYPES(dtype, "cache_append", [&] {
    const Slabs<scalar_t> m{k_pages.data_ptr<scalar_t>(), v_pages.data_ptr<scalar_t>(),
                            ring_k.data_ptr<scalar_t>(),  ring_v.data_ptr<scalar_t>(),
                            ring_w.data_ptr<scalar_t>(),  table.data_ptr<int64_t>(),
                            lengths.data_ptr<int64_t>(),  run_len.data_ptr<int64_t>()};
    result = append_all<scalar_t>(s, m, ids, batch, k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                  alpha.data_ptr<bool>(), omega.data_ptr<scalar_t>(),
                                  cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                  free_pages.data_ptr<int64_t>(), num_free);
  });
  if (result >= 0 && seen.numel() > 0) {
    int64_t* counts = seen.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) counts[ids[b]] += 1;
  }
  return result;
}

// Fused CPU kernels of the FIITED prefix-chunk store (compresskit/plugins/fiited/store.py has the layout).
//
// A row r keeps a prefix of counts[r] chunks of `cs` floats each, stored contiguously in the pool from slot
//   slot(r) = base[r >> 6] + counts[r & ~63] + ... + counts[r - 1]
// so a lookup is one masked read of the row's block of counts (one cache line) plus one base read, and the row's
// stored values are one contiguous run of counts[r] * cs floats (pruned dims are not stored and read as zeros).
//
// forward:  pooled bags (sum / mean, optional per-sample weights), one pass over the ids.
// backward: ids radix-sorted by row, the gradient of each distinct row accumulated once, then per row either
//           written out (dense or sparse gradient for a torch optimizer) or applied by a fused optimizer (SGD,
//           Adagrad, row-wise Adagrad, as FBGEMM's EXACT_* optimizers), together with the chunk utility update.
// forward_q / backward_q: the same over int8 / int4 chunks with fp16 scales (dequantized as they are summed; the
//           fused update re-quantizes), hot rows from an fp32 cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "register_pooling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using namespace fiited;

namespace {

// A batch of bags: ids (checked to lie in [0, num_rows)), offsets and optional per-sample weights.
struct BagInputs {
  int64_t n, bags;
  const int64_t* ids;
  const int64_t* offsets;
  const float* psw;
};

BagInputs bag_inputs(const at::Tensor& ids, const at::Tensor& offsets, const at::Tensor& weights, int64_t num_rows) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong, "ids/offsets: int64");
  BagInputs in{ids.numel(), offsets.numel(), ids.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
               weights.defined() && weights.numel() ? weights.data_ptr<float>() : nullptr};
  check_ids(in.ids, in.n, num_rows);
  check_offsets(in.offsets, in.bags, in.n);
  return in;
}

// Per-position weight: per-sample weight (or 1) times 1/bag length for mode 'mean'; bag of every position.
void position_weights(const int64_t* offsets, int64_t bags, int64_t n, const float* psw, bool mean,
                      std::vector<float>& w, std::vector<int64_t>& bag_of) {
  w.resize(n);
  bag_of.resize(n);
  for (int64_t b = 0; b < bags; ++b) {
    const int64_t start = offsets[b], end = b + 1 < bags ? offsets[b + 1] : n;
    const float scale = (mean && end > start) ? 1.0f / float(end - start) : 1.0f;
    for (int64_t i = start; i < end; ++i) {
      w[i] = (psw ? psw[i] : 1.0f) * scale;
      bag_of[i] = b;
    }
  }
}

// Positions 0..n-1 stably sorted by ids[pos] (LSD radix sort of (id, position) pairs, with as few passes of at most
// 12-bit digits as the largest id needs). Returns the sorted ids and their positions.
void sort_by_row(const int64_t* ids, int64_t n, int64_t num_rows, std::vector<int64_t>& keys,
                 std::vector<int64_t>& order) {
  keys.assign(ids, ids + n);
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  int bits = 0;
  for (uint64_t m = uint64_t(num_rows > 0 ? num_rows - 1 : 0); m; m >>= 1) ++bits;
  const int passes = (bits + 11) / 12;
  const int width = passes ? (bits + passes - 1) / passes : 0;
  const uint64_t mask = (uint64_t(1) << width) - 1;
  std::vector<int64_t> tk(n), to(n), hist;
  for (int p = 0; p < passes; ++p) {
    const int shift = width * p;
    hist.assign(mask + 2, 0);
    for (int64_t i = 0; i < n; ++i) ++hist[((uint64_t(keys[i]) >> shift) & mask) + 1];
    if (hist[1] == n) continue;  // every key has this digit 0: nothing to reorder
    for (uint64_t d = 0; d <= mask; ++d) hist[d + 1] += hist[d];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t dst = hist[(uint64_t(keys[i]) >> shift) & mask]++;
      tk[dst] = keys[i];
      to[dst] = order[i];
    }
    keys.swap(tk);
    order.swap(to);
  }
}

// The distinct rows of a batch, for backward: positions sorted by row, and per distinct row its start in `order`,
// its first slot and its stored chunks (seg has one more entry, n, at the end).
struct RowSegments {
  std::vector<float> w;
  std::vector<int64_t> bag_of, keys, order, seg, seg_slot, seg_cnt;
  int64_t rows() const { return int64_t(seg.size()) - 1; }
};

RowSegments segment_rows(const Layout& L, const int64_t* idp, int64_t n, const int64_t* offp, int64_t bags,
                         const float* psw, bool mean) {
  RowSegments S;
  position_weights(offp, bags, n, psw, mean, S.w, S.bag_of);
  sort_by_row(idp, n, L.num_rows, S.keys, S.order);
  S.seg.reserve(n + 1);
  for (int64_t i = 0; i < n; ++i) {
    if (i + 2 * kPrefetch < n) L.prefetch_index(S.keys[i + 2 * kPrefetch]);
    if (i == 0 || S.keys[i] != S.keys[i - 1]) {
      int64_t cnt;
      S.seg.push_back(i);
      S.seg_slot.push_back(L.slot(S.keys[i], &cnt));
      S.seg_cnt.push_back(cnt);
    }
  }
  S.seg.push_back(n);
  return S;
}

// g[0 .. len) = the gradient of one distinct row: the weighted output gradients of its positions order[i0 .. i1),
// summed (bag_of: each position's bag; w: each position's weight).
#ifdef FIITED_AVX512
// In NV registers (dim <= 16 * NV): one fused multiply-add a register and position, where the loop over memory
// waited on its own stores at every position.
template <int NV>
inline void accumulate_row_in_registers(float* g, const int64_t* order, const int64_t* bag_of, const float* w,
                                        int64_t i0, int64_t i1, int64_t n, const float* g_out, int64_t dim,
                                        int64_t len) {
  __m512 acc[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
  const int regs = int((len + 15) / 16);
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kPrefetch < n) prefetch_run(g_out + bag_of[order[i + kPrefetch]] * dim, dim);
    const int64_t pos = order[i];
    const __m512 wi = _mm512_set1_ps(w[pos]);
    const float* go = g_out + bag_of[pos] * dim;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      if (j >= regs) break;  // the same for every position of the row: predicted
      acc[j] = _mm512_fmadd_ps(wi, _mm512_maskz_loadu_ps(lanes_below(len - 16 * j), go + 16 * j), acc[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    if (j >= regs) break;
    _mm512_mask_storeu_ps(g + 16 * j, lanes_below(len - 16 * j), acc[j]);
  }
}
#endif

using AccumulateRow = void (*)(float*, const int64_t*, const int64_t*, const float*, int64_t, int64_t, int64_t,
                               const float*, int64_t, int64_t);

inline void accumulate_row_in_memory(float* g, const int64_t* order, const int64_t* bag_of, const float* w,
                                     int64_t i0, int64_t i1, int64_t n, const float* g_out, int64_t dim,
                                     int64_t len) {
  std::memset(g, 0, sizeof(float) * len);
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kPrefetch < n) prefetch_run(g_out + bag_of[order[i + kPrefetch]] * dim, dim);
    const int64_t pos = order[i];
    const float wi = w[pos];
    const float* go = g_out + bag_of[pos] * dim;
    for (int64_t k = 0; k < len; ++k) g[k] += wi * go[k];
  }
}

// The row accumulation of a dim: in registers where this build and dim allow it
inline AccumulateRow pick_accumulate_row(int64_t dim) {
#ifdef FIITED_AVX512
  switch ((dim + 15) / 16) {
    case 1: return accumulate_row_in_registers<1>;
    case 2: return accumulate_row_in_registers<2>;
    case 3: return accumulate_row_in_registers<3>;
    case 4: return accumulate_row_in_registers<4>;
    case 5: return accumulate_row_in_registers<5>;
    case 6: return accumulate_row_in_registers<6>;
    case 7: return accumulate_row_in_registers<7>;
    case 8: return accumulate_row_in_registers<8>;
    default: break;
  }
#endif
  return accumulate_row_in_memory;
}

// u[c] += gain * ||g of chunk c||: squares per chunk first, then one vectorisable pass of square roots
inline void add_utility(float* u, const float* g, int64_t cnt, int64_t cs, float gain, float* sq) {
  for (int64_t c = 0; c < cnt; ++c) {
    float a = 0.f;
    for (int64_t k = c * cs; k < (c + 1) * cs; ++k) a += g[k] * g[k];
    sq[c] = a;
  }
  for (int64_t c = 0; c < cnt; ++c) u[c] += gain * std::sqrt(sq[c]);
}

// The fused update of one row's values p[0 .. len) (optim 1 SGD, 2 Adagrad with per-value state m, 3 row-wise
// Adagrad with the row's state mr), FBGEMM's EXACT_* rules.
inline void fused_update(float* p, const float* g, int64_t len, int64_t optim, float lr, float eps, float* m,
                         float* mr) {
  if (optim == 1) {
    for (int64_t k = 0; k < len; ++k) p[k] -= lr * g[k];
  } else if (optim == 2) {
    for (int64_t k = 0; k < len; ++k) {
      m[k] += g[k] * g[k];
      p[k] -= lr * g[k] / (std::sqrt(m[k]) + eps);
    }
  } else {
    float sq = 0.f;
    for (int64_t k = 0; k < len; ++k) sq += g[k] * g[k];
    *mr += sq / float(len);
    const float step = lr / (std::sqrt(*mr) + eps);
    for (int64_t k = 0; k < len; ++k) p[k] -= step * g[k];
  }
}

// The forward pooled in registers (register_pooling.h) where this build and dim allow it: a new [bags, dim] tensor,
// or an undefined one where it cannot (the caller's portable loop then runs).
template <int KIND>
at::Tensor forward_in_registers(const Layout& L, const uint8_t* codes, const at::Half* scales, bool rowwise,
                                int64_t code_bytes, const CacheView& C, const BagInputs& in, bool mean) {
  Stored S;
  S.pool = L.pool;
  S.codes = codes;
  S.scales = scales;
  S.rowwise = rowwise;
  S.cs = L.cs;
  S.dim = L.dim;
  S.num_rows = L.num_rows;
  S.code_bytes = code_bytes;
  S.cache = C;
  BagView bags;
  bags.ids = in.ids;
  bags.offsets = in.offsets;
  bags.psw = in.psw;
  bags.n = in.n;
  bags.bags = bags.num_offsets = in.bags;
  at::Tensor out = at::empty({in.bags, L.dim}, at::kFloat);
  const bool done = in.psw ? pool_in_registers_any<KIND, true>(S, L, bags, mean, out.data_ptr<float>())
                           : pool_in_registers_any<KIND, false>(S, L, bags, mean, out.data_ptr<float>());
  return done ? out : at::Tensor();
}

}  // namespace

at::Tensor prefix_bag_forward(const at::Tensor& pool, const at::Tensor& counts, const at::Tensor& base,
                              const at::Tensor& ids, const at::Tensor& offsets, const at::Tensor& weights,
                              bool mean, int64_t dim, int64_t num_rows) {
  const Layout L = make_layout(pool, counts, base, dim, num_rows);
  const BagInputs in = bag_inputs(ids, offsets, weights, num_rows);
  const int64_t n = in.n, bags = in.bags;
  const int64_t* idp = in.ids;
  const int64_t* offp = in.offsets;
  const float* psw = in.psw;
  at::Tensor out = forward_in_registers<32>(L, nullptr, nullptr, false, 0, CacheView{}, in, mean);
  if (out.defined()) return out;
  out = at::zeros({bags, dim}, pool.options());
  float* outp = out.data_ptr<float>();
  std::vector<int64_t> start_of(n), len_of(n);  // where each id's stored values start in the pool, and how many
  for (int64_t i = 0; i < n; ++i) {
    if (i + 2 * kPrefetch < n) L.prefetch_index(idp[i + 2 * kPrefetch]);
    int64_t cnt;
    start_of[i] = L.slot(idp[i], &cnt) * L.cs;
    len_of[i] = cnt * L.cs;
  }
  at::parallel_for(0, bags, 256, [&](int64_t b0, int64_t b1) {
    const int64_t first = offp[b0], last = b1 < bags ? offp[b1] : n;
    for (int64_t i = first; i < std::min(first + kPrefetch, last); ++i) prefetch_run(L.pool + start_of[i], len_of[i]);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = offp[b], end = b + 1 < bags ? offp[b + 1] : n;
      float* o = outp + b * dim;
      for (int64_t i = start; i < end; ++i) {
        if (i + kPrefetch < last) prefetch_run(L.pool + start_of[i + kPrefetch], len_of[i + kPrefetch]);
        const float* p = L.pool + start_of[i];
        const int64_t len = len_of[i];
        const float w = psw ? psw[i] : 1.0f;
        for (int64_t k = 0; k < len; ++k) o[k] += w * p[k];
      }
      if (mean && end > start) {
        const float s = 1.0f / float(end - start);
        for (int64_t k = 0; k < dim; ++k) o[k] *= s;
      }
    }
  });
  return out;
}

// optim: 0 none (gradient out), 1 SGD, 2 Adagrad (per element state [slots, cs]), 3 row-wise Adagrad (state [rows]).
// grad_kind (optim 0): 0 dense gradient [slots, cs], 1 sparse (slot indices, values).
// utility (optional, float32 [slots]): utility[chunk] += utility_gain * ||accumulated gradient of the chunk||.
// Returns {grad} (dense), {slot indices [nnz], values [nnz, cs]} (sparse), or {} (fused update).
std::vector<at::Tensor> prefix_bag_backward(const at::Tensor& grad_out, const at::Tensor& pool,
                                            const at::Tensor& counts, const at::Tensor& base, const at::Tensor& ids,
                                            const at::Tensor& offsets, const at::Tensor& weights, bool mean,
                                            int64_t num_rows, int64_t optim, double lr, double eps,
                                            const at::Tensor& state, const at::Tensor& utility, double utility_gain,
                                            int64_t grad_kind) {
  const int64_t dim = grad_out.size(1);
  const Layout L = make_layout(pool, counts, base, dim, num_rows);
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous(), "grad_out: contiguous float32");
  const int64_t n = ids.numel(), bags = offsets.numel(), cs = L.cs;
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* psw = weights.defined() && weights.numel() ? weights.data_ptr<float>() : nullptr;
  const float* g_out = grad_out.data_ptr<float>();
  float* poolw = pool.data_ptr<float>();
  float* st = state.defined() && state.numel() ? state.data_ptr<float>() : nullptr;
  float* util = utility.defined() && utility.numel() ? utility.data_ptr<float>() : nullptr;
  TORCH_CHECK(optim != 2 || (state.defined() && state.numel() == pool.numel()),
              "fused Adagrad: the state must have the pool's shape");
  TORCH_CHECK(optim != 3 || (state.defined() && state.numel() >= num_rows),
              "fused row-wise Adagrad: the state needs one value per row");

  const RowSegments S = segment_rows(L, idp, n, offsets.data_ptr<int64_t>(), bags, psw, mean);
  const std::vector<int64_t>& seg = S.seg;
  const std::vector<int64_t>& seg_slot = S.seg_slot;
  const std::vector<int64_t>& seg_cnt = S.seg_cnt;
  const int64_t rows = S.rows();

  at::Tensor grad, grad_slots, grad_values;
  float* gw = nullptr;
  int64_t* gs = nullptr;
  std::vector<int64_t> first_chunk;  // sparse: where each row's chunks start in the output
  if (optim == 0 && grad_kind == 0) {
    grad = at::zeros_like(pool);
    gw = grad.data_ptr<float>();
  } else if (optim == 0) {
    first_chunk.resize(rows + 1, 0);
    for (int64_t s = 0; s < rows; ++s) first_chunk[s + 1] = first_chunk[s] + seg_cnt[s];
    grad_slots = at::empty({first_chunk[rows]}, ids.options());
    grad_values = at::empty({first_chunk[rows], cs}, pool.options());
    gs = grad_slots.data_ptr<int64_t>();
    gw = grad_values.data_ptr<float>();
  }
  const float flr = float(lr), feps = float(eps), fgain = float(utility_gain);

  const AccumulateRow accumulate_row = pick_accumulate_row(dim);
  at::parallel_for(0, rows, 64, [&](int64_t s0, int64_t s1) {
    std::vector<float> acc(dim), norms(dim);
    const int64_t* const order = S.order.data();
    const int64_t* const bag_of = S.bag_of.data();
    const float* const w = S.w.data();
    for (int64_t s = s0; s < s1; ++s) {
      if (s + kPrefetchRows < s1) {
        if (optim != 0) prefetch_run(poolw + seg_slot[s + kPrefetchRows] * cs, seg_cnt[s + kPrefetchRows] * cs);
        if (optim == 2) prefetch_run(st + seg_slot[s + kPrefetchRows] * cs, seg_cnt[s + kPrefetchRows] * cs);
        if (util) __builtin_prefetch(util + seg_slot[s + kPrefetchRows], 1, 1);
      }
      const int64_t r = S.keys[seg[s]];
      const int64_t cnt = seg_cnt[s];
      const int64_t slot = seg_slot[s];
      const int64_t len = cnt * cs;
      if (len == 0) continue;
      float* g = acc.data();
      accumulate_row(g, order, bag_of, w, seg[s], seg[s + 1], n, g_out, dim, len);
      if (util) add_utility(util + slot, g, cnt, cs, fgain, norms.data());
      if (optim == 0 && grad_kind == 0) {
        std::memcpy(gw + slot * cs, g, sizeof(float) * len);
      } else if (optim == 0) {
        const int64_t f = first_chunk[s];
        std::memcpy(gw + f * cs, g, sizeof(float) * len);
        for (int64_t c = 0; c < cnt; ++c) gs[f + c] = slot + c;
      } else {
        fused_update(poolw + slot * cs, g, len, optim, flr, feps, optim == 2 ? st + slot * cs : nullptr,
                     optim == 3 ? st + r : nullptr);
      }
    }
  });
  if (optim == 0 && grad_kind == 0) return {grad};
  if (optim == 0) return {grad_slots, grad_values};
  return {};
}

// forward over quantized chunks: codes (uint8 [slots, cs * bits / 8]: int8, or int4 packed two a byte with the
// even value in the low nibble, code + 8) times one fp16 scale a chunk, or times the row's fp16 scale plus its
// offset (scales [rows, 2]: row-wise). Rows of the fp32 cache are found in O(1)
// with a rank bitmap (cache_bits: one bit a row in int64 words; cache_rank: cached rows before each word, int32)
// and read from cache_values (their stored chunks, float32, flat; cache_starts: each cached row's first chunk there,
// layout.h's CacheView) instead.
at::Tensor prefix_bag_forward_q(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t cs,
                                const at::Tensor& counts, const at::Tensor& base, const at::Tensor& ids,
                                const at::Tensor& offsets, const at::Tensor& weights, bool mean, int64_t dim,
                                int64_t num_rows, const at::Tensor& cache_bits, const at::Tensor& cache_rank,
                                const at::Tensor& cache_values, const at::Tensor& cache_starts) {
  const Layout L = quantized_layout(codes, scales, bits, cs, counts, base, dim, num_rows);
  const CacheView C = cache_view(cache_bits, cache_rank, cache_values, cache_starts, cs, num_rows);
  const int64_t cb = cs * bits / 8;  // code bytes a chunk
  const BagInputs in = bag_inputs(ids, offsets, weights, num_rows);
  const int64_t n = in.n, bags = in.bags;
  const int64_t* idp = in.ids;
  const int64_t* offp = in.offsets;
  const float* psw = in.psw;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const bool rowwise = scales.dim() == 2;
  at::Tensor out = bits == 8 ? forward_in_registers<8>(L, cp, sp, rowwise, cb, C, in, mean)
                             : forward_in_registers<4>(L, cp, sp, rowwise, cb, C, in, mean);
  if (out.defined()) return out;
  const AddChunks add = bits == 8 ? pick_add_chunks<8>(cs) : pick_add_chunks<4>(cs);
  out = at::zeros({bags, dim}, at::kFloat);
  float* outp = out.data_ptr<float>();
  // per id: first slot, or -(cache position + 1) for a cached row; and its stored chunks
  std::vector<int64_t> where(n), cnt_of(n);
  for (int64_t i = 0; i < n; ++i) {
    if (i + 2 * kPrefetch < n) L.prefetch_index(idp[i + 2 * kPrefetch]);
    const int64_t r = idp[i];
    where[i] = L.slot(r, &cnt_of[i]);
    const int64_t pos = C.position(r);
    if (pos >= 0) {
      where[i] = -pos - 1;
      cnt_of[i] = C.chunks(pos);
    }
  }
  at::parallel_for(0, bags, 256, [&](int64_t b0, int64_t b1) {
    const int64_t last = b1 < bags ? offp[b1] : n;
    std::vector<float> tmp(dim);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = offp[b], end = b + 1 < bags ? offp[b + 1] : n;
      float* o = outp + b * dim;
      for (int64_t i = start; i < end; ++i) {
        if (i + kPrefetch < last) {
          const int64_t j = i + kPrefetch;
          if (where[j] >= 0) {
            __builtin_prefetch(rowwise ? sp + 2 * idp[j] : sp + where[j], 0, 1);
            for (int64_t k = 0; k < cnt_of[j] * cb; k += 64) __builtin_prefetch(cp + where[j] * cb + k, 0, 1);
          } else {
            prefetch_run(C.row(-where[j] - 1), cnt_of[j] * cs);
          }
        }
        const float w = psw ? psw[i] : 1.0f;
        const int64_t cnt = cnt_of[i];
        if (where[i] < 0) {
          const float* p = C.row(-where[i] - 1);
          for (int64_t k = 0; k < cnt * cs; ++k) o[k] += w * p[k];
        } else if (rowwise) {
          (bits == 8 ? add_row_codes<8> : add_row_codes<4>)(o, cp + where[i] * cb, sp + 2 * idp[i], cnt * cs, w);
        } else {
          add(o, cp + where[i] * cb, sp + where[i], cnt, w, cs, tmp.data());
        }
      }
      if (mean && end > start) {
        const float s = 1.0f / float(end - start);
        for (int64_t k = 0; k < dim; ++k) o[k] *= s;
      }
    }
  });
  return out;
}

namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Round x to an integer code in [lo, hi] (nearest-even, or stochastically: floor(x + u), u uniform in [0, 1) from
// rng) and store it as code k of a chunk or row: a byte (int8), or a nibble (int4, code + 8, even k in the low one).
inline void put_code(float x, float lo, float hi, int64_t bits, uint8_t* out, int64_t k, bool stochastic,
                     uint64_t& rng) {
  if (stochastic) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    x = std::floor(x + float(rng >> 40) * (1.0f / 16777216.0f));
  } else {
    x = std::nearbyint(x);
  }
  const int q = int(std::min(std::max(x, lo), hi));
  if (bits == 8) {
    out[k] = uint8_t(int8_t(q));
  } else if (k % 2 == 0) {
    out[k / 2] = uint8_t(q + 8);
  } else {
    out[k / 2] |= uint8_t((q + 8) << 4);
  }
}

// Quantize one chunk (chunk_codec.py's rules): symmetric, FP16 scale = max|v| / qmax rounded up, codes rounded by
// put_code.
inline void quantize_chunk(const float* v, int64_t cs, int64_t bits, uint8_t* out, at::Half* scale, bool stochastic,
                           uint64_t& rng) {
  float amax = 0.f;
  for (int64_t k = 0; k < cs; ++k) amax = std::max(amax, std::fabs(v[k]));
  const float top = bits == 8 ? 127.f : 7.f;
  const float exact = std::min(amax / top, 65504.f);
  at::Half h(exact);
  if (float(h) < exact) h.x += 1;  // the next FP16 value up: no code clips
  *scale = h;
  const float sc = std::max(float(h), std::numeric_limits<float>::min());
  for (int64_t k = 0; k < cs; ++k) put_code(v[k] / sc, -top, top, bits, out, k, stochastic, rng);
}

// Quantize a row's len stored values with one (scale, offset) pair (chunk_codec.py's row-wise rules): FP16 scale =
// (max - min) / (2^bits - 1) rounded up, FP16 offset = min + 2^(bits-1) * scale, codes in [-2^(bits-1),
// 2^(bits-1) - 1] written to the row's run of code bytes, rounded by put_code.
inline void quantize_row(const float* v, int64_t len, int64_t bits, uint8_t* out, at::Half* qp, bool stochastic,
                         uint64_t& rng) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t k = 0; k < len; ++k) {
    lo = std::min(lo, v[k]);
    hi = std::max(hi, v[k]);
  }
  const float half = float(1 << (bits - 1));
  const float exact = std::min((hi - lo) / (2.f * half - 1.f), 65504.f);
  at::Half h(exact);
  if (float(h) < exact) h.x += 1;
  const float scale = float(h);
  const at::Half off(std::min(std::max(lo + half * scale, -65504.f), 65504.f));
  qp[0] = h;
  qp[1] = off;
  const float sc = std::max(scale, std::numeric_limits<float>::min()), offset = float(off);
  for (int64_t k = 0; k < len; ++k) put_code((v[k] - offset) / sc, -half, half - 1.f, bits, out, k, stochastic, rng);
}

}  // namespace

// The fused backward of a quantized store (quantized_training.py's rules): per distinct row, its gradient is accumulated and
// its chunks' utilities updated as in `backward`; a row of the fp32 cache (rank bitmap as in forward_q) is updated in
// the cache; any other row is dequantized, updated and re-quantized with a fresh scale a chunk, or a fresh (scale,
// offset) for the row when the scales are row-wise (rounding 0: nearest,
// 1: stochastic, seeded per row from `seed`, so the result does not depend on the thread count).
void prefix_bag_backward_q(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& scales,
                           int64_t bits, int64_t cs, const at::Tensor& counts, const at::Tensor& base,
                           const at::Tensor& ids, const at::Tensor& offsets, const at::Tensor& weights, bool mean,
                           int64_t num_rows, int64_t optim, double lr, double eps, const at::Tensor& state,
                           const at::Tensor& utility, double utility_gain, const at::Tensor& cache_bits,
                           const at::Tensor& cache_rank, const at::Tensor& cache_values,
                           const at::Tensor& cache_starts, int64_t rounding,
                           int64_t seed) {
  const int64_t dim = grad_out.size(1);
  const Layout L = quantized_layout(codes, scales, bits, cs, counts, base, dim, num_rows);
  const CacheView C = cache_view(cache_bits, cache_rank, cache_values, cache_starts, cs, num_rows);
  const int64_t cb = cs * bits / 8;
  TORCH_CHECK(optim >= 1 && optim <= 3, "optim: 1 SGD, 2 Adagrad, 3 row-wise Adagrad");
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous(), "grad_out: contiguous float32");
  TORCH_CHECK(optim != 2 || (state.defined() && state.numel() == codes.size(0) * cs),
              "fused Adagrad: the state needs one value per stored value");
  TORCH_CHECK(optim != 3 || (state.defined() && state.numel() >= num_rows),
              "fused row-wise Adagrad: the state needs one value per row");
  const int64_t n = ids.numel(), bags = offsets.numel();
  const int64_t* idp = ids.data_ptr<int64_t>();
  check_ids(idp, n, num_rows);
  const float* psw = weights.defined() && weights.numel() ? weights.data_ptr<float>() : nullptr;
  const RowSegments S = segment_rows(L, idp, n, offsets.data_ptr<int64_t>(), bags, psw, mean);
  const float* g_out = grad_out.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  at::Half* sp = scales.data_ptr<at::Half>();
  const bool rowwise = scales.dim() == 2;
  float* st = state.defined() && state.numel() ? state.data_ptr<float>() : nullptr;
  float* util = utility.defined() && utility.numel() ? utility.data_ptr<float>() : nullptr;
  const float flr = float(lr), feps = float(eps), fgain = float(utility_gain);
  const bool stochastic = rounding == 1;

  const AccumulateRow accumulate_row = pick_accumulate_row(dim);
  at::parallel_for(0, S.rows(), 64, [&](int64_t s0, int64_t s1) {
    std::vector<float> acc(dim), values(dim), norms(dim);
    const int64_t* const order = S.order.data();
    const int64_t* const bag_of = S.bag_of.data();
    const float* const w = S.w.data();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r = S.keys[S.seg[s]];
      const int64_t cnt = S.seg_cnt[s];
      const int64_t slot = S.seg_slot[s];
      const int64_t len = cnt * cs;
      if (len == 0) continue;
      float* g = acc.data();
      accumulate_row(g, order, bag_of, w, S.seg[s], S.seg[s + 1], n, g_out, dim, len);
      if (util) add_utility(util + slot, g, cnt, cs, fgain, norms.data());
      float* m = optim == 2 ? st + slot * cs : nullptr;
      float* mr = optim == 3 ? st + r : nullptr;
      const int64_t pos = C.position(r);
      if (pos >= 0) {
        TORCH_CHECK(C.chunks(pos) == cnt, "the cache and the store disagree on a cached row's chunks");
        fused_update(C.row(pos), g, len, optim, flr, feps, m, mr);
        continue;
      }
      float* v = values.data();
      const float row_scale = rowwise ? half_to_float(sp[2 * r]) : 0.f;
      const float row_offset = rowwise ? half_to_float(sp[2 * r + 1]) : 0.f;
      for (int64_t c = 0; c < cnt; ++c) {
        const float sc = rowwise ? row_scale : half_to_float(sp[slot + c]);
        const float off = rowwise ? row_offset : 0.f;
        const uint8_t* q = cp + (slot + c) * cb;
        for (int64_t k = 0; k < cs; ++k) {
          const int code = bits == 8 ? int(int8_t(q[k])) : int((q[k / 2] >> (4 * (k % 2))) & 0xF) - 8;
          v[c * cs + k] = float(code) * sc + off;
        }
      }
      fused_update(v, g, len, optim, flr, feps, m, mr);
      uint64_t rng = splitmix64(uint64_t(seed) ^ splitmix64(uint64_t(r))) | 1;
      if (rowwise) {
        quantize_row(v, len, bits, cp + slot * cb, sp + 2 * r, stochastic, rng);
        continue;
      }
      for (int64_t c = 0; c < cnt; ++c) {
        quantize_chunk(v + c * cs, cs, bits, cp + (slot + c) * cb, sp + slot + c, stochastic, rng);
      }
    }
  });
}

// Slot of the first chunk and the chunk count of every row in `rows` (int64 [n, 2]).
at::Tensor prefix_row_slots(const at::Tensor& counts, const at::Tensor& base, const at::Tensor& rows,
                            int64_t num_rows) {
  check_counts_base(counts, base, num_rows);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows: contiguous int64");
  const Layout L{nullptr, counts.data_ptr<uint8_t>(), base.data_ptr<int64_t>(), 0, 0, num_rows};
  const int64_t n = rows.numel();
  const int64_t* rp = rows.data_ptr<int64_t>();
  check_ids(rp, n, num_rows);
  at::Tensor out = at::empty({n, 2}, rows.options());
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) o[2 * i] = L.slot(rp[i], &o[2 * i + 1]);
  });
  return out;
}

// packed_bag.cpp: the serving kernel of packed tables
at::Tensor packed_bag(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& counts, const at::Tensor& base, const at::Tensor& cache_bits,
                      const at::Tensor& cache_rank, const at::Tensor& cache_values, const at::Tensor& cache_starts,
                      const at::Tensor& input,
                      const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& per_sample_weights,
                      int64_t bits, int64_t cs, int64_t mode, bool include_last_offset, int64_t num_rows,
                      int64_t dim);

// whether this build pools in AVX-512 registers (a portable build does not: tests/test_fiited_portable.py)
bool built_with_avx512() {
#ifdef FIITED_AVX512
  return true;
#else
  return false;
#endif
}

// the kernels of this file and of packed_bag.cpp
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_avx512", &built_with_avx512, "whether the AVX-512 register loops are compiled in");
  m.def("packed_bag", &packed_bag, "pooled lookup over a packed table (fp32 / int8 / int4 chunks, fp32 cache)");
  m.def("forward", &prefix_bag_forward, "pooled lookup over the prefix-chunk store");
  m.def("backward", &prefix_bag_backward, "gradient (dense/sparse) or fused optimizer update, with utilities");
  m.def("row_slots", &prefix_row_slots, "(first slot, chunk count) of rows");
  m.def("forward_q", &prefix_bag_forward_q, "pooled lookup over int8 / int4 chunks, hot rows from an fp32 cache");
  m.def("backward_q", &prefix_bag_backward_q, "fused update of int8 / int4 chunks (re-quantized) and cached rows");
}

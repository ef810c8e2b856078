// Shared pieces of the FIITED kernels (prefix_bag.cpp: training, packed_bag.cpp: serving): the prefix-chunk
// layout, id checks, fp16 conversion, the fp32 hot-row cache view and the dequantizing chunk adder.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Half.h>
#if defined(__F16C__) || defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include <cstring>

namespace fiited {

constexpr int64_t kBlock = 64;  // rows a block: one int64 base a block, one uint8 count a row (1.125 bytes a row)
constexpr int kBlockShift = 6;

// Chunks stored by the k < 64 rows before row k of a block (the sum of the block's first k count bytes). With
// AVX-512: one masked 64-byte load (unaligned allowed; only the k bytes below the row are read) and a sum of
// absolute differences; otherwise 16-bit lanes over its 8-byte words (the counts are whole words).
inline int64_t counts_before(const uint8_t* block, int k) {
#if defined(__AVX512BW__) && defined(__BMI2__)
  const __m512i v = _mm512_maskz_loadu_epi8(_cvtu64_mask64(_bzhi_u64(~uint64_t(0), unsigned(k))), block);
  return _mm512_reduce_add_epi64(_mm512_sad_epu8(v, _mm512_setzero_si512()));
#else
  int64_t sum = 0;
  for (int j = 0; j < k; j += 8) {
    uint64_t word;
    std::memcpy(&word, block + j, sizeof(word));
    if (k - j < 8) word &= (uint64_t(1) << (8 * (k - j))) - 1;
    word = (word & 0x00FF00FF00FF00FFULL) + ((word >> 8) & 0x00FF00FF00FF00FFULL);  // four 16-bit sums
    sum += int64_t((word * 0x0001000100010001ULL) >> 48);
  }
  return sum;
#endif
}

struct Layout {
  const float* pool;
  const uint8_t* counts;
  const int64_t* base;
  int64_t cs;
  int64_t dim;
  int64_t num_rows;

  inline int64_t slot(int64_t r, int64_t* count) const {
    const uint8_t* block = counts + (r & ~(kBlock - 1));
    const int k = int(r & (kBlock - 1));
    *count = block[k];
    return base[r >> kBlockShift] + counts_before(block, k);
  }

  inline void prefetch_index(int64_t r) const {
    __builtin_prefetch(counts + (r & ~(kBlock - 1)), 0, 1);
    __builtin_prefetch(base + (r >> kBlockShift), 0, 1);
  }
};

constexpr int kPrefetch = 8;  // ids looked ahead when prefetching rows (memory latency of random rows)
constexpr int kPrefetchRows = 24;  // distinct rows looked ahead by the fused update (each waits on its own misses)

inline void prefetch_run(const float* p, int64_t len) {
  for (int64_t k = 0; k < len; k += 16) __builtin_prefetch(p + k, 0, 1);
}

inline void check_pool(const at::Tensor& pool) {
  TORCH_CHECK(pool.scalar_type() == at::kFloat && pool.is_contiguous() && pool.dim() == 2, "pool: contiguous float32 [slots, chunk]");
}

// codes uint8 [slots, cs * bits / 8], scales fp16 [slots]
// Quantized chunks: codes and either one fp16 scale a chunk (scales [slots]) or one fp16 (scale, offset) pair a row
// (scales [>= num_rows, 2], chunk_codec.py's row-wise layout). Returns whether the scales are row-wise.
inline bool check_codes(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t cs,
                        int64_t num_rows) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits: 8 or 4");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(1) == cs * bits / 8, "codes: contiguous uint8 [slots, cs * bits / 8]");
  const bool rowwise = scales.dim() == 2;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  (rowwise ? scales.size(1) == 2 && scales.size(0) >= num_rows : scales.numel() == codes.size(0)),
              "scales: contiguous float16 [slots] (a scale a chunk) or [rows, 2] (scale and offset a row)");
  return rowwise;
}

// counts: whole 8-byte words covering num_rows (the portable counts_before reads words), base: one a block of counts
inline bool counts_base_cover(const at::Tensor& counts, const at::Tensor& base, int64_t num_rows) {
  return counts.numel() % 8 == 0 && base.numel() == (counts.numel() + kBlock - 1) / kBlock &&
         num_rows <= counts.numel();
}

inline void check_counts_base(const at::Tensor& counts, const at::Tensor& base, int64_t num_rows) {
  TORCH_CHECK(counts.scalar_type() == at::kByte && counts.is_contiguous(), "counts: contiguous uint8");
  TORCH_CHECK(base.scalar_type() == at::kLong && base.is_contiguous(), "base: contiguous int64");
  TORCH_CHECK(counts_base_cover(counts, base, num_rows), "counts/base sizes disagree");
}

inline Layout make_layout(const at::Tensor& pool, const at::Tensor& counts, const at::Tensor& base, int64_t dim,
                   int64_t num_rows) {
  check_pool(pool);
  check_counts_base(counts, base, num_rows);
  return Layout{pool.data_ptr<float>(), counts.data_ptr<uint8_t>(), base.data_ptr<int64_t>(), pool.size(1), dim,
                num_rows};
}

// IndexError, as nn.Embedding raises, for an id outside [0, num_rows)
inline void check_id(int64_t r, int64_t num_rows) {
  TORCH_CHECK_INDEX(r >= 0 && r < num_rows, "index ", r, " out of range for a table of ", num_rows,
                    " rows (ids must be in [0, ", num_rows, "))");
}

inline void check_ids(const int64_t* ids, int64_t n, int64_t num_rows) {
  for (int64_t i = 0; i < n; ++i) check_id(ids[i], num_rows);
}

// ValueError unless the bag offsets are non-decreasing and in [0, n] (the kernels index by them)
inline void check_offsets(const int64_t* offsets, int64_t count, int64_t n) {
  for (int64_t b = 0; b < count; ++b) {
    const int64_t o = offsets[b];
    TORCH_CHECK_VALUE(o >= 0 && o <= n && (b == 0 || o >= offsets[b - 1]),
                      "offsets must be non-decreasing and in [0, ", n, "], got ", o, " at position ", b);
  }
}

inline float half_to_float(at::Half h) {
#ifdef __F16C__
  return _cvtsh_ss(h.x);
#else
  return float(h);
#endif
}

// The layout of a quantized store, its tensors checked: codes uint8 [slots, cs * bits / 8], scales fp16 [slots].
inline Layout quantized_layout(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t cs,
                        const at::Tensor& counts, const at::Tensor& base, int64_t dim, int64_t num_rows) {
  check_codes(codes, scales, bits, cs, num_rows);
  check_counts_base(counts, base, num_rows);
  return Layout{nullptr, counts.data_ptr<uint8_t>(), base.data_ptr<int64_t>(), cs, dim, num_rows};
}

// The fp32 hot-row cache: a rank bitmap over the rows (bits: one a row in int64 words; rank: cached rows before
// each word, int32) and the cached rows' stored chunks (values: float32, flat, rows in ascending id order; starts:
// int64 [k + 1], each row's first chunk in values, so row p holds starts[p + 1] - starts[p] chunks). A cached row's
// chunk count is the cache's (a packed table keeps no codes for it). No starts beyond the first: no cache.
struct CacheView {
  const uint64_t* bits = nullptr;
  const int32_t* rank = nullptr;
  float* values = nullptr;
  const int64_t* starts = nullptr;
  int64_t cs = 0;

  // position of row r in the cache, or -1
  inline int64_t position(int64_t r) const {
    if (!bits) return -1;
    // no branch on whether r is cached (on Zipf ids, hot rows are about half the lookups: a branch on it was
    // mispredicted about as often)
    const uint64_t word = bits[r >> 6];
    const int bit = int(r & 63);
    const int64_t pos = int64_t(rank[r >> 6]) + __builtin_popcountll(word & ((uint64_t(1) << bit) - 1));
    return (word >> bit) & 1 ? pos : -1;
  }
  // the values of the cached row at pos, and its chunk count
  inline float* row(int64_t pos) const { return values + starts[pos] * cs; }
  inline int64_t chunks(int64_t pos) const { return starts[pos + 1] - starts[pos]; }
};

inline CacheView cache_view(const at::Tensor& cache_bits, const at::Tensor& cache_rank,
                            const at::Tensor& cache_values, const at::Tensor& cache_starts, int64_t cs,
                            int64_t num_rows) {
  CacheView C;
  TORCH_CHECK(cache_starts.scalar_type() == at::kLong && cache_starts.is_contiguous() && cache_starts.dim() == 1,
              "cache starts: contiguous int64 [cached rows + 1]");
  if (cache_starts.numel() <= 1) return C;
  TORCH_CHECK(cache_bits.scalar_type() == at::kLong && cache_bits.is_contiguous() &&
                  cache_bits.numel() * 64 >= num_rows && cache_rank.scalar_type() == at::kInt &&
                  cache_rank.is_contiguous() && cache_rank.numel() == cache_bits.numel() &&
                  cache_values.scalar_type() == at::kFloat && cache_values.is_contiguous() &&
                  cache_values.dim() == 1 &&
                  cache_starts.data_ptr<int64_t>()[cache_starts.numel() - 1] * cs == cache_values.numel(),
              "cache: bits int64 [ceil(rows / 64)], rank int32 [same], values float32 [cached chunks * cs], starts "
              "int64 [cached rows + 1] ending at the values' chunks");
  C.bits = reinterpret_cast<const uint64_t*>(cache_bits.data_ptr<int64_t>());
  C.rank = cache_rank.data_ptr<int32_t>();
  C.values = cache_values.data_ptr<float>();
  C.starts = cache_starts.data_ptr<int64_t>();
  C.cs = cs;
  return C;
}

// o[0 .. cnt * CS) += w * dequantized chunks (CS values each; CS = 0: the run-time cs). The scales are expanded to
// one a value first (tmp), so the multiply-add runs as one vectorisable loop over the row's run of codes.
template <int BITS, int CS>
inline void add_chunks(float* o, const uint8_t* codes, const at::Half* scales, int64_t cnt, float w, int64_t cs_rt,
                       float* tmp) {
  const int64_t cs = CS ? CS : cs_rt;
  const int64_t len = cnt * cs;
  for (int64_t c = 0; c < cnt; ++c) {
    const float s = w * half_to_float(scales[c]);
    for (int64_t k = 0; k < cs; ++k) tmp[c * cs + k] = s;
  }
  if (BITS == 8) {
    const int8_t* q8 = reinterpret_cast<const int8_t*>(codes);
    for (int64_t k = 0; k < len; ++k) o[k] += tmp[k] * float(q8[k]);
  } else {
    for (int64_t k = 0; k < len / 2; ++k) {
      o[2 * k] += tmp[2 * k] * float(int(codes[k] & 0xF) - 8);
      o[2 * k + 1] += tmp[2 * k + 1] * float(int(codes[k] >> 4) - 8);
    }
  }
}

using AddChunks = void (*)(float*, const uint8_t*, const at::Half*, int64_t, float, int64_t, float*);

// o[0 .. len) += w * (codes * scale + offset): a row's len values with row-wise (scale, offset) qp.
template <int BITS>
inline void add_row_codes(float* o, const uint8_t* codes, const at::Half* qp, int64_t len, float w) {
  const float s = w * half_to_float(qp[0]), b = w * half_to_float(qp[1]);
  if (BITS == 8) {
    const int8_t* q8 = reinterpret_cast<const int8_t*>(codes);
    for (int64_t k = 0; k < len; ++k) o[k] += s * float(q8[k]) + b;
  } else {
    for (int64_t k = 0; k < len / 2; ++k) {
      o[2 * k] += s * float(int(codes[k] & 0xF) - 8) + b;
      o[2 * k + 1] += s * float(int(codes[k] >> 4) - 8) + b;
    }
  }
}

template <int BITS>
inline AddChunks pick_add_chunks(int64_t cs) {
  switch (cs) {
    case 2: return add_chunks<BITS, 2>;
    case 4: return add_chunks<BITS, 4>;
    case 8: return add_chunks<BITS, 8>;
    case 16: return add_chunks<BITS, 16>;
    case 32: return add_chunks<BITS, 32>;
    default: return add_chunks<BITS, 0>;
  }
}

}  // namespace fiited

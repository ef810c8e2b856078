// The serving kernel of packed FIITED tables (compresskit/plugins/fiited/packed.py): pooled lookups over FP32, INT8
// or INT4 chunks (one fp16 scale a chunk) with an optional fp32 hot-row cache, for every input form
// nn.EmbeddingBag takes (1-D ids with offsets, with or without include_last_offset; 2-D ids; empty bags; sum or
// mean; per-sample weights). Ids outside [0, num_rows) raise IndexError.
//
// Two passes over each group of a thread's bags: the first finds every id's stored run through the index (its
// block's 16-byte entry: first slot and counts, prefetched ahead), with no dependence between iterations; the
// second adds the runs into each bag's accumulator, prefetching the runs ahead. (One pass, where a run's prefetch
// must wait for its index entry, reached a third of the memory parallelism on random ids.) With AVX-512 and
// dim <= 128 the accumulator is dim / 16 vector registers, written to the output once a bag: a row's prefix of
// stored values is read with masked loads (int8 / int4 codes widened and scaled in registers). Otherwise the
// accumulator is the output row itself (auto-vectorised loops). Measured (docs/fiited.md, serving speed): with the
// rows in cache a lookup costs about what nn.EmbeddingBag's does; on Zipf ids over a 1M-row table it takes about
// 1.6x its time at pooling 20, pruned or not, so the remaining cost is latency, not the values read.
#include <ATen/Parallel.h>

#include "layout.h"

#include <algorithm>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define FIITED_AVX512 1
#include <immintrin.h>
#endif

using namespace fiited;

namespace {

constexpr int64_t kPrefetchRun = 32;    // ids looked ahead when prefetching stored runs
constexpr int64_t kPrefetchIndex = 96;  // ids looked ahead when prefetching index entries
constexpr int64_t kGroupIds = 2048;     // ids located per pass: their locations (32-48 KiB) stay in L1/L2
constexpr int64_t kIdsPerTask = 2048;  // ids a thread takes at least (smaller batches run on one thread)

// The bags of one call: bag b holds positions [start(b), stop(b)) of `ids`.
struct BagView {
  const int64_t* ids = nullptr;
  const int64_t* offsets = nullptr;  // nullptr: fixed-length bags (2-D input) of `length` ids
  const float* psw = nullptr;
  int64_t n = 0, bags = 0, length = 0, num_offsets = 0;

  inline int64_t start(int64_t b) const { return offsets ? offsets[b] : b * length; }
  inline int64_t stop(int64_t b) const {
    return offsets ? (b + 1 < num_offsets ? offsets[b + 1] : n) : (b + 1) * length;
  }
};

// The stored chunks of one table, as the accumulators read them.
struct Table {
  Layout L;
  const uint8_t* codes = nullptr;  // quantized storage: codes and one fp16 scale a chunk
  const at::Half* scales = nullptr;
  int64_t code_bytes = 0;          // bytes of one chunk's codes
  const int64_t* index = nullptr;  // the packed index (see Reader)
  CacheView C;
};

// Generic accumulator: the output row itself (any dim, any instruction set).
template <int KIND>  // 32: fp32 values, 8: int8 codes, 4: int4 codes
struct RowAccumulator {
  float* o = nullptr;
  const uint8_t* codes;
  const at::Half* scales;
  int64_t cs, dim, code_bytes;
  std::vector<float> tmp;
  AddChunks add_chunks;

  explicit RowAccumulator(const Table& t)
      : codes(t.codes), scales(t.scales), cs(t.L.cs), dim(t.L.dim), code_bytes(t.code_bytes),
        tmp(KIND == 32 ? 0 : t.L.dim),
        add_chunks(KIND == 8 ? pick_add_chunks<8>(t.L.cs) : pick_add_chunks<4>(t.L.cs)) {}

  inline void begin(float* out) {
    o = out;
    std::memset(o, 0, sizeof(float) * dim);
  }
  // add w times a row's stored values: the fp32 run p, or (p null) the quantized chunks from slot
  template <bool WEIGHTED>
  inline void add(const float* p, int64_t slot, int64_t cnt, float w) {
    const int64_t len = cnt * cs;
    if (p) {
      if (WEIGHTED) {
        for (int64_t k = 0; k < len; ++k) o[k] += w * p[k];
      } else {
        for (int64_t k = 0; k < len; ++k) o[k] += p[k];
      }
    } else if (KIND != 32) {
      add_chunks(o, codes + slot * code_bytes, scales + slot, cnt, w, cs, tmp.data());
    }
  }
  inline void end(float scale) {
    if (scale != 1.0f) {
      for (int64_t k = 0; k < dim; ++k) o[k] *= scale;
    }
  }
};


// Prefetch the cache line of p into L1. An asm statement, because GCC dropped the __builtin_prefetch calls of the
// pooling pass altogether (found in the disassembly: the second pass ran without any prefetch).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// The table as plain locals of the loop (no reloads through references), with row lookups and prefetches.
template <int KIND>
struct Reader {
  const float* pool;
  const int64_t* index;  // [blocks, 2]: a block's first slot, then its 8 counts (one byte each)
  const uint8_t* codes;
  const at::Half* scales;
  CacheView cache;
  int64_t cs, dim, code_bytes, num_rows;
  bool small;

  explicit Reader(const Table& T)
      : pool(T.L.pool), index(T.index), codes(T.codes), scales(T.scales), cache(T.C), cs(T.L.cs), dim(T.L.dim),
        code_bytes(T.code_bytes), num_rows(T.L.num_rows), small(T.L.small) {}

  inline bool valid(int64_t r) const { return r >= 0 && r < num_rows; }

  inline void prefetch_index(int64_t r) const {
    __builtin_prefetch(index + 2 * (r >> 3), 0, 1);  // one 16-byte entry: one cache line
  }

  // slot of row r's first chunk; its chunk count in *cnt (layout.h's Layout::slot)
  inline int64_t slot(int64_t r, int64_t* cnt) const {
    const int64_t* entry = index + 2 * (r >> 3);
    const uint64_t word = uint64_t(entry[1]);
    const int k = int(r & 7);
    *cnt = int64_t((word >> (8 * k)) & 0xFF);
    return entry[0] + counts_before(word, k, small);
  }

  // fp32 values of row r (pool or cache), or nullptr for quantized chunks at *slot
  inline const float* locate(int64_t r, int64_t* slot, int64_t* cnt) const {
    *slot = this->slot(r, cnt);
    const int64_t cached = cache.position(r);
    if (cached >= 0) return cache.values + cached * dim;
    return KIND == 32 ? pool + *slot * cs : nullptr;
  }

  inline void prefetch_run(const float* p, int64_t slot, int64_t cnt) const {
    if (p) {
      for (int64_t k = 0; k < cnt * cs; k += 16) prefetch_line(p + k);
    } else {
      prefetch_line(scales + slot);
      const uint8_t* q = codes + slot * code_bytes;
      for (int64_t k = 0; k < cnt * code_bytes; k += 64) prefetch_line(q + k);
    }
  }
};

// Where one id's stored values are: an fp32 run p (pool or cache), or (p null) quantized chunks from slot.
struct Where {
  const float* p;
  int64_t slot;
  int64_t cnt;
};

template <int KIND, bool WEIGHTED, class Acc>
void pool_bags(const Table& T, const BagView& in, bool mean, float* outp) {
  const int64_t grain = std::max<int64_t>(1, in.bags * kIdsPerTask / std::max<int64_t>(in.n, 1));
  at::parallel_for(0, in.bags, grain, [&](int64_t b0, int64_t b1) {
    const Reader<KIND> R(T);
    Acc acc(T);
    const int64_t* ids = in.ids;
    const float* psw = in.psw;
    const int64_t dim = R.dim, num_rows = R.num_rows;
    thread_local std::vector<Where> where;  // reused across calls: no allocation (or page faults) per call
    for (int64_t g0 = b0; g0 < b1;) {
      // a group of bags with at most kGroupIds ids (or one bag)
      int64_t g1 = g0 + 1;
      while (g1 < b1 && in.stop(g1) - in.start(g0) <= kGroupIds) ++g1;
      const int64_t first = in.start(g0), last = std::max(first, in.stop(g1 - 1));
      if (int64_t(where.size()) < last - first) where.resize(last - first);
      Where* w = where.data() - first;
      // pass 1: every id's run (independent iterations, index entries prefetched kPrefetchIndex ids ahead)
      for (int64_t i = first; i < last; ++i) {
        if (i + kPrefetchIndex < last && R.valid(ids[i + kPrefetchIndex])) R.prefetch_index(ids[i + kPrefetchIndex]);
        const int64_t r = ids[i];
        check_id(r, num_rows);
        w[i].p = R.locate(r, &w[i].slot, &w[i].cnt);
      }
      for (int64_t i = first; i < std::min(first + kPrefetchRun, last); ++i) R.prefetch_run(w[i].p, w[i].slot, w[i].cnt);
      // pass 2: pool each bag in registers (or its output row), runs prefetched kPrefetchRun ids ahead
      for (int64_t b = g0; b < g1; ++b) {
        const int64_t start = in.start(b), stop = in.stop(b);
        acc.begin(outp + b * dim);
        for (int64_t i = start; i < stop; ++i) {
          if (i + kPrefetchRun < last) R.prefetch_run(w[i + kPrefetchRun].p, w[i + kPrefetchRun].slot,
                                                      w[i + kPrefetchRun].cnt);
          if (w[i].cnt) acc.template add<WEIGHTED>(w[i].p, w[i].slot, w[i].cnt, WEIGHTED ? psw[i] : 1.0f);
        }
        acc.end(mean && stop > start ? 1.0f / float(stop - start) : 1.0f);
      }
      g0 = g1;
    }
  });
}

#ifdef FIITED_AVX512
// Tables of dim <= 16 * NV with AVX-512: pool_bags' two passes with nothing
// else live, the accumulator in NV local registers. Everything the loop reads is a local of the lambda: read
// through its captured references, values were reloaded after every store, and with pool_bags' accumulator object
// rows in cache took 1.5-2.5x this loop's time. Branches on a row's length are left only where they are
// predictable (pruned rows' lengths are random).
template <int KIND, bool WEIGHTED, bool CACHED, int NV>
void pool_plain(const Table& T, const BagView& in, bool mean, float* outp) {
  const int64_t grain = std::max<int64_t>(1, in.bags * kIdsPerTask / std::max<int64_t>(in.n, 1));
  at::parallel_for(0, in.bags, grain, [&](int64_t b0, int64_t b1) {
    const float* const pool = T.L.pool;
    const uint8_t* const codes = T.codes;
    const at::Half* const scales = T.scales;
    const int64_t* const index = T.index;
    const CacheView cache = T.C;
    const BagView bags = in;
    const int64_t* const ids = bags.ids;
    const float* const psw = bags.psw;
    const int64_t cs = T.L.cs, dim = T.L.dim, num_rows = T.L.num_rows, code_bytes = T.code_bytes;
    const bool small = T.L.small, by_mean = mean;
    float* const out = outp;
    // quantized: lane -> the chunk whose scale it takes, counted from the row's first chunk (rows of at most 16
    // chunks: their scales are one register) or from register j's first chunk (longer rows)
    const bool few_chunks = dim / cs <= 16;
    __m512i chunk_of[NV];
    int64_t first_chunk[NV];
    for (int j = 0; j < NV; ++j) {
      alignas(64) int32_t lane[16];
      first_chunk[j] = few_chunks ? 0 : (16 * j) / cs;
      for (int l = 0; l < 16; ++l) lane[l] = int32_t(std::min<int64_t>((16 * j + l) / cs - first_chunk[j], 15));
      chunk_of[j] = _mm512_load_si512(lane);
    }
    struct Run {
      int64_t slot;  // of the row's first chunk; a cached row: -1 - its position in the cache
      int64_t cnt;   // chunks served
    };
    auto run_of = [&](int64_t r) -> Run {
      const int64_t* e = index + 2 * (r >> 3);
      const uint64_t word = uint64_t(e[1]);
      const int k = int(r & 7);
      const int64_t cnt = int64_t((word >> (8 * k)) & 0xFF);
      if (CACHED) {
        const int64_t cached = cache.position(r);
        if (cached >= 0) return Run{-1 - cached, cnt};
      }
      return Run{e[0] + counts_before(word, k, small), cnt};
    };
    auto fp32_values = [&](const Run& run) -> const float* {
      return CACHED && run.slot < 0 ? cache.values + (-1 - run.slot) * dim : pool + run.slot * cs;
    };
    auto prefetch = [&](const Run& run) {
      if (KIND == 32 || (CACHED && run.slot < 0)) {
        const float* p = fp32_values(run);
        prefetch_line(p);
        if (run.cnt * cs == 16 * NV) {
#pragma GCC unroll 8
          for (int j = 1; j < NV; ++j) prefetch_line(p + 16 * j);
        }
        prefetch_line(p + std::max<int64_t>(run.cnt * cs - 1, 0));
      } else {
        const uint8_t* q = codes + run.slot * code_bytes;
        const int64_t last_byte = std::max<int64_t>(run.cnt * code_bytes - 1, 0);  // rows of at most 128 bytes
        prefetch_line(q);
        prefetch_line(q + std::min<int64_t>(64, last_byte));
        prefetch_line(q + last_byte);
        prefetch_line(scales + run.slot);
        prefetch_line(scales + run.slot + std::max<int64_t>(run.cnt - 1, 0));
      }
    };
    thread_local std::vector<Run> buffer;  // reused across calls: no allocation (or page faults) per call
    for (int64_t g0 = b0; g0 < b1;) {
      // a group of bags with at most kGroupIds ids (or one bag)
      int64_t g1 = g0 + 1;
      while (g1 < b1 && bags.stop(g1) - bags.start(g0) <= kGroupIds) ++g1;
      const int64_t first = bags.start(g0), last = std::max(first, bags.stop(g1 - 1));
      if (int64_t(buffer.size()) < last - first) buffer.resize(last - first);
      Run* const runs = buffer.data() - first;
      // pass 1: every id's run (independent iterations, index entries prefetched kPrefetchIndex ids ahead)
      for (int64_t i = first; i < last; ++i) {
        if (i + kPrefetchIndex < last) {
          const int64_t r = ids[i + kPrefetchIndex];
          if (uint64_t(r) < uint64_t(num_rows)) __builtin_prefetch(index + 2 * (r >> 3), 0, 1);
        }
        check_id(ids[i], num_rows);
        runs[i] = run_of(ids[i]);
      }
      for (int64_t i = first; i < std::min(first + kPrefetchRun, last); ++i) prefetch(runs[i]);
      // pass 2: pool each bag in registers, runs prefetched kPrefetchRun ids ahead
      for (int64_t b = g0; b < g1; ++b) {
        const int64_t start = bags.start(b), stop = bags.stop(b);
        __m512 acc[NV];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t i = start; i < stop; ++i) {
          if (i + kPrefetchRun < last) prefetch(runs[i + kPrefetchRun]);
          const Run run = runs[i];
          const int64_t len = run.cnt * cs;
          const __m512 vw = _mm512_set1_ps(WEIGHTED ? psw[i] : 1.0f);
          if (KIND == 32 || (CACHED && run.slot < 0)) {
            const float* p = fp32_values(run);
            if (len == 16 * NV) {  // a whole row of a dim that is a multiple of 16: plain loads
#pragma GCC unroll 8
              for (int j = 0; j < NV; ++j) {
                const __m512 v = _mm512_loadu_ps(p + 16 * j);
                acc[j] = WEIGHTED ? _mm512_fmadd_ps(vw, v, acc[j]) : _mm512_add_ps(acc[j], v);
              }
              continue;
            }
            // the first register without a branch, the others only where the row reaches them
#pragma GCC unroll 8
            for (int j = 0; j < NV; ++j) {
              if (j > 0 && 16 * j >= len) break;
              const __mmask16 m = __mmask16((1u << std::min<int64_t>(std::max<int64_t>(len - 16 * j, 0), 16)) - 1);
              const __m512 v = _mm512_maskz_loadu_ps(m, p + 16 * j);
              acc[j] = WEIGHTED ? _mm512_fmadd_ps(vw, v, acc[j]) : _mm512_add_ps(acc[j], v);
            }
            continue;
          }
          // quantized chunks: scales spread to the lanes (rows of at most 16 chunks: all of them read once)
          __m512 row_scales = _mm512_setzero_ps();
          if (few_chunks) {
            row_scales = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << run.cnt) - 1), scales + run.slot));
            if (WEIGHTED) row_scales = _mm512_mul_ps(row_scales, vw);
          }
          const uint8_t* q = codes + run.slot * code_bytes;
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j) {
            if (j > 0 && 16 * j >= len) break;
            const __mmask16 m = __mmask16((1u << std::min<int64_t>(std::max<int64_t>(len - 16 * j, 0), 16)) - 1);
            __m512 v;
            if (KIND == 8) {
              v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + 16 * j)));
            } else {
              const int64_t bytes = std::min<int64_t>(std::max<int64_t>((len - 16 * j + 1) / 2, 0), 8);
              const __m128i b8 = _mm_maskz_loadu_epi8(__mmask16((1u << bytes) - 1), q + 8 * j);
              const __m128i nib = _mm_set1_epi8(0x0F);
              const __m128i lo = _mm_and_si128(b8, nib), hi = _mm_and_si128(_mm_srli_epi16(b8, 4), nib);
              const __m512i c = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), _mm512_set1_epi32(8));
              v = _mm512_maskz_mov_ps(m, _mm512_cvtepi32_ps(c));
            }
            __m512 sc;
            if (few_chunks) {
              sc = _mm512_permutexvar_ps(chunk_of[j], row_scales);
            } else {
              const int64_t chunks = std::min<int64_t>(run.cnt - first_chunk[j], 16);
              const __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << chunks) - 1), scales + run.slot + first_chunk[j]);
              sc = _mm512_permutexvar_ps(chunk_of[j], _mm512_cvtph_ps(h));
              if (WEIGHTED) sc = _mm512_mul_ps(sc, vw);
            }
            acc[j] = _mm512_fmadd_ps(sc, v, acc[j]);
          }
        }
        const __m512 scale = _mm512_set1_ps(by_mean && stop > start ? 1.0f / float(stop - start) : 1.0f);
        float* o = out + b * dim;
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) {
          const int64_t m = std::min<int64_t>(std::max<int64_t>(dim - 16 * j, 0), 16);
          _mm512_mask_storeu_ps(o + 16 * j, __mmask16((1u << m) - 1), _mm512_mul_ps(acc[j], scale));
        }
      }
      g0 = g1;
    }
  });
}

// pool_plain for a table's dim
template <int KIND, bool WEIGHTED, bool CACHED>
bool pool_plain_any(const Table& T, const BagView& in, bool mean, float* outp) {
  if (T.L.dim > 128) return false;
  switch ((T.L.dim + 15) / 16) {
    case 1: pool_plain<KIND, WEIGHTED, CACHED, 1>(T, in, mean, outp); return true;
    case 2: pool_plain<KIND, WEIGHTED, CACHED, 2>(T, in, mean, outp); return true;
    case 3: pool_plain<KIND, WEIGHTED, CACHED, 3>(T, in, mean, outp); return true;
    case 4: pool_plain<KIND, WEIGHTED, CACHED, 4>(T, in, mean, outp); return true;
    case 5: pool_plain<KIND, WEIGHTED, CACHED, 5>(T, in, mean, outp); return true;
    case 6: pool_plain<KIND, WEIGHTED, CACHED, 6>(T, in, mean, outp); return true;
    case 7: pool_plain<KIND, WEIGHTED, CACHED, 7>(T, in, mean, outp); return true;
    case 8: pool_plain<KIND, WEIGHTED, CACHED, 8>(T, in, mean, outp); return true;
  }
  return false;
}
#endif



template <int KIND, bool WEIGHTED>
void pool_any(const Table& T, const BagView& in, bool mean, float* outp) {
#ifdef FIITED_AVX512
  if (T.C.values ? pool_plain_any<KIND, WEIGHTED, true>(T, in, mean, outp)
                 : pool_plain_any<KIND, WEIGHTED, false>(T, in, mean, outp))
    return;
#endif
  pool_bags<KIND, WEIGHTED, RowAccumulator<KIND>>(T, in, mean, outp);
}

}  // namespace

// values: float32 [slots, cs] (bits 32), or codes uint8 [slots, cs * bits / 8] and scales float16 [slots] (bits 8
// or 4); index: int64 [blocks, 2], per block of 8 rows its first slot and its 8 chunk counts (a byte each, row
// 8b + j in byte j), so a lookup reads one 16-byte entry; cache_*: the fp32 hot-row cache (empty values: none); input, offsets,
// per_sample_weights, mode (0 sum, 1 mean) and include_last_offset as nn.EmbeddingBag. Returns [bags, dim] float32.
at::Tensor packed_bag(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& index, const at::Tensor& cache_bits,
                      const at::Tensor& cache_rank, const at::Tensor& cache_values, const at::Tensor& input,
                      const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& per_sample_weights,
                      int64_t bits, int64_t cs, int64_t mode, bool include_last_offset, int64_t num_rows,
                      int64_t dim) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode: 0 (sum) or 1 (mean)");
  TORCH_CHECK_VALUE(bits == 32 || bits == 8 || bits == 4, "bits: 32, 8 or 4");
  TORCH_CHECK_VALUE(input.scalar_type() == at::kLong || input.scalar_type() == at::kInt,
                    "input: int64 or int32 ids, got ", input.scalar_type());
  Table T;
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 2 &&
                        index.size(1) == 2 && index.size(0) * 8 >= num_rows,
                    "index: contiguous int64 [blocks, 2] covering num_rows rows");
  TORCH_CHECK_VALUE(cs >= 1 && dim % cs == 0, "chunk_size must divide dim");
  if (bits == 32) {
    check_pool(values);
    TORCH_CHECK_VALUE(values.size(1) == cs, "values: [slots, chunk_size]");
  } else {
    check_codes(codes, scales, bits, cs);
  }
  T.L = Layout{bits == 32 ? values.data_ptr<float>() : nullptr, nullptr, nullptr, cs, dim, num_rows};
  T.L.small = dim / cs <= 36;
  T.index = index.data_ptr<int64_t>();
  T.C = cache_view(cache_bits, cache_rank, cache_values, dim, num_rows);
  if (bits != 32) {
    T.codes = codes.data_ptr<uint8_t>();
    T.scales = scales.data_ptr<at::Half>();
    T.code_bytes = cs * bits / 8;
  }
  const bool has_offsets = offsets.has_value() && offsets->defined();
  const at::Tensor ids = input.scalar_type() == at::kLong ? input.contiguous() : input.to(at::kLong).contiguous();
  BagView in;
  at::Tensor offs;
  if (input.dim() == 2) {
    TORCH_CHECK_VALUE(!has_offsets, "offsets must be None when input is 2-D");
    in.bags = input.size(0);
    in.length = input.size(1);
  } else {
    TORCH_CHECK_VALUE(input.dim() == 1, "input must be 1-D or 2-D, got ", input.dim(), "-D");
    TORCH_CHECK_VALUE(has_offsets, "offsets are required when input is 1-D");
    TORCH_CHECK_VALUE(offsets->dim() == 1, "offsets must be 1-D, got ", offsets->dim(), "-D");
    offs = offsets->scalar_type() == at::kLong ? offsets->contiguous() : offsets->to(at::kLong).contiguous();
    in.offsets = offs.data_ptr<int64_t>();
    in.num_offsets = offs.numel();
    in.bags = include_last_offset ? std::max<int64_t>(in.num_offsets - 1, 0) : in.num_offsets;
  }
  in.ids = ids.data_ptr<int64_t>();
  in.n = ids.numel();
  for (int64_t b = 0; b < in.num_offsets; ++b) {
    const int64_t o = in.offsets[b];
    TORCH_CHECK_VALUE(o >= 0 && o <= in.n && (b == 0 || o >= in.offsets[b - 1]),
                      "offsets must be non-decreasing and in [0, ", in.n, "], got ", o, " at position ", b);
  }
  at::Tensor psw;
  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    TORCH_CHECK_VALUE(mode == 0, "per_sample_weights are only supported with mode='sum' (as in nn.EmbeddingBag)");
    TORCH_CHECK_VALUE(per_sample_weights->numel() == in.n, "per_sample_weights must have one weight per id (",
                      in.n, "), got ", per_sample_weights->numel());
    psw = per_sample_weights->to(at::kFloat).contiguous();
    in.psw = psw.data_ptr<float>();
  }
  // ids in no bag (before the first offset, past the last one) are checked here, the others as they are pooled
  const int64_t covered_from = in.bags ? in.start(0) : in.n, covered_to = in.bags ? in.stop(in.bags - 1) : in.n;
  check_ids(in.ids, covered_from, num_rows);
  check_ids(in.ids + covered_to, in.n - covered_to, num_rows);
  at::Tensor out = at::empty({in.bags, dim}, at::kFloat);
  if (in.bags == 0) return out;
  float* outp = out.data_ptr<float>();
  const bool mean = mode == 1, weighted = in.psw != nullptr;
  if (bits == 32) {
    weighted ? pool_any<32, true>(T, in, mean, outp) : pool_any<32, false>(T, in, mean, outp);
  } else if (bits == 8) {
    weighted ? pool_any<8, true>(T, in, mean, outp) : pool_any<8, false>(T, in, mean, outp);
  } else {
    weighted ? pool_any<4, true>(T, in, mean, outp) : pool_any<4, false>(T, in, mean, outp);
  }
  return out;
}

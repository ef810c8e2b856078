// Pooled lookups with each bag's sum in AVX-512 registers, shared by the serving kernel (packed tables,
// packed_bag.cpp) and the training forward (the chunk store, prefix_bag.cpp): FP32, INT8 or INT4 chunks (one fp16
// scale a chunk), an optional fp32 hot-row cache, dim <= 128. Without AVX-512 (or for wider rows) the callers keep
// their portable loops.
//
// Two passes over each group of a thread's bags: the first finds every id's stored run through the index
// (prefetched ahead), with no dependence between iterations; the second adds the runs into the bag's registers,
// prefetching the runs ahead. A row's prefix of stored values is read with masked loads (int8 / int4 codes widened
// and scaled in registers). Measured on Zen 4 with every looked-up row in cache (1M x 64, pooling 20, 1 thread;
// nn.EmbeddingBag: 0.15 ms): reading the loop's state through the lambda's captured references, which the
// compiler reloads after every store since the stores may alias them, cost 0.40 against 0.30 ms; counts_before's
// k == 0 test, compiled to a branch mispredicted one lookup in 8, 0.42 against 0.33 ms; a branch on whether a pruned
// row reaches the first register, 0.61 against 0.47 ms; and the older loop's accumulator object, with those fixed,
// still 0.77 against 0.33 ms. So everything the loop reads is a local, the sum is NV local registers, the first
// register is added without a branch, and runs are prefetched at clamped offsets.
#pragma once
#include <ATen/Parallel.h>

#include "layout.h"

#include <algorithm>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define FIITED_AVX512 1
#include <immintrin.h>
#endif

namespace fiited {

constexpr int64_t kPrefetchRun = 32;    // ids looked ahead when prefetching stored runs
constexpr int64_t kPrefetchIndex = 96;  // ids looked ahead when prefetching index entries
constexpr int64_t kGroupIds = 2048;     // ids located per pass: their locations (32 KiB) stay in L1/L2
constexpr int64_t kIdsPerTask = 2048;   // ids a thread takes at least (smaller batches run on one thread)

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

// The stored chunks of one table: fp32 values (pool, [slots, cs]) or codes and one fp16 scale a chunk (or one fp16
// scale and offset a row: rowwise); the cache.
struct Stored {
  const float* pool = nullptr;
  const uint8_t* codes = nullptr;
  const at::Half* scales = nullptr;
  bool rowwise = false;
  int64_t cs = 0, dim = 0, num_rows = 0;
  int64_t code_bytes = 0;  // of one chunk
  CacheView cache;
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

#ifdef FIITED_AVX512
// The lanes of a register below n values (none for n <= 0, all 16 from n >= 16).
inline __mmask16 lanes_below(int64_t n) {
  return __mmask16((1u << std::min<int64_t>(std::max<int64_t>(n, 0), 16)) - 1);
}

// Register j (values 16j .. 16j + 15) of a row's int8 (KIND 8) or int4 (KIND 4) codes at q, as floats: lanes at or
// past len are zero, and nothing past them is read.
template <int KIND>
inline __m512 codes_register(const uint8_t* q, int j, int64_t len) {
  const __mmask16 m = lanes_below(len - 16 * j);
  if (KIND == 8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + 16 * j)));
  const int64_t bytes = std::min<int64_t>(std::max<int64_t>((len - 16 * j + 1) / 2, 0), 8);
  const __m128i b8 = _mm_maskz_loadu_epi8(__mmask16((1u << bytes) - 1), q + 8 * j);
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b8, nib), hi = _mm_and_si128(_mm_srli_epi16(b8, 4), nib);
  const __m512i c = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), _mm512_set1_epi32(8));
  return _mm512_maskz_mov_ps(m, _mm512_cvtepi32_ps(c));
}

// The fp16 scales of a row of cnt <= 16 chunks at s, one a lane (times w when WEIGHTED), read once a row.
template <bool WEIGHTED>
inline __m512 row_scales_of(const at::Half* s, int64_t cnt, __m512 w) {
  const __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << cnt) - 1), s));
  return WEIGHTED ? _mm512_mul_ps(sc, w) : sc;
}

// The scale of every lane of a register of a row of more than 16 chunks: the scales from its first chunk
// (first_chunk of cnt) spread by chunk_of (lane -> chunk counted from first_chunk), times w when WEIGHTED.
template <bool WEIGHTED>
inline __m512 register_scales(const at::Half* s, int64_t cnt, int64_t first_chunk, __m512i chunk_of, __m512 w) {
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(cnt - first_chunk, 0), 16);
  const __m512 sc = _mm512_permutexvar_ps(chunk_of, _mm512_cvtph_ps(
      _mm256_maskz_loadu_epi16(__mmask16((1u << chunks) - 1), s + first_chunk)));
  return WEIGHTED ? _mm512_mul_ps(sc, w) : sc;
}

// The index (layout.h's Layout: counts and block bases, of a training store or of packed tables) gives a row's first
// slot and chunk count and prefetches what that reads (prefetch_index(r)).
template <int KIND, bool WEIGHTED, bool CACHED, int NV>
void pool_in_registers(const Stored& S, const Layout& X, const BagView& in, bool mean, float* outp) {
  const int64_t grain = std::max<int64_t>(1, in.bags * kIdsPerTask / std::max<int64_t>(in.n, 1));
  at::parallel_for(0, in.bags, grain, [&](int64_t b0, int64_t b1) {
    const float* const pool = S.pool;
    const uint8_t* const codes = S.codes;
    const at::Half* const scales = S.scales;
    const Layout index = X;
    const CacheView cache = S.cache;
    const BagView bags = in;
    const int64_t* const ids = bags.ids;
    const float* const psw = bags.psw;
    const int64_t cs = S.cs, dim = S.dim, num_rows = S.num_rows, code_bytes = S.code_bytes;
    const bool by_mean = mean, rowwise = S.rowwise;
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
      int64_t cnt;
      const int64_t slot = index.slot(r, &cnt);
      if (CACHED) {  // a cached row: its chunks from the cache (loaded at a valid position either way: no branch)
        const int64_t cached = cache.position(r);
        const int64_t in_cache = cache.chunks(std::max<int64_t>(cached, 0));
        return Run{cached >= 0 ? -1 - cached : slot, cached >= 0 ? in_cache : cnt};
      }
      return Run{slot, cnt};
    };
    auto fp32_values = [&](const Run& run) -> const float* {
      return CACHED && run.slot < 0 ? cache.row(-1 - run.slot) : pool + run.slot * cs;
    };
    auto prefetch = [&](const Run& run, int64_t r) {
      if (KIND == 32 || (CACHED && run.slot < 0)) {
        const float* p = fp32_values(run);
        prefetch_line(p);
        if (run.cnt * cs == 16 * NV) {
#pragma GCC unroll 8
          for (int j = 1; j < NV; ++j) prefetch_line(p + 16 * j);
        }
        prefetch_line(p + std::max<int64_t>(run.cnt * cs - 1, 0));
        return;
      }
      const uint8_t* q = codes + run.slot * code_bytes;
      const int64_t last_byte = std::max<int64_t>(run.cnt * code_bytes - 1, 0);  // rows of at most 128 bytes
      prefetch_line(q);
      prefetch_line(q + std::min<int64_t>(64, last_byte));
      prefetch_line(q + last_byte);
      if (rowwise) {
        prefetch_line(scales + 2 * r);
        return;
      }
      prefetch_line(scales + run.slot);
      prefetch_line(scales + run.slot + std::max<int64_t>(run.cnt - 1, 0));
    };
    thread_local std::vector<Run> buffer;  // reused across calls: no allocation (or page faults) per call
    for (int64_t g0 = b0; g0 < b1;) {
      // a group of bags with at most kGroupIds ids (or one bag)
      int64_t g1 = g0 + 1;
      while (g1 < b1 && bags.stop(g1) - bags.start(g0) <= kGroupIds) ++g1;
      const int64_t first = bags.start(g0), last = std::max(first, bags.stop(g1 - 1));
      if (int64_t(buffer.size()) < last - first) buffer.resize(last - first);
      Run* const runs = buffer.data() - first;
      // pass 1: every id's run (independent iterations, index entries prefetched kPrefetchIndex ids ahead, the
      // group's first ones before the loop)
      for (int64_t i = first; i < std::min(first + kPrefetchIndex, last); ++i) {
        if (uint64_t(ids[i]) < uint64_t(num_rows)) index.prefetch_index(ids[i]);
      }
      for (int64_t i = first; i < last; ++i) {
        if (i + kPrefetchIndex < last) {
          const int64_t r = ids[i + kPrefetchIndex];
          if (uint64_t(r) < uint64_t(num_rows)) index.prefetch_index(r);
        }
        check_id(ids[i], num_rows);
        runs[i] = run_of(ids[i]);
      }
      for (int64_t i = first; i < std::min(first + kPrefetchRun, last); ++i) prefetch(runs[i], ids[i]);
      // pass 2: pool each bag in registers, runs prefetched kPrefetchRun ids ahead
      for (int64_t b = g0; b < g1; ++b) {
        const int64_t start = bags.start(b), stop = bags.stop(b);
        __m512 acc[NV];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t i = start; i < stop; ++i) {
          if (i + kPrefetchRun < last) prefetch(runs[i + kPrefetchRun], ids[i + kPrefetchRun]);
          const Run run = runs[i];
          const int64_t len = run.cnt * cs;
          const __m512 vw = _mm512_set1_ps(WEIGHTED ? psw[i] : 1.0f);
          if (KIND == 32 || (CACHED && run.slot < 0)) {  // fp32 values: the pool, or a cached row
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
              const __m512 v = _mm512_maskz_loadu_ps(lanes_below(len - 16 * j), p + 16 * j);
              acc[j] = WEIGHTED ? _mm512_fmadd_ps(vw, v, acc[j]) : _mm512_add_ps(acc[j], v);
            }
            continue;
          }
          // Quantized chunks, scales spread to the lanes. (Taking cached and uncached rows through one masked path,
          // without this branch, measured 0.45-0.47x of nn.EmbeddingBag at pooling 20 against 0.50-0.53x with it.)
          const uint8_t* q = codes + run.slot * code_bytes;
          if (rowwise) {  // one (scale, offset) a row: w * scale times the codes, plus w * offset on stored lanes
            const at::Half* qp = scales + 2 * ids[i];
            const float w = WEIGHTED ? psw[i] : 1.0f;
            const __m512 sc = _mm512_set1_ps(w * half_to_float(qp[0])), off = _mm512_set1_ps(w * half_to_float(qp[1]));
#pragma GCC unroll 8
            for (int j = 0; j < NV; ++j) {
              if (j > 0 && 16 * j >= len) break;
              const __m512 a = _mm512_fmadd_ps(sc, codes_register<KIND>(q, j, len), acc[j]);
              acc[j] = _mm512_mask_add_ps(a, lanes_below(len - 16 * j), a, off);
            }
            continue;
          }
          const at::Half* sp = scales + run.slot;
          const __m512 row_scales = few_chunks ? row_scales_of<WEIGHTED>(sp, run.cnt, vw) : _mm512_setzero_ps();
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j) {
            if (j > 0 && 16 * j >= len) break;
            const __m512 sc = few_chunks ? _mm512_permutexvar_ps(chunk_of[j], row_scales)
                                         : register_scales<WEIGHTED>(sp, run.cnt, first_chunk[j], chunk_of[j], vw);
            acc[j] = _mm512_fmadd_ps(sc, codes_register<KIND>(q, j, len), acc[j]);
          }
        }
        const __m512 scale = _mm512_set1_ps(by_mean && stop > start ? 1.0f / float(stop - start) : 1.0f);
        float* o = out + b * dim;
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) {
          _mm512_mask_storeu_ps(o + 16 * j, lanes_below(dim - 16 * j), _mm512_mul_ps(acc[j], scale));
        }
      }
      g0 = g1;
    }
    if (buffer.size() > size_t(4 * kGroupIds)) std::vector<Run>().swap(buffer);  // one huge bag: not kept for good
  });
}

template <int KIND, bool WEIGHTED, bool CACHED>
bool pool_in_registers_dim(const Stored& S, const Layout& X, const BagView& in, bool mean, float* outp) {
  switch ((S.dim + 15) / 16) {
    case 1: pool_in_registers<KIND, WEIGHTED, CACHED, 1>(S, X, in, mean, outp); return true;
    case 2: pool_in_registers<KIND, WEIGHTED, CACHED, 2>(S, X, in, mean, outp); return true;
    case 3: pool_in_registers<KIND, WEIGHTED, CACHED, 3>(S, X, in, mean, outp); return true;
    case 4: pool_in_registers<KIND, WEIGHTED, CACHED, 4>(S, X, in, mean, outp); return true;
    case 5: pool_in_registers<KIND, WEIGHTED, CACHED, 5>(S, X, in, mean, outp); return true;
    case 6: pool_in_registers<KIND, WEIGHTED, CACHED, 6>(S, X, in, mean, outp); return true;
    case 7: pool_in_registers<KIND, WEIGHTED, CACHED, 7>(S, X, in, mean, outp); return true;
    case 8: pool_in_registers<KIND, WEIGHTED, CACHED, 8>(S, X, in, mean, outp); return true;
  }
  return false;
}
#endif

// Pool `in` over the stored chunks in AVX-512 registers; false (nothing done) where this build or dim cannot.
template <int KIND, bool WEIGHTED>
bool pool_in_registers_any(const Stored& S, const Layout& X, const BagView& in, bool mean, float* outp) {
#ifdef FIITED_AVX512
  if (S.dim > 128 || S.cs <= 0 || S.dim % S.cs) return false;  // (the callers' loops take what this cannot)
  return S.cache.bits ? pool_in_registers_dim<KIND, WEIGHTED, true>(S, X, in, mean, outp)
                        : pool_in_registers_dim<KIND, WEIGHTED, false>(S, X, in, mean, outp);
#else
  return false;
#endif
}

}  // namespace fiited

// The serving kernel of packed FIITED tables (compresskit/plugins/fiited/packed.py): pooled lookups over FP32, INT8
// or INT4 chunks (one fp16 scale a chunk, or one fp16 scale and offset a row) with an optional fp32 hot-row cache,
// for every input form nn.EmbeddingBag takes (1-D ids with offsets, with or without include_last_offset; 2-D ids;
// empty bags; sum or mean; per-sample weights). Ids outside [0, num_rows) raise IndexError.
//
// With AVX-512 and dim <= 128 the bags are pooled in registers (register_pooling.h, shared with the training
// forward). Otherwise, the portable loop below: the same two passes over each group of a thread's bags (every id's
// stored run located through the index, its block's counts and base prefetched ahead; then the runs added, prefetched
// ahead), with the output row itself as the accumulator (auto-vectorised loops). One pass, where a run's prefetch
// must wait for its index entry, reached a third of the memory parallelism on random ids.
#include "register_pooling.h"

using namespace fiited;

namespace {

// The stored chunks of one table, as the accumulators read them.
struct Table {
  Layout L;
  const uint8_t* codes = nullptr;  // quantized storage: codes and one fp16 scale a chunk (or scale, offset a row)
  const at::Half* scales = nullptr;
  bool rowwise = false;
  int64_t code_bytes = 0;          // bytes of one chunk's codes
  CacheView C;
};

// Generic accumulator: the output row itself (any dim, any instruction set).
template <int KIND>  // 32: fp32 values, 8: int8 codes, 4: int4 codes
struct RowAccumulator {
  float* o = nullptr;
  const uint8_t* codes;
  const at::Half* scales;
  bool rowwise;
  int64_t cs, dim, code_bytes;
  std::vector<float> tmp;
  AddChunks add_chunks;

  explicit RowAccumulator(const Table& t)
      : codes(t.codes), scales(t.scales), rowwise(t.rowwise), cs(t.L.cs), dim(t.L.dim), code_bytes(t.code_bytes),
        tmp(KIND == 32 ? 0 : t.L.dim),
        add_chunks(KIND == 8 ? pick_add_chunks<8>(t.L.cs) : pick_add_chunks<4>(t.L.cs)) {}

  inline void begin(float* out) {
    o = out;
    std::memset(o, 0, sizeof(float) * dim);
  }
  // add w times row r's stored values: the fp32 run p, or (p null) the quantized chunks from slot
  template <bool WEIGHTED>
  inline void add(const float* p, int64_t r, int64_t slot, int64_t cnt, float w) {
    const int64_t len = cnt * cs;
    if (p) {
      if (WEIGHTED) {
        for (int64_t k = 0; k < len; ++k) o[k] += w * p[k];
      } else {
        for (int64_t k = 0; k < len; ++k) o[k] += p[k];
      }
    } else if (KIND != 32 && rowwise) {
      add_row_codes<KIND == 4 ? 4 : 8>(o, codes + slot * code_bytes, scales + 2 * r, len, w);
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


// The table as plain locals of the loop (no reloads through references), with row lookups and prefetches.
template <int KIND>
struct Reader {
  const float* pool;
  Layout index;
  const uint8_t* codes;
  const at::Half* scales;
  bool rowwise;
  CacheView cache;
  int64_t cs, dim, code_bytes, num_rows;

  explicit Reader(const Table& T)
      : pool(T.L.pool), index(T.L), codes(T.codes), scales(T.scales), rowwise(T.rowwise), cache(T.C), cs(T.L.cs),
        dim(T.L.dim), code_bytes(T.code_bytes), num_rows(T.L.num_rows) {}

  inline bool valid(int64_t r) const { return r >= 0 && r < num_rows; }

  inline void prefetch_index(int64_t r) const { index.prefetch_index(r); }

  // fp32 values of row r (pool or cache), or nullptr for quantized chunks at *slot
  inline const float* locate(int64_t r, int64_t* slot, int64_t* cnt) const {
    *slot = index.slot(r, cnt);
    const int64_t cached = cache.position(r);
    if (cached >= 0) {
      *cnt = cache.chunks(cached);
      return cache.row(cached);
    }
    return KIND == 32 ? pool + *slot * cs : nullptr;
  }

  inline void prefetch_run(const float* p, int64_t r, int64_t slot, int64_t cnt) const {
    if (p) {
      for (int64_t k = 0; k < cnt * cs; k += 16) prefetch_line(p + k);
    } else {
      prefetch_line(rowwise ? scales + 2 * r : scales + slot);
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
      for (int64_t i = first; i < std::min(first + kPrefetchRun, last); ++i) {
        R.prefetch_run(w[i].p, ids[i], w[i].slot, w[i].cnt);
      }
      // pass 2: pool each bag in registers (or its output row), runs prefetched kPrefetchRun ids ahead
      for (int64_t b = g0; b < g1; ++b) {
        const int64_t start = in.start(b), stop = in.stop(b);
        acc.begin(outp + b * dim);
        for (int64_t i = start; i < stop; ++i) {
          if (i + kPrefetchRun < last) R.prefetch_run(w[i + kPrefetchRun].p, ids[i + kPrefetchRun],
                                                      w[i + kPrefetchRun].slot, w[i + kPrefetchRun].cnt);
          if (w[i].cnt) acc.template add<WEIGHTED>(w[i].p, ids[i], w[i].slot, w[i].cnt, WEIGHTED ? psw[i] : 1.0f);
        }
        acc.end(mean && stop > start ? 1.0f / float(stop - start) : 1.0f);
      }
      g0 = g1;
    }
    if (where.size() > size_t(4 * kGroupIds)) std::vector<Where>().swap(where);  // one huge bag: not kept
  });
}




template <int KIND, bool WEIGHTED>
void pool_any(const Table& T, const BagView& in, bool mean, float* outp) {
  Stored S;
  S.pool = T.L.pool;
  S.codes = T.codes;
  S.scales = T.scales;
  S.rowwise = T.rowwise;
  S.cs = T.L.cs;
  S.dim = T.L.dim;
  S.num_rows = T.L.num_rows;
  S.code_bytes = T.code_bytes;
  S.cache = T.C;
  if (pool_in_registers_any<KIND, WEIGHTED>(S, T.L, in, mean, outp)) return;
  pool_bags<KIND, WEIGHTED, RowAccumulator<KIND>>(T, in, mean, outp);
}

}  // namespace

// values: float32 [slots, cs] (bits 32), or codes uint8 [slots, cs * bits / 8] and scales float16 [slots] or
// [rows, 2] (row-wise scale and offset) (bits 8 or 4); counts: uint8, one a row (rows rounded up to 8); base:
// int64, the slot of each 64-row block's first chunk (layout.h); cache_*: the fp32 hot-row cache (layout.h's
// CacheView; one start: none); input, offsets, per_sample_weights, mode (0 sum, 1 mean) and include_last_offset as
// nn.EmbeddingBag. Returns [bags, dim] float32.
at::Tensor packed_bag(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& counts, const at::Tensor& base, const at::Tensor& cache_bits,
                      const at::Tensor& cache_rank, const at::Tensor& cache_values, const at::Tensor& cache_starts,
                      const at::Tensor& input,
                      const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& per_sample_weights,
                      int64_t bits, int64_t cs, int64_t mode, bool include_last_offset, int64_t num_rows,
                      int64_t dim) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "mode: 0 (sum) or 1 (mean)");
  TORCH_CHECK_VALUE(bits == 32 || bits == 8 || bits == 4, "bits: 32, 8 or 4");
  TORCH_CHECK_VALUE(input.scalar_type() == at::kLong || input.scalar_type() == at::kInt,
                    "input: int64 or int32 ids, got ", input.scalar_type());
  Table T;
  TORCH_CHECK_VALUE(counts.scalar_type() == at::kByte && counts.is_contiguous() && base.scalar_type() == at::kLong &&
                        base.is_contiguous() && counts_base_cover(counts, base, num_rows),
                    "counts / base: contiguous uint8 [rows rounded up to 8] and int64 [ceil(rows / 64)] covering "
                    "num_rows rows");
  TORCH_CHECK_VALUE(cs >= 1 && dim % cs == 0, "chunk_size must divide dim");
  if (bits == 32) {
    check_pool(values);
    TORCH_CHECK_VALUE(values.size(1) == cs, "values: [slots, chunk_size]");
  } else {
    T.rowwise = check_codes(codes, scales, bits, cs, num_rows);
  }
  T.L = Layout{bits == 32 ? values.data_ptr<float>() : nullptr, counts.data_ptr<uint8_t>(), base.data_ptr<int64_t>(),
               cs, dim, num_rows};
  T.C = cache_view(cache_bits, cache_rank, cache_values, cache_starts, cs, num_rows);
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
  check_offsets(in.offsets, in.num_offsets, in.n);
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

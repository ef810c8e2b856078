// A 2-D convolution over only the input channels a sample kept (per-channel WTA, inference). Per-channel WTA keeps
// a different channel set for every input, so a kernel slice cannot be cut and prepacked once: cutting it on every
// call (and oneDNN reordering it) costs more than the convolution saves. This kernel reads the kept channels' rows
// straight from a weight packed once, input-channel-major, so a batch-1 call reads only the kept half of the
// weights (where a batch-1 net's later layers are bound by weight reads) and does only the kept half of the
// multiply-adds.
//
// Packed weight (pack_conv_weight): [blocks, Cin, KH * KW, BLOCK] float32, the output channels cut in blocks of
// BLOCK (64 with AVX-512, 16 with AVX2; all of a narrower layer's, rounded up to whole vectors; the last block
// zero-padded), so one block's weights for one input channel are contiguous. The convolution
// (sparse_input_conv2d) computes output tiles of P pixels x one block in vector registers, looping over the kept
// channels and the kernel taps; the input is first copied into a zero-padded buffer (so taps need no bounds
// checks). Bias and ReLU are applied as the tile is written; the output is channels-last.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

namespace {

// The vector type the tiles accumulate in, and the accumulators its register file holds beside OV weight vectors
// and a broadcast: a tile is P pixels x OV vectors with P * OV <= kAcc (narrow blocks get more pixels).
#if defined(__AVX512F__)
using vec = __m512;
constexpr int kLanes = 16, kAcc = 24, kMaxOV = 4;  // 24 accumulators of 32 registers
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vrelu(vec a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }  // NaN stays NaN (torch's ReLU)
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int kLanes = 8, kAcc = 8, kMaxOV = 2;  // 8 accumulators of 16 registers
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vrelu(vec a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
#else
using vec = float;
constexpr int kLanes = 1, kAcc = 16, kMaxOV = 4;
inline vec vload(const float* p) { return *p; }
inline vec vset1(float x) { return x; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline vec vrelu(vec a) { return a < 0.0f ? 0.0f : a; }
inline void vstore(float* p, vec a) { *p = a; }
#endif

constexpr int64_t kBlock = int64_t(kLanes) * kMaxOV;  // the most output channels a weight block holds
constexpr int64_t kPrefetchChannels = 4;

// Output channels a block holds for cout outputs: kBlock, or all of them (rounded up to whole vectors) when fewer,
// so a narrow layer's packed weight is not padded to kBlock.
int64_t block_for(int64_t cout) { return std::min(kBlock, (cout + kLanes - 1) / kLanes * kLanes); }

// What one call's tiles read and write.
struct Conv {
  const float* xpad;      // zero-padded kept channels of one sample: [k, Hp, Wp] or (channels-last) [Hp, Wp, k]
  int64_t xc, xq;         // xpad's strides of a channel and of a pixel
  const int64_t* chan;    // [k] input channel of each kept channel
  const float* weight;    // packed [blocks, Cin, T, block]
  const float* bias;      // [blocks * block] (zero-padded)
  int64_t block;          // output channels a block holds
  float* out;             // [Ho * Wo, cout] channels-last
  int64_t k, cin, taps, hp, wp, wo, sh, sw, cout;
  const int64_t* tap_offset;  // [T] (kh * Wp + kw) * xq
  bool relu;
};

// One tile: P output pixels from flat pixel q0, OV vectors of block ob.
template <int P, int OV>
void tile(const Conv& c, int64_t ob, int64_t q0) {
  int64_t off[P];
  for (int p = 0; p < P; ++p) {
    const int64_t q = q0 + p, oh = q / c.wo, ow = q % c.wo;
    off[p] = (oh * c.sh * c.wp + ow * c.sw) * c.xq;
  }
  vec acc[P][OV];
  for (int v = 0; v < OV; ++v) {
    const vec b = vload(c.bias + ob * c.block + v * kLanes);
    for (int p = 0; p < P; ++p) acc[p][v] = b;
  }
  const int64_t row = c.taps * c.block;
  const float* wblock = c.weight + ob * c.cin * row;
  for (int64_t j = 0; j < c.k; ++j) {
    const float* wj = wblock + c.chan[j] * row;
    // the kept channels' weight runs are apart in memory: fetch the run kPrefetchChannels ahead, a tap at a time
    const float* ahead = wblock + c.chan[std::min(j + kPrefetchChannels, c.k - 1)] * row;
    const float* xj = c.xpad + j * c.xc;
    for (int64_t t = 0; t < c.taps; ++t) {
      for (int v = 0; v < OV * kLanes; v += 16) __builtin_prefetch(ahead + t * c.block + v, 0, 3);
      vec w[OV];
      for (int v = 0; v < OV; ++v) w[v] = vload(wj + t * c.block + v * kLanes);
      const float* xt = xj + c.tap_offset[t];
      for (int p = 0; p < P; ++p) {
        const vec b = vset1(xt[off[p]]);
        for (int v = 0; v < OV; ++v) acc[p][v] = vfma(b, w[v], acc[p][v]);
      }
    }
  }
  const int64_t o0 = ob * c.block;
  for (int p = 0; p < P; ++p) {
    float* dst = c.out + (q0 + p) * c.cout + o0;
    for (int v = 0; v < OV; ++v) {
      const vec a = c.relu ? vrelu(acc[p][v]) : acc[p][v];
      if (o0 + (v + 1) * kLanes <= c.cout) {
        vstore(dst + v * kLanes, a);
      } else {  // the last block's partial vector
        float lanes[kLanes];
        vstore(lanes, a);
        for (int64_t i = 0; i < c.cout - o0 - v * kLanes; ++i) dst[v * kLanes + i] = lanes[i];
      }
    }
  }
}

// tile<p, OV> for a run-time p in [1, P]
template <int OV, int P>
void tile_upto(const Conv& c, int64_t ob, int64_t q0, int p) {
  if (p == P) return tile<P, OV>(c, ob, q0);
  if constexpr (P > 1) tile_upto<OV, P - 1>(c, ob, q0, p);
}

// Pixels a tile of OV vectors takes.
constexpr int pixels_for(int ov) { return kAcc / ov; }

void run_tile(const Conv& c, int64_t ob, int64_t q0, int p, int ov) {
  switch (ov) {
    case 1: return tile_upto<1, pixels_for(1)>(c, ob, q0, p);
    case 2: return tile_upto<std::min(2, kMaxOV), pixels_for(std::min(2, kMaxOV))>(c, ob, q0, p);
    case 3: return tile_upto<std::min(3, kMaxOV), pixels_for(std::min(3, kMaxOV))>(c, ob, q0, p);
    default: return tile_upto<kMaxOV, pixels_for(kMaxOV)>(c, ob, q0, p);
  }
}

}  // namespace

// weight [Cout, Cin, KH, KW] float32 -> packed [blocks, Cin, KH * KW, block] (see the file comment; block_for).
at::Tensor pack_conv_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 4 && weight.size(0) >= 1,
              "weight: float32 [Cout, Cin, KH, KW], Cout >= 1");
  const int64_t cout = weight.size(0), cin = weight.size(1), taps = weight.size(2) * weight.size(3);
  const int64_t block = block_for(cout), blocks = (cout + block - 1) / block;
  at::Tensor padded = at::zeros({blocks * block, cin, taps}, weight.options());
  padded.narrow(0, 0, cout).copy_(weight.reshape({cout, cin, taps}));
  return padded.view({blocks, block, cin, taps}).permute({0, 2, 3, 1}).contiguous();
}

// The most output channels one packed block holds (the vector width times the tile's vectors).
int64_t conv_block() { return kBlock; }

// x: float32 [n, k, H, W] (any strides): the kept channels of each sample; channels: int64 [k] (one set for all n
// samples: kept channel i is input channel channels[i]) or [n, k] (each sample its own set); weight: pack_conv_weight's; bias: float32 [cout] or empty. Returns the
// convolution over the kept channels only (the others read as zero), [n, cout, Ho, Wo] channels-last, with ReLU
// applied if relu.
at::Tensor sparse_input_conv2d(const at::Tensor& x, const at::Tensor& channels, const at::Tensor& weight,
                               const at::Tensor& bias, int64_t cout, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                               int64_t ph, int64_t pw, bool relu) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4 && x.device().is_cpu(), "x: float32 [n, k, H, W] on CPU");
  const bool per_sample = channels.dim() == 2;
  TORCH_CHECK(channels.scalar_type() == at::kLong && channels.size(-1) == x.size(1) &&
                  (channels.dim() == 1 || (per_sample && channels.size(0) == x.size(0))),
              "channels: int64 [k] or [n, k], one a kept channel of x");
  TORCH_CHECK(cout >= 1 && kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0,
              "output channels, kernel, stride and padding");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 4 &&
                  weight.size(3) == block_for(cout) &&
                  weight.size(0) == (cout + block_for(cout) - 1) / block_for(cout) && weight.size(2) == kh * kw,
              "weight: pack_conv_weight's [blocks, Cin, KH * KW, ", block_for(cout), "] for ", cout, " output channels");
  const int64_t n = x.size(0), k = x.size(1), h = x.size(2), w = x.size(3), cin = weight.size(1);
  const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
  TORCH_CHECK(hp >= kh && wp >= kw, "the padded input is smaller than the kernel");
  const int64_t ho = (hp - kh) / sh + 1, wo = (wp - kw) / sw + 1, taps = kh * kw, blocks = weight.size(0);
  const at::Tensor chan = channels.contiguous();
  const int64_t* cp = chan.data_ptr<int64_t>();
  for (int64_t i = 0; i < chan.numel(); ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] < cin, "channel ", cp[i], " out of range for ", cin, " input channels");
  }
  const int64_t block = weight.size(3);
  at::Tensor bias_padded = at::zeros({blocks * block}, x.options());
  if (bias.defined() && bias.numel()) {
    TORCH_CHECK(bias.numel() == cout, "bias: one a output channel");
    bias_padded.narrow(0, 0, cout).copy_(bias.reshape({cout}));
  }
  at::Tensor out = at::empty({n, cout, ho, wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  std::vector<int64_t> tap_offset(taps);
  for (int64_t a = 0; a < kh; ++a) {
    for (int64_t b = 0; b < kw; ++b) tap_offset[a * kw + b] = a * wp + b;
  }
  // the padded copy keeps x's layout: pixel-major when x's channels are adjacent (channels-last)
  const bool pixel_major = x.stride(1) == 1 && k > 1;
  const int64_t xc = pixel_major ? 1 : hp * wp, xq = pixel_major ? k : 1;
  for (auto& o : tap_offset) o *= xq;
  at::Tensor xpad = at::zeros({k * hp * wp}, x.options());
  // tiles as wide as the widest block allows (a narrower last block runs the same tiles)
  const int widest = int(block / kLanes);
  const int64_t pixels = ho * wo, tile_pixels = pixels_for(widest), tiles = (pixels + tile_pixels - 1) / tile_pixels;
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sx2 = x.stride(2), sx3 = x.stride(3);
  for (int64_t s = 0; s < n; ++s) {
    const float* xs = x.data_ptr<float>() + s * sx0;
    float* xp = xpad.data_ptr<float>();
    if (pixel_major) {
      for (int64_t i = 0; i < h; ++i) {
        for (int64_t j = 0; j < w; ++j) {
          std::copy(xs + i * sx2 + j * sx3, xs + i * sx2 + j * sx3 + k, xp + ((i + ph) * wp + j + pw) * k);
        }
      }
    } else {
      for (int64_t c = 0; c < k; ++c) {
        for (int64_t i = 0; i < h; ++i) {
          float* dst = xp + (c * hp + i + ph) * wp + pw;
          const float* src = xs + c * sx1 + i * sx2;
          for (int64_t j = 0; j < w; ++j) dst[j] = src[j * sx3];
        }
      }
    }
    const Conv c{xp, xc, xq, per_sample ? cp + s * k : cp, weight.data_ptr<float>(), bias_padded.data_ptr<float>(),
                 block, out.data_ptr<float>() + s * pixels * cout, k, cin, taps, hp, wp, wo, sh, sw, cout,
                 tap_offset.data(), relu};
    // one work item a (block, tile), tiles of one block adjacent: a thread re-reads a block's weights from cache
    at::parallel_for(0, blocks * tiles, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t ob = i / tiles, q0 = (i % tiles) * tile_pixels;
        const int p = int(std::min<int64_t>(tile_pixels, pixels - q0));
        const int ov = int(std::min<int64_t>(widest, (cout - ob * block + kLanes - 1) / kLanes));
        run_tile(c, ob, q0, p, ov);
      }
    });
  }
  return out;
}

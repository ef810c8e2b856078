// DASNet's winners-take-all in inference, one pass over the activation per sample (compresskit/plugins/dasnet/
// wta.py has the rule): each group's score is the sum of |x| over its channels' maps (or of x, for inputs known
// non-negative), the `keep` best groups win, and the output is x times the 0/1 mask of the winners, written in the
// input's memory format (contiguous, or channels-last 4-D); or, for per-channel WTA, the winners' maps alone
// (wta_compact, what the sparse path's compact convolutions read). The torch path takes eight operator calls (a reduction,
// top-k, a scatter, a repeat and a multiply among them), about 20 us at batch 1 whatever the size, which over a
// ResNet-20's 19 WTA layers was a third of the gap to the tuned dense model.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

// Sum (of |v|, unless NONNEGATIVE) of n floats in float64, in 16 independent lanes the compiler vectorises (one
// running sum would be n dependent adds).
template <bool NONNEGATIVE>
inline double lane_sum(const float* v, int64_t n) {
  double lanes[16] = {0.0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) lanes[j] += double(NONNEGATIVE ? v[i + j] : std::fabs(v[i + j]));
  }
  double s = 0.0;
  for (; i < n; ++i) s += double(NONNEGATIVE ? v[i] : std::fabs(v[i]));
  for (int j = 0; j < 16; ++j) s += lanes[j];
  return s;
}

// Scores of every group of one sample: summed in float64, ranked as float32 values, as wta.py ranks its float32
// sums (exact ties, from all-zero or saturated channels, then break alike).
void group_scores(const float* xs, int64_t channels, int64_t pixels, bool channels_last, bool nonnegative,
                  int64_t per_group, std::vector<double>& channel, std::vector<float>& score) {
  if (channels_last) {   // pixel-major: one running sum a channel, adjacent channels vectorised
    std::fill(channel.begin(), channel.end(), 0.0);
    for (int64_t p = 0; p < pixels; ++p) {
      const float* row = xs + p * channels;
      if (nonnegative) {
        for (int64_t c = 0; c < channels; ++c) channel[c] += double(row[c]);
      } else {
        for (int64_t c = 0; c < channels; ++c) channel[c] += double(std::fabs(row[c]));
      }
    }
  } else {
    for (int64_t c = 0; c < channels; ++c) {
      const float* map = xs + c * pixels;
      channel[c] = nonnegative ? lane_sum<true>(map, pixels) : lane_sum<false>(map, pixels);
    }
  }
  for (int64_t g = 0; g < int64_t(score.size()); ++g) {
    double s = 0.0;
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) s += double(float(channel[c]));
    score[g] = float(s);
  }
}

// wta.py's order: the higher score first, NaN above everything, a tie to the lower group.
inline bool ranks_before(const std::vector<float>& score, int64_t a, int64_t b) {
  const bool na = std::isnan(score[a]), nb = std::isnan(score[b]);
  if (na != nb) return na;
  if (!na && score[a] != score[b]) return score[a] > score[b];
  return a < b;
}

// order[0 .. keep): the keep best groups (in no particular order)
void select_winners(const std::vector<float>& score, int64_t keep, std::vector<int64_t>& order) {
  std::iota(order.begin(), order.end(), int64_t(0));
  std::nth_element(order.begin(), order.begin() + (keep - 1), order.end(),
                   [&](int64_t a, int64_t c) { return ranks_before(score, a, c); });
}

// Whether x is channels-last 4-D (and not also contiguous); checks x is one of the two layouts the kernels read.
bool checked_channels_last(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 2 && x.device().is_cpu(), "x: float32 [B, C, ...] on CPU");
  const bool channels_last = x.dim() == 4 && !x.is_contiguous() &&
                             x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), "x: contiguous or channels-last");
  return channels_last;
}

// One WTA call's shape, checked: x float32 [batch, channels, ...] (contiguous or channels-last 4-D) ranked in
// `groups` groups (dividing the channels), `keep` of them winning.
struct Geometry {
  int64_t batch, channels, pixels, groups, keep;
  bool channels_last, nonnegative;

  Geometry(const at::Tensor& x, int64_t keep_, int64_t groups_, bool nonnegative_)
      : batch(x.size(0)), channels(x.size(1)), groups(groups_), keep(keep_), channels_last(checked_channels_last(x)),
        nonnegative(nonnegative_) {
    TORCH_CHECK(groups >= 1 && channels % groups == 0, "groups must divide the channels");
    TORCH_CHECK(keep >= 1 && keep <= groups, "keep: 1 .. groups");
    pixels = channels ? x.numel() / std::max<int64_t>(batch * channels, 1) : 0;
  }
};

// The ranking of one sample after another, with its scratch (one ranker a thread).
struct Ranker {
  const Geometry& g;
  std::vector<double> channel;
  std::vector<float> score;
  std::vector<int64_t> order;

  explicit Ranker(const Geometry& geometry)
      : g(geometry), channel(geometry.channels), score(geometry.groups), order(geometry.groups) {}

  // the keep winning groups of the sample at xs (ascending if sorted; valid until the next call)
  const int64_t* winners(const float* xs, bool sorted) {
    group_scores(xs, g.channels, g.pixels, g.channels_last, g.nonnegative, g.channels / g.groups, channel, score);
    select_winners(score, g.keep, order);
    if (sorted) std::sort(order.begin(), order.begin() + g.keep);
    return order.data();
  }
};

}  // namespace

// Per-channel WTA in compact form (wta.py's compact_wta for groups == channels): each sample's keep winning
// channels, ascending (int64 [B, keep]), and their maps (float32 [B, keep, ...]; channels-last when 4-D, where
// torch pools several times faster than contiguous at batch 1), in one pass that scores the channels and copies
// the winners out. x: float32 [B, C, ...], contiguous or channels-last 4-D.
std::vector<at::Tensor> wta_compact(const at::Tensor& x, int64_t keep, bool nonnegative) {
  const Geometry g(x, keep, x.size(1), nonnegative);
  std::vector<int64_t> shape = x.sizes().vec();
  shape[1] = keep;
  const bool data_channels_last = x.dim() == 4;
  at::Tensor data = at::empty(shape, x.options().memory_format(data_channels_last ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous));
  at::Tensor winners = at::empty({g.batch, keep}, x.options().dtype(at::kLong));
  if (g.batch == 0) return {winners, data};
  const float* xp = x.data_ptr<float>();
  float* dp = data.data_ptr<float>();
  int64_t* wp = winners.data_ptr<int64_t>();
  const int64_t channels = g.channels, pixels = g.pixels, size = channels * pixels;
  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    Ranker ranker(g);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xs = xp + b * size;
      float* ds = dp + b * keep * pixels;
      int64_t* ws = wp + b * keep;
      const int64_t* won = ranker.winners(xs, true);
      std::copy(won, won + keep, ws);
      if (data_channels_last && g.channels_last) {  // pixel-major both: gather each pixel's winners
        for (int64_t p = 0; p < pixels; ++p) {
          const float* src = xs + p * channels;
          float* dst = ds + p * keep;
          for (int64_t i = 0; i < keep; ++i) dst[i] = src[ws[i]];
        }
      } else if (data_channels_last) {
        for (int64_t i = 0; i < keep; ++i) {
          const float* src = xs + ws[i] * pixels;
          for (int64_t p = 0; p < pixels; ++p) ds[p * keep + i] = src[p];
        }
      } else {
        for (int64_t i = 0; i < keep; ++i) std::copy(xs + ws[i] * pixels, xs + (ws[i] + 1) * pixels, ds + i * pixels);
      }
    }
  });
  return {winners, data};
}

// Each sample's keep winning groups, ascending (int64 [B, keep]): the ranking wta_masked and wta_compact use, for
// block WTA's compact form (which groups samples by their winning set). x: float32 [B, C, ...], contiguous or
// channels-last 4-D; groups divides C.
at::Tensor wta_winners(const at::Tensor& x, int64_t keep, int64_t groups, bool nonnegative) {
  const Geometry g(x, keep, groups, nonnegative);
  at::Tensor winners = at::empty({g.batch, keep}, x.options().dtype(at::kLong));
  if (g.batch == 0) return winners;
  const float* xp = x.data_ptr<float>();
  int64_t* wp = winners.data_ptr<int64_t>();
  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    Ranker ranker(g);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* won = ranker.winners(xp + b * g.channels * g.pixels, true);
      std::copy(won, won + keep, wp + b * keep);
    }
  });
  return winners;
}

// x: float32 [B, C, ...] (contiguous, or channels-last 4-D); groups divides C; keep in [1, groups].
at::Tensor wta_masked(const at::Tensor& x, int64_t keep, int64_t groups, bool nonnegative) {
  const Geometry g(x, keep, groups, nonnegative);
  const bool channels_last = g.channels_last;
  const int64_t channels = g.channels, pixels = g.pixels;
  at::Tensor out = at::empty_like(x);   // the input's memory format
  if (x.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t per_group = channels / groups, size = channels * pixels;
  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    Ranker ranker(g);
    std::vector<float> mask(channels);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xs = xp + b * size;
      float* os = op + b * size;
      const int64_t* won = ranker.winners(xs, false);
      std::fill(mask.begin(), mask.end(), 0.0f);
      for (int64_t i = 0; i < keep; ++i) {
        std::fill(mask.begin() + won[i] * per_group, mask.begin() + (won[i] + 1) * per_group, 1.0f);
      }
      // x * mask, as the torch path multiplies (a loser's -0 and NaN stay what x * 0 gives)
      if (channels_last) {
        for (int64_t p = 0; p < pixels; ++p) {
          const float* row = xs + p * channels;
          float* dst = os + p * channels;
          for (int64_t c = 0; c < channels; ++c) dst[c] = row[c] * mask[c];
        }
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          const float m = mask[c];
          const float* map = xs + c * pixels;
          float* dst = os + c * pixels;
          for (int64_t i = 0; i < pixels; ++i) dst[i] = map[i] * m;
        }
      }
    }
  });
  return out;
}

// dense + the compact activation (channels [B, k] or [k], data [B, k, ...]) scattered to its channels, in one pass
// (a residual shortcut added to WTA's compact output): a new tensor in dense's memory format. dense: float32
// [B, C, ...], contiguous or channels-last 4-D; data: float32, any strides.
at::Tensor add_channels(const at::Tensor& dense, const at::Tensor& channels, const at::Tensor& data) {
  const bool channels_last = checked_channels_last(dense);
  const int64_t batch = dense.size(0), units = dense.size(1), keep = data.size(1);
  TORCH_CHECK(data.scalar_type() == at::kFloat && data.dim() == dense.dim() && data.size(0) == batch,
              "data: float32 [B, k, ...] like dense");
  for (int64_t d = 2; d < dense.dim(); ++d) TORCH_CHECK(data.size(d) == dense.size(d), "data: dense's map sizes");
  TORCH_CHECK(channels.scalar_type() == at::kLong && channels.size(-1) == keep &&
                  (channels.dim() == 1 || (channels.dim() == 2 && channels.size(0) == batch)),
              "channels: int64 [k] or [B, k]");
  const at::Tensor chan = channels.contiguous();
  const int64_t* cp = chan.data_ptr<int64_t>();
  for (int64_t i = 0; i < chan.numel(); ++i) {
    TORCH_CHECK(cp[i] >= 0 && cp[i] < units, "channel ", cp[i], " out of range for ", units, " channels");
  }
  at::Tensor out = at::empty_like(dense);
  const int64_t pixels = batch && units ? dense.numel() / (batch * units) : 0;
  if (out.numel() == 0) return out;
  // data as [B, k, pixels] with its strides (its map dimensions flatten when contiguous among themselves)
  const at::Tensor d3 = data.reshape({batch, keep, pixels});
  const int64_t sb = d3.stride(0), sk = d3.stride(1), sp = d3.stride(2);
  const float* src = d3.data_ptr<float>();
  const float* in = dense.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool shared = chan.dim() == 1;
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* ch = shared ? cp : cp + b * keep;
      const float* ds = src + b * sb;
      const int64_t base = b * units * pixels;
      std::copy(in + base, in + base + units * pixels, op + base);
      if (channels_last) {
        for (int64_t p = 0; p < pixels; ++p) {
          float* row = op + base + p * units;
          for (int64_t i = 0; i < keep; ++i) row[ch[i]] += ds[i * sk + p * sp];
        }
      } else {
        for (int64_t i = 0; i < keep; ++i) {
          float* map = op + base + ch[i] * pixels;
          for (int64_t p = 0; p < pixels; ++p) map[p] += ds[i * sk + p * sp];
        }
      }
    }
  });
  return out;
}

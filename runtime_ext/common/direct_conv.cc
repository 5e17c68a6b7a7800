// The shared direct convolution: see direct_conv.h.
#include "common/direct_conv.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <immintrin.h>

namespace compressor {
namespace direct_conv {

bool UseAvx512(const char* portable_variable) {
  const char* portable = std::getenv(portable_variable);
  if (portable != nullptr && std::strcmp(portable, "1") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}

EntryOrder EntryOrder::Make(int64_t kH, int64_t kW, int64_t stride_h, int64_t stride_w,
                          int64_t dilation_h, int64_t dilation_w) {
  EntryOrder o;
  o.row_phases = stride_h;
  o.class_begin.push_back(0);
  for (int64_t column_phase = 0; column_phase < stride_w; ++column_phase) {
    for (int64_t row_phase = 0; row_phase < stride_h; ++row_phase) {
      for (int64_t h = 0; h < kH; ++h) {
        for (int64_t w = 0; w < kW; ++w) {
          if ((w * dilation_w) % stride_w != column_phase || (h * dilation_h) % stride_h != row_phase) continue;
          o.kh.push_back(h);
          o.kw.push_back(w);
        }
      }
      o.class_begin.push_back(static_cast<int64_t>(o.kh.size()));
    }
  }
  return o;
}

EntryOffsets MakeEntryOffsets(const Geometry& g, const PhaseLayout& p, const EntryOrder& order) {
  EntryOffsets e;
  e.phase.resize(g.kW);
  e.shift.resize(g.kW);
  for (int64_t kw = 0; kw < g.kW; ++kw) {
    e.phase[kw] = (kw * g.dilation_w) % g.stride_w;
    e.shift[kw] = (kw * g.dilation_w) / g.stride_w;
  }
  e.offset.resize(order.kh.size());
  for (size_t t = 0; t < order.kh.size(); ++t) {
    const int64_t kh = order.kh[t], kw = order.kw[t];
    e.offset[t] = kh * g.dilation_h * p.RowStride() + e.phase[kw] * p.length + e.shift[kw];
  }
  return e;
}

// Copies the input rows of a unit into its phase image (zeros outside the input). Rows are
// short: inline loops, not memset/memcpy calls.
__attribute__((optimize("no-tree-loop-distribute-patterns")))
COMPRESSOR_CLONES void BuildPhaseImagePortable(const Geometry& g, const PhaseLayout& p,
                                               const float* image, const int32_t* channels,
                                               int64_t count, float* out) {
  const int64_t sw = g.stride_w;
  // Per phase: the j range whose column j * sw + phase - pad_left lies in [0, W).
  int64_t first[64], last[64];
  for (int64_t phase = 0; phase < std::min<int64_t>(p.phases, 64); ++phase) {
    first[phase] = std::clamp<int64_t>(CeilDiv(std::max<int64_t>(0, g.pad_left - phase), sw), 0, p.length);
    last[phase] = g.W + g.pad_left - phase <= 0
                      ? first[phase]
                      : std::clamp<int64_t>(CeilDiv(g.W + g.pad_left - phase, sw), first[phase], p.length);
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t c = channels ? channels[i] : i;
    for (int64_t r = 0; r < p.rows; ++r) {
      float* row = out + i * p.ChannelStride() + r * p.RowStride();
      const int64_t ih = p.row_begin + r;
      if (ih < 0 || ih >= g.H) {
        for (int64_t j = 0; j < p.RowStride(); ++j) row[j] = 0.0f;
        continue;
      }
      const float* in = image + (c * g.H + ih) * g.W;
      for (int64_t phase = 0; phase < p.phases; ++phase) {
        float* dst = row + phase * p.length;
        int64_t j0, j1;
        if (phase < 64) {
          j0 = first[phase];
          j1 = last[phase];
        } else {
          j0 = std::clamp<int64_t>(CeilDiv(std::max<int64_t>(0, g.pad_left - phase), sw), 0, p.length);
          j1 = g.W + g.pad_left - phase <= 0
                   ? j0
                   : std::clamp<int64_t>(CeilDiv(g.W + g.pad_left - phase, sw), j0, p.length);
        }
        for (int64_t j = 0; j < j0; ++j) dst[j] = 0.0f;
        const float* src = in + phase - g.pad_left;
        if (sw == 1) {
          for (int64_t j = j0; j < j1; ++j) dst[j] = src[j];
        } else {
          for (int64_t j = j0; j < j1; ++j) dst[j] = src[j * sw];
        }
        for (int64_t j = j1; j < p.length; ++j) dst[j] = 0.0f;
      }
    }
  }
}

// The same with AVX-512: per 16 floats one masked load (stride_w 1) or masked gather, and one
// masked store (the masked lanes of a load or gather never fault), so a row costs a few
// instructions.
__attribute__((target("avx512f"))) void BuildPhaseImageAvx512(const Geometry& g,
                                                              const PhaseLayout& p,
                                                              const float* image,
                                                              const int32_t* channels,
                                                              int64_t count, float* out) {
  const int64_t sw = g.stride_w;
  const __m512 zero = _mm512_setzero_ps();
  const __m512i lane_offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(sw)));
  auto range_mask = [](int64_t begin, int64_t end) -> __mmask16 {  // lanes in [begin, end)
    begin = std::clamp<int64_t>(begin, 0, 16);
    end = std::clamp<int64_t>(end, 0, 16);
    if (end <= begin) return 0;
    return static_cast<__mmask16>(((1u << end) - 1u) & ~((1u << begin) - 1u));
  };
  // The masks depend only on the chunk of 16 within a row: computed once (on the stack for
  // rows of up to 1024 floats).
  const int64_t chunks = CeilDiv(p.length, 16);
  constexpr int64_t kStackChunks = 64;
  __mmask16 stack_masks[3 * kStackChunks];
  std::vector<__mmask16> heap_masks;
  __mmask16* masks = stack_masks;
  if (chunks > kStackChunks) {
    heap_masks.resize(3 * chunks);
    masks = heap_masks.data();
  }
  __mmask16* store_mask = masks;
  __mmask16* low_mask = masks + chunks;
  __mmask16* high_mask = masks + 2 * chunks;
  if (sw == 2) {  // de-interleave 32 columns into 16 of each phase with two permutes
    for (int64_t k = 0; k < chunks; ++k) {  // columns 2j + lane - pad_left must lie in [0, W)
      const int64_t j = 16 * k, first = g.pad_left - 2 * j, end = g.W + g.pad_left - 2 * j;
      store_mask[k] = range_mask(0, p.length - j);
      low_mask[k] = range_mask(first, end);
      high_mask[k] = range_mask(first - 16, end - 16);
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t c = channels ? channels[i] : i;
      for (int64_t r = 0; r < p.rows; ++r) {
        float* row = out + i * p.ChannelStride() + r * p.RowStride();
        const int64_t ih = p.row_begin + r;
        const bool inside = ih >= 0 && ih < g.H;
        const float* src = inside ? image + (c * g.H + ih) * g.W - g.pad_left : nullptr;
        for (int64_t k = 0; k < chunks; ++k) {
          __m512 low = zero, high = zero;
          if (inside) {
            low = _mm512_maskz_loadu_ps(low_mask[k], src + 32 * k);
            high = _mm512_maskz_loadu_ps(high_mask[k], src + 32 * k + 16);
          }
          _mm512_mask_storeu_ps(row + 16 * k, store_mask[k], _mm512_permutex2var_ps(low, even, high));
          _mm512_mask_storeu_ps(row + p.length + 16 * k, store_mask[k],
                                _mm512_permutex2var_ps(low, odd, high));
        }
      }
    }
    return;
  }
  for (int64_t phase = 0; phase < p.phases; ++phase) {
    // j range whose column j * sw + phase - pad_left lies in [0, W)
    const int64_t j0 = std::clamp<int64_t>(CeilDiv(std::max<int64_t>(0, g.pad_left - phase), sw), 0, p.length);
    const int64_t j1 = g.W + g.pad_left - phase <= 0
                           ? j0
                           : std::clamp<int64_t>(CeilDiv(g.W + g.pad_left - phase, sw), j0, p.length);
    for (int64_t k = 0; k < chunks; ++k) {
      store_mask[k] = range_mask(0, p.length - 16 * k);
      low_mask[k] = range_mask(j0 - 16 * k, j1 - 16 * k);
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t c = channels ? channels[i] : i;
      for (int64_t r = 0; r < p.rows; ++r) {
        float* row = out + i * p.ChannelStride() + r * p.RowStride() + phase * p.length;
        const int64_t ih = p.row_begin + r;
        const bool inside = ih >= 0 && ih < g.H;
        const float* src = inside ? image + (c * g.H + ih) * g.W + phase - g.pad_left : nullptr;
        for (int64_t k = 0; k < chunks; ++k) {
          __m512 v = zero;
          if (inside && sw == 1) {
            v = _mm512_maskz_loadu_ps(low_mask[k], src + 16 * k);
          } else if (inside && low_mask[k]) {
            v = _mm512_mask_i32gather_ps(zero, low_mask[k], lane_offsets, src + 16 * k * sw, 4);
          }
          _mm512_mask_storeu_ps(row + 16 * k, store_mask[k], v);
        }
      }
    }
  }
}

void BuildPhaseImage(const Geometry& g, const PhaseLayout& p, const float* image,
                     const int32_t* channels, int64_t count, float* out, bool avx512) {
  if (avx512) {
    BuildPhaseImageAvx512(g, p, image, channels, count, out);
  } else {
    BuildPhaseImagePortable(g, p, image, channels, count, out);
  }
}

// When count >= 16, the last block is shifted back to end at `count` (it rewrites some
// windows of the previous block with the same values) so every store is a whole vector.
COMPRESSOR_CLONES void StoreTransposed(const StoreCall& a) {
  for (int64_t j0 = 0; j0 < a.count; j0 += kLanes) {
    const int64_t start = a.count >= kLanes ? std::min(j0, a.count - kLanes) : 0;
    const int64_t n = std::min<int64_t>(kLanes, a.count - start);
    const float* src[kLanes];
    int64_t row = start / a.OW, ow = start % a.OW;
    const float* last = a.out + row * a.row_stride + ow * a.width;
    for (int64_t i = 0; i < kLanes; ++i) {
      src[i] = last;  // windows past the end repeat the last one (never stored)
      if (i + 1 < n && ++ow == a.OW) {
        ow = 0;
        ++row;
      }
      if (i + 1 < n) last = a.out + row * a.row_stride + ow * a.width;
    }
    for (int64_t m0 = 0; m0 < a.channels; m0 += kLanes) {
      Vec16 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = Load16(src[i] + m0);
      TransposeStage<0>(r);
      TransposeStage<1>(r);
      TransposeStage<2>(r);
      TransposeStage<3>(r);
      const int64_t mn = std::min<int64_t>(kLanes, a.channels - m0);
#pragma GCC unroll 16
      for (int m = 0; m < 16; ++m) {  // unrolled: r stays in registers
        if (m >= mn) break;
        const int64_t o = a.output_channels ? a.output_channels[m0 + m] : m0 + m;
        Vec16 v = r[m] + (a.bias ? a.bias[o] : 0.0f);
        if (a.relu) v = v > Vec16{} ? v : Vec16{};
        float* dst = a.y + o * a.plane + start;
        if (n == kLanes) {
          Store16(dst, v);
        } else {
          for (int64_t i = 0; i < n; ++i) dst[i] = v[i];
        }
      }
    }
  }
}

// The micro-kernel: for P windows (each given by the address of its first input float, entry
// (c=0, kh=0, kw=0)) and a tile of NV * 16 output channels, sums over the kernel entries
// k = (c, kh, kw) of `channels` input channels from channel c0 the input value times the
// packed weight vector wp[k] (wp: [c0's first entry][NV*16]), and stores (or with
// `accumulate`, adds) the P x NV*16 results at out[p]. Accumulators live in registers.
// kConsecutive: window p starts at window[0] + p and its output is out[0] + p * out_stride,
// so one address register serves every window (with P distinct addresses and NV = 1, 12 of
// them, the address registers run out and spill).
template <int NV, int P, bool kConsecutive>
COMPRESSOR_INLINE void ConvWindows(const float* const* window, int64_t window_offset,
                                   const float* wp, const int64_t* offsets,
                                   int64_t entries_per_channel, int64_t channels,
                                   int64_t channel_stride, bool accumulate, float* const* out,
                                   int64_t out_stride) {
  constexpr int64_t kWidth = NV * kLanes;
  auto output = [&](int p) { return kConsecutive ? out[0] + p * out_stride : out[p]; };
  Vec16 acc[P][NV];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[p][v] = accumulate ? Load16(output(p) + v * kLanes) : Vec16{};
  }
  const float* base[kConsecutive ? 1 : P];
#pragma GCC unroll 16
  for (int p = 0; p < (kConsecutive ? 1 : P); ++p) base[p] = window[p] + window_offset;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t t = 0; t < entries_per_channel; ++t, wp += kWidth) {
      const int64_t o = offsets[t];
      Vec16 w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = Load16(wp + v * kLanes);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const float s = kConsecutive ? base[0][o + p] : base[p][o];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[p][v] += s * w[v];
      }
    }
#pragma GCC unroll 16
    for (int p = 0; p < (kConsecutive ? 1 : P); ++p) base[p] += channel_stride;
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store16(output(p) + v * kLanes, acc[p][v]);
  }
}

// The micro-kernel for r <= R windows (R a compile-time bound).
template <int NV, int R, bool kConsecutive>
COMPRESSOR_INLINE void ConvSome(int64_t r, const float* const* window, int64_t window_offset,
                                const float* wp, const int64_t* offsets,
                                int64_t entries_per_channel, int64_t channels,
                                int64_t channel_stride, bool accumulate, float* const* out,
                                int64_t out_stride) {
  if constexpr (R > 0) {
    if (r == R) {
      ConvWindows<NV, R, kConsecutive>(window, window_offset, wp, offsets, entries_per_channel,
                                       channels, channel_stride, accumulate, out, out_stride);
    } else {
      ConvSome<NV, R - 1, kConsecutive>(r, window, window_offset, wp, offsets,
                                        entries_per_channel, channels, channel_stride,
                                        accumulate, out, out_stride);
    }
  }
}

// Runs the micro-kernel over a list of windows in as few calls as P allows, with the windows
// spread evenly over the calls: a call on 1 or 2 windows would wait on its few accumulators
// and on the weights it streams (e.g. 7 windows go as 4 + 3, not 6 + 1). Input channels go in
// blocks whose weights fit in L1, every window of the list per block. kConsecutive: the list
// is window[0] + i, output out[0] + i * out_stride, for i < count.
template <int NV, bool kConsecutive>
COMPRESSOR_INLINE void ConvWindowList(const float* const* window, float* const* out,
                                      int64_t count, const float* wp, const int64_t* offsets,
                                      int64_t entries_per_channel, int64_t channels,
                                      int64_t channel_stride, int64_t out_stride) {
  constexpr int P = WindowsPerCall<NV>();
  constexpr int64_t kWidth = NV * kLanes;
  const int64_t calls = CeilDiv(count, P);
  const int64_t block = std::max<int64_t>(
      1, kWeightBlockBytes / (entries_per_channel * kWidth * static_cast<int64_t>(sizeof(float))));
  for (int64_t c0 = 0; c0 < channels; c0 += block) {
    const int64_t c1 = std::min(channels, c0 + block);
    const float* wb = wp + c0 * entries_per_channel * kWidth;
    int64_t i = 0;
    for (int64_t call = 0; call < calls; ++call) {
      const int64_t r = count / calls + (call < count % calls ? 1 : 0);
      const float* first_window = kConsecutive ? window[0] + i : nullptr;
      float* first_out = kConsecutive ? out[0] + i * out_stride : nullptr;
      ConvSome<NV, P, kConsecutive>(r, kConsecutive ? &first_window : window + i,
                                    c0 * channel_stride, wb, offsets, entries_per_channel,
                                    c1 - c0, channel_stride, c0 > 0,
                                    kConsecutive ? &first_out : out + i, out_stride);
      i += r;
    }
  }
}

template <int NV>
COMPRESSOR_INLINE void ConvTile(const ConvCall& a) {
  if (a.consecutive) {
    ConvWindowList<NV, true>(a.window, a.out, a.count, a.wp, a.offsets, a.entries_per_channel,
                             a.channels, a.channel_stride, a.out_stride);
  } else {
    ConvWindowList<NV, false>(a.window, a.out, a.count, a.wp, a.offsets, a.entries_per_channel,
                              a.channels, a.channel_stride, 0);
  }
}

COMPRESSOR_CLONES void RunConv(const ConvCall& a) {
  switch (a.nv) {
    case 4: ConvTile<4>(a); break;
    case 3: ConvTile<3>(a); break;
    case 2: ConvTile<2>(a); break;
    default: ConvTile<1>(a); break;
  }
}

std::vector<float> PackWeights(const float* w, int64_t M, int64_t C, int64_t kH, int64_t kW,
                               const EntryOrder& order) {
  const int64_t K = C * kH * kW, tiles = CeilDiv(M, kTileWidth);
  std::vector<float> packed(static_cast<size_t>(tiles * K * kTileWidth), 0.0f);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t m0 = t * kTileWidth;
    const int64_t width = std::min(kTileWidth, RoundUp(M - m0, kLanes));
    float* dst = packed.data() + t * K * kTileWidth;
    for (int64_t m = m0; m < std::min(M, m0 + kTileWidth); ++m) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t e = 0; e < kH * kW; ++e) {
          const float value = w[((m * C + c) * kH + order.kh[e]) * kW + order.kw[e]];
          dst[(c * kH * kW + e) * width + (m - m0)] = value;
        }
      }
    }
  }
  return packed;
}


// ---- The row kernel ----

template <int F, int V = RowVectors(F)>
COMPRESSOR_INLINE void RowKernel(const float* phase, int64_t positions, int64_t channel_stride,
                                 const int64_t* offsets, int64_t E, const float* const* weights,
                                 const int32_t* channels, int64_t active, float* out,
                                 int64_t out_stride) {
  for (int64_t p0 = 0; p0 < positions; p0 += V * kLanes) {
    Vec16 acc[F][V] = {};
    for (int64_t j = 0; j < active; ++j) {
      const float* in = phase + j * channel_stride + p0;
      const float* w[F];
#pragma GCC unroll 8
      for (int f = 0; f < F; ++f) w[f] = weights[f] + static_cast<int64_t>(channels[j]) * E;
      for (int64_t e = 0; e < E; ++e) {
        const float* x = in + offsets[e];
        Vec16 xv[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) xv[v] = Load16(x + v * kLanes);
#pragma GCC unroll 8
        for (int f = 0; f < F; ++f) {
          const float ws = w[f][e];
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[f][v] += ws * xv[v];
        }
      }
    }
#pragma GCC unroll 8
    for (int f = 0; f < F; ++f) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) Store16(out + f * out_stride + p0 + v * kLanes, acc[f][v]);
    }
  }
}

COMPRESSOR_CLONES void StoreRows(const float* source, int64_t length, int64_t rows, int64_t OW,
                                 float bias, float* y, bool relu) {
  const Vec16 b = Vec16{} + bias;
  const Vec16 zero{};
  for (int64_t row = 0; row < rows; ++row) {
    const float* from = source + row * length;
    float* to = y + row * OW;
    if (OW < kLanes) {
      for (int64_t ow = 0; ow < OW; ++ow) {
        const float v = from[ow] + bias;
        to[ow] = relu && !(v > 0.0f) ? 0.0f : v;
      }
      continue;
    }
    // Whole vectors, the last one overlapping the one before (no scalar tail).
    for (int64_t ow = 0; ow < OW; ow += kLanes) {
      const int64_t at = std::min(ow, OW - kLanes);
      Vec16 v = Load16(from + at) + b;
      if (relu) v = v > zero ? v : zero;
      Store16(to + at, v);
    }
  }
}

COMPRESSOR_CLONES void RunRows(const RowCall& a) {
#define COMPRESSOR_ROWS(F)                                                                          \
  RowKernel<F>(a.phase, a.positions, a.channel_stride, a.offsets, a.E, a.weights, a.channels, \
               a.active, a.out, a.out_stride)
  switch (a.filters) {
    case 8: COMPRESSOR_ROWS(8); break;
    case 7: COMPRESSOR_ROWS(7); break;
    case 6: COMPRESSOR_ROWS(6); break;
    case 5: COMPRESSOR_ROWS(5); break;
    case 4: COMPRESSOR_ROWS(4); break;
    case 3: COMPRESSOR_ROWS(3); break;
    case 2: COMPRESSOR_ROWS(2); break;
    default: COMPRESSOR_ROWS(1); break;
  }
#undef COMPRESSOR_ROWS
}


}  // namespace direct_conv
}  // namespace compressor

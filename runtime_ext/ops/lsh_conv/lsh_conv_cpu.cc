// LSHConv CPU kernel. Units of (sample, block of output rows) on onnxruntime's intra-op
// thread pool, or on the calling thread for small calls (RunInline), each:
//   1. for its sample: queries (the mean query: window sums as one product of the image with
//      a 0/1 mask; columns: window column sums) -> projections on every table's hyperplanes ->
//      sign bits packed into codes -> OR of the bucket bitsets: the selected filters; with
//      channel_mask, the list of input channels that can be nonzero; then, for the channel
//      tiles, the selected filters' weights over the active channels gathered into tiles of
//      up to 64. A thread keeps this per-sample state and reuses it for the next unit of the
//      same sample in the same call, so a sample is hashed and packed once per thread, not
//      once per unit, and no unit waits for another. Large batches select first, 8 samples a
//      unit (one pass over the planes per 8 samples), in a parallel section of their own;
//   2. for its rows: a direct convolution on the phase image of the active channels
//      (common/direct_conv.h): channel tiles of selected filters through DiffConv's
//      micro-kernel and a transposing store into their output channels, or, for stride 1 and
//      few selected filters or few input channels, the row kernel below (lanes over windows,
//      weights broadcast);
//      unselected filters' rows are zero.
// With every filter selected and every channel active the tiles packed at session creation
// (constant weight) or once per call are used as they are.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <immintrin.h>

#include "common/conv_inputs.h"
#include "common/direct_conv.h"
#include "common/gemm.h"
#include "common/simhash.h"
#include "common/cpu_parallel.h"
#include "ops/lsh_conv/lsh_conv.h"

namespace compressor {
namespace {

using namespace direct_conv;

// A block of rows' output buffer (its windows x the widest tile, written once by the
// micro-kernel, read once by the store) may fill much of L2: longer blocks write each output
// channel in longer runs, which measured faster than L1-sized blocks (e.g. 16->96 1x1 @28x28,
// batch 64: 12 ms instead of 20 ms) because 64 short runs at once defeat the prefetchers.
constexpr int64_t kBufferBytes = 256 * 1024;

// Hashing scratch.
struct HashScratch {
  std::vector<float> sums, rows, queries, projections;
  std::vector<uint8_t> skip;
  std::vector<uint64_t> codes;
};

// What a thread knows about the sample of its last unit: its selection and packed weights.
struct SampleState {
  uint64_t call = 0;  // Compute call it belongs to (0: none)
  int64_t n = -1;
  std::vector<uint64_t> words;   // selected filters, bitset
  std::vector<int32_t> filters;  // selected filters, ascending
  std::vector<int32_t> channels; // active input channels, ascending
  int64_t count = 0, active = 0;
  std::vector<float> tiles;      // gathered weights, when not every filter and channel
};

// Per unit scratch of the direct convolution.
struct ConvScratch {
  std::vector<float> phase_image, out;
  std::vector<const float*> windows;
  std::vector<float*> outs;
};

// Every Compute call gets a distinct id, so a thread's SampleState never outlives its call.
std::atomic<uint64_t> next_call{1};

// Weights [M, C, kH, kW] with each filter's entries in EntryOrder, filters innermost:
// by_entry[(c * E + e) * M + m] = W[m, c, kh_e, kw_e]: a tile of any filters over any
// channels is gathered from it row by row.
std::vector<float> WeightsByEntry(const float* w, int64_t M, int64_t C, int64_t kH, int64_t kW,
                                  const EntryOrder& order) {
  const int64_t E = kH * kW;
  std::vector<float> by_entry(static_cast<size_t>(C * E * M));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t e = 0; e < E; ++e) {
        by_entry[(c * E + e) * M + m] = w[((m * C + c) * kH + order.kh[e]) * kW + order.kw[e]];
      }
    }
  }
  return by_entry;
}

// Tiles of the listed filters over the listed channels, laid out as PackWeights' (tile t of
// filters [64t, 64t + 64) at t * active * E * 64: [channel][entry][16 * nv], lanes past the
// filters zero). With AVX-512, each 16 filters of a row: up to 128 filters, the row in
// registers and one permute per 32 of them (a gather costs several times more); else a
// masked gather.
constexpr int64_t kMaxPermutePairs = 4;  // 32 filters per pair of vectors
__attribute__((target("avx512f"))) void GatherTilesAvx512(const float* by_entry, int64_t M,
                                                          int64_t E, const int32_t* filters,
                                                          int64_t count, const int32_t* channels,
                                                          int64_t active, float* tiles) {
  const int64_t K = active * E, pairs = CeilDiv(M, 2 * kLanes);
  const bool permute = pairs <= kMaxPermutePairs;
  auto lanes_mask = [](int64_t lanes) -> __mmask16 {
    lanes = std::clamp<int64_t>(lanes, 0, kLanes);
    return static_cast<__mmask16>(lanes == kLanes ? 0xFFFF : (1u << lanes) - 1u);
  };
  __mmask16 row_mask[2 * kMaxPermutePairs];  // the row's floats in [0, M)
  for (int64_t h = 0; h < 2 * kMaxPermutePairs; ++h) row_mask[h] = lanes_mask(M - h * kLanes);
  for (int64_t m0 = 0; m0 < count; m0 += kTileWidth) {
    const int64_t n = std::min(kTileWidth, count - m0), vectors = CeilDiv(n, kLanes);
    __m512i index[kMaxVectors];
    __mmask16 valid[kMaxVectors], in_pair[kMaxVectors][kMaxPermutePairs];
    for (int64_t v = 0; v < vectors; ++v) {
      valid[v] = lanes_mask(n - v * kLanes);
      index[v] = _mm512_maskz_loadu_epi32(valid[v], filters + m0 + v * kLanes);
      const __m512i pair = _mm512_srli_epi32(index[v], 5);
      for (int64_t p = 0; p < kMaxPermutePairs; ++p) {
        in_pair[v][p] = _mm512_mask_cmpeq_epi32_mask(valid[v], pair, _mm512_set1_epi32(static_cast<int>(p)));
      }
    }
    float* dst = tiles + (m0 / kTileWidth) * K * kTileWidth;
    for (int64_t j = 0; j < active; ++j) {
      for (int64_t e = 0; e < E; ++e, dst += vectors * kLanes) {
        const float* row = by_entry + (channels[j] * E + e) * M;
        if (permute) {
          __m512 low[kMaxPermutePairs], high[kMaxPermutePairs];
          for (int64_t p = 0; p < pairs; ++p) {
            low[p] = _mm512_maskz_loadu_ps(row_mask[2 * p], row + 2 * p * kLanes);
            high[p] = _mm512_maskz_loadu_ps(row_mask[2 * p + 1], row + (2 * p + 1) * kLanes);
          }
          for (int64_t v = 0; v < vectors; ++v) {
            __m512 out = _mm512_setzero_ps();
            for (int64_t p = 0; p < pairs; ++p) {  // the permute reads the index's low 5 bits
              out = _mm512_mask_blend_ps(in_pair[v][p], out,
                                         _mm512_permutex2var_ps(low[p], index[v], high[p]));
            }
            _mm512_storeu_ps(dst + v * kLanes, out);
          }
        } else {
          for (int64_t v = 0; v < vectors; ++v) {
            _mm512_storeu_ps(dst + v * kLanes,
                             _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid[v], index[v], row, 4));
          }
        }
      }
    }
  }
}

COMPRESSOR_CLONES void GatherTilesPortable(const float* by_entry, int64_t M, int64_t E,
                                           const int32_t* filters, int64_t count,
                                           const int32_t* channels, int64_t active, float* tiles) {
  const int64_t K = active * E;
  for (int64_t m0 = 0; m0 < count; m0 += kTileWidth) {
    const int64_t n = std::min(kTileWidth, count - m0), width = RoundUp(n, kLanes);
    const int32_t* f = filters + m0;
    float* dst = tiles + (m0 / kTileWidth) * K * kTileWidth;
    for (int64_t j = 0; j < active; ++j) {
      for (int64_t e = 0; e < E; ++e, dst += width) {
        const float* row = by_entry + (channels[j] * E + e) * M;
        for (int64_t i = 0; i < n; ++i) dst[i] = row[f[i]];
        for (int64_t i = n; i < width; ++i) dst[i] = 0.0f;
      }
    }
  }
}

// The mean query's window sums as a product with a 0/1 mask: kernel entry e = (kh, kw) of
// channel c sums, over all windows, x[c, p] at the input position p = (ih, iw) the window
// reads through e; a position is read through e by at most one window, so the sum is
// sum over p of x[c, p] * reads[e][p], whatever the strides, pads and dilations. The product
// runs with the vector lanes over positions (dot products, for few entries and large images)
// or over entries (for many entries and small images), whichever needs fewer multiply-adds.
struct WindowMask {
  int64_t H = -1, W = -1, kH = -1, kW = -1;
  int64_t entries = 0, positions = 0;
  bool by_position = false;
  std::vector<float> mask;  // by_position: [entry][positions rounded up to 16]; else
                            // [position][entries rounded up to 16]; zero-padded

  static WindowMask Make(const Conv2dShape& g) {
    WindowMask m;
    m.H = g.H;
    m.W = g.W;
    m.kH = g.kH;
    m.kW = g.kW;
    m.entries = g.kH * g.kW;
    m.positions = g.H * g.W;
    const int64_t by_position_cost = m.entries * (CeilDiv(m.positions, kLanes) + 8);
    const int64_t by_entry_cost = m.positions * CeilDiv(m.entries, kLanes);
    m.by_position = by_position_cost < by_entry_cost;
    std::vector<uint8_t> rows(static_cast<size_t>(g.kH * g.H), 0), columns(static_cast<size_t>(g.kW * g.W), 0);
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t ih = oh * g.stride_h + kh * g.dilation_h - g.pad_top;
        if (ih >= 0 && ih < g.H) rows[kh * g.H + ih] = 1;
      }
    }
    for (int64_t kw = 0; kw < g.kW; ++kw) {
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t iw = ow * g.stride_w + kw * g.dilation_w - g.pad_left;
        if (iw >= 0 && iw < g.W) columns[kw * g.W + iw] = 1;
      }
    }
    const int64_t padded_positions = RoundUp(m.positions, kLanes), padded_entries = RoundUp(m.entries, kLanes);
    m.mask.assign(static_cast<size_t>(m.by_position ? m.entries * padded_positions
                                                    : m.positions * padded_entries), 0.0f);
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const int64_t e = kh * g.kW + kw;
        for (int64_t ih = 0; ih < g.H; ++ih) {
          for (int64_t iw = 0; iw < g.W; ++iw) {
            const int64_t position = ih * g.W + iw;
            const float read = rows[kh * g.H + ih] && columns[kw * g.W + iw] ? 1.0f : 0.0f;
            m.mask[m.by_position ? e * padded_positions + position : position * padded_entries + e] = read;
          }
        }
      }
    }
    return m;
  }
};

// out[b] = sum over the positions of x times mask row b, for B mask rows (stride `padded`):
// the channel's vectors are loaded once for the B rows. `tail` is x's last partial vector,
// zero-padded.
template <int B>
COMPRESSOR_INLINE void MaskedDots(const float* x, Vec16 tail, int64_t full, int64_t vectors,
                                  const float* mask, int64_t padded, float* out) {
  Vec16 acc[B] = {};
  for (int64_t j = 0; j < vectors; ++j) {
    const Vec16 xv = j < full ? Load16(x + j * kLanes) : tail;
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) acc[b] += xv * Load16(mask + b * padded + j * kLanes);
  }
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) out[b] = HorizontalSum(acc[b]);
}

// S[c * entries + e] = the window sum of entry e of channel c (0 for skipped channels).
COMPRESSOR_CLONES void MaskedSums(const WindowMask& m, const float* image, int64_t C,
                                  const bool* skip, float* S) {
  const int64_t P = m.positions, E = m.entries;
  if (m.by_position) {
    const int64_t padded = RoundUp(P, kLanes), full = P / kLanes, vectors = CeilDiv(P, kLanes);
    for (int64_t c = 0; c < C; ++c) {
      float* out = S + c * E;
      if (skip != nullptr && skip[c]) {
        for (int64_t e = 0; e < E; ++e) out[e] = 0.0f;
        continue;
      }
      const float* x = image + c * P;
      Vec16 tail = {};  // the last partial vector, zero-padded (no read past the channel)
      for (int64_t i = full * kLanes; i < P; ++i) tail[i - full * kLanes] = x[i];
      int64_t e0 = 0;
      for (; e0 + 6 <= E; e0 += 6) MaskedDots<6>(x, tail, full, vectors, m.mask.data() + e0 * padded, padded, out + e0);
      const float* mask = m.mask.data() + e0 * padded;
      switch (E - e0) {
        case 5: MaskedDots<5>(x, tail, full, vectors, mask, padded, out + e0); break;
        case 4: MaskedDots<4>(x, tail, full, vectors, mask, padded, out + e0); break;
        case 3: MaskedDots<3>(x, tail, full, vectors, mask, padded, out + e0); break;
        case 2: MaskedDots<2>(x, tail, full, vectors, mask, padded, out + e0); break;
        case 1: MaskedDots<1>(x, tail, full, vectors, mask, padded, out + e0); break;
        default: break;
      }
    }
    return;
  }
  const int64_t padded = RoundUp(E, kLanes);
  for (int64_t c0 = 0; c0 < C; c0 += 4) {  // 4 channels share each mask load
    const int64_t count = std::min<int64_t>(4, C - c0);
    const float* x[4];
    for (int64_t i = 0; i < 4; ++i) x[i] = image + std::min(c0 + i, C - 1) * P;
    for (int64_t e0 = 0; e0 < E; e0 += kLanes) {
      Vec16 acc[4] = {};
      for (int64_t p = 0; p < P; ++p) {
        const Vec16 row = Load16(m.mask.data() + p * padded + e0);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) acc[i] += x[i][p] * row;
      }
      const int64_t lanes = std::min<int64_t>(kLanes, E - e0);
      for (int64_t i = 0; i < count; ++i) {
        const bool skipped = skip != nullptr && skip[c0 + i];
        for (int64_t l = 0; l < lanes; ++l) S[(c0 + i) * E + e0 + l] = skipped ? 0.0f : acc[i][l];
      }
    }
  }
}

// Y[i][r] = A[r, :] . X[i, :] for A [rows, cols] and the `count` <= 8 rows of X (row stride
// ldx, zero past cols up to a multiple of 16): each row of A is read once for the block of
// samples (the planes are a large matrix: reading them is most of the hashing's cost).
constexpr int64_t kProjectBlock = 8;

// Rows [r0, r0 + R) of A against B samples: R B independent accumulator chains (one chain
// per row for a single sample was bound by the multiply-add latency: ~10% of a small layer's
// time at batch 1), each of A's and X's vectors loaded once per pass.
template <int B, int R>
COMPRESSOR_INLINE void ProjectBlock(const float* A, int64_t r0, int64_t rows, int64_t cols,
                                    const float* X, int64_t ldx, float* Y) {
  const int64_t full = cols / kLanes;
  Vec16 acc[R][B] = {};
  for (int64_t j = 0; j < full; ++j) {
    Vec16 xv[B];
#pragma GCC unroll 8
    for (int i = 0; i < B; ++i) xv[i] = Load16(X + i * ldx + j * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec16 av = Load16(A + (r0 + r) * cols + j * kLanes);
#pragma GCC unroll 8
      for (int i = 0; i < B; ++i) acc[r][i] += av * xv[i];
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* a = A + (r0 + r) * cols;
    for (int i = 0; i < B; ++i) {
      float total = HorizontalSum(acc[r][i]);
      for (int64_t k = full * kLanes; k < cols; ++k) total += a[k] * X[i * ldx + k];
      Y[i * rows + r0 + r] = total;
    }
  }
}

template <int B>
COMPRESSOR_INLINE void ProjectBlocks(const float* A, int64_t rows, int64_t cols, const float* X,
                                     int64_t ldx, float* Y) {
  constexpr int R = B >= 5 ? 1 : 8 / B;  // B = 3: 2 rows
  int64_t r = 0;
  for (; r + R <= rows; r += R) ProjectBlock<B, R>(A, r, rows, cols, X, ldx, Y);
  for (; r < rows; ++r) ProjectBlock<B, 1>(A, r, rows, cols, X, ldx, Y);
}

COMPRESSOR_CLONES void ProjectRows(const float* A, int64_t rows, int64_t cols, const float* X,
                                   int64_t ldx, int64_t count, float* Y) {
  switch (count) {
    case 1: ProjectBlocks<1>(A, rows, cols, X, ldx, Y); break;
    case 2: ProjectBlocks<2>(A, rows, cols, X, ldx, Y); break;
    case 3: ProjectBlocks<3>(A, rows, cols, X, ldx, Y); break;
    case 4: ProjectBlocks<4>(A, rows, cols, X, ldx, Y); break;
    case 5: ProjectBlocks<5>(A, rows, cols, X, ldx, Y); break;
    case 6: ProjectBlocks<6>(A, rows, cols, X, ldx, Y); break;
    case 7: ProjectBlocks<7>(A, rows, cols, X, ldx, Y); break;
    default: ProjectBlocks<8>(A, rows, cols, X, ldx, Y); break;
  }
}

// Weights packed for the micro-kernels: tiles of every filter (PackWeights) for calls that
// select every filter and read every channel, filter-innermost rows to gather tiles from, and
// each filter's entries in EntryOrder (by_filter[(m * C + c) * E + e]) for the row kernel.
struct PackedWeights {
  std::vector<int64_t> shape;  // [M, C, kH, kW]; empty: nothing packed
  std::vector<float> tiles, by_entry, by_filter;

  static PackedWeights Make(const float* w, const std::vector<int64_t>& shape, const EntryOrder& order) {
    PackedWeights p;
    p.shape = shape;
    p.tiles = PackWeights(w, shape[0], shape[1], shape[2], shape[3], order);
    p.by_entry = WeightsByEntry(w, shape[0], shape[1], shape[2], shape[3], order);
    const int64_t M = shape[0], C = shape[1], kW = shape[3], E = shape[2] * kW;
    p.by_filter.resize(static_cast<size_t>(M * C * E));
    for (int64_t mc = 0; mc < M * C; ++mc) {
      for (int64_t e = 0; e < E; ++e) {
        p.by_filter[mc * E + e] = w[mc * E + order.kh[e] * kW + order.kw[e]];
      }
    }
    return p;
  }
};

class LshConvCpuKernel {
 public:
  static constexpr const char* kLabel = kLshConvName;

  LshConvCpuKernel(const OrtApi& api, const OrtKernelInfo* info)
      : attributes_(LshConvAttributes::Read(info)),
        // COMPRESSOR_LSH_CONV_PORTABLE=1: the portable helpers even on AVX-512 (tests).
        avx512_(UseAvx512("COMPRESSOR_LSH_CONV_PORTABLE")) {
    // A constant weight (the usual case: an initializer) is packed once.
    const ConstantWeight weight = ConstantWeight::Read(api, info);
    if (weight.data != nullptr) {
      const std::vector<int64_t>& shape = weight.shape;
      const Conv2dAttributes& a = attributes_.conv;
      const EntryOrder order = EntryOrder::Make(shape[2], shape[3], a.strides[0], a.strides[1],
                                                a.dilations[0], a.dilations[1]);
      constant_ = PackedWeights::Make(weight.data, shape, order);
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  struct Inputs {
    const float* x;
    const float* w;
    const float* planes;
    const uint64_t* buckets;
    const float* bias;
    const bool* channel_mask;
    const WindowMask* window_mask;  // mean query
  };

  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext context(raw_context);
    const size_t input_count = context.GetInputCount();
    if (input_count < 4) throw OpError("needs inputs X, W, planes and buckets");
    Ort::ConstValue x = context.GetInput(0);
    Ort::ConstValue w = context.GetInput(1);
    Ort::ConstValue planes = context.GetInput(2);
    Ort::ConstValue buckets = context.GetInput(3);
    const OrtValue* bias_value = nullptr;
    const OrtValue* mask_value = nullptr;
    if (input_count > 4) Check(api.KernelContext_GetInput(raw_context, 4, &bias_value));
    if (input_count > 5) Check(api.KernelContext_GetInput(raw_context, 5, &mask_value));
    std::vector<int64_t> bias_shape;
    const float* bias = nullptr;
    if (bias_value != nullptr) {
      Ort::ConstValue b(bias_value);
      bias_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      bias = b.GetTensorData<float>();
    }
    const Conv2dShape g = Conv2dShape::Make(attributes_.conv, x.GetTensorTypeAndShapeInfo().GetShape(),
                                            w.GetTensorTypeAndShapeInfo().GetShape(),
                                            bias_value ? &bias_shape : nullptr);
    const LshTablesShape t = LshTablesShape::Make(g, planes.GetTensorTypeAndShapeInfo().GetShape(),
                                                  buckets.GetTensorTypeAndShapeInfo().GetShape());
    const bool* channel_mask = nullptr;
    if (mask_value != nullptr) {
      Ort::ConstValue m(mask_value);
      CheckChannelMask(g, m.GetTensorTypeAndShapeInfo().GetShape());
      channel_mask = m.GetTensorData<bool>();
    }

    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    bool* selected_out = nullptr;
    if (context.GetOutputCount() > 1) {
      OrtValue* selected_value = nullptr;
      const int64_t shape[] = {g.N, g.M};
      Check(api.KernelContext_GetOutput(raw_context, 1, shape, 2, &selected_value));
      if (selected_value != nullptr) {
        selected_out = Ort::UnownedValue(selected_value).GetTensorMutableData<bool>();
      }
    }
    if (g.N == 0) return;

    std::shared_ptr<const WindowMask> window_mask;
    if (attributes_.query == LshQuery::kMean) {  // one per input size, kept
      std::lock_guard<std::mutex> lock(window_mask_mutex_);
      if (!window_mask_ || window_mask_->H != g.H || window_mask_->W != g.W ||
          window_mask_->kH != g.kH || window_mask_->kW != g.kW) {
        window_mask_ = std::make_shared<const WindowMask>(WindowMask::Make(g));
      }
      window_mask = window_mask_;
    }
    Inputs in{x.GetTensorData<float>(), w.GetTensorData<float>(), planes.GetTensorData<float>(),
              reinterpret_cast<const uint64_t*>(buckets.GetTensorData<int64_t>()), bias,
              channel_mask, window_mask.get()};
    const Geometry direct = Geometry::Of(g);
    const EntryOrder order = EntryOrder::Make(direct);
    const std::vector<int64_t> w_shape{g.M, g.C, g.kH, g.kW};
    PackedWeights call_packed;
    if (constant_.shape != w_shape) call_packed = PackedWeights::Make(in.w, w_shape, order);
    const PackedWeights& packed = constant_.shape == w_shape ? constant_ : call_packed;

    // Units: samples x blocks of output rows, at least 3 per thread when the batch is small
    // (Convolve cuts a unit's rows into blocks whose buffers stay in L1; a unit writes each
    // output channel's rows in one run, not one short run per block). Small batches: one
    // parallel section (with spinning off every extra one costs a wake-up of the pool), each
    // thread selecting for its samples itself. Batches of several blocks of kProjectBlock
    // samples per thread: the selection first, a block of samples per unit, so that the
    // planes are read once per block rather than once per sample.
    const bool empty = g.OH == 0 || g.OW == 0;
    // Small calls run on the calling thread (every zoo layer at batch 1).
    OrtKernelContext* pool = RunInline(g) ? nullptr : raw_context;
    const int64_t threads = pool == nullptr ? 1 : HardwareThreads();
    std::vector<uint64_t> selections;  // [N][t.words] when selected up front
    if (g.N >= 2 * kProjectBlock * threads) {
      selections.resize(static_cast<size_t>(g.N * t.words));
      const int64_t blocks = CeilDiv(g.N, kProjectBlock);
      ParallelUnits(raw_context, static_cast<size_t>(blocks), [&](size_t i) {
        const int64_t n0 = static_cast<int64_t>(i) * kProjectBlock;
        const int64_t n1 = std::min(g.N, n0 + kProjectBlock);
        Select(g, t, in, n0, n1, selections.data() + n0 * t.words);
      });
    }
    int64_t rows_per_unit = 1, row_blocks = 1;
    if (!empty) {
      const int64_t blocks_per_image =
          pool == nullptr ? 1 : std::clamp<int64_t>(CeilDiv(3 * threads, g.N), 1, g.OH);
      rows_per_unit = CeilDiv(g.OH, blocks_per_image);
      row_blocks = CeilDiv(g.OH, rows_per_unit);
    }
    const uint64_t call = next_call.fetch_add(1, std::memory_order_relaxed);
    float* out = y.GetTensorMutableData<float>();
    ParallelUnits(pool, static_cast<size_t>(g.N * row_blocks), [&](size_t i) {
      thread_local SampleState sample;
      const int64_t n = static_cast<int64_t>(i) / row_blocks;
      const int64_t rb = static_cast<int64_t>(i) % row_blocks;
      if (sample.call != call || sample.n != n) {
        sample.call = 0;  // until it is complete
        Prepare(g, t, in, n, order, packed, selections.empty() ? nullptr : selections.data() + n * t.words,
                sample);
        sample.call = call;
        sample.n = n;
      }
      if (rb == 0 && selected_out != nullptr) {
        for (int64_t m = 0; m < g.M; ++m) {
          selected_out[n * g.M + m] = (sample.words[m / 64] >> (m % 64)) & 1;
        }
      }
      if (!empty) {
        Convolve(g, direct, order, in, n, rb * rows_per_unit,
                 std::min(g.OH, (rb + 1) * rows_per_unit), packed, sample, out);
      }
    });
  }

  // Sample n's selected filters (given, or selected here), active channels and (unless every
  // filter and channel is in) their gathered weight tiles.
  void Prepare(const Conv2dShape& g, const LshTablesShape& t, const Inputs& in, int64_t n,
               const EntryOrder& order, const PackedWeights& packed, const uint64_t* selected,
               SampleState& s) const {
    uint64_t* words = Scratch(s.words, static_cast<size_t>(t.words));
    if (selected != nullptr) {
      std::copy(selected, selected + t.words, words);
    } else {
      Select(g, t, in, n, n + 1, words);
    }
    int32_t* filters = Scratch(s.filters, static_cast<size_t>(g.M));
    s.count = simhash::SetBits(words, t.words, filters);
    int32_t* channels = Scratch(s.channels, static_cast<size_t>(g.C));
    s.active = 0;
    for (int64_t c = 0; c < g.C; ++c) {
      if (in.channel_mask == nullptr || in.channel_mask[n * g.C + c]) channels[s.active++] = static_cast<int32_t>(c);
    }
    if (s.count == 0 || s.active == 0 || (s.count == g.M && s.active == g.C) ||
        UseRowKernel(g, s.count, s.active)) {
      return;
    }
    const int64_t E = static_cast<int64_t>(order.kh.size());
    float* tiles = Scratch(s.tiles, static_cast<size_t>(CeilDiv(s.count, kTileWidth) * s.active * E * kTileWidth));
    if (avx512_) {
      GatherTilesAvx512(packed.by_entry.data(), g.M, E, filters, s.count, channels, s.active, tiles);
    } else {
      GatherTilesPortable(packed.by_entry.data(), g.M, E, filters, s.count, channels, s.active, tiles);
    }
  }

  // The filters samples [n0, n1) select (n1 - n0 <= kProjectBlock), as bitsets of t.words
  // words at words + (n - n0) * t.words.
  void Select(const Conv2dShape& g, const LshTablesShape& t, const Inputs& in, int64_t n0,
              int64_t n1, uint64_t* words) const {
    thread_local HashScratch s;
    const int64_t D = g.D(), OW = g.OW, count = n1 - n0;
    std::memset(words, 0, sizeof(uint64_t) * t.words * count);
    const bool mean = attributes_.query == LshQuery::kMean;
    const int64_t Q = mean ? 1 : OW;  // queries per sample
    if (Q == 0) return;
    const int64_t planes_count = t.L * t.K;
    float* projections = Scratch(s.projections, static_cast<size_t>(count * planes_count * Q));
    // Queries (the last coordinate is the bias's 1): mean, [count][D + 1 padded to 16], so one
    // pass over the planes serves the block; columns, [D + 1, OW] per sample, one GEMM each.
    const int64_t ldq = mean ? RoundUp(D + 1, kLanes) : (D + 1) * Q;
    float* queries = Scratch(s.queries, static_cast<size_t>(count * ldq));
    for (int64_t n = n0; n < n1; ++n) {
      const bool* skip = nullptr;
      if (in.channel_mask != nullptr) {
        uint8_t* flags = Scratch(s.skip, static_cast<size_t>(g.C));
        for (int64_t c = 0; c < g.C; ++c) flags[c] = !in.channel_mask[n * g.C + c];
        skip = reinterpret_cast<const bool*>(flags);
      }
      const float* image = in.x + n * g.C * g.H * g.W;
      float* q = queries + (n - n0) * ldq;
      if (mean) {
        MaskedSums(*in.window_mask, image, g.C, skip, q);
        const float scale = g.Windows() > 0 ? 1.0f / static_cast<float>(g.Windows()) : 0.0f;
        for (int64_t k = 0; k < D; ++k) q[k] *= scale;
        q[D] = 1.0f;
        for (int64_t k = D + 1; k < ldq; ++k) q[k] = 0.0f;
      } else {
        float* sums = Scratch(s.sums, static_cast<size_t>(D * OW));
        WindowColumnSums(g, image, skip, sums, s.rows, 0, g.C);
        const float scale = g.OH > 0 ? 1.0f / static_cast<float>(g.OH) : 0.0f;
        for (int64_t j = 0; j < D * OW; ++j) q[j] = sums[j] * scale;
        for (int64_t ow = 0; ow < OW; ++ow) q[D * OW + ow] = 1.0f;
        // Every table's projections in one GEMM: [L * K, D + 1] x [D + 1, OW].
        Sgemm(static_cast<int>(planes_count), static_cast<int>(Q), static_cast<int>(D + 1),
              in.planes, static_cast<int>(D + 1), q, static_cast<int>(Q),
              projections + (n - n0) * planes_count * Q, static_cast<int>(Q));
      }
    }
    // Mean: [count][L * K] (OpenBLAS's GEMM costs several times more for these shapes).
    if (mean) ProjectRows(in.planes, planes_count, D + 1, queries, ldq, count, projections);

    uint64_t* codes = Scratch(s.codes, static_cast<size_t>(Q));
    const int64_t table_size = int64_t{1} << t.K;
    for (int64_t i = 0; i < count; ++i) {
      const float* projection = projections + i * planes_count * Q;  // [L * K][Q]
      uint64_t* selected = words + i * t.words;
      for (int64_t l = 0; l < t.L; ++l) {
        std::memset(codes, 0, sizeof(uint64_t) * Q);
        for (int64_t k = 0; k < t.K; ++k) {
          simhash::AddSignBit(projection + (l * t.K + k) * Q, 0.0f, Q, static_cast<int>(k), codes);
        }
        const uint64_t* table = in.buckets + l * table_size * t.words;
        uint64_t previous = ~uint64_t{0};
        for (int64_t q = 0; q < Q; ++q) {
          if (codes[q] == previous) continue;  // neighbouring columns often share a code
          previous = codes[q];
          simhash::OrWords(selected, table + static_cast<int64_t>(codes[q]) * t.words, t.words);
        }
      }
      simhash::ClearTail(selected, g.M);
    }
  }

  // Output rows [oh0, oh1) of sample n: the selected filters by the direct convolution over
  // the active channels, zeros for the others.
  void Convolve(const Conv2dShape& g, const Geometry& direct, const EntryOrder& order,
                const Inputs& in, int64_t n, int64_t oh0, int64_t oh1,
                const PackedWeights& packed, const SampleState& s, float* y) const {
    const int64_t plane = g.OH * g.OW, rows = oh1 - oh0, cols = rows * g.OW;
    float* out = y + n * g.M * plane + oh0 * g.OW;  // channel m at out + m * plane
    const int32_t* filters = s.filters.data();
    auto zero_rows = [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) std::memset(out + m * plane, 0, sizeof(float) * cols);
    };
    int64_t previous = 0;
    for (int64_t i = 0; i < s.count; ++i) {
      zero_rows(previous, filters[i]);
      previous = filters[i] + 1;
    }
    zero_rows(previous, g.M);
    if (s.count == 0) return;
    if (s.active == 0) {  // every input channel is known to be zero: selected filters give their bias
      for (int64_t i = 0; i < s.count; ++i) {
        float* o = out + filters[i] * plane;
        const float value = in.bias ? in.bias[filters[i]] : 0.0f;
        for (int64_t j = 0; j < cols; ++j) o[j] = value;
      }
      return;
    }

    // Blocks of rows whose output buffer stays in L1.
    const bool row_kernel = UseRowKernel(g, s.count, s.active);
    const int64_t padded_row = g.OW + (g.kW - 1) * g.dilation_w;  // stride 1: windows per row, junk included
    const int64_t row_bytes = static_cast<int64_t>(sizeof(float)) *
                              (row_kernel ? kRowFilters * padded_row
                                          : (g.stride_h == 1 && g.stride_w == 1 ? padded_row : g.OW) *
                                                std::min(kTileWidth, RoundUp(s.count, kLanes)));
    const int64_t block_rows = std::max<int64_t>(1, kBufferBytes / row_bytes);
    for (int64_t r0 = oh0; r0 < oh1; r0 += block_rows) {
      ConvolveBlock(g, direct, order, in, n, r0, std::min(oh1, r0 + block_rows), packed, s, y);
    }
  }

  // Output rows [oh0, oh1) of sample n for the selected filters, with at least one active
  // channel.
  void ConvolveBlock(const Conv2dShape& g, const Geometry& direct, const EntryOrder& order,
                     const Inputs& in, int64_t n, int64_t oh0, int64_t oh1,
                     const PackedWeights& packed, const SampleState& s, float* y) const {
    thread_local ConvScratch scratch;
    const int64_t plane = g.OH * g.OW, rows = oh1 - oh0, cols = rows * g.OW;
    float* out = y + n * g.M * plane + oh0 * g.OW;  // channel m at out + m * plane
    const int32_t* filters = s.filters.data();
    const int64_t E = static_cast<int64_t>(order.kh.size()), K = s.active * E;
    const PhaseLayout layout = PhaseLayout::Make(direct, oh0, oh1);
    const EntryOffsets entry = MakeEntryOffsets(direct, layout, order);
    // The row kernel's junk lanes of the last chunk read up to a chunk plus a kernel row's
    // span past the last channel: slack, zeroed.
    const int64_t image_size = s.active * layout.Size(), slack = kRowChunk + g.kW * g.dilation_w;
    float* phase_image = Scratch(scratch.phase_image, static_cast<size_t>(image_size + slack));
    BuildPhaseImage(direct, layout, in.x + n * g.C * g.H * g.W,
                    s.active == g.C ? nullptr : s.channels.data(), s.active, phase_image, avx512_);

    if (UseRowKernel(g, s.count, s.active)) {
      std::memset(phase_image + image_size, 0, sizeof(float) * slack);
      const int64_t positions = rows * layout.length, stride = RoundUp(positions, kRowStrideMultiple);
      float* buffer = Scratch(scratch.out, static_cast<size_t>(kRowFilters * stride));
      // Groups as even as possible (11 filters: 6 + 5, not 8 + 3).
      const int64_t groups = CeilDiv(s.count, kRowFilters), widest = CeilDiv(s.count, groups);
      for (int64_t i0 = 0; i0 < s.count; i0 += widest) {
        const int group = static_cast<int>(std::min<int64_t>(widest, s.count - i0));
        const float* weights[kRowFilters];
        for (int f = 0; f < group; ++f) weights[f] = packed.by_filter.data() + filters[i0 + f] * g.C * E;
        RunRows(RowCall{phase_image, positions, layout.ChannelStride(), entry.offset.data(), E,
                        weights, s.channels.data(), s.active, buffer, stride, group});
        for (int f = 0; f < group; ++f) {
          const int64_t m = filters[i0 + f];
          StoreRows(buffer + f * stride, layout.length, rows, g.OW, in.bias ? in.bias[m] : 0.0f,
                    out + m * plane);
        }
      }
      return;
    }

    const bool every = s.count == g.M && s.active == g.C;
    const float* tiles = every ? packed.tiles.data() : s.tiles.data();

    // Output buffer: window-major, [rows][OW][width], width = the widest tile. With stride 1
    // the windows go to the micro-kernel as one run of consecutive phase-image positions,
    // row after row with the padding columns' junk windows in between (computed, never
    // stored): one address register for all of a call's windows instead of one each.
    const bool consecutive = g.stride_h == 1 && g.stride_w == 1;
    const int64_t width = std::min(kTileWidth, RoundUp(s.count, kLanes));
    const int64_t row_stride = (consecutive ? layout.length : g.OW) * width;
    float* buffer = Scratch(scratch.out, static_cast<size_t>(rows * row_stride));
    const float** windows = Scratch(scratch.windows, static_cast<size_t>(consecutive ? 1 : cols));
    float** outs = Scratch(scratch.outs, static_cast<size_t>(consecutive ? 1 : cols));
    int64_t listed = 1;
    if (consecutive) {
      windows[0] = phase_image;
      outs[0] = buffer;
      listed = (rows - 1) * layout.length + g.OW;
    } else {
      for (int64_t row = 0, k = 0; row < rows; ++row) {
        for (int64_t ow = 0; ow < g.OW; ++ow, ++k) {
          windows[k] = phase_image + row * g.stride_h * layout.RowStride() + ow;
          outs[k] = buffer + row * row_stride + ow * width;
        }
      }
      listed = cols;
    }
    for (int64_t m0 = 0; m0 < s.count; m0 += kTileWidth) {
      const int64_t tile_filters = std::min(kTileWidth, s.count - m0);
      RunConv(ConvCall{windows, outs, listed, tiles + (m0 / kTileWidth) * K * kTileWidth,
                       entry.offset.data(), E, s.active, layout.ChannelStride(),
                       static_cast<int>(CeilDiv(tile_filters, kLanes)), consecutive, width});
      if (s.count == g.M) {  // output channels m0.. in order
        StoreTransposed(StoreCall{buffer, row_stride, width, g.OW, cols, tile_filters, plane,
                                  in.bias ? in.bias + m0 : nullptr, out + m0 * plane});
      } else {
        StoreTransposed(StoreCall{buffer, row_stride, width, g.OW, cols, tile_filters, plane,
                                  in.bias, out, filters + m0});
      }
    }
  }

  LshConvAttributes attributes_;
  bool avx512_;  // the AVX-512 phase image and tile gather; the micro-kernels use target_clones
  PackedWeights constant_;
  std::mutex window_mask_mutex_;
  std::shared_ptr<const WindowMask> window_mask_;
};

using LshConvCpuOp = KernelOp<LshConvCpuKernel, LshConvSignature, Provider::kCpu>;

}  // namespace

void AddLshConvCpu(Ort::CustomOpDomain& domain) { AddOp<LshConvCpuOp>(domain); }

}  // namespace compressor

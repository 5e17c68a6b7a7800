// DiffConv CPU kernel: direct convolution with our own vector micro-kernels (no im2col, no
// GEMM library; the parts LSHConv shares are in common/direct_conv.h). Work is split into
// units of (image, block of output rows) on ORT's intra-op thread pool; within a unit, output
// channels go in tiles of up to 64 (4 vectors of 16).
//
// Per unit:
//   1. The input rows the unit reads are copied, zero-padded, into a "phase image": each row
//      split by column phase (column % stride_w), so that consecutive windows read
//      consecutive floats whatever the stride (PhaseLayout).
//   2. The thresholded column differences D (x at a column minus x one stride to its left;
//      |d| <= threshold is skipped) are taken once per input element: the window difference
//      P[:, ow] - P[:, ow - 1] is D's patch at ow. Their density picks the path.
//   3. One of three paths computes the unit's output, channel tile by channel tile, into a
//      window-major buffer [window][64 channels] that a transposing store writes to Y (NCHW):
//      * conv (threshold 0, dense differences): plain direct convolution of the input.
//        Exact; the differential form cannot beat it when most differences are nonzero.
//      * dense (threshold > 0, many kept differences): the same micro-kernel on the
//        difference image, restart windows on the input, then a prefix sum along each row.
//      * sparse (few kept differences; at threshold 0 too, where it is exact): the kept
//        differences are listed per input position (the channels c and values d); for each
//        position and a group of kernel entries (kh, kw), sum_c d * W[:, c, kh, kw] is formed
//        in registers and added once to each window the position feeds; restart windows by
//        the micro-kernel; prefix sum. It only multiplies what the algorithm counts (plus the
//        products for windows outside the unit, which it drops).
// The path choice (SparseDensityLimit) and the block sizes were measured with
// bench/bench_diffconv.py; runtime_ext/README.md has the numbers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "common/conv_inputs.h"
#include "common/cpu_parallel.h"
#include "common/direct_conv.h"
#include "ops/diffconv/diffconv.h"

namespace compressor {
namespace {

using namespace direct_conv;

// Below this fraction of kept differences (per input element) the sparse path beats the
// dense ones (measured on the zoo's layers, AVX-512; README.md). Its fixed cost per input
// position is shared by the input channels listed there, so it needs channels to pay off:
// never below 8, up to 30% kept from 44 channels on.
double SparseDensityLimit(int64_t channels) {
  if (channels < 8) return 0.0;
  return std::min(0.30, 0.15 + 0.004 * static_cast<double>(channels - 8));
}

// A unit's output buffer (its rows x 64 channels) should stay in L1 (48 KiB here).
constexpr int64_t kBufferBytes = 32 * 1024;

enum class Path { kAuto, kConv, kDense, kSparse };

// COMPRESSOR_DIFFCONV_PATH=auto|conv|dense|sparse forces a path (tests and benchmarks); read
// when a session creates the kernel. "conv" is the exact path: at threshold > 0 it means dense.
Path PathFromEnvironment() {
  return static_cast<Path>(
      ChoiceFromEnvironment("COMPRESSOR_DIFFCONV_PATH", {"auto", "conv", "dense", "sparse"}));
}

// Kernel entries per sparse-product pass for a tile of NV vectors: G * NV accumulators.
template <int NV>
constexpr int EntriesPerGroup() {
  return NV == 4 ? 6 : NV == 3 ? 8 : 9;
}

template <class T>
T* Scratch(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// Differences along each phase row of a phase image: the column differences
// x(col) - x(col - stride_w). j = 0 has no left neighbour in its row and is only read by
// restart windows: it is never kept. A difference is kept when |d| > threshold.

// Number of kept differences (picks the path). Runs over the rows as one array, then takes
// back the pairs that straddle two rows.
COMPRESSOR_CLONES int64_t CountDifferences(const float* phase_image, int64_t rows, int64_t length,
                                           float threshold) {
  const int64_t size = rows * length;
  int64_t count = 0;
  for (int64_t i0 = 1; i0 < size; i0 += 4096) {  // 32-bit lanes count each block
    const int64_t i1 = std::min(size, i0 + 4096);
    int32_t kept = 0;
    for (int64_t i = i0; i < i1; ++i) kept += std::fabs(phase_image[i] - phase_image[i - 1]) > threshold;
    count += kept;
  }
  for (int64_t r = 1; r < rows; ++r) {
    const int64_t i = r * length;
    count -= std::fabs(phase_image[i] - phase_image[i - 1]) > threshold;
  }
  return count;
}

// The difference image (the dense path runs the micro-kernel on it): kept differences, else 0.
// Runs over the rows as one array, then clears each row's first element.
COMPRESSOR_CLONES void BuildDifferenceImage(const float* phase_image, int64_t rows, int64_t length,
                                            float threshold, float* out) {
  const int64_t size = rows * length;
  out[0] = 0.0f;
  for (int64_t i = 1; i < size; ++i) {
    const float d = phase_image[i] - phase_image[i - 1];
    out[i] = std::fabs(d) > threshold ? d : 0.0f;
  }
  for (int64_t r = 1; r < rows; ++r) out[r * length] = 0.0f;
}

// Prefix sum along each output row of the buffer, restarting at restart windows.
COMPRESSOR_CLONES void PrefixSumRows(float* out, int64_t rows, int64_t row_stride, int64_t OW,
                                     int64_t restart, int64_t width, int nv) {
  for (int64_t row = 0; row < rows; ++row) {
    float* o = out + row * row_stride;
    for (int64_t ow = 1; ow < OW; ++ow) {
      if (ow % restart == 0) continue;
      float* cur = o + ow * width;
      const float* prev = cur - width;
      for (int v = 0; v < nv; ++v) Store16(cur + v * kLanes, Load16(cur + v * kLanes) + Load16(prev + v * kLanes));
    }
  }
}

// Kept differences grouped by position of the phase image (pos = (r * phases + phase) *
// length + j, one channel's worth): the input channels c whose difference there is kept,
// ascending, and the values, entries [starts[pos], starts[pos + 1]). Positions with j = 0
// have none (their difference is only read by restart windows). The arrays need 16 entries
// of slack past the last one.
struct PositionLists {
  int32_t* channels;
  float* values;
  int32_t* starts;  // [positions + 1]
};

void BuildPositionListsPortable(const PhaseLayout& p, int64_t C, const float* x,
                                float threshold, const PositionLists& out) {
  const int64_t positions = p.Size();
  int32_t count = 0;
  for (int64_t pos = 0; pos < positions; ++pos) {
    out.starts[pos] = count;
    if (pos % p.length == 0) continue;
    for (int64_t c = 0; c < C; ++c) {  // branch-free compaction
      const float d = x[c * positions + pos] - x[c * positions + pos - 1];
      out.channels[count] = static_cast<int32_t>(c);
      out.values[count] = d;
      count += std::fabs(d) > threshold;
    }
  }
  out.starts[positions] = count;
}

// The same with AVX-512: differences for 16 channels x 16 positions, a register transpose
// into `transposed` [positions][C rounded up to 16], then one compress per 16 channels of a
// position.
__attribute__((target("avx512f"))) void BuildPositionListsAvx512(const PhaseLayout& p,
                                                                 int64_t C, const float* x,
                                                                 float threshold,
                                                                 const PositionLists& out,
                                                                 float* transposed) {
  const int64_t positions = p.Size(), padded = RoundUp(C, kLanes);
  for (int64_t c0 = 0; c0 < padded; c0 += kLanes) {
    for (int64_t pos0 = 0; pos0 < positions; pos0 += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, positions - pos0);
      const __mmask16 valid = static_cast<__mmask16>(n == kLanes ? 0xFFFF : (1u << n) - 1u);
      const __mmask16 previous = pos0 == 0 ? static_cast<__mmask16>(valid & ~1u) : valid;
      Vec16 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        r[i] = Vec16{};
        if (c0 + i < C) {
          const float* xc = x + (c0 + i) * positions + pos0;
          const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, xc),
                                         _mm512_maskz_loadu_ps(previous, xc - 1));
          std::memcpy(&r[i], &d, sizeof(d));
        }
      }
      TransposeStage<0>(r);
      TransposeStage<1>(r);
      TransposeStage<2>(r);
      TransposeStage<3>(r);
      for (int64_t k = 0; k < n; ++k) Store16(transposed + (pos0 + k) * padded + c0, r[k]);
    }
  }
  const __m512 limit = _mm512_set1_ps(threshold);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int32_t count = 0;
  for (int64_t pos = 0; pos < positions; ++pos) {
    out.starts[pos] = count;
    if (pos % p.length == 0) continue;
    const float* t = transposed + pos * padded;
    for (int64_t c0 = 0; c0 < padded; c0 += kLanes) {  // padded channels are 0: never kept
      const __m512 d = _mm512_loadu_ps(t + c0);
      const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_abs_ps(d), limit, _CMP_GT_OQ);
      const __m512i c = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c0)), lane);
      _mm512_storeu_ps(out.values + count, _mm512_maskz_compress_ps(keep, d));
      _mm512_storeu_si512(out.channels + count, _mm512_maskz_compress_epi32(keep, c));
      count += __builtin_popcount(keep);
    }
  }
  out.starts[positions] = count;
}

// Kept differences of the algorithm in a unit: for every non-restart window and kernel entry,
// whether the difference it reads is kept (the lengths of the position lists).
int64_t CountKept(const DiffConvGeometry& g, const PhaseLayout& p, const EntryOffsets& e,
                  const int32_t* starts, int64_t rows) {
  int64_t kept = 0;
  for (int64_t kh = 0; kh < g.kH; ++kh) {
    for (int64_t kw = 0; kw < g.kW; ++kw) {
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t r = row * g.stride_h + kh * g.dilation_h;
        const int64_t base = (r * p.phases + e.phase[kw]) * p.length + e.shift[kw];
        for (int64_t ow = 1; ow < g.OW; ++ow) {
          if (ow % g.restart != 0) kept += starts[base + ow + 1] - starts[base + ow];
        }
      }
    }
  }
  return kept;
}

// The sparse product, output-stationary. For one column phase and a group of G kernel
// entries (kh, kw) of that phase, each position (r, j) of the phase image with kept
// differences feeds window (row (r - kh * dilation_h) / stride_h, ow = j - shift[kw]) through
// entry (kh, kw): acc[entry] = sum over the position's kept (c, d) of d * W[c, kh, kw] is
// formed in registers (G * NV accumulators; two sets when that is too few to hide the
// multiply-add latency) and added once to each of those windows that is a non-restart window
// of the unit. The group's weights over all input channels stay in L1 while every position is
// visited.
struct GatherCall {
  const DiffConvGeometry* g;
  const PhaseLayout* layout;
  const EntryOffsets* entry;
  const EntryOrder* order;
  PositionLists lists;
  const float* wp;  // packed weights of the tile, [C][entries][16 * nv]
  float* out;       // window 0 of row 0 of the output buffer
  int64_t row_stride, width, rows;
  int nv;
};

// Entries [first, first + G) of EntryOrder, all of one class, of column phase `phase`.
template <int NV, int G>
COMPRESSOR_INLINE void GatherGroup(const GatherCall& a, int64_t phase, int64_t first) {
  const DiffConvGeometry& g = *a.g;
  const PhaseLayout& p = *a.layout;
  constexpr int64_t kWidth = NV * kLanes;
  constexpr bool kTwoSets = G * NV < 8;
  const int64_t channel_stride = g.kH * g.kW * kWidth;
  const int32_t* starts = a.lists.starts;
  const int32_t* channels = a.lists.channels;
  const float* values = a.lists.values;
  const float* wp = a.wp + first * kWidth;  // entry first + e of channel c: wp[c * stride + e * kWidth]
  int64_t kh[G], shift[G];
  for (int e = 0; e < G; ++e) {
    kh[e] = a.order->kh[first + e];
    shift[e] = a.entry->shift[a.order->kw[first + e]];
  }
  for (int64_t r = 0; r < p.rows; ++r) {
    float* row_out[G];
    bool any = false;
    for (int e = 0; e < G; ++e) {
      const int64_t shifted = r - kh[e] * g.dilation_h;
      const bool ok = shifted >= 0 && shifted % g.stride_h == 0 && shifted / g.stride_h < a.rows;
      row_out[e] = ok ? a.out + shifted / g.stride_h * a.row_stride : nullptr;
      any |= ok;
    }
    if (!any) continue;
    const int32_t* row_starts = starts + (r * p.phases + phase) * p.length;
    for (int64_t j = 1; j < p.length; ++j) {
      int64_t i = row_starts[j];
      const int64_t end = row_starts[j + 1];
      if (i == end) continue;
      Vec16 acc[G][NV], acc2[kTwoSets ? G : 1][NV];
#pragma GCC unroll 16
      for (int e = 0; e < G; ++e) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[e][v] = Vec16{};
      }
      if constexpr (kTwoSets) {
#pragma GCC unroll 16
        for (int e = 0; e < G; ++e) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc2[e][v] = Vec16{};
        }
        for (; i + 1 < end; i += 2) {
          const float* w0 = wp + channels[i] * channel_stride;
          const float* w1 = wp + channels[i + 1] * channel_stride;
          const float d0 = values[i], d1 = values[i + 1];
#pragma GCC unroll 16
          for (int e = 0; e < G; ++e) {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              acc[e][v] += d0 * Load16(w0 + e * kWidth + v * kLanes);
              acc2[e][v] += d1 * Load16(w1 + e * kWidth + v * kLanes);
            }
          }
        }
      }
      for (; i < end; ++i) {
        const float* w0 = wp + channels[i] * channel_stride;
        const float d0 = values[i];
#pragma GCC unroll 16
        for (int e = 0; e < G; ++e) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[e][v] += d0 * Load16(w0 + e * kWidth + v * kLanes);
        }
      }
#pragma GCC unroll 16
      for (int e = 0; e < G; ++e) {
        const int64_t ow = j - shift[e];
        if (row_out[e] == nullptr || ow < 1 || ow >= g.OW || ow % g.restart == 0) continue;
        float* o = row_out[e] + ow * a.width;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          Vec16 sum = acc[e][v];
          if constexpr (kTwoSets) sum += acc2[e][v];
          Store16(o + v * kLanes, Load16(o + v * kLanes) + sum);
        }
      }
    }
  }
}

// GatherGroup for a group of count <= G entries (G a compile-time bound).
template <int NV, int G>
COMPRESSOR_INLINE void GatherSome(int64_t count, const GatherCall& a, int64_t phase, int64_t first) {
  if constexpr (G > 0) {
    if (count == G) {
      GatherGroup<NV, G>(a, phase, first);
    } else {
      GatherSome<NV, G - 1>(count, a, phase, first);
    }
  }
}

template <int NV>
COMPRESSOR_INLINE void GatherImpl(const GatherCall& a) {
  const DiffConvGeometry& g = *a.g;
  constexpr int kMax = EntriesPerGroup<NV>();
  // Entries per pass: as many as registers allow whose weights (C x 16 * NV floats each) fit
  // in L1 together.
  const int64_t entry_bytes = g.C * NV * kLanes * static_cast<int64_t>(sizeof(float));
  const int64_t group = std::clamp<int64_t>(kWeightBlockBytes / entry_bytes, 1, kMax);
  const int64_t classes = static_cast<int64_t>(a.order->class_begin.size()) - 1;
  for (int64_t k = 0; k < classes; ++k) {
    const int64_t phase = k / a.order->row_phases;  // column phase
    const int64_t begin = a.order->class_begin[k], entries = a.order->class_begin[k + 1] - begin;
    if (entries == 0) continue;
    const int64_t passes = CeilDiv(entries, group);
    int64_t first = begin;
    for (int64_t pass = 0; pass < passes; ++pass) {  // entries spread evenly over the passes
      const int64_t count = entries / passes + (pass < entries % passes ? 1 : 0);
      GatherSome<NV, kMax>(count, a, phase, first);
      first += count;
    }
  }
}

COMPRESSOR_CLONES void RunGather(const GatherCall& a) {
  switch (a.nv) {
    case 4: GatherImpl<4>(a); break;
    case 3: GatherImpl<3>(a); break;
    case 2: GatherImpl<2>(a); break;
    default: GatherImpl<1>(a); break;
  }
}

struct Scratchpad {
  std::vector<float> phase_image, differences, out, transposed, values;
  std::vector<int32_t> channels, starts;
  std::vector<const float*> windows;
  std::vector<float*> outs;
};

class DiffConvCpuKernel {
 public:
  static constexpr const char* kLabel = kDiffConvName;

  DiffConvCpuKernel(const OrtApi& api, const OrtKernelInfo* info)
      : attributes_(DiffConvAttributes::Read(info)),
        path_(PathFromEnvironment()),
        // COMPRESSOR_DIFFCONV_PORTABLE=1: the portable helpers even on AVX-512 (tests).
        avx512_(UseAvx512("COMPRESSOR_DIFFCONV_PORTABLE")) {
    // A constant weight is packed once.
    const ConstantWeight weight = ConstantWeight::Read(api, info);
    if (weight.data != nullptr) {
      const std::vector<int64_t>& shape = weight.shape;
      const EntryOrder order =
          EntryOrder::Make(shape[2], shape[3], attributes_.strides[0], attributes_.strides[1],
                           attributes_.dilations[0], attributes_.dilations[1]);
      packed_ = PackWeights(weight.data, shape[0], shape[1], shape[2], shape[3], order);
      packed_shape_ = shape;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    const ConvInputs in = ConvInputs::Read(raw_context);
    const DiffConvGeometry g =
        DiffConvGeometry::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::KernelContext context(raw_context);

    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    int64_t* counts_out = nullptr;
    if (context.GetOutputCount() > 1) {
      OrtValue* counts_value = nullptr;
      const int64_t counts_shape[] = {2};
      Check(api.KernelContext_GetOutput(raw_context, 1, counts_shape, 1, &counts_value));
      if (counts_value != nullptr) counts_out = Ort::UnownedValue(counts_value).GetTensorMutableData<int64_t>();
    }
    if (g.N == 0 || g.OH == 0 || g.OW == 0) {
      if (counts_out) counts_out[0] = counts_out[1] = 0;
      return;
    }
    Run(raw_context, g, in.x, in.w, in.bias, y.GetTensorMutableData<float>(), counts_out);
  }

  void Run(OrtKernelContext* context, const DiffConvGeometry& g, const float* x, const float* w,
           const float* bias, float* y, int64_t* counts_out) const {
    const bool constant_weight = !packed_.empty() && packed_shape_[0] == g.M &&
                                 packed_shape_[1] == g.C && packed_shape_[2] == g.kH &&
                                 packed_shape_[3] == g.kW;
    const EntryOrder order =
        EntryOrder::Make(g.kH, g.kW, g.stride_h, g.stride_w, g.dilation_h, g.dilation_w);
    std::vector<float> call_packed;
    if (!constant_weight) call_packed = PackWeights(w, g.M, g.C, g.kH, g.kW, order);
    const float* packed = constant_weight ? packed_.data() : call_packed.data();

    // Units: images x blocks of output rows, at least 3 per thread when the batch is small
    // (inline: one per image), and few enough rows that the unit's output buffer stays in L1.
    const bool inline_units = RunInline(g);  // small calls: on the calling thread
    const int64_t blocks_per_image =
        inline_units ? 1 : std::clamp<int64_t>(CeilDiv(3 * HardwareThreads(), g.N), 1, g.OH);
    const int64_t row_bytes = g.OW * std::min(kTileWidth, RoundUp(g.M, kLanes)) *
                              static_cast<int64_t>(sizeof(float));
    const int64_t rows_in_l1 = std::max<int64_t>(1, kBufferBytes / row_bytes);
    const int64_t rows_per_unit = std::min(CeilDiv(g.OH, blocks_per_image), rows_in_l1);
    const int64_t row_blocks = CeilDiv(g.OH, rows_per_unit);
    const int64_t total_units = g.N * row_blocks;

    std::atomic<int64_t> performed{0};
    const bool counting = counts_out != nullptr;
    ParallelUnits(inline_units ? nullptr : context, static_cast<size_t>(total_units), [&](size_t i) {
      const int64_t n = static_cast<int64_t>(i) / row_blocks;
      const int64_t rb = static_cast<int64_t>(i) % row_blocks;
      const int64_t oh0 = rb * rows_per_unit, oh1 = std::min(g.OH, oh0 + rows_per_unit);
      const int64_t counted = RunUnit(g, order, n, oh0, oh1, x, packed, bias, y, counting);
      if (counting) performed.fetch_add(counted, std::memory_order_relaxed);
    });
    if (counts_out) {
      counts_out[0] = performed.load() * g.M;
      counts_out[1] = g.DenseMultiplications();
    }
  }

  // Computes output rows [oh0, oh1) of image n; returns the multiplications per output
  // channel that the differential algorithm needs for them (only when counting).
  int64_t RunUnit(const DiffConvGeometry& g, const EntryOrder& order, int64_t n, int64_t oh0,
                  int64_t oh1, const float* x, const float* packed, const float* bias, float* y,
                  bool counting) const {
    thread_local Scratchpad s;
    const Geometry direct = Geometry::Of(g);
    const PhaseLayout layout = PhaseLayout::Make(direct, oh0, oh1);
    const EntryOffsets entry = MakeEntryOffsets(direct, layout, order);
    const int64_t rows = oh1 - oh0, K = g.K(), plane = g.OH * g.OW;
    const int64_t positions = layout.Size(), image_size = g.C * positions;
    if (image_size >= INT32_MAX) throw OpError("input too large for one unit", ORT_NOT_IMPLEMENTED);
    const float* image = x + n * g.C * g.H * g.W;

    float* phase_image = Scratch(s.phase_image, static_cast<size_t>(image_size));
    BuildPhaseImage(direct, layout, image, nullptr, g.C, phase_image, avx512_);
    const int64_t phase_rows = g.C * layout.Lists();

    Path path = path_;
    if (path == Path::kAuto) {
      // The kept fraction, estimated on up to 16 evenly spaced input channels.
      const int64_t step = std::max<int64_t>(1, g.C / 16);
      int64_t kept = 0, counted = 0;
      for (int64_t c = 0; c < g.C; c += step, counted += positions) {
        kept += CountDifferences(phase_image + c * positions, layout.Lists(), layout.length, g.threshold);
      }
      const double density = static_cast<double>(kept) / static_cast<double>(counted);
      path = density < SparseDensityLimit(g.C) ? Path::kSparse
             : g.threshold > 0.0f                 ? Path::kDense
                                                  : Path::kConv;
    }
    if (path == Path::kConv && g.threshold > 0.0f) path = Path::kDense;

    float* differences = nullptr;
    if (path == Path::kDense) {
      differences = Scratch(s.differences, static_cast<size_t>(image_size));
      BuildDifferenceImage(phase_image, phase_rows, layout.length, g.threshold, differences);
    }
    PositionLists lists{};
    if (path == Path::kSparse || counting) {
      lists.channels = Scratch(s.channels, static_cast<size_t>(image_size + kLanes));
      lists.values = Scratch(s.values, static_cast<size_t>(image_size + kLanes));
      lists.starts = Scratch(s.starts, static_cast<size_t>(positions + 1));
      if (avx512_) {
        float* transposed = Scratch(s.transposed, static_cast<size_t>(positions * RoundUp(g.C, kLanes)));
        BuildPositionListsAvx512(layout, g.C, phase_image, g.threshold, lists, transposed);
      } else {
        BuildPositionListsPortable(layout, g.C, phase_image, g.threshold, lists);
      }
    }

    // Output buffer: window-major, [rows][OW][width], width = the widest channel tile.
    const int64_t width = std::min(kTileWidth, RoundUp(g.M, kLanes));
    const int64_t row_stride = g.OW * width;
    float* out = Scratch(s.out, static_cast<size_t>(rows * row_stride));

    // Window lists for the micro-kernel: every window of the unit (conv, dense), and the
    // restart windows (dense, sparse), each as its first input float and its output.
    const int64_t per_row_restarts = CeilDiv(g.OW, g.restart);
    const int64_t all_windows = rows * g.OW;
    const int64_t listed = (path == Path::kSparse ? 0 : all_windows) +
                           (path == Path::kConv ? 0 : rows * per_row_restarts);
    const float** windows = Scratch(s.windows, static_cast<size_t>(listed));
    float** outs = Scratch(s.outs, static_cast<size_t>(listed));
    int64_t count = 0;
    const float* window_source = path == Path::kDense ? differences : phase_image;
    if (path != Path::kSparse) {
      for (int64_t row = 0; row < rows; ++row) {
        for (int64_t ow = 0; ow < g.OW; ++ow, ++count) {
          windows[count] = window_source + row * g.stride_h * layout.RowStride() + ow;
          outs[count] = out + row * row_stride + ow * width;
        }
      }
    }
    const int64_t restart_begin = count;
    if (path != Path::kConv) {
      for (int64_t row = 0; row < rows; ++row) {
        for (int64_t ow = 0; ow < g.OW; ow += g.restart, ++count) {
          windows[count] = phase_image + row * g.stride_h * layout.RowStride() + ow;
          outs[count] = out + row * row_stride + ow * width;
        }
      }
    }

    const int64_t tiles = CeilDiv(g.M, kTileWidth);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m0 = t * kTileWidth;
      const int64_t channels = std::min(kTileWidth, g.M - m0);
      const int nv = static_cast<int>(CeilDiv(channels, kLanes));
      const float* wp = packed + t * K * kTileWidth;
      ConvCall conv{windows, outs, restart_begin, wp, entry.offset.data(), g.kH * g.kW, g.C,
                    layout.ChannelStride(), nv};
      if (path == Path::kSparse) {
        std::memset(out, 0, sizeof(float) * rows * row_stride);
        RunGather(GatherCall{&g, &layout, &entry, &order, lists, wp, out, row_stride, width, rows, nv});
      } else {
        RunConv(conv);
      }
      if (path != Path::kConv) {
        conv.window = windows + restart_begin;
        conv.out = outs + restart_begin;
        conv.count = count - restart_begin;
        RunConv(conv);  // restart windows: overwrite
        PrefixSumRows(out, rows, row_stride, g.OW, g.restart, width, nv);
      }
      StoreTransposed(StoreCall{out, row_stride, width, g.OW, all_windows, channels, plane,
                                bias ? bias + m0 : nullptr, y + (n * g.M + m0) * plane + oh0 * g.OW});
    }
    if (!counting) return 0;
    return rows * per_row_restarts * K + CountKept(g, layout, entry, lists.starts, rows);
  }

  DiffConvAttributes attributes_;
  Path path_;
  bool avx512_;  // the AVX-512 helpers (masked loads, compress); the micro-kernels use target_clones
  std::vector<float> packed_;
  std::vector<int64_t> packed_shape_;
};

using DiffConvCpuOp = KernelOp<DiffConvCpuKernel, DiffConvSignature, Provider::kCpu>;

}  // namespace

void AddDiffConvCpu(Ort::CustomOpDomain& domain) { AddOp<DiffConvCpuOp>(domain); }

}  // namespace compressor

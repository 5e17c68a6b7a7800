// DirectConv CPU kernel (see direct_conv_op.h): the shared direct convolution
// (common/direct_conv.h) of every filter over every channel. Per (image, block of output rows):
// the phase image, then the row kernel (vectorised over output positions, for few filters) or
// the channel tiles (vectorised over 16 to 64 filters) as UseRowKernel chooses, each with its
// store adding the bias and the fused ReLU. Units run on ORT's intra-op thread pool (inline
// for small calls: RunInline). A constant weight is packed once, at session creation.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/conv_inputs.h"
#include "common/cpu_parallel.h"
#include "common/direct_conv.h"
#include "ops/direct_conv/direct_conv_op.h"

namespace compressor {
namespace {

using namespace direct_conv;

// A unit's phase image should stay in L2 (1 MiB here; half of it for the image) ...
constexpr int64_t kImageBytes = 512 * 1024;
// ... and its window-major output buffer (the channel tiles) in a quarter of it.
constexpr int64_t kBufferBytes = 256 * 1024;

// Weights as the kernels read them: the channel tiles' PackWeights, and for the row kernel
// W itself (stride 1: EntryOrder is plain (kh, kw) order, so W[m, c] is filter m's entries for
// channel c), read where it is: the session's constant, or the call's input.
struct PackedWeights {
  std::vector<int64_t> shape;  // [M, C, kH, kW]; empty: nothing packed
  std::vector<float> tiles;
  const float* by_filter = nullptr;

  static PackedWeights Make(const float* w, const std::vector<int64_t>& shape) {
    PackedWeights p;
    p.shape = shape;
    const EntryOrder order = EntryOrder::Make(shape[2], shape[3], 1, 1, 1, 1);
    p.tiles = PackWeights(w, shape[0], shape[1], shape[2], shape[3], order);
    p.by_filter = w;
    return p;
  }
};

// Which kernel computes a call: UseRowKernel's choice, or the one
// COMPRESSOR_DIRECT_CONV_KERNEL names (rows, tiles), so tests run both kernels on every shape.
enum class KernelChoice { kAuto, kRows, kTiles };

KernelChoice KernelFromEnvironment() {
  return static_cast<KernelChoice>(
      ChoiceFromEnvironment("COMPRESSOR_DIRECT_CONV_KERNEL", {"auto", "rows", "tiles"}));
}

// Y's rows [pr0, pr0 + rows / 2) of one channel from `rows` (even) unpooled rows of width OW
// at `source`: the max of each 2x2 block (floor: an odd last column is dropped).
COMPRESSOR_CLONES void MaxPool2x2Rows(const float* source, int64_t rows, int64_t OW,
                                      int64_t PW, float* y) {
  for (int64_t pr = 0; pr < rows / 2; ++pr) {
    const float* r0 = source + 2 * pr * OW;
    const float* r1 = r0 + OW;
    float* to = y + pr * PW;
    int64_t pw = 0;
    for (; pw + kLanes <= PW; pw += kLanes) {
      const Vec16 a = Load16(r0 + 2 * pw), b = Load16(r0 + 2 * pw + kLanes);
      const Vec16 c = Load16(r1 + 2 * pw), d = Load16(r1 + 2 * pw + kLanes);
      const Vec16 top = a > c ? a : c, bottom = b > d ? b : d;
      const Vec16 even = __builtin_shufflevector(top, bottom, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
                                                 20, 22, 24, 26, 28, 30);
      const Vec16 odd = __builtin_shufflevector(top, bottom, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19,
                                                21, 23, 25, 27, 29, 31);
      Store16(to + pw, even > odd ? even : odd);
    }
    for (; pw < PW; ++pw) {
      to[pw] = std::max(std::max(r0[2 * pw], r0[2 * pw + 1]), std::max(r1[2 * pw], r1[2 * pw + 1]));
    }
  }
}

// The reference: a plain loop over every output, summing in double, then the pool.
void RunReference(const DirectConvShape& g, const float* x, const float* w, const float* bias,
                  bool relu, float* y) {
  std::vector<float> conv;
  float* out = y;
  if (g.pool) {
    conv.resize(static_cast<size_t>(g.N * g.M * g.OH * g.OW));
    out = conv.data();
  }
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t m = 0; m < g.M; ++m) {
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          double s = bias != nullptr ? bias[m] : 0.0;
          for (int64_t c = 0; c < g.C; ++c) {
            for (int64_t kh = 0; kh < g.kH; ++kh) {
              const int64_t ih = oh - g.pad_top + kh;
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t kw = 0; kw < g.kW; ++kw) {
                const int64_t iw = ow - g.pad_left + kw;
                if (iw < 0 || iw >= g.W) continue;
                s += double(x[((n * g.C + c) * g.H + ih) * g.W + iw]) *
                     w[((m * g.C + c) * g.kH + kh) * g.kW + kw];
              }
            }
          }
          if (relu && s < 0) s = 0;
          out[((n * g.M + m) * g.OH + oh) * g.OW + ow] = static_cast<float>(s);
        }
      }
    }
  }
  if (!g.pool) return;
  for (int64_t nm = 0; nm < g.N * g.M; ++nm) {
    for (int64_t ph = 0; ph < g.PH; ++ph) {
      for (int64_t pw = 0; pw < g.PW; ++pw) {
        const float* at = out + (nm * g.OH + 2 * ph) * g.OW + 2 * pw;
        y[(nm * g.PH + ph) * g.PW + pw] =
            std::max(std::max(at[0], at[1]), std::max(at[g.OW], at[g.OW + 1]));
      }
    }
  }
}

class DirectConvCpuKernel {
 public:
  static constexpr const char* kLabel = kDirectConvName;

  DirectConvCpuKernel(const OrtApi& api, const OrtKernelInfo* info)
      : attributes_(ReadStrideOneAttributes(info)),
        relu_(ReadDirectConvActivation(info) == DirectConvActivation::kRelu),
        pool_(ReadDirectConvPool(info)),
        reference_(ReferenceStagesFromEnvironment("COMPRESSOR_DIRECT_CONV_REFERENCE")),
        avx512_(UseAvx512("COMPRESSOR_DIRECT_CONV_PORTABLE")),
        kernel_(KernelFromEnvironment()) {
    // A constant weight (the usual case: an initializer) is packed once, at session creation.
    const ConstantWeight weight = ConstantWeight::Read(api, info);
    if (weight.data != nullptr) constant_ = PackedWeights::Make(weight.data, weight.shape);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const ConvInputs in = ConvInputs::Read(raw_context);
    const DirectConvShape g =
        DirectConvShape::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape(), pool_);
    Ort::KernelContext context(raw_context);
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.PH, g.PW});
    if (g.N == 0 || g.PH == 0 || g.PW == 0) return;
    float* out = y.GetTensorMutableData<float>();
    if (reference_) {
      RunReference(g, in.x, in.w, in.bias, relu_, out);
      return;
    }
    PackedWeights call_packed;
    const PackedWeights* packed = &constant_;
    if (constant_.shape != in.w_shape) {
      call_packed = PackedWeights::Make(in.w, in.w_shape);
      packed = &call_packed;
    }
    Run(raw_context, g, in.x, *packed, in.bias, out);
  }

  void Run(OrtKernelContext* context, const DirectConvShape& g, const float* x,
           const PackedWeights& packed, const float* bias, float* y) const {
    const bool inline_units = RunInline(g);
    const int64_t threads = inline_units ? 1 : HardwareThreads();
    const bool by_rows = kernel_ == KernelChoice::kAuto ? UseRowKernel(g, g.M, g.C)
                                                        : kernel_ == KernelChoice::kRows;
    // Output rows per unit: the phase image within kImageBytes and the channel tiles' buffer
    // within kBufferBytes, and at most an even share of the call over 2 units per thread.
    int64_t rows = std::max<int64_t>(1, kImageBytes / (4 * g.C * g.Wp) - (g.kH - 1));
    if (!by_rows) {
      rows = std::min(rows, std::max<int64_t>(1, kBufferBytes / (4 * g.Wp * kTileWidth)));
    }
    // With the pool, the rows the pool reads (an odd last one is not) in even blocks.
    const int64_t computed = g.pool ? 2 * g.PH : g.OH;
    rows = std::min(rows, (g.N * computed + 2 * threads - 1) / (2 * threads));
    rows = std::clamp<int64_t>(rows, 1, computed);
    if (g.pool) rows = std::max<int64_t>(2, rows / 2 * 2);
    const int64_t blocks = (computed + rows - 1) / rows;
    ParallelUnits(inline_units ? nullptr : context, static_cast<size_t>(g.N * blocks),
                  [&](size_t i) {
                    const int64_t unit = static_cast<int64_t>(i);
                    const int64_t oh0 = (unit % blocks) * rows;
                    RunUnit(g, by_rows, unit / blocks, oh0, std::min(computed, oh0 + rows), x,
                            packed, bias, y);
                  });
  }

  // Output rows [oh0, oh1) of image n: the phase image, then the row kernel per group of up
  // to kRowFilters filters or the channel tiles per 64 filters (as LSHConv's dense case).
  void RunUnit(const DirectConvShape& g, bool by_rows, int64_t n, int64_t oh0, int64_t oh1,
               const float* x, const PackedWeights& packed, const float* bias, float* y) const {
    thread_local std::vector<float> phase_buffer, out_buffer, pool_buffer;
    thread_local std::vector<int32_t> channels;
    const Geometry direct = Geometry::Of(g);
    const EntryOrder order = EntryOrder::Make(direct);
    const PhaseLayout layout = PhaseLayout::Make(direct, oh0, oh1);
    const EntryOffsets entry = MakeEntryOffsets(direct, layout, order);
    const int64_t E = g.kH * g.kW, rows = oh1 - oh0;
    // The stores write channel m at out + m * plane: Y's rows, or with the pool the unit's
    // scratch of unpooled rows, pooled into Y at the end.
    int64_t plane = g.OH * g.OW;
    float* out = y + n * g.M * plane + oh0 * g.OW;
    if (g.pool) {
      plane = rows * g.OW;
      out = Scratch(pool_buffer, static_cast<size_t>(g.M * plane));
    }
    auto pool_into_y = [&] {
      if (!g.pool) return;
      for (int64_t m = 0; m < g.M; ++m) {
        MaxPool2x2Rows(out + m * plane, rows, g.OW, g.PW,
                       y + ((n * g.M + m) * g.PH + oh0 / 2) * g.PW);
      }
    };
    // The row kernel's junk lanes of the last chunk read up to a chunk plus a kernel row's
    // span past the last channel: slack, zeroed.
    const int64_t image_size = g.C * layout.Size(), slack = kRowChunk + g.kW;
    float* phase_image = Scratch(phase_buffer, static_cast<size_t>(image_size + slack));
    BuildPhaseImage(direct, layout, x + n * g.C * g.H * g.W, nullptr, g.C, phase_image, avx512_);

    if (by_rows) {
      std::memset(phase_image + image_size, 0, sizeof(float) * slack);
      if (static_cast<int64_t>(channels.size()) != g.C) {
        channels.resize(static_cast<size_t>(g.C));
        for (int64_t c = 0; c < g.C; ++c) channels[c] = static_cast<int32_t>(c);
      }
      const int64_t positions = rows * layout.length;
      const int64_t stride = RoundUp(positions, kRowStrideMultiple);
      float* buffer = Scratch(out_buffer, static_cast<size_t>(kRowFilters * stride));
      // Groups as even as possible (11 filters: 6 + 5, not 8 + 3).
      const int64_t groups = CeilDiv(g.M, kRowFilters), widest = CeilDiv(g.M, groups);
      for (int64_t m0 = 0; m0 < g.M; m0 += widest) {
        const int group = static_cast<int>(std::min<int64_t>(widest, g.M - m0));
        const float* weights[kRowFilters];
        for (int f = 0; f < group; ++f) weights[f] = packed.by_filter + (m0 + f) * g.C * E;
        RunRows(RowCall{phase_image, positions, layout.ChannelStride(), entry.offset.data(), E,
                        weights, channels.data(), g.C, buffer, stride, group});
        for (int f = 0; f < group; ++f) {
          StoreRows(buffer + f * stride, layout.length, rows, g.OW,
                    bias != nullptr ? bias[m0 + f] : 0.0f, out + (m0 + f) * plane, relu_);
        }
      }
      pool_into_y();
      return;
    }

    // Window-major buffer [rows][length][width]: the windows go to the micro-kernel as one run
    // of consecutive phase-image positions, row after row with the padding columns' junk
    // windows in between (computed, never stored).
    const int64_t width = std::min(kTileWidth, RoundUp(g.M, kLanes));
    const int64_t row_stride = layout.length * width;
    float* buffer = Scratch(out_buffer, static_cast<size_t>(rows * row_stride));
    const float* windows[1] = {phase_image};
    float* outs[1] = {buffer};
    const int64_t listed = (rows - 1) * layout.length + g.OW;
    for (int64_t m0 = 0; m0 < g.M; m0 += kTileWidth) {
      const int64_t tile_filters = std::min(kTileWidth, g.M - m0);
      RunConv(ConvCall{windows, outs, listed, packed.tiles.data() + (m0 / kTileWidth) * g.C * E * kTileWidth,
                       entry.offset.data(), E, g.C, layout.ChannelStride(),
                       static_cast<int>(CeilDiv(tile_filters, kLanes)), true, width});
      StoreTransposed(StoreCall{buffer, row_stride, width, g.OW, rows * g.OW, tile_filters, plane,
                                bias != nullptr ? bias + m0 : nullptr, out + m0 * plane, nullptr,
                                relu_});
    }
    pool_into_y();
  }

  Conv2dAttributes attributes_;
  bool relu_;
  bool pool_;
  bool reference_;
  bool avx512_;  // the AVX-512 phase image; the micro-kernels use target_clones
  KernelChoice kernel_;
  PackedWeights constant_;
};

using DirectConvCpuOp = KernelOp<DirectConvCpuKernel, DirectConvSignature, Provider::kCpu>;

}  // namespace

DirectConvActivation ReadDirectConvActivation(const OrtKernelInfo* info) {
  const std::string value = AttributeString(info, "activation", "");
  if (value.empty()) return DirectConvActivation::kNone;
  if (value == "Relu") return DirectConvActivation::kRelu;
  throw OpError("activation must be \"\" or \"Relu\", got '" + value + "'", ORT_NOT_IMPLEMENTED);
}

bool ReadDirectConvPool(const OrtKernelInfo* info) {
  const std::vector<int64_t> pool = AttributeInts(info, "pool", {});
  if (pool.empty()) return false;
  if (pool.size() == 2 && pool[0] == 2 && pool[1] == 2) return true;
  throw OpError("pool must be [] or [2, 2] (a 2x2 stride-2 MaxPool), got " + ShapeString(pool),
                ORT_NOT_IMPLEMENTED);
}

void AddDirectConvCpu(Ort::CustomOpDomain& domain) { AddOp<DirectConvCpuOp>(domain); }

}  // namespace compressor

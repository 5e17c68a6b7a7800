// Im2colConv CPU kernel: per (image, group, block of output rows), the block's im2col matrix P
// (conv2d.h's Im2Col, sized to stay in L2) and one GEMM W_g @ P into Y through our
// single-threaded GEMM wrapper (common/gemm.h, OpenBLAS), the units on ORT's intra-op thread
// pool (inline for small calls: RunInline). COMPRESSOR_IM2COL_REFERENCE=1 runs the plain
// references of both stages (an im2col loop and a GEMM summing in double).
#include <algorithm>
#include <vector>

#include "common/conv_inputs.h"
#include "common/cpu_parallel.h"
#include "common/gemm.h"
#include "ops/im2col_conv/im2col_conv.h"

namespace compressor {
namespace {

// A unit's P should stay in L2 (1 MiB here) ...
constexpr int64_t kUnitBytes = 1 << 20;
// ... but give the GEMM at least this many columns where the layer has them.
constexpr int64_t kMinUnitColumns = 256;

// Reference im2col: P[((c * kH + kh) * kW + kw) * ld + (oh - oh0) * OW + ow] for channels
// [0, count) of `image`, output rows [oh0, oh1).
void Im2ColReference(const Im2colConvShape& g, const float* image, int64_t count, int64_t oh0,
                     int64_t oh1, float* P, int64_t ld) {
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        float* row = P + ((c * g.kH + kh) * g.kW + kw) * ld;
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h;
            const int64_t iw = ow * g.stride_w - g.pad_left + kw * g.dilation_w;
            const bool inside = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
            row[(oh - oh0) * g.OW + ow] = inside ? image[(c * g.H + ih) * g.W + iw] : 0.0f;
          }
        }
      }
    }
  }
}

// Reference GEMM: C[M, N] (+)= A[M, K] @ B[K, N], summed in double.
void GemmReference(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                   int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double s = accumulate ? C[i * ldc + j] : 0.0;
      for (int64_t k = 0; k < K; ++k) s += double(A[i * lda + k]) * B[k * ldb + j];
      C[i * ldc + j] = static_cast<float>(s);
    }
  }
}

class Im2colConvCpuKernel {
 public:
  static constexpr const char* kLabel = kIm2colConvName;

  Im2colConvCpuKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(Conv2dAttributes::Read(info, /*any_group=*/true)),
        reference_(ReferenceStagesFromEnvironment("COMPRESSOR_IM2COL_REFERENCE")) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const ConvInputs in = ConvInputs::Read(raw_context);
    const Im2colConvShape g =
        Im2colConvShape::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::KernelContext context(raw_context);
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    if (g.N == 0 || g.OH == 0 || g.OW == 0) return;
    Run(raw_context, g, in.x, in.w, in.bias, y.GetTensorMutableData<float>());
  }

  void Run(OrtKernelContext* context, const Im2colConvShape& g, const float* x, const float* w,
           const float* bias, float* y) const {
    const bool inline_units = RunInline(g);
    const int64_t threads = inline_units ? 1 : HardwareThreads();
    // Output rows per unit: P within kUnitBytes, at least kMinUnitColumns columns, and at
    // most an even share of the call over 2 units per thread.
    const int64_t images = g.N * g.group;
    int64_t columns = std::max(kMinUnitColumns, kUnitBytes / (4 * g.D()));
    columns = std::min(columns, (images * g.OH * g.OW + 2 * threads - 1) / (2 * threads));
    const int64_t rows = std::clamp<int64_t>((columns + g.OW - 1) / g.OW, 1, g.OH);
    const int64_t blocks = (g.OH + rows - 1) / rows;
    ParallelUnits(inline_units ? nullptr : context, static_cast<size_t>(images * blocks),
                  [&](size_t i) {
                    const int64_t unit = static_cast<int64_t>(i);
                    const int64_t oh0 = (unit % blocks) * rows;
                    RunUnit(g, unit / blocks, oh0, std::min(g.OH, oh0 + rows), x, w, bias, y);
                  });
  }

  // Output rows [oh0, oh1) of image n's group `image_group % group` (image_group = n * group
  // + group index).
  void RunUnit(const Im2colConvShape& g, int64_t image_group, int64_t oh0, int64_t oh1,
               const float* x, const float* w, const float* bias, float* y) const {
    thread_local std::vector<float> scratch;
    const int64_t n = image_group / g.group, group = image_group % g.group;
    const int64_t Cg = g.GroupChannels(), Mg = g.GroupFilters(), D = g.D();
    const int64_t plane = g.OH * g.OW, columns = (oh1 - oh0) * g.OW;
    const float* image = x + (n * g.C + group * Cg) * g.H * g.W;
    const float* P;
    int64_t ld;
    if (g.Pointwise()) {  // P is the image: its rows are the channels
      P = image + oh0 * g.OW;
      ld = g.H * g.W;
    } else {
      float* buffer = Scratch(scratch, static_cast<size_t>(D * columns));
      if (reference_) {
        Im2ColReference(g, image, Cg, oh0, oh1, buffer, columns);
      } else {
        Im2Col(g, image, nullptr, Cg, oh0, oh1, buffer, columns);
      }
      P = buffer;
      ld = columns;
    }
    float* out = y + (n * g.M + group * Mg) * plane + oh0 * g.OW;
    if (bias != nullptr) {
      for (int64_t k = 0; k < Mg; ++k) std::fill_n(out + k * plane, columns, bias[group * Mg + k]);
    }
    const float* filters = w + group * Mg * D;
    if (reference_) {
      GemmReference(Mg, columns, D, filters, D, P, ld, out, plane, bias != nullptr);
    } else {
      Sgemm(static_cast<int>(Mg), static_cast<int>(columns), static_cast<int>(D), filters,
            static_cast<int>(D), P, static_cast<int>(ld), out, static_cast<int>(plane),
            bias != nullptr);
    }
  }

  Conv2dAttributes attributes_;
  bool reference_;
};

using Im2colConvCpuOp = KernelOp<Im2colConvCpuKernel, Im2colConvSignature, Provider::kCpu>;

}  // namespace

void AddIm2colConvCpu(Ort::CustomOpDomain& domain) { AddOp<Im2colConvCpuOp>(domain); }

}  // namespace compressor

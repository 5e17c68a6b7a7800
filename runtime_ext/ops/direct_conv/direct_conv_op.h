// DirectConv: ONNX Conv for 2-D inputs (stride 1, dilation 1, group 1, pads, optional bias)
// computed directly, vectorised over output positions, with an optional fused ReLU. It is the
// algorithm for layers with few channels, where channel-blocked kernels waste vector lanes:
// MLAS's NCHWc convolution runs 1 or 6 channels as a block of 16 (LeNet-5's and the zoo's
// first layers), and an im2col GEMM with M = 6 rows is a poor shape.
//
// Inputs:  X [N, C, H, W] float, W [M, C, kH, kW] float (the Conv's own weights), B [M] float
//          (optional).
// Outputs: Y [N, M, OH, OW] float; with `pool`, Y [N, M, OH / 2, OW / 2].
// Attributes: pads, kernel_shape (checked), strides and dilations (1 only), group (1 only),
//             activation: "" (none, the default) or "Relu" (y = max(conv + bias, 0)),
//             pool: [] (none, the default) or [2, 2]: a fused MaxPool (kernel 2x2, stride 2,
//             no pads, floor) after the activation, as LeNet-style Conv-Relu-MaxPool blocks run;
//             the unpooled rows stay in the unit's cache-resident scratch, never in memory.
//
// It is the shared direct convolution of common/direct_conv.h (LSHConv's kernels, with every
// filter selected and every channel active) as an op: per image and block of output rows, a
// zero-padded phase image, then either the row kernel (lanes over consecutive output
// positions, weights broadcast: any number of filters fills the lanes; the padding columns'
// positions are computed and dropped) or the channel tiles (lanes over 16 to 64 filters,
// inputs broadcast) as UseRowKernel chooses; the stores add the bias and apply the ReLU.
// COMPRESSOR_DIRECT_CONV_REFERENCE=1 runs a plain loop summing in double instead.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/conv_inputs.h"
#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

inline constexpr const char* kDirectConvName = "DirectConv";

// The op as ORT sees it: inputs X, W, B (optional); output Y.
struct DirectConvSignature : ConvSignature {
  static constexpr const char* kName = kDirectConvName;
};

// Sizes of one call: Conv2dShape's (stride 1, dilation 1, group 1), plus the padded plane
// width, within 32-bit sizes.
struct DirectConvShape : Conv2dShape {
  int64_t Wp = 0;  // W + pad_left + pad_right: a padded row, the stride between output rows
  bool pool = false;  // a fused 2x2 stride-2 MaxPool: Y is [N, M, PH, PW]
  int64_t PH = 0, PW = 0;  // Y's map: OH x OW, or OH / 2 x OW / 2 with the pool

  static DirectConvShape Make(const Conv2dAttributes& a, const std::vector<int64_t>& x,
                              const std::vector<int64_t>& w, const std::vector<int64_t>* bias,
                              bool pool = false) {
    DirectConvShape g{};
    static_cast<Conv2dShape&>(g) = Conv2dShape::FromShapes(a, x, w, bias);
    g.Wp = g.W + a.pads[1] + a.pads[3];
    g.pool = pool;
    g.PH = pool ? g.OH / 2 : g.OH;
    g.PW = pool ? g.OW / 2 : g.OW;
    if (g.D() > INT32_MAX / 64 || (g.H + a.pads[0] + a.pads[2]) * g.Wp > INT32_MAX / 64 ||
        g.M > INT32_MAX / 64 || g.M * g.OH * g.Wp > INT32_MAX / 4) {
      throw OpError("shape too large: X " + ShapeString(x) + ", W " + ShapeString(w),
                    ORT_NOT_IMPLEMENTED);
    }
    return g;
  }
};

// The fused activation: none, or ReLU.
enum class DirectConvActivation { kNone, kRelu };

// Reads the `activation` attribute; throws OpError naming an unknown value.
DirectConvActivation ReadDirectConvActivation(const OrtKernelInfo* info);

// Reads the `pool` attribute: false for [] (or absent), true for [2, 2]; throws OpError for any
// other value.
bool ReadDirectConvPool(const OrtKernelInfo* info);

// Registration hook: adds the CPU kernel to the op domain.
void AddDirectConvCpu(Ort::CustomOpDomain& domain);

}  // namespace compressor

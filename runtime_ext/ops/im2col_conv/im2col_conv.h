// Im2colConv: ONNX Conv for 2-D inputs (strides, pads, dilations, group, optional bias) as
// im2col + GEMM, the textbook baseline the faster algorithms are measured against.
//
// Inputs:  X [N, C, H, W] float, W [M, C / group, kH, kW] float (the Conv's own weights),
//          B [M] float (optional).
// Outputs: Y [N, M, OH, OW] float.
// Attributes: strides, pads, dilations, kernel_shape (checked), group (any divisor of C and M).
//
// Per image n and group g, with D = C / group * kH * kW:
//   P[d][oh * OW + ow] = x[n, g C/group + c, ih, iw]   im2col (0 in the padding), d = (c, kh, kw)
//   Y[n, g M/group + k] = W_g [M/group x D] @ P [D x OH OW] (+ bias)
// A 1x1 stride-1 unpadded convolution needs no im2col: P is the image itself. The CPU kernel
// cuts the output columns into blocks whose P fits L2 and runs the GEMMs through
// common/gemm.h on ORT's thread pool; COMPRESSOR_IM2COL_REFERENCE=1 runs plain loops (the
// reference) instead. The CUDA kernel fuses the im2col into the B-tile loads of a tiled
// shared-memory GEMM (implicit im2col: P is never written out).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/conv_inputs.h"
#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

inline constexpr const char* kIm2colConvName = "Im2colConv";

// The op as ORT sees it: inputs X, W, B (optional); output Y.
struct Im2colConvSignature : ConvSignature {
  static constexpr const char* kName = kIm2colConvName;
};

// Sizes of one call: Conv2dShape's (any group), within the 32-bit sizes the GEMMs take.
struct Im2colConvShape : Conv2dShape {
  int64_t GroupChannels() const { return C / group; }  // input channels per group
  int64_t GroupFilters() const { return M / group; }   // output channels per group
  int64_t D() const { return GroupChannels() * kH * kW; }  // GEMM depth (an im2col column)
  // Whether P is the image itself: 1x1 kernel, stride 1, no padding.
  bool Pointwise() const {
    return kH == 1 && kW == 1 && stride_h == 1 && stride_w == 1 && pad_top == 0 &&
           pad_left == 0 && OH == H && OW == W;
  }

  static Im2colConvShape Make(const Conv2dAttributes& a, const std::vector<int64_t>& x,
                              const std::vector<int64_t>& w, const std::vector<int64_t>* bias) {
    Im2colConvShape g{};
    static_cast<Conv2dShape&>(g) = Conv2dShape::FromShapes(a, x, w, bias);
    if (g.D() > INT32_MAX / 64 || g.OH * g.OW > INT32_MAX / 64 || g.M > INT32_MAX / 64 ||
        g.C * g.H * g.W > INT32_MAX || g.M * g.OH * g.OW > INT32_MAX) {
      throw OpError("shape too large: X " + ShapeString(x) + ", W " + ShapeString(w),
                    ORT_NOT_IMPLEMENTED);
    }
    return g;
  }
};

// Registration hooks: each adds its kernel to the op domain.
void AddIm2colConvCpu(Ort::CustomOpDomain& domain);

#if COMPRESSOR_WITH_CUDA
void AddIm2colConvCuda(Ort::CustomOpDomain& domain);

// Launches the CUDA kernel on `stream` (ORT's compute stream). Returns an empty string on
// success, else the CUDA error.
std::string LaunchIm2colConvCuda(const Im2colConvShape& g, const float* x, const float* w,
                                 const float* bias, float* y, void* stream);
#else
inline void AddIm2colConvCuda(Ort::CustomOpDomain&) {}  // built without CUDA: nothing to add
#endif

}  // namespace compressor

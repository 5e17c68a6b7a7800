// WinogradConv: ONNX Conv for 3x3 kernels at stride 1 (any pads, group 1, optional bias), computed
// by Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016), m = `tile` (2 or 4).
//
// Inputs:  X [N, C, H, W] float, W [M, C, 3, 3] float (the Conv's own weights), B [M] (optional).
// Outputs: Y [N, M, OH, OW] float.
// Attributes: pads (any, asymmetric), strides / dilations (must be 1), kernel_shape (3x3 when
//   given), group (must be 1), tile (2: F(2x2,3x3), 4: F(4x4,3x3); default 4).
//
// The output is cut into m x m tiles (partial tiles at the bottom and right edges: their
// outputs beyond OH/OW are computed on zeros and dropped). With alpha = m + 2:
//   U[xi][c][k] = (G g[k][c] G^T)[xi]             weights, transformed once (a constant W: when
//                                                 the session creates the kernel)
//   V[xi][t][c] = (B^T d[t][c] B)[xi]             input transform of each alpha x alpha patch
//   M[xi][t][k] = sum_c V[xi][t][c] U[xi][c][k]   alpha^2 GEMMs [tiles x C] x [C x M]
//   Y[t][k]     = A^T M[.][t][k] A (+ bias)        output transform
// The three stages are separate functions (NNPACK's structure), each with a plain reference
// (COMPRESSOR_WINOGRAD_REFERENCE=1 runs the references: tests check both against ORT's Conv).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/conv_inputs.h"
#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

inline constexpr const char* kWinogradConvName = "WinogradConv";

// The op as ORT sees it: inputs X, W, B (optional); output Y.
struct WinogradConvSignature : ConvSignature {
  static constexpr const char* kName = kWinogradConvName;
};

// Conv's attributes restricted to what Winograd computes (common/conv_inputs.h: stride 1,
// dilation 1, 3x3), plus the tile size.
struct WinogradConvAttributes : Conv2dAttributes {
  int64_t tile = 4;

  // Reads and validates the node's attributes; throws OpError naming the bad one.
  static WinogradConvAttributes Read(const OrtKernelInfo* info) {
    WinogradConvAttributes a;
    a.tile = AttributeInt(info, "tile", a.tile);
    if (a.tile != 2 && a.tile != 4) {
      throw OpError("tile must be 2 (F(2x2,3x3)) or 4 (F(4x4,3x3)), got " +
                    std::to_string(a.tile));
    }
    static_cast<Conv2dAttributes&>(a) = ReadStrideOneAttributes(info, /*kernel_size=*/3);
    return a;
  }
};

// Sizes of one call: Conv2dShape's, checked for a 3x3 kernel, and the tile grid.
struct WinogradConvShape : Conv2dShape {
  int64_t m;      // output tile size (2 or 4)
  int64_t alpha;  // input tile size m + 2
  int64_t tiles_h, tiles_w;

  static WinogradConvShape Make(const WinogradConvAttributes& a, const std::vector<int64_t>& x,
                                const std::vector<int64_t>& w, const std::vector<int64_t>* bias) {
    if (w.size() == 4 && (w[2] != 3 || w[3] != 3)) {
      throw OpError("weight W " + ShapeString(w) + " is not a 3x3 kernel (only 3x3 is supported)",
                    ORT_NOT_IMPLEMENTED);
    }
    WinogradConvShape g{};
    static_cast<Conv2dShape&>(g) = Conv2dShape::FromShapes(a, x, w, bias);
    g.m = a.tile;
    g.alpha = a.tile + 2;
    g.tiles_h = (g.OH + g.m - 1) / g.m;
    g.tiles_w = (g.OW + g.m - 1) / g.m;
    // The GEMM takes 32-bit sizes.
    if (g.C > INT32_MAX / 64 || g.M > INT32_MAX / 64 || g.tiles_w * (g.C + 16) > INT32_MAX / 64) {
      throw OpError("shape too large: X " + ShapeString(x) + ", W " + ShapeString(w),
                    ORT_NOT_IMPLEMENTED);
    }
    return g;
  }
};

// Registration hooks: each adds its kernel to the op domain.
void AddWinogradConvCpu(Ort::CustomOpDomain& domain);

#if COMPRESSOR_WITH_CUDA
void AddWinogradConvCuda(Ort::CustomOpDomain& domain);

// Launches the CUDA kernels (winograd_conv_kernel.cu: weight transform, input transform, the
// alpha^2 transform-domain GEMMs, output transform) on `stream` (ORT's compute stream).
// Returns an empty string on success, else the CUDA error.
std::string LaunchWinogradConvCuda(const WinogradConvShape& g, const float* x, const float* w,
                                   const float* bias, float* y, void* stream);
#else
inline void AddWinogradConvCuda(Ort::CustomOpDomain&) {}  // built without CUDA: nothing to add
#endif

}  // namespace compressor

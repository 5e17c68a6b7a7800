// DiffConv: ONNX Conv semantics for 2-D inputs (strides, pads, dilations, group 1, optional
// bias), computed differentially along each output row.
//
// Inputs:  X [N, C, H, W] float, W [M, C, kH, kW] float, B [M] float (optional).
// Outputs: Y [N, M, OH, OW] float; multiplications (optional) int64 [performed, dense].
// Attributes: strides, pads, dilations, kernel_shape (checked), group (must be 1),
//   threshold (float, default 0), restart (int, default 16).
//
// Along an output row, window ow = 0, restart, 2*restart, ... is computed directly (every
// kernel entry multiplied: the restart bounds rounding drift and threshold error); each other
// window is the previous window's result plus the kernel applied to the difference between
// its input patch and the previous window's patch, skipping differences with |d| <= threshold.
// threshold = 0 is exact up to float rounding. "performed" counts the multiplications this
// algorithm needs: every entry of each restart window plus each kept difference.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

inline constexpr const char* kDiffConvName = "DiffConv";

// The op as ORT sees it (common/ort_op.h, KernelOp): inputs X, W, B (optional); outputs Y, counts
// (optional).
struct DiffConvSignature {
  static constexpr const char* kName = kDiffConvName;
  static constexpr ONNXTensorElementDataType kInputs[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kFirstOptionalInput = 2;
  static constexpr ONNXTensorElementDataType kOutputs[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64};
  static constexpr size_t kFirstOptionalOutput = 1;
};

// Conv's attributes (validated as for the LSH ops), plus threshold and restart.
struct DiffConvAttributes : Conv2dAttributes {
  float threshold = 0.0f;
  int64_t restart = 16;

  // Reads and validates the node's attributes; throws OpError naming the bad one.
  static DiffConvAttributes Read(const OrtKernelInfo* info) {
    DiffConvAttributes a;
    static_cast<Conv2dAttributes&>(a) = Conv2dAttributes::Read(info);
    a.threshold = AttributeFloat(info, "threshold", a.threshold);
    a.restart = AttributeInt(info, "restart", a.restart);
    if (!std::isfinite(a.threshold) || a.threshold < 0.0f) {
      throw OpError("threshold must be a finite float >= 0, got " + std::to_string(a.threshold));
    }
    if (a.restart < 1) {
      throw OpError("restart must be >= 1, got " + std::to_string(a.restart));
    }
    return a;
  }
};

// Sizes of one DiffConv call, validated against the attributes (as Conv2dShape's), plus the
// threshold and restart interval.
struct DiffConvGeometry : Conv2dShape {
  int64_t restart;
  float threshold;

  int64_t K() const { return D(); }  // multiplications per output
  int64_t DenseMultiplications() const { return N * M * OH * OW * K(); }

  static DiffConvGeometry Make(const DiffConvAttributes& a, const std::vector<int64_t>& x,
                               const std::vector<int64_t>& w, const std::vector<int64_t>* bias) {
    DiffConvGeometry g{};
    static_cast<Conv2dShape&>(g) = Conv2dShape::FromShapes(a, x, w, bias);
    g.restart = a.restart;
    g.threshold = a.threshold;
    // The CPU kernel indexes its position lists with 32-bit ints.
    if (g.K() * g.OH * g.OW > INT32_MAX || g.M * g.K() > INT32_MAX) {
      throw OpError("shape too large: X " + ShapeString(x) + ", W " + ShapeString(w),
                    ORT_NOT_IMPLEMENTED);
    }
    return g;
  }
};

// Registration hooks: each adds its kernel(s) to the op domain.
void AddDiffConvCpu(Ort::CustomOpDomain& domain);

#if COMPRESSOR_WITH_CUDA
void AddDiffConvCuda(Ort::CustomOpDomain& domain);

// Launches the CUDA kernels on `stream` (ORT's compute stream). Returns an empty string on
// success, else the CUDA error. counts: device int64[2] or nullptr.
std::string LaunchDiffConvCuda(const DiffConvGeometry& g, const float* x, const float* w,
                               const float* bias, float* y, int64_t* counts, void* stream);
#else
inline void AddDiffConvCuda(Ort::CustomOpDomain&) {}  // built without CUDA: nothing to add
#endif

}  // namespace compressor

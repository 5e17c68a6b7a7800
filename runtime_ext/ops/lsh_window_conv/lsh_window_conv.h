// LSHWindowConv: a 2-D convolution that groups similar input windows (im2col columns) of each
// sample by SimHash and computes one result per group (the Differential & LSH report's LSH
// convolution).
//
// Inputs:
//   X       [N, C, H, W] float
//   W       [M, C, kH, kW] float
//   planes  [K, D + 1] float, D = C * kH * kW, 1 <= K <= 32: window j's code has bit k set when
//           planes[k, :D] . P[:, j] + planes[k, D] > 0 (the last column is an offset, e.g. the
//           projection of the calibration data's mean window, negated)
//   B       [M] float, optional
// Outputs:
//   Y       [N, M, OH, OW] float: window j's output is W applied to the mean of the windows
//           sharing its code (its bucket), plus the bias
//   buckets [N, OH, OW] int64, optional: each window's bucket, numbered 0, 1, ... in the order
//           the buckets first occur (row-major over the windows); max + 1 = buckets computed
// Attributes: strides, pads, dilations, kernel_shape, group (1), auto_pad (NOTSET).
//
// With one window per bucket (every code distinct, or only identical windows sharing one) it
// is Conv up to float rounding. passes/lsh_window.py holds the numpy reference
// (reference_lsh_window_conv) and the pass that calibrates K.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

inline constexpr const char* kLshWindowConvName = "LSHWindowConv";

// The op as ORT sees it (common/ort_op.h, KernelOp): inputs X, W, planes, B (optional); outputs Y,
// counts (optional).
struct LshWindowConvSignature {
  static constexpr const char* kName = kLshWindowConvName;
  static constexpr ONNXTensorElementDataType kInputs[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kFirstOptionalInput = 3;
  static constexpr ONNXTensorElementDataType kOutputs[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64};
  static constexpr size_t kFirstOptionalOutput = 1;
};

inline constexpr int64_t kLshWindowConvMaxBits = 32;

// The number of hyperplanes K, checked against the convolution.
inline int64_t LshWindowBits(const Conv2dShape& g, const std::vector<int64_t>& planes) {
  if (planes.size() != 2) {
    throw OpError("planes must be 2-D [K, D + 1], got shape " + ShapeString(planes));
  }
  if (planes[0] < 1 || planes[0] > kLshWindowConvMaxBits) {
    throw OpError("planes " + ShapeString(planes) + " must have 1 <= K <= " +
                  std::to_string(kLshWindowConvMaxBits) + " rows (hash bits)");
  }
  if (planes[1] != g.D() + 1) {
    throw OpError("planes " + ShapeString(planes) + " must have D + 1 = " +
                  std::to_string(g.D() + 1) + " columns (C * kH * kW + 1 for the offset)");
  }
  return planes[0];
}

void AddLshWindowConvCpu(Ort::CustomOpDomain& domain);

#if COMPRESSOR_WITH_CUDA
void AddLshWindowConvCuda(Ort::CustomOpDomain& domain);

struct LshWindowConvDeviceArgs {
  const float* x;
  const float* w;
  const float* planes;
  const float* bias;  // or null
  float* y;
  int64_t* buckets;   // or null
};

// Launches the CUDA kernels on `stream` (ORT's compute stream). Returns an empty string on
// success, else the CUDA error.
std::string LaunchLshWindowConvCuda(const Conv2dShape& g, int64_t bits,
                                    const LshWindowConvDeviceArgs& args, void* stream);
#else
inline void AddLshWindowConvCuda(Ort::CustomOpDomain&) {}  // built without CUDA: nothing to add
#endif

}  // namespace compressor

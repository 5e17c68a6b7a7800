// LSHConv: a 2-D convolution that, per input sample, computes only the output filters an LSH
// lookup selects (CNN-SLIDE's adaptive filter selection) and writes zeros for the rest.
//
// Inputs:
//   X       [N, C, H, W] float
//   W       [M, C, kH, kW] float
//   planes  [L, K, D + 1] float, D = C * kH * kW: table l's K hyperplanes, applied to a query
//           [q, 1] (the last column multiplies the constant 1, the bias coordinate)
//   buckets [L, 2^K, ceil(M / 64)] int64: bucket b of table l as a bitset of filters (bit m % 64
//           of word m / 64); bits at or past M are ignored
//   B       [M] float, optional
//   channel_mask [N, C] bool, optional: false = input channel c of sample n is known to be
//           zero (e.g. a filter the previous LSHConv did not select); it is skipped (treated as 0)
// Outputs:
//   Y       [N, M, OH, OW] float: Conv(X, W, B) for the selected filters, 0 for the others
//   selected [N, M] bool, optional: the selected filters of each sample
// Attributes: strides, pads, dilations, kernel_shape, group (1), auto_pad (NOTSET), and
//   query (string): "mean" (default) or "columns".
//
// Queries (per sample): "mean": one query, the mean window (im2col column) over all output
// positions; "columns": one per output column ow, the mean window over the output rows.
// Hash: bit k of table l's code = (planes[l, k, :D] . q + planes[l, k, D] > 0). The sample's
// filters = the union over its queries and the L tables of the buckets its codes land in.
// passes/lsh_conv.py holds the numpy reference (reference_lsh_conv) and builds planes and
// buckets from the filters (with the asymmetric MIPS transform).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

inline constexpr const char* kLshConvName = "LSHConv";

// The op as ORT sees it (common/ort_op.h, KernelOp): inputs X, W, planes, buckets, B and channel
// mask (optional); outputs Y, selected (optional).
struct LshConvSignature {
  static constexpr const char* kName = kLshConvName;
  static constexpr ONNXTensorElementDataType kInputs[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL};
  static constexpr size_t kFirstOptionalInput = 4;
  static constexpr ONNXTensorElementDataType kOutputs[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL};
  static constexpr size_t kFirstOptionalOutput = 1;
};

inline constexpr int64_t kLshConvMaxBits = 16;  // a table has 2^K buckets

enum class LshQuery { kMean, kColumns };

struct LshConvAttributes {
  Conv2dAttributes conv;
  LshQuery query = LshQuery::kMean;

  static LshConvAttributes Read(const OrtKernelInfo* info) {
    LshConvAttributes a;
    a.conv = Conv2dAttributes::Read(info);
    std::string query;
    try {
      query = AttributeString(info, "query", "mean");
    } catch (const OpError& e) {
      throw OpError(std::string("attribute 'query' must be a string: ") + e.what());
    }
    if (query == "mean") {
      a.query = LshQuery::kMean;
    } else if (query == "columns") {
      a.query = LshQuery::kColumns;
    } else {
      throw OpError("query must be 'mean' or 'columns', got '" + query + "'");
    }
    return a;
  }
};

// The hash tables' sizes, checked against the convolution's.
struct LshTablesShape {
  int64_t L, K, words;

  static LshTablesShape Make(const Conv2dShape& g, const std::vector<int64_t>& planes,
                             const std::vector<int64_t>& buckets) {
    if (planes.size() != 3) {
      throw OpError("planes must be 3-D [L, K, D + 1], got shape " + ShapeString(planes));
    }
    if (planes[0] < 1 || planes[1] < 1 || planes[1] > kLshConvMaxBits) {
      throw OpError("planes " + ShapeString(planes) + " must have L >= 1 tables of 1 <= K <= " +
                    std::to_string(kLshConvMaxBits) + " bits");
    }
    if (planes[2] != g.D() + 1) {
      throw OpError("planes " + ShapeString(planes) + " must have D + 1 = " +
                    std::to_string(g.D() + 1) + " columns (C * kH * kW + 1 for the bias)");
    }
    LshTablesShape t{planes[0], planes[1], (g.M + 63) / 64};
    const std::vector<int64_t> expected{t.L, int64_t{1} << t.K, t.words};
    if (buckets != expected) {
      throw OpError("buckets must be [L, 2^K, ceil(M / 64)] = " + ShapeString(expected) +
                    ", got " + ShapeString(buckets));
    }
    return t;
  }
};

inline void CheckChannelMask(const Conv2dShape& g, const std::vector<int64_t>& shape) {
  if (shape.size() != 2 || shape[0] != g.N || shape[1] != g.C) {
    throw OpError("channel_mask must be [N, C] = " + ShapeString({g.N, g.C}) + ", got " +
                  ShapeString(shape));
  }
}

void AddLshConvCpu(Ort::CustomOpDomain& domain);

#if COMPRESSOR_WITH_CUDA
void AddLshConvCuda(Ort::CustomOpDomain& domain);

struct LshConvDeviceArgs {
  const float* x;
  const float* w;
  const float* planes;
  const int64_t* buckets;
  const float* bias;          // or null
  const bool* channel_mask;   // or null
  float* y;
  bool* selected;             // or null
};

// Launches the CUDA kernels on `stream` (ORT's compute stream). Returns an empty string on
// success, else the CUDA error.
std::string LaunchLshConvCuda(const Conv2dShape& g, const LshTablesShape& t, LshQuery query,
                              const LshConvDeviceArgs& args, void* stream);
#else
inline void AddLshConvCuda(Ort::CustomOpDomain&) {}  // built without CUDA: nothing to add
#endif

}  // namespace compressor

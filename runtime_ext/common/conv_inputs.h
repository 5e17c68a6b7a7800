// What every Conv-like op shares: its signature, the inputs it reads first (X, W and an
// optional bias, with their shapes; the op's own shape struct then checks them against each
// other and its attributes), the attribute checks of the stride-1 algorithms and the switch to
// their plain reference stages. Pointers are to ORT's buffers (device memory on the CUDA
// provider).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

// The signature (common/ort_op.h, KernelOp) of an op that reads ConvInputs and writes Y, all
// float: inputs X, W, B (optional); output Y. An op adds its name:
//   struct MyConvSignature : ConvSignature { static constexpr const char* kName = "MyConv"; };
struct ConvSignature {
  static constexpr ONNXTensorElementDataType kInputs[] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kFirstOptionalInput = 2;
  static constexpr ONNXTensorElementDataType kOutputs[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  static constexpr size_t kFirstOptionalOutput = 1;
};

// Conv's attributes for an algorithm that computes stride 1, dilation 1 only (WinogradConv,
// FFTConv); `kernel_size` > 0 also requires kernel_shape, when given, to be that square (0: any
// kernel). Throws OpError naming the bad attribute, ORT_NOT_IMPLEMENTED for a valid Conv that
// the algorithm does not compute.
inline Conv2dAttributes ReadStrideOneAttributes(const OrtKernelInfo* info, int64_t kernel_size = 0) {
  const Conv2dAttributes a = Conv2dAttributes::Read(info);
  if (a.strides[0] != 1 || a.strides[1] != 1) {
    throw OpError("strides " + ShapeString(a.strides) + " are not supported (only [1, 1])",
                  ORT_NOT_IMPLEMENTED);
  }
  if (a.dilations[0] != 1 || a.dilations[1] != 1) {
    throw OpError("dilations " + ShapeString(a.dilations) + " are not supported (only [1, 1])",
                  ORT_NOT_IMPLEMENTED);
  }
  if (kernel_size > 0 && !a.kernel_shape.empty() &&
      (a.kernel_shape[0] != kernel_size || a.kernel_shape[1] != kernel_size)) {
    throw OpError("kernel_shape " + ShapeString(a.kernel_shape) + " is not supported (only " +
                      ShapeString({kernel_size, kernel_size}) + ")",
                  ORT_NOT_IMPLEMENTED);
  }
  return a;
}

// Whether the environment variable `name` (COMPRESSOR_<OP>_REFERENCE) asks for the op's plain
// reference stages: unset, "" or "0" no, "1" yes; anything else throws OpError.
inline bool ReferenceStagesFromEnvironment(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || std::strcmp(value, "") == 0 || std::strcmp(value, "0") == 0) {
    return false;
  }
  if (std::strcmp(value, "1") == 0) return true;
  throw OpError(std::string(name) + " must be 0 or 1, got '" + value + "'");
}

// Which of `choices` the environment variable `name` (a kernel's forced path or schedule, for
// tests and benchmarks) names: unset or "" is choices[0] (the kernel's own choice); anything
// else not listed throws OpError. Returns the index.
inline size_t ChoiceFromEnvironment(const char* name, const std::vector<std::string>& choices) {
  const char* value = std::getenv(name);
  if (value == nullptr || std::strcmp(value, "") == 0) return 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    if (choices[i] == value) return i;
  }
  std::string listed;
  for (size_t i = 0; i < choices.size(); ++i) {
    listed += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i];
  }
  throw OpError(std::string(name) + " must be " + listed + ", got '" + value + "'");
}

// A weight input a kernel prepares once, at session creation (packed, transformed): its data
// and shape when input `index` is a constant 4-D float tensor with no empty dimension, else
// data == nullptr (the kernel then prepares the weight at every call).
struct ConstantWeight {
  const float* data = nullptr;  // owned by the session; valid while the kernel lives
  std::vector<int64_t> shape;

  static ConstantWeight Read(const OrtApi& api, const OrtKernelInfo* info, size_t index = 1) {
    ConstantWeight c;
    int is_constant = 0;
    const OrtValue* weight = nullptr;
    OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &weight);
    if (status != nullptr) {
      api.ReleaseStatus(status);
      return c;
    }
    if (!is_constant || weight == nullptr) return c;
    Ort::ConstValue value(weight);
    auto type = value.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = type.GetShape();
    if (shape.size() != 4 || type.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return c;
    for (int64_t d : shape) {
      if (d < 1) return c;
    }
    c.data = value.GetTensorData<float>();
    c.shape = std::move(shape);
    return c;
  }
};

struct ConvInputs {
  const float* x = nullptr;
  const float* w = nullptr;
  const float* bias = nullptr;  // only when has_bias
  bool has_bias = false;
  std::vector<int64_t> x_shape, w_shape, bias_shape;

  // The bias shape for the shape checks, or nullptr without a bias.
  const std::vector<int64_t>* BiasShape() const { return has_bias ? &bias_shape : nullptr; }

  // Reads X (input 0), W (input 1) and the optional bias at input `bias_index`; throws OpError
  // when X or W is missing.
  static ConvInputs Read(OrtKernelContext* raw_context, size_t bias_index = 2) {
    Ort::KernelContext context(raw_context);
    const size_t input_count = context.GetInputCount();
    if (input_count < 2) throw OpError("needs inputs X and W");
    ConvInputs in;
    Ort::ConstValue x = context.GetInput(0);
    Ort::ConstValue w = context.GetInput(1);
    in.x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
    in.w_shape = w.GetTensorTypeAndShapeInfo().GetShape();
    in.x = x.GetTensorData<float>();
    in.w = w.GetTensorData<float>();
    const OrtValue* bias_value = nullptr;
    if (input_count > bias_index) {
      Check(Ort::GetApi().KernelContext_GetInput(raw_context, bias_index, &bias_value));
    }
    if (bias_value != nullptr) {
      Ort::ConstValue b(bias_value);
      in.has_bias = true;
      in.bias_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      in.bias = b.GetTensorData<float>();
    }
    return in;
  }
};

}  // namespace compressor

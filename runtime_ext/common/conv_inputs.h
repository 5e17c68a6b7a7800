// The inputs every Conv-like op reads first, X, W and an optional bias, with their shapes; the
// op's own shape struct then checks them against each other and its attributes. Pointers are
// to ORT's buffers (device memory on the CUDA provider).
#pragma once

#include <cstdint>
#include <vector>

#include "common/ort_op.h"

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

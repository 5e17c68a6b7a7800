// LSHConv on the CUDA execution provider: same attributes, checks and outputs as the CPU
// kernel (shapes are checked on the host from the tensors' metadata); the kernels
// (lsh_conv_kernel.cu) run on ORT's compute stream.
#include <string>
#include <vector>

#include "ops/lsh_conv/lsh_conv.h"

namespace compressor {
namespace {

constexpr const char* kCudaName = "LSHConv (CUDA)";

class LshConvCudaKernel {
 public:
  LshConvCudaKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(LshConvAttributes::Read(info)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kCudaName, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext context(raw_context);
    const size_t input_count = context.GetInputCount();
    if (input_count < 4) throw OpError("needs inputs X, W, planes and buckets");
    Ort::ConstValue x = context.GetInput(0);
    Ort::ConstValue w = context.GetInput(1);
    Ort::ConstValue planes = context.GetInput(2);
    Ort::ConstValue buckets = context.GetInput(3);
    const OrtValue* bias_value = nullptr;
    const OrtValue* mask_value = nullptr;
    if (input_count > 4) Check(api.KernelContext_GetInput(raw_context, 4, &bias_value));
    if (input_count > 5) Check(api.KernelContext_GetInput(raw_context, 5, &mask_value));
    std::vector<int64_t> bias_shape;
    LshConvDeviceArgs args{};
    if (bias_value != nullptr) {
      Ort::ConstValue b(bias_value);
      bias_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      args.bias = b.GetTensorData<float>();
    }
    const Conv2dShape g = Conv2dShape::Make(attributes_.conv, x.GetTensorTypeAndShapeInfo().GetShape(),
                                            w.GetTensorTypeAndShapeInfo().GetShape(),
                                            bias_value ? &bias_shape : nullptr);
    const LshTablesShape t = LshTablesShape::Make(g, planes.GetTensorTypeAndShapeInfo().GetShape(),
                                                  buckets.GetTensorTypeAndShapeInfo().GetShape());
    if (mask_value != nullptr) {
      Ort::ConstValue m(mask_value);
      CheckChannelMask(g, m.GetTensorTypeAndShapeInfo().GetShape());
      args.channel_mask = m.GetTensorData<bool>();
    }
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    if (context.GetOutputCount() > 1) {
      OrtValue* selected_value = nullptr;
      const int64_t shape[] = {g.N, g.M};
      Check(api.KernelContext_GetOutput(raw_context, 1, shape, 2, &selected_value));
      if (selected_value != nullptr) {
        args.selected = Ort::UnownedValue(selected_value).GetTensorMutableData<bool>();
      }
    }
    args.x = x.GetTensorData<float>();
    args.w = w.GetTensorData<float>();
    args.planes = planes.GetTensorData<float>();
    args.buckets = buckets.GetTensorData<int64_t>();
    args.y = y.GetTensorMutableData<float>();
    const std::string error =
        LaunchLshConvCuda(g, t, attributes_.query, args, context.GetGPUComputeStream());
    if (!error.empty()) throw OpError(error, ORT_FAIL);
  }

  LshConvAttributes attributes_;
};

struct LshConvCudaOp : Ort::CustomOpBase<LshConvCudaOp, LshConvCudaKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return Guard(kCudaName, [&] { *kernel = new LshConvCudaKernel(api, info); });
  }
  const char* GetName() const { return kLshConvName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (index == 5) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

}  // namespace

void AddLshConvCuda(Ort::CustomOpDomain& domain) {
  static LshConvCudaOp op;
  domain.Add(&op);
}

}  // namespace compressor

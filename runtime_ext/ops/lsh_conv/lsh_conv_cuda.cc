// LSHConv on the CUDA execution provider: same attributes, checks and outputs as the CPU
// kernel (shapes are checked on the host from the tensors' metadata); the kernels
// (lsh_conv_kernel.cu) run on ORT's compute stream.
#include <string>
#include <vector>

#include "ops/lsh_conv/lsh_conv.h"

namespace compressor {
namespace {

class LshConvCudaKernel {
 public:
  static constexpr const char* kLabel = "LSHConv (CUDA)";

  LshConvCudaKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(LshConvAttributes::Read(info)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
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

using LshConvCudaOp = KernelOp<LshConvCudaKernel, LshConvSignature, Provider::kCuda>;

}  // namespace

void AddLshConvCuda(Ort::CustomOpDomain& domain) { AddOp<LshConvCudaOp>(domain); }

}  // namespace compressor

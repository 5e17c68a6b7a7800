// LSHWindowConv on the CUDA execution provider: same attributes, checks and outputs as the
// CPU kernel; the kernels (lsh_window_conv_kernel.cu) run on ORT's compute stream.
#include <string>
#include <vector>

#include "ops/lsh_window_conv/lsh_window_conv.h"

namespace compressor {
namespace {

class LshWindowConvCudaKernel {
 public:
  static constexpr const char* kLabel = "LSHWindowConv (CUDA)";

  LshWindowConvCudaKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(Conv2dAttributes::Read(info)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext context(raw_context);
    const size_t input_count = context.GetInputCount();
    if (input_count < 3) throw OpError("needs inputs X, W and planes");
    Ort::ConstValue x = context.GetInput(0);
    Ort::ConstValue w = context.GetInput(1);
    Ort::ConstValue planes = context.GetInput(2);
    const OrtValue* bias_value = nullptr;
    if (input_count > 3) Check(api.KernelContext_GetInput(raw_context, 3, &bias_value));
    std::vector<int64_t> bias_shape;
    LshWindowConvDeviceArgs args{};
    if (bias_value != nullptr) {
      Ort::ConstValue b(bias_value);
      bias_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      args.bias = b.GetTensorData<float>();
    }
    const Conv2dShape g = Conv2dShape::Make(attributes_, x.GetTensorTypeAndShapeInfo().GetShape(),
                                            w.GetTensorTypeAndShapeInfo().GetShape(),
                                            bias_value ? &bias_shape : nullptr);
    const int64_t bits = LshWindowBits(g, planes.GetTensorTypeAndShapeInfo().GetShape());
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    if (context.GetOutputCount() > 1) {
      OrtValue* buckets_value = nullptr;
      const int64_t shape[] = {g.N, g.OH, g.OW};
      Check(api.KernelContext_GetOutput(raw_context, 1, shape, 3, &buckets_value));
      if (buckets_value != nullptr) {
        args.buckets = Ort::UnownedValue(buckets_value).GetTensorMutableData<int64_t>();
      }
    }
    args.x = x.GetTensorData<float>();
    args.w = w.GetTensorData<float>();
    args.planes = planes.GetTensorData<float>();
    args.y = y.GetTensorMutableData<float>();
    const std::string error = LaunchLshWindowConvCuda(g, bits, args, context.GetGPUComputeStream());
    if (!error.empty()) throw OpError(error, ORT_FAIL);
  }

  Conv2dAttributes attributes_;
};

using LshWindowConvCudaOp = KernelOp<LshWindowConvCudaKernel, LshWindowConvSignature, Provider::kCuda>;

}  // namespace

void AddLshWindowConvCuda(Ort::CustomOpDomain& domain) { AddOp<LshWindowConvCudaOp>(domain); }

}  // namespace compressor

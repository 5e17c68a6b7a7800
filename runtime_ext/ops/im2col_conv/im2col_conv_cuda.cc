// Im2colConv on the CUDA execution provider: same attributes, checks and output as the CPU
// kernel; the kernel (im2col_conv_kernel.cu) runs on ORT's compute stream.
#include <string>

#include "common/conv_inputs.h"
#include "ops/im2col_conv/im2col_conv.h"

namespace compressor {
namespace {

class Im2colConvCudaKernel {
 public:
  static constexpr const char* kLabel = "Im2colConv (CUDA)";

  Im2colConvCudaKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(Conv2dAttributes::Read(info, /*any_group=*/true)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const ConvInputs in = ConvInputs::Read(raw_context);
    const Im2colConvShape g =
        Im2colConvShape::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::KernelContext context(raw_context);
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    const std::string error = LaunchIm2colConvCuda(g, in.x, in.w, in.bias,
                                                   y.GetTensorMutableData<float>(),
                                                   context.GetGPUComputeStream());
    if (!error.empty()) throw OpError(error, ORT_FAIL);
  }

  Conv2dAttributes attributes_;
};

using Im2colConvCudaOp = KernelOp<Im2colConvCudaKernel, Im2colConvSignature, Provider::kCuda>;

}  // namespace

void AddIm2colConvCuda(Ort::CustomOpDomain& domain) { AddOp<Im2colConvCudaOp>(domain); }

}  // namespace compressor

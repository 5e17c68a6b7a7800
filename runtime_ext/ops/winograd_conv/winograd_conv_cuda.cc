// WinogradConv on the CUDA execution provider: same attributes, checks and output as the CPU
// kernel; the kernels (winograd_conv_kernel.cu) run on ORT's compute stream. The weights are
// transformed on the device at every call (a small kernel next to the GEMMs), not cached.
#include <string>

#include "common/conv_inputs.h"
#include "ops/winograd_conv/winograd_conv.h"

namespace compressor {
namespace {

class WinogradConvCudaKernel {
 public:
  static constexpr const char* kLabel = "WinogradConv (CUDA)";

  WinogradConvCudaKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(WinogradConvAttributes::Read(info)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const ConvInputs in = ConvInputs::Read(raw_context);
    const WinogradConvShape g =
        WinogradConvShape::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::KernelContext context(raw_context);
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    const std::string error = LaunchWinogradConvCuda(g, in.x, in.w, in.bias,
                                                     y.GetTensorMutableData<float>(),
                                                     context.GetGPUComputeStream());
    if (!error.empty()) throw OpError(error, ORT_FAIL);
  }

  WinogradConvAttributes attributes_;
};

using WinogradConvCudaOp =
    KernelOp<WinogradConvCudaKernel, WinogradConvSignature, Provider::kCuda>;

}  // namespace

void AddWinogradConvCuda(Ort::CustomOpDomain& domain) { AddOp<WinogradConvCudaOp>(domain); }

}  // namespace compressor

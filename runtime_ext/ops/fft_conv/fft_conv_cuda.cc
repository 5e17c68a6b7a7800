// FFTConv on the CUDA execution provider: same attributes, checks, FFT size and output as the
// CPU kernel; the transforms and products (fft_conv_kernel.cu) run on ORT's compute stream. The
// kernel spectra are computed on the device at every call (not cached), like WinogradConv's
// weight transform.
#include <memory>
#include <string>

#include "common/conv_inputs.h"
#include "ops/fft_conv/fft_conv.h"

namespace compressor {
namespace {

class FFTConvCudaKernel {
 public:
  static constexpr const char* kLabel = "FFTConv (CUDA)";

  FFTConvCudaKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(ReadStrideOneAttributes(info)), plans_(MakeFFTConvCudaPlans()) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const ConvInputs in = ConvInputs::Read(raw_context);
    const FFTConvShape g = FFTConvShape::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::KernelContext context(raw_context);
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    const std::string error = LaunchFFTConvCuda(*plans_, g, in.x, in.w, in.bias,
                                                y.GetTensorMutableData<float>(),
                                                context.GetGPUComputeStream());
    if (!error.empty()) throw OpError(error, ORT_FAIL);
  }

  Conv2dAttributes attributes_;
  std::shared_ptr<FFTConvCudaPlans> plans_;
};

using FFTConvCudaOp = KernelOp<FFTConvCudaKernel, FFTConvSignature, Provider::kCuda>;

}  // namespace

void AddFFTConvCuda(Ort::CustomOpDomain& domain) { AddOp<FFTConvCudaOp>(domain); }

}  // namespace compressor

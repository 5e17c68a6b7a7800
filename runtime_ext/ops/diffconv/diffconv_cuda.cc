// DiffConv on the CUDA execution provider: same attributes, checks and outputs as the CPU
// kernel; the kernels (diffconv_kernel.cu) run on ORT's compute stream.
#include <string>
#include <vector>

#include "common/conv_inputs.h"
#include "ops/diffconv/diffconv.h"

namespace compressor {
namespace {

class DiffConvCudaKernel {
 public:
  static constexpr const char* kLabel = "DiffConv (CUDA)";

  DiffConvCudaKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(DiffConvAttributes::Read(info)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    const ConvInputs in = ConvInputs::Read(raw_context);
    const DiffConvGeometry g =
        DiffConvGeometry::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::KernelContext context(raw_context);
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    int64_t* counts = nullptr;
    if (context.GetOutputCount() > 1) {
      OrtValue* counts_value = nullptr;
      const int64_t counts_shape[] = {2};
      Check(api.KernelContext_GetOutput(raw_context, 1, counts_shape, 1, &counts_value));
      if (counts_value != nullptr) {
        counts = Ort::UnownedValue(counts_value).GetTensorMutableData<int64_t>();
      }
    }
    void* stream = context.GetGPUComputeStream();
    const std::string error =
        LaunchDiffConvCuda(g, in.x, in.w, in.bias, y.GetTensorMutableData<float>(), counts, stream);
    if (!error.empty()) throw OpError(error, ORT_FAIL);
  }

  DiffConvAttributes attributes_;
};

using DiffConvCudaOp = KernelOp<DiffConvCudaKernel, DiffConvSignature, Provider::kCuda>;

}  // namespace

void AddDiffConvCuda(Ort::CustomOpDomain& domain) { AddOp<DiffConvCudaOp>(domain); }

}  // namespace compressor

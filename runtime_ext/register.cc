// The library's only exported symbol (see exports.lds): onnxruntime calls RegisterCustomOps
// when a session's options load this library.
#include <memory>
#include <mutex>
#include <vector>

#include "build_config.h"
#include "common/ort_op.h"
#include "ops/diffconv/diffconv.h"
#include "ops/direct_conv/direct_conv_op.h"
#include "ops/fft_conv/fft_conv.h"
#include "ops/im2col_conv/im2col_conv.h"
#include "ops/lsh_conv/lsh_conv.h"
#include "ops/lsh_window_conv/lsh_window_conv.h"
#include "ops/winograd_conv/winograd_conv.h"

namespace {

// Ops were built against API 21 (onnxruntime 1.21), the oldest onnxruntime we support.
constexpr uint32_t kOrtApiVersion = 21;

// Domains must outlive every session that uses them: keep each one for the process lifetime.
void KeepAlive(Ort::CustomOpDomain&& domain) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;
  std::lock_guard<std::mutex> lock(mutex);
  domains.push_back(std::make_unique<Ort::CustomOpDomain>(std::move(domain)));
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(kOrtApiVersion);
  if (api == nullptr) {  // onnxruntime older than 1.21: report it with the version-1 API
    const OrtApi* old_api = api_base->GetApi(1);
    return old_api->CreateStatus(
        ORT_FAIL, "libcompressor_ops needs onnxruntime >= 1.21 (ORT API 21); this onnxruntime "
                  "is older: pip install -U onnxruntime");
  }
  Ort::InitApi(api);
  return compressor::Guard("RegisterCustomOps", [&] {
    Ort::CustomOpDomain domain(compressor::kOpDomain);
    compressor::AddDiffConvCpu(domain);
    compressor::AddDiffConvCuda(domain);
    compressor::AddLshConvCpu(domain);
    compressor::AddLshConvCuda(domain);
    compressor::AddLshWindowConvCpu(domain);
    compressor::AddLshWindowConvCuda(domain);
    compressor::AddFFTConvCpu(domain);
    compressor::AddFFTConvCuda(domain);
    compressor::AddWinogradConvCpu(domain);
    compressor::AddWinogradConvCuda(domain);
    compressor::AddIm2colConvCpu(domain);
    compressor::AddIm2colConvCuda(domain);
    compressor::AddDirectConvCpu(domain);
    Ort::UnownedSessionOptions(options).Add(static_cast<OrtCustomOpDomain*>(domain));
    KeepAlive(std::move(domain));
  });
}

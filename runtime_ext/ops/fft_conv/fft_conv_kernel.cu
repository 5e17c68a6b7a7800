// CUDA kernels of FFTConv (fft_conv.h): the CPU kernel's overlap-save stages on ORT's compute
// stream, scratch from cudaMallocAsync on that stream (no device sync), the FFT size and tile
// grid from FFTConvShape (the CPU kernel's):
//   GatherFilters  w[m][c] zero-padded to Fh x Fw, as window line c * M + m
//   rfft2 (cuFFT)  of those windows, written frequency-major: K[f][c][m] (complex)
//   GatherWindows  the Fh x Fw input window of each (tile t, channel c) of a chunk of tiles, as
//                  line t * C + c (zeros outside the image)
//   rfft2 (cuFFT)  X[f][t][c], frequency-major (cuFFT's output stride: no transpose)
//   TiledGemm      per frequency the real product Z[f] [T x 2M] = X[f] [T x 2C] @ [Kr Ki; -Ki Kr]
//                  with K conjugated (correlation, not convolution), the frequencies batched in
//                  blockIdx.z (lsh_conv/cuda_common.cuh): where the time goes
//   irfft2 (cuFFT) Z[f][t][m] -> windows [t * M + m][Fh][Fw] (unnormalised)
//   ScatterTiles   the valid tile_h x tile_w part of each window, / (Fh Fw), + bias, into Y
//
// cuFFT is opened at the first call (dlopen of libcufft.so.12, CUDA 13's, or libcufft.so.11,
// CUDA 12's: one the process has loaded already, such as onnxruntime-gpu's, first) and called
// through the few entry points below, declared as cufft.h declares them. Why not linked: this
// toolkit has no libcufft_static.a (nor does the cuFFT wheel or Debian's main archive), and a
// link to libcufft.so would stop the whole library from loading where cuFFT is absent; this
// way only FFTConv on CUDA fails, with a status saying what is missing.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "ops/fft_conv/fft_conv.h"
#include "ops/lsh_conv/cuda_common.cuh"

namespace compressor {
namespace {

// --- cuFFT, opened at run time ----------------------------------------------------------------

// cufft.h's cufftHandle, cufftResult (CUFFT_SUCCESS = 0) and cufftType values.
using CufftHandle = int;
using CufftResult = int;
constexpr int kCufftR2C = 0x2a;
constexpr int kCufftC2R = 0x2c;

struct CufftApi {
  CufftResult (*PlanMany)(CufftHandle* plan, int rank, int* n, int* inembed, int istride,
                          int idist, int* onembed, int ostride, int odist, int type, int batch);
  CufftResult (*SetStream)(CufftHandle plan, cudaStream_t stream);
  CufftResult (*ExecR2C)(CufftHandle plan, float* in, float2* out);
  CufftResult (*ExecC2R)(CufftHandle plan, float2* in, float* out);
  CufftResult (*Destroy)(CufftHandle plan);
};

// The API, or nullptr with *error saying why (once per process).
const CufftApi* OpenCufft(std::string* error) {
  static std::once_flag once;
  static CufftApi api;
  static bool opened = false;
  static std::string failure;
  std::call_once(once, [] {
    const char* names[] = {"libcufft.so.12", "libcufft.so.11", "libcufft.so"};
    void* library = nullptr;
    for (int mode : {RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, RTLD_NOW | RTLD_LOCAL}) {
      for (const char* name : names) {
        if (library == nullptr) library = dlopen(name, mode);
      }
    }
    if (library == nullptr) {
      failure = "cuFFT not found (libcufft.so.12 or libcufft.so.11 on the library path): "
                "pip install nvidia-cufft (CUDA 13) or nvidia-cufft-cu12";
      return;
    }
    auto symbol = [&](const char* name) {
      void* address = dlsym(library, name);
      if (address == nullptr && failure.empty()) failure = std::string("cuFFT has no ") + name;
      return address;
    };
    api.PlanMany = reinterpret_cast<decltype(api.PlanMany)>(symbol("cufftPlanMany"));
    api.SetStream = reinterpret_cast<decltype(api.SetStream)>(symbol("cufftSetStream"));
    api.ExecR2C = reinterpret_cast<decltype(api.ExecR2C)>(symbol("cufftExecR2C"));
    api.ExecC2R = reinterpret_cast<decltype(api.ExecC2R)>(symbol("cufftExecC2R"));
    api.Destroy = reinterpret_cast<decltype(api.Destroy)>(symbol("cufftDestroy"));
    opened = failure.empty();
  });
  if (!opened) *error = failure;
  return opened ? &api : nullptr;
}

std::string CufftError(const char* what, CufftResult result) {
  return std::string(what) + " failed: cufftResult " + std::to_string(result);
}

}  // namespace

class FFTConvCudaPlans {
 public:
  ~FFTConvCudaPlans() {
    if (api_ == nullptr) return;
    for (const auto& entry : plans_) api_->Destroy(entry.second);
  }

  // A plan of `batch` 2-D Fh x Fw transforms of `type` whose spectra side is frequency-major
  // (element (line, f) at f * batch + line) and whose real side is contiguous windows.
  std::string Get(const CufftApi& api, int Fh, int Fw, int type, int batch, CufftHandle* plan) {
    api_ = &api;
    const std::array<int, 4> key{Fh, Fw, type, batch};
    const auto found = plans_.find(key);
    if (found != plans_.end()) {
      *plan = found->second;
      return "";
    }
    int n[2] = {Fh, Fw}, real[2] = {Fh, Fw}, spectrum[2] = {Fh, Fw / 2 + 1};
    const CufftResult result =
        type == kCufftR2C
            ? api.PlanMany(plan, 2, n, real, 1, Fh * Fw, spectrum, batch, 1, type, batch)
            : api.PlanMany(plan, 2, n, spectrum, batch, 1, real, 1, Fh * Fw, type, batch);
    if (result != 0) return CufftError("cufftPlanMany", result);
    plans_.emplace(key, *plan);
    return "";
  }

  std::mutex mutex;  // held for a whole launch: a plan runs on one stream at a time

 private:
  const CufftApi* api_ = nullptr;
  std::map<std::array<int, 4>, CufftHandle> plans_;
};

std::shared_ptr<FFTConvCudaPlans> MakeFFTConvCudaPlans() {
  return std::make_shared<FFTConvCudaPlans>();
}

namespace {

struct DeviceShape {
  int N, C, H, W, M, kH, kW, OH, OW, pad_top, pad_left;
  int Fh, Fw, P, tile_h, tile_w, tiles_h, tiles_w;
};

__global__ void GatherFilters(DeviceShape g, const float* __restrict__ w,
                              float* __restrict__ windows) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long window = static_cast<long long>(g.Fh) * g.Fw;
  if (id >= static_cast<long long>(g.C) * g.M * window) return;
  const long long line = id / window;
  const int r = (id % window) / g.Fw, s = id % g.Fw;
  const int m = line % g.M, c = line / g.M;
  windows[id] = (r < g.kH && s < g.kW)
                    ? w[((static_cast<long long>(m) * g.C + c) * g.kH + r) * g.kW + s]
                    : 0.0f;
}

// Windows of tiles [t0, t0 + T) of the batch.
__global__ void GatherWindows(DeviceShape g, long long t0, int T, const float* __restrict__ x,
                              float* __restrict__ windows) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long window = static_cast<long long>(g.Fh) * g.Fw;
  if (id >= static_cast<long long>(T) * g.C * window) return;
  const long long line = id / window;
  const int r = (id % window) / g.Fw, s = id % g.Fw;
  const int c = line % g.C;
  const long long tile = t0 + line / g.C, per_image = static_cast<long long>(g.tiles_h) * g.tiles_w;
  const int n = tile / per_image, i = (tile % per_image) / g.tiles_w, j = tile % g.tiles_w;
  const int ih = i * g.tile_h - g.pad_top + r, iw = j * g.tile_w - g.pad_left + s;
  windows[id] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
                    ? x[((static_cast<long long>(n) * g.C + c) * g.H + ih) * g.W + iw]
                    : 0.0f;
}

__global__ void ScatterTiles(DeviceShape g, long long t0, int T, const float* __restrict__ windows,
                             const float* __restrict__ bias, float* __restrict__ y) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long tile_size = static_cast<long long>(g.tile_h) * g.tile_w;
  if (id >= static_cast<long long>(T) * g.M * tile_size) return;
  const long long line = id / tile_size;  // t * M + m
  const int r = (id % tile_size) / g.tile_w, s = id % g.tile_w;
  const int m = line % g.M;
  const long long tile = t0 + line / g.M, per_image = static_cast<long long>(g.tiles_h) * g.tiles_w;
  const int n = tile / per_image, i = (tile % per_image) / g.tiles_w, j = tile % g.tiles_w;
  const int oh = i * g.tile_h + r, ow = j * g.tile_w + s;
  if (oh >= g.OH || ow >= g.OW) return;
  const float scale = 1.0f / static_cast<float>(g.Fh * g.Fw);
  const float value = windows[line * g.Fh * g.Fw + r * g.Fw + s] * scale;
  y[((static_cast<long long>(n) * g.M + m) * g.OH + oh) * g.OW + ow] =
      value + (bias != nullptr ? bias[m] : 0.0f);
}

// The per-frequency product's operands, frequency f = f0 + z: X[f] as a real [T x 2C] matrix
// (interleaved re, im), K[f] as the real [2C x 2M] matrix of its conjugate, Z[f] [T x 2M].
struct LoadX {
  const float* __restrict__ X;
  int T, C, f0;
  __device__ int Rows(int) const { return T; }
  __device__ int Depth(int) const { return 2 * C; }
  __device__ float operator()(int z, int t, int k) const {
    return X[(static_cast<long long>(f0 + z) * T + t) * 2 * C + k];
  }
};

struct LoadK {
  const float2* __restrict__ K;
  int C, M, f0;
  __device__ int Cols(int) const { return 2 * M; }
  __device__ float operator()(int z, int k, int j) const {
    const float2 v = K[(static_cast<long long>(f0 + z) * C + k / 2) * M + j / 2];
    const float re = v.x, im = -v.y;  // conj(K)
    // rows 2c, 2c + 1 at columns 2m, 2m + 1: [re im; -im re]
    if (k % 2 == 0) return j % 2 == 0 ? re : im;
    return j % 2 == 0 ? -im : re;
  }
};

struct StoreZ {
  float* __restrict__ Z;
  int T, M, f0;
  __device__ void operator()(int z, int t, int j, float value) const {
    Z[(static_cast<long long>(f0 + z) * T + t) * 2 * M + j] = value;
  }
};

constexpr int kThreads = 256;

// Device memory of one chunk's windows and spectra stays under this; at least one tile a chunk.
constexpr long long kChunkBytes = 256LL << 20;

// The largest batch of frequencies in one GEMM launch (blockIdx.z).
constexpr int kFrequenciesPerLaunch = 65535;

std::string Check(const char* what) {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? "" : cuda::Error(what, error);
}

// Buffers of one call, carved from one stream-ordered allocation.
struct Buffers {
  float* filter_windows;   // [C * M][Fh][Fw]
  float2* K;               // [P][C][M]
  float* input_windows;    // [chunk * C][Fh][Fw]
  float2* X;               // [P][chunk][C]
  float2* Z;               // [P][chunk][M]
  float* output_windows;   // [chunk * M][Fh][Fw]
};

// `batch` transforms of `type` (plan kept in `plans`) from `in` to `out` on `stream`.
std::string Transform(const CufftApi& api, FFTConvCudaPlans& plans, const DeviceShape& g,
                      int type, int batch, void* in, void* out, cudaStream_t stream) {
  CufftHandle plan = 0;
  const std::string failed = plans.Get(api, g.Fh, g.Fw, type, batch, &plan);
  if (!failed.empty()) return failed;
  CufftResult result = api.SetStream(plan, stream);
  if (result != 0) return CufftError("cufftSetStream", result);
  result = type == kCufftR2C
               ? api.ExecR2C(plan, static_cast<float*>(in), static_cast<float2*>(out))
               : api.ExecC2R(plan, static_cast<float2*>(in), static_cast<float*>(out));
  return result == 0 ? "" : CufftError(type == kCufftR2C ? "cufftExecR2C" : "cufftExecC2R", result);
}

std::string Run(const CufftApi& api, FFTConvCudaPlans& plans, const DeviceShape& g,
                long long total, int chunk, const float* x, const float* w, const float* bias,
                float* y, const Buffers& b, cudaStream_t stream) {
  const long long window = static_cast<long long>(g.Fh) * g.Fw;
  // Kernel spectra.
  GatherFilters<<<cuda::Blocks(static_cast<long long>(g.C) * g.M * window, kThreads), kThreads,
                  0, stream>>>(g, w, b.filter_windows);
  std::string failed = Check("GatherFilters launch");
  if (!failed.empty()) return failed;
  failed = Transform(api, plans, g, kCufftR2C, g.C * g.M, b.filter_windows, b.K, stream);
  if (!failed.empty()) return failed;
  for (long long t0 = 0; t0 < total; t0 += chunk) {
    const int T = static_cast<int>(std::min<long long>(chunk, total - t0));
    GatherWindows<<<cuda::Blocks(static_cast<long long>(T) * g.C * window, kThreads), kThreads, 0,
                    stream>>>(g, t0, T, x, b.input_windows);
    failed = Check("GatherWindows launch");
    if (!failed.empty()) return failed;
    failed = Transform(api, plans, g, kCufftR2C, T * g.C, b.input_windows, b.X, stream);
    if (!failed.empty()) return failed;
    for (int f0 = 0; f0 < g.P; f0 += kFrequenciesPerLaunch) {
      const int frequencies = std::min(kFrequenciesPerLaunch, g.P - f0);
      failed = cuda::LaunchTiledGemm(T, 2 * g.M, frequencies,
                                     LoadX{reinterpret_cast<const float*>(b.X), T, g.C, f0},
                                     LoadK{b.K, g.C, g.M, f0},
                                     StoreZ{reinterpret_cast<float*>(b.Z), T, g.M, f0}, stream);
      if (!failed.empty()) return failed;
    }
    failed = Transform(api, plans, g, kCufftC2R, T * g.M, b.Z, b.output_windows, stream);
    if (!failed.empty()) return failed;
    const long long outputs = static_cast<long long>(T) * g.M * g.tile_h * g.tile_w;
    ScatterTiles<<<cuda::Blocks(outputs, kThreads), kThreads, 0, stream>>>(
        g, t0, T, b.output_windows, bias, y);
    failed = Check("ScatterTiles launch");
    if (!failed.empty()) return failed;
  }
  return "";
}

}  // namespace

std::string LaunchFFTConvCuda(FFTConvCudaPlans& plans, const FFTConvShape& s, const float* x,
                              const float* w, const float* bias, float* y, void* stream_ptr) {
  if (s.N == 0 || s.OH == 0 || s.OW == 0) return "";
  std::string error;
  const CufftApi* api = OpenCufft(&error);
  if (api == nullptr) return error;
  const long long P = s.Frequencies(), window = s.Fh * s.Fw, total = s.Tiles();
  const long long lines_per_tile = std::max(s.C, s.M);
  // cuFFT and the kernels index a chunk with 32-bit ints: lines * (Fh * Fw) and P * lines.
  const long long per_line = std::max(window, 2 * P);
  if (s.C * s.M * per_line > INT32_MAX || lines_per_tile * per_line > INT32_MAX ||
      total > INT32_MAX) {
    return "shape too large for the CUDA kernel: " + std::to_string(s.C) + " -> " +
           std::to_string(s.M) + " channels at FFT size " + std::to_string(s.Fh) + " x " +
           std::to_string(s.Fw);
  }
  const long long tile_bytes = (s.C + s.M) * (4 * window + 8 * P);
  const long long chunk = std::clamp<long long>(
      std::min(kChunkBytes / tile_bytes, INT32_MAX / (lines_per_tile * per_line)), 1, total);

  auto i32 = [](long long value) { return static_cast<int>(value); };
  const DeviceShape g{i32(s.N), i32(s.C), i32(s.H), i32(s.W), i32(s.M), i32(s.kH), i32(s.kW),
                      i32(s.OH), i32(s.OW), i32(s.pad_top), i32(s.pad_left), i32(s.Fh),
                      i32(s.Fw), i32(P), i32(s.tile_h), i32(s.tile_w), i32(s.tiles_h),
                      i32(s.tiles_w)};

  // Sizes in floats, each rounded up to 64 (256-byte alignment for cuFFT and float2).
  auto rounded = [](long long floats) { return (floats + 63) / 64 * 64; };
  const long long sizes[] = {rounded(s.C * s.M * window), rounded(2 * P * s.C * s.M),
                             rounded(chunk * s.C * window), rounded(2 * P * chunk * s.C),
                             rounded(2 * P * chunk * s.M), rounded(chunk * s.M * window)};
  long long floats = 0;
  for (long long size : sizes) floats += size;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  float* scratch = nullptr;
  cudaError_t status = cudaMallocAsync(reinterpret_cast<void**>(&scratch),
                                       sizeof(float) * static_cast<size_t>(floats), stream);
  if (status != cudaSuccess) return cuda::Error("cudaMallocAsync", status);
  float* parts[6];
  float* next = scratch;
  for (int i = 0; i < 6; ++i) {
    parts[i] = next;
    next += sizes[i];
  }
  const Buffers buffers{parts[0], reinterpret_cast<float2*>(parts[1]), parts[2],
                        reinterpret_cast<float2*>(parts[3]), reinterpret_cast<float2*>(parts[4]),
                        parts[5]};
  std::string failed;
  {
    std::lock_guard<std::mutex> lock(plans.mutex);
    failed = Run(*api, plans, g, total, static_cast<int>(chunk), x, w, bias, y, buffers, stream);
  }
  status = cudaFreeAsync(scratch, stream);
  if (failed.empty() && status != cudaSuccess) failed = cuda::Error("cudaFreeAsync", status);
  return failed;
}

}  // namespace compressor

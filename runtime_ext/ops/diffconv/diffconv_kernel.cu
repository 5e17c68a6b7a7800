// CUDA kernels of DiffConv. One thread per (image, output channel, output row, restart
// segment): it computes the segment's first window directly and every next window from the
// previous one plus the kernel applied to the kept differences, exactly as the CPU kernel and
// the numpy reference do. Consecutive threads share the output channel, so weight reads are
// warp-wide broadcasts and input reads fall in the same rows.
#include <cuda_runtime.h>

#include <string>

#include "ops/diffconv/diffconv.h"

namespace compressor {
namespace {

struct DeviceGeometry {
  int N, C, H, W, M, kH, kW, OH, OW;
  int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int restart, segments;
  float threshold;
};

__device__ __forceinline__ float InputAt(const float* image, const DeviceGeometry& g, int c,
                                         int ih, int iw) {
  return (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? image[(c * g.H + ih) * g.W + iw] : 0.0f;
}

__global__ void DiffConvKernel(DeviceGeometry g, const float* __restrict__ x,
                               const float* __restrict__ w, const float* __restrict__ bias,
                               float* __restrict__ y, unsigned long long* kept) {
  const long long total = (long long)g.N * g.M * g.OH * g.segments;
  const long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (id >= total) return;
  const int segment = id % g.segments;
  const int oh = (id / g.segments) % g.OH;
  const int m = (id / ((long long)g.segments * g.OH)) % g.M;
  const int n = id / ((long long)g.segments * g.OH * g.M);
  const float* image = x + (long long)n * g.C * g.H * g.W;
  const float* kernel = w + (long long)m * g.C * g.kH * g.kW;
  float* out = y + (((long long)n * g.M + m) * g.OH + oh) * g.OW;
  const float b = bias ? bias[m] : 0.0f;
  const int ow_begin = segment * g.restart;
  const int ow_end = min(g.OW, ow_begin + g.restart);

  float acc = 0.0f;
  unsigned long long kept_here = 0;
  for (int ow = ow_begin; ow < ow_end; ++ow) {
    const int iw_base = ow * g.stride_w - g.pad_left;
    for (int c = 0; c < g.C; ++c) {
      for (int kh = 0; kh < g.kH; ++kh) {
        const int ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h;
        const float* wrow = kernel + (c * g.kH + kh) * g.kW;
        for (int kw = 0; kw < g.kW; ++kw) {
          const int iw = iw_base + kw * g.dilation_w;
          const float value = InputAt(image, g, c, ih, iw);
          if (ow == ow_begin) {
            acc = fmaf(wrow[kw], value, acc);
          } else {
            const float d = value - InputAt(image, g, c, ih, iw - g.stride_w);
            if (fabsf(d) > g.threshold) {
              acc = fmaf(wrow[kw], d, acc);
              ++kept_here;
            }
          }
        }
      }
    }
    out[ow] = acc + b;
  }
  // The kept set does not depend on the output channel: count it once, for channel 0.
  if (kept != nullptr && m == 0) {
    const unsigned long long restart_part = (unsigned long long)g.C * g.kH * g.kW;
    atomicAdd(kept, kept_here + restart_part);
  }
}

// counts[0] = performed multiplications = M * (restart windows * K + kept differences).
__global__ void FinishCounts(const unsigned long long* kept, long long M, long long dense,
                             long long* counts) {
  counts[0] = (long long)(*kept) * M;
  counts[1] = dense;
}

std::string CudaError(const char* what, cudaError_t error) {
  return std::string(what) + " failed: " + cudaGetErrorName(error) + ": " +
         cudaGetErrorString(error);
}

}  // namespace

std::string LaunchDiffConvCuda(const DiffConvGeometry& geometry, const float* x, const float* w,
                               const float* bias, float* y, int64_t* counts, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  DeviceGeometry g{};
  g.N = (int)geometry.N;
  g.C = (int)geometry.C;
  g.H = (int)geometry.H;
  g.W = (int)geometry.W;
  g.M = (int)geometry.M;
  g.kH = (int)geometry.kH;
  g.kW = (int)geometry.kW;
  g.OH = (int)geometry.OH;
  g.OW = (int)geometry.OW;
  g.stride_h = (int)geometry.stride_h;
  g.stride_w = (int)geometry.stride_w;
  g.pad_top = (int)geometry.pad_top;
  g.pad_left = (int)geometry.pad_left;
  g.dilation_h = (int)geometry.dilation_h;
  g.dilation_w = (int)geometry.dilation_w;
  g.restart = (int)std::min<int64_t>(geometry.restart, geometry.OW > 0 ? geometry.OW : 1);
  g.segments = (int)((geometry.OW + g.restart - 1) / g.restart);
  g.threshold = geometry.threshold;

  unsigned long long* kept = nullptr;
  if (counts != nullptr) {
    // Stream-ordered scratch counter: no device-wide synchronisation.
    cudaError_t error = cudaMallocAsync(reinterpret_cast<void**>(&kept), sizeof(*kept), stream);
    if (error != cudaSuccess) return CudaError("cudaMallocAsync", error);
    error = cudaMemsetAsync(kept, 0, sizeof(*kept), stream);
    if (error != cudaSuccess) return CudaError("cudaMemsetAsync", error);
  }
  const long long total = (long long)g.N * g.M * g.OH * g.segments;
  if (total > 0) {
    constexpr int kThreads = 256;
    const long long blocks = (total + kThreads - 1) / kThreads;
    if (blocks > 0x7fffffffLL) return "too many output windows for one launch";
    DiffConvKernel<<<(unsigned)blocks, kThreads, 0, stream>>>(g, x, w, bias, y, kept);
    cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return CudaError("DiffConvKernel launch", error);
  }
  if (counts != nullptr) {
    FinishCounts<<<1, 1, 0, stream>>>(kept, geometry.M, geometry.DenseMultiplications(),
                                      reinterpret_cast<long long*>(counts));
    cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return CudaError("FinishCounts launch", error);
    error = cudaFreeAsync(kept, stream);
    if (error != cudaSuccess) return CudaError("cudaFreeAsync", error);
  }
  return "";
}

}  // namespace compressor

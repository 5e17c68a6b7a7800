// CUDA kernels of WinogradConv, the CPU kernel's three stages (plus the weight transform), all
// on ORT's compute stream, scratch from cudaMallocAsync on that stream (no device sync):
//   WeightTransform  one thread per (filter k, channel c): U[xi][c][k] = (G g G^T)[xi], double
//   InputTransform   one thread per (tile t, channel c), c fastest: V[xi][t][c] = (B^T d B)[xi]
//                    of the tile's alpha x alpha input patch (zeros outside the input)
//   TiledGemm        alpha^2 GEMMs P[xi] [T x M] = V[xi] [T x C] @ U[xi] [C x M], batched over
//                    xi in blockIdx.z (lsh_conv/cuda_common.cuh: 64 x 64 shared-memory tiles,
//                    4 x 4 outputs per thread): where the time goes
//   OutputTransform  one thread per (tile t, filter k), k fastest: Y = A^T P A (+ bias), the
//                    outputs of partial tiles beyond OH / OW dropped
// T = N * tiles_h * tiles_w tiles over the whole batch (tile t: image t / (tiles_h tiles_w)).
#include <cuda_runtime.h>

#include <string>

#include "ops/lsh_conv/cuda_common.cuh"
#include "ops/winograd_conv/winograd_conv.h"
#include "ops/winograd_conv/winograd_transforms.h"

namespace compressor {
namespace {

using winograd::At1;
using winograd::Bt1;

struct DeviceShape {
  int N, C, H, W, M, OH, OW, pad_top, pad_left;
  int tiles_h, tiles_w;
  long long T;  // tiles over the batch
};

// Lavin & Gray's G (the CPU kernel's, winograd_conv_cpu.cc), F(2x2,3x3) and F(4x4,3x3).
__constant__ double kG2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
__constant__ double kG4[6][3] = {{1.0 / 4, 0, 0},
                                 {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                 {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                 {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                 {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                 {0, 0, 1}};

template <int kM>
__device__ __forceinline__ double G(int i, int j) {
  if constexpr (kM == 2) {
    return kG2[i][j];
  } else {
    return kG4[i][j];
  }
}

template <int kM>
__global__ void WeightTransform(DeviceShape g, const float* __restrict__ w,
                                float* __restrict__ U) {
  constexpr int A = kM + 2;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(g.M) * g.C) return;
  const int k = id % g.M, c = id / g.M;  // k fastest: coalesced writes of U[xi][c][.]
  const float* f = w + (static_cast<long long>(k) * g.C + c) * 9;
  double t[A][3];
#pragma unroll
  for (int i = 0; i < A; ++i) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      t[i][j] = G<kM>(i, 0) * f[j] + G<kM>(i, 1) * f[3 + j] + G<kM>(i, 2) * f[6 + j];
    }
  }
#pragma unroll
  for (int i = 0; i < A; ++i) {
#pragma unroll
    for (int j = 0; j < A; ++j) {
      const double s = t[i][0] * G<kM>(j, 0) + t[i][1] * G<kM>(j, 1) + t[i][2] * G<kM>(j, 2);
      U[(static_cast<long long>(i * A + j) * g.C + c) * g.M + k] = static_cast<float>(s);
    }
  }
}

template <int kM>
__global__ void InputTransform(DeviceShape g, const float* __restrict__ x,
                               float* __restrict__ V) {
  constexpr int A = kM + 2;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= g.T * g.C) return;
  const int c = id % g.C;
  const long long t = id / g.C;
  const int tc = t % g.tiles_w, tr = (t / g.tiles_w) % g.tiles_h;
  const int n = t / (static_cast<long long>(g.tiles_w) * g.tiles_h);
  const float* image = x + (static_cast<long long>(n) * g.C + c) * g.H * g.W;
  const int ih0 = tr * kM - g.pad_top, iw0 = tc * kM - g.pad_left;
  float tmp[A][A];  // (B^T d)[i][j]
#pragma unroll
  for (int j = 0; j < A; ++j) {
    float column[A], r[A];
#pragma unroll
    for (int i = 0; i < A; ++i) {
      const int ih = ih0 + i, iw = iw0 + j;
      column[i] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? image[ih * g.W + iw] : 0.0f;
    }
    Bt1<kM>(column, r);
#pragma unroll
    for (int i = 0; i < A; ++i) tmp[i][j] = r[i];
  }
#pragma unroll
  for (int i = 0; i < A; ++i) {
    float r[A];
    Bt1<kM>(tmp[i], r);
#pragma unroll
    for (int j = 0; j < A; ++j) V[(static_cast<long long>(i * A + j) * g.T + t) * g.C + c] = r[j];
  }
}

template <int kM>
__global__ void OutputTransform(DeviceShape g, const float* __restrict__ P,
                                const float* __restrict__ bias, float* __restrict__ y) {
  constexpr int A = kM + 2;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= g.T * g.M) return;
  const int k = id % g.M;
  const long long t = id / g.M;
  const int tc = t % g.tiles_w, tr = (t / g.tiles_w) % g.tiles_h;
  const int n = t / (static_cast<long long>(g.tiles_w) * g.tiles_h);
  float tmp[kM][A];  // (A^T P)[i][j]
#pragma unroll
  for (int j = 0; j < A; ++j) {
    float column[A], r[kM];
#pragma unroll
    for (int i = 0; i < A; ++i) column[i] = P[(static_cast<long long>(i * A + j) * g.T + t) * g.M + k];
    At1<kM>(column, r);
#pragma unroll
    for (int i = 0; i < kM; ++i) tmp[i][j] = r[i];
  }
  const float b = bias != nullptr ? bias[k] : 0.0f;
  float* out = y + (static_cast<long long>(n) * g.M + k) * g.OH * g.OW;
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    float r[kM];
    At1<kM>(tmp[i], r);
    const int oh = tr * kM + i;
#pragma unroll
    for (int j = 0; j < kM; ++j) {
      const int ow = tc * kM + j;
      if (oh < g.OH && ow < g.OW) out[oh * g.OW + ow] = r[j] + b;
    }
  }
}

// The transform-domain GEMM's operands: z = xi.
struct LoadV {
  DeviceShape g;
  const float* __restrict__ V;
  __device__ int Rows(int) const { return static_cast<int>(g.T); }
  __device__ int Depth(int) const { return g.C; }
  __device__ float operator()(int z, int t, int c) const {
    return V[(static_cast<long long>(z) * g.T + t) * g.C + c];
  }
};

struct LoadU {
  DeviceShape g;
  const float* __restrict__ U;
  __device__ int Cols(int) const { return g.M; }
  __device__ float operator()(int z, int c, int k) const {
    return U[(static_cast<long long>(z) * g.C + c) * g.M + k];
  }
};

struct StoreP {
  DeviceShape g;
  float* __restrict__ P;
  __device__ void operator()(int z, int t, int k, float value) const {
    P[(static_cast<long long>(z) * g.T + t) * g.M + k] = value;
  }
};

constexpr int kThreads = 256;

template <int kM>
std::string Launch(const DeviceShape& g, const float* x, const float* w, const float* bias,
                   float* y, float* U, float* V, float* P, cudaStream_t stream) {
  constexpr int A = kM + 2;
  WeightTransform<kM><<<cuda::Blocks(static_cast<long long>(g.M) * g.C, kThreads), kThreads, 0,
                        stream>>>(g, w, U);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return cuda::Error("WeightTransform launch", error);
  InputTransform<kM><<<cuda::Blocks(g.T * g.C, kThreads), kThreads, 0, stream>>>(g, x, V);
  error = cudaGetLastError();
  if (error != cudaSuccess) return cuda::Error("InputTransform launch", error);
  std::string failed = cuda::LaunchTiledGemm(static_cast<int>(g.T), g.M, A * A, LoadV{g, V},
                                             LoadU{g, U}, StoreP{g, P}, stream);
  if (!failed.empty()) return failed;
  OutputTransform<kM><<<cuda::Blocks(g.T * g.M, kThreads), kThreads, 0, stream>>>(g, P, bias, y);
  error = cudaGetLastError();
  return error == cudaSuccess ? "" : cuda::Error("OutputTransform launch", error);
}

}  // namespace

std::string LaunchWinogradConvCuda(const WinogradConvShape& s, const float* x, const float* w,
                                   const float* bias, float* y, void* stream_ptr) {
  if (s.N == 0 || s.OH == 0 || s.OW == 0) return "";
  const long long T = static_cast<long long>(s.N) * s.tiles_h * s.tiles_w;
  if (T > 65535LL * cuda::kTile || (T * (s.C > s.M ? s.C : s.M)) > (1LL << 40) ||
      T * s.alpha * s.alpha > INT32_MAX) {
    return "too many tiles for one launch: " + std::to_string(T);
  }
  DeviceShape g{};
  g.N = static_cast<int>(s.N);
  g.C = static_cast<int>(s.C);
  g.H = static_cast<int>(s.H);
  g.W = static_cast<int>(s.W);
  g.M = static_cast<int>(s.M);
  g.OH = static_cast<int>(s.OH);
  g.OW = static_cast<int>(s.OW);
  g.pad_top = static_cast<int>(s.pad_top);
  g.pad_left = static_cast<int>(s.pad_left);
  g.tiles_h = static_cast<int>(s.tiles_h);
  g.tiles_w = static_cast<int>(s.tiles_w);
  g.T = T;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const long long a2 = s.alpha * s.alpha;
  const size_t u_size = a2 * s.C * s.M, v_size = a2 * T * s.C, p_size = a2 * T * s.M;
  float* scratch = nullptr;  // U, V, P in one stream-ordered allocation
  cudaError_t error = cudaMallocAsync(reinterpret_cast<void**>(&scratch),
                                      sizeof(float) * (u_size + v_size + p_size), stream);
  if (error != cudaSuccess) return cuda::Error("cudaMallocAsync", error);
  float* U = scratch;
  float* V = U + u_size;
  float* P = V + v_size;
  std::string failed = s.m == 2 ? Launch<2>(g, x, w, bias, y, U, V, P, stream)
                                : Launch<4>(g, x, w, bias, y, U, V, P, stream);
  error = cudaFreeAsync(scratch, stream);
  if (failed.empty() && error != cudaSuccess) failed = cuda::Error("cudaFreeAsync", error);
  return failed;
}

}  // namespace compressor

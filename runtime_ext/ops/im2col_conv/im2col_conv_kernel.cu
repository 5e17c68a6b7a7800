// CUDA kernel of Im2colConv: one tiled shared-memory GEMM launch (lsh_conv/cuda_common.cuh,
// 64 x 64 output tiles, 4 x 4 per thread) per call, batched over (image, group) in
// blockIdx.z: rows are the group's filters, columns the output positions, depth the group's
// window entries (c, kh, kw). The im2col is implicit: the B-tile load gathers x at the window
// entry (0 in the padding), so P is never written to memory; the store adds the bias.
#include <cuda_runtime.h>

#include <string>

#include "ops/im2col_conv/im2col_conv.h"
#include "ops/lsh_conv/cuda_common.cuh"

namespace compressor {
namespace {

struct DeviceShape {
  int C, H, W, M, kH, kW, OH, OW;
  int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int group, group_channels, group_filters, depth;
};

// A(z, row, k): filter row of group z % group, window entry k.
struct LoadFilters {
  DeviceShape g;
  const float* __restrict__ w;
  __device__ int Rows(int) const { return g.group_filters; }
  __device__ int Depth(int) const { return g.depth; }
  __device__ float operator()(int z, int row, int k) const {
    const long long filter = static_cast<long long>(z % g.group) * g.group_filters + row;
    return w[filter * g.depth + k];
  }
};

// B(z, k, col): the im2col matrix of image z / group, group z % group, gathered on the fly.
struct LoadWindows {
  DeviceShape g;
  const float* __restrict__ x;
  __device__ int Cols(int) const { return g.OH * g.OW; }
  __device__ float operator()(int z, int k, int col) const {
    const int kw = k % g.kW, kh = (k / g.kW) % g.kH, c = k / (g.kW * g.kH);
    const int ih = (col / g.OW) * g.stride_h - g.pad_top + kh * g.dilation_h;
    const int iw = (col % g.OW) * g.stride_w - g.pad_left + kw * g.dilation_w;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return 0.0f;
    const int n = z / g.group, channel = (z % g.group) * g.group_channels + c;
    return x[((static_cast<long long>(n) * g.C + channel) * g.H + ih) * g.W + iw];
  }
};

struct StoreOutput {
  DeviceShape g;
  const float* __restrict__ bias;
  float* __restrict__ y;
  __device__ void operator()(int z, int row, int col, float value) const {
    const int n = z / g.group, filter = (z % g.group) * g.group_filters + row;
    const float b = bias != nullptr ? bias[filter] : 0.0f;
    y[(static_cast<long long>(n) * g.M + filter) * g.OH * g.OW + col] = value + b;
  }
};

}  // namespace

std::string LaunchIm2colConvCuda(const Im2colConvShape& s, const float* x, const float* w,
                                 const float* bias, float* y, void* stream) {
  if (s.N == 0 || s.OH == 0 || s.OW == 0) return "";
  if (s.N * s.group > 65535) {
    return "batch x group = " + std::to_string(s.N * s.group) +
           " is too large for one launch (at most 65535)";
  }
  DeviceShape g{};
  g.C = static_cast<int>(s.C);
  g.H = static_cast<int>(s.H);
  g.W = static_cast<int>(s.W);
  g.M = static_cast<int>(s.M);
  g.kH = static_cast<int>(s.kH);
  g.kW = static_cast<int>(s.kW);
  g.OH = static_cast<int>(s.OH);
  g.OW = static_cast<int>(s.OW);
  g.stride_h = static_cast<int>(s.stride_h);
  g.stride_w = static_cast<int>(s.stride_w);
  g.pad_top = static_cast<int>(s.pad_top);
  g.pad_left = static_cast<int>(s.pad_left);
  g.dilation_h = static_cast<int>(s.dilation_h);
  g.dilation_w = static_cast<int>(s.dilation_w);
  g.group = static_cast<int>(s.group);
  g.group_channels = static_cast<int>(s.GroupChannels());
  g.group_filters = static_cast<int>(s.GroupFilters());
  g.depth = static_cast<int>(s.D());
  return cuda::LaunchTiledGemm(g.group_filters, g.OH * g.OW, static_cast<int>(s.N * s.group),
                               LoadFilters{g, w}, LoadWindows{g, x}, StoreOutput{g, bias, y},
                               static_cast<cudaStream_t>(stream));
}

}  // namespace compressor

// CUDA kernels of LSHConv, all on ORT's compute stream, in the CPU kernel's order:
//   QueryKernel    one thread per (sample, query, window entry k): the mean window entry
//   HashKernel     one thread per (sample, query, table): K projections -> sign bits -> code
//   UnionKernel    one thread per (sample, 64-filter word): OR of the buckets hit
//   CompactKernel  one block per sample: ascending lists of selected filters and active input
//                  channels (block-wide scans), the optional `selected` output
//   TiledGemm      selected filters x active channels, with the filter gather, the implicit
//                  im2col and the scatter into Y fused into its loads and store (Y is zeroed
//                  first, so unselected filters stay 0)
// Scratch comes from cudaMallocAsync on the same stream (stream-ordered, no device sync).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "ops/lsh_conv/cuda_common.cuh"
#include "ops/lsh_conv/lsh_conv.h"

namespace compressor {
namespace {

struct Geometry {
  int N, C, H, W, M, kH, kW, OH, OW;
  int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int D, L, K, Q, words;
};

__device__ __forceinline__ float InputAt(const float* x, const Geometry& g, int n, int c, int ih,
                                         int iw) {
  return (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
             ? x[((static_cast<long long>(n) * g.C + c) * g.H + ih) * g.W + iw]
             : 0.0f;
}

// queries[n][q][k], k <= D (k == D: the constant 1). Q == 1: mean over every output
// position; else query q is the mean over the output rows of column q.
__global__ void QueryKernel(Geometry g, const float* __restrict__ x,
                            const bool* __restrict__ channel_mask, float* __restrict__ queries) {
  const long long total = static_cast<long long>(g.N) * g.Q * (g.D + 1);
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= total) return;
  const int k = id % (g.D + 1);
  const int q = (id / (g.D + 1)) % g.Q;
  const int n = id / (static_cast<long long>(g.D + 1) * g.Q);
  if (k == g.D) {
    queries[id] = 1.0f;
    return;
  }
  const int c = k / (g.kH * g.kW), kh = (k / g.kW) % g.kH, kw = k % g.kW;
  if (channel_mask != nullptr && !channel_mask[static_cast<long long>(n) * g.C + c]) {
    queries[id] = 0.0f;
    return;
  }
  const int ow_begin = g.Q == 1 ? 0 : q, ow_end = g.Q == 1 ? g.OW : q + 1;
  float sum = 0.0f;
  for (int oh = 0; oh < g.OH; ++oh) {
    const int ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h;
    if (ih < 0 || ih >= g.H) continue;
    for (int ow = ow_begin; ow < ow_end; ++ow) {
      sum += InputAt(x, g, n, c, ih, ow * g.stride_w - g.pad_left + kw * g.dilation_w);
    }
  }
  const int windows = g.OH * (ow_end - ow_begin);
  queries[id] = windows > 0 ? sum / static_cast<float>(windows) : 0.0f;
}

// codes[n][q][l]: bit j set when planes[l][j] . queries[n][q] > 0.
__global__ void HashKernel(Geometry g, const float* __restrict__ planes,
                           const float* __restrict__ queries, unsigned* __restrict__ codes) {
  const long long total = static_cast<long long>(g.N) * g.Q * g.L;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= total) return;
  const int l = id % g.L;
  const long long nq = id / g.L;  // n * Q + q
  const float* query = queries + nq * (g.D + 1);
  unsigned code = 0;
  for (int j = 0; j < g.K; ++j) {
    const float* plane = planes + (static_cast<long long>(l) * g.K + j) * (g.D + 1);
    float dot = 0.0f;
    for (int k = 0; k <= g.D; ++k) dot = fmaf(plane[k], query[k], dot);
    code |= static_cast<unsigned>(dot > 0.0f) << j;
  }
  codes[id] = code;
}

// selected[n][word] = OR over queries and tables of buckets[l][code][word].
__global__ void UnionKernel(Geometry g, const unsigned long long* __restrict__ buckets,
                            const unsigned* __restrict__ codes,
                            unsigned long long* __restrict__ selected) {
  const long long total = static_cast<long long>(g.N) * g.words;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= total) return;
  const int word = id % g.words;
  const int n = id / g.words;
  const long long buckets_per_table = 1LL << g.K;
  unsigned long long bits = 0;
  for (int q = 0; q < g.Q; ++q) {
    for (int l = 0; l < g.L; ++l) {
      const unsigned code = codes[(static_cast<long long>(n) * g.Q + q) * g.L + l];
      bits |= buckets[(l * buckets_per_table + code) * g.words + word];
    }
  }
  const int tail = g.M - word * 64;  // bits at or past M are ignored
  if (tail < 64) bits &= (1ULL << tail) - 1;
  selected[id] = bits;
}

// Per sample (one block): filters[n][0, counts[n]) = selected filters ascending;
// channels[n][0, active[n]) = active input channels ascending; the optional bool output.
__global__ void CompactKernel(Geometry g, const unsigned long long* __restrict__ selected,
                              const bool* __restrict__ channel_mask, int* __restrict__ filters,
                              int* __restrict__ counts, int* __restrict__ channels,
                              int* __restrict__ active, bool* __restrict__ selected_out) {
  const int n = blockIdx.x;
  const unsigned long long* words = selected + static_cast<long long>(n) * g.words;
  int base = 0;
  for (int start = 0; start < g.M; start += blockDim.x) {
    const int m = start + threadIdx.x;
    const int bit = m < g.M ? static_cast<int>((words[m / 64] >> (m % 64)) & 1ULL) : 0;
    int chunk = 0;
    const int offset = cuda::BlockExclusiveScan(bit, &chunk);
    if (bit) filters[static_cast<long long>(n) * g.M + base + offset] = m;
    if (selected_out != nullptr && m < g.M) selected_out[static_cast<long long>(n) * g.M + m] = bit;
    base += chunk;
  }
  if (threadIdx.x == 0) counts[n] = base;
  base = 0;
  for (int start = 0; start < g.C; start += blockDim.x) {
    const int c = start + threadIdx.x;
    const int on = c < g.C && (channel_mask == nullptr || channel_mask[static_cast<long long>(n) * g.C + c]);
    int chunk = 0;
    const int offset = cuda::BlockExclusiveScan(on, &chunk);
    if (on) channels[static_cast<long long>(n) * g.C + base + offset] = c;
    base += chunk;
  }
  if (threadIdx.x == 0) active[n] = base;
}

// GEMM operands. A(n, i, k): selected filter i's weight at (active channel k / (kH kW), entry
// k % (kH kW)). B(n, k, p): the input under that entry at output position p (implicit im2col).
struct SelectedWeights {
  const float* w;
  const int* filters;
  const int* counts;
  const int* channels;
  const int* active;
  int M, C, kernel;
  __device__ int Rows(int n) const { return counts[n]; }
  __device__ int Depth(int n) const { return active[n] * kernel; }
  __device__ float operator()(int n, int i, int k) const {
    const int m = filters[static_cast<long long>(n) * M + i];
    const int c = channels[static_cast<long long>(n) * C + k / kernel];
    return w[(static_cast<long long>(m) * C + c) * kernel + k % kernel];
  }
};

struct ImplicitPatches {
  const float* x;
  const int* channels;
  Geometry g;
  __device__ int Cols(int) const { return g.OH * g.OW; }
  __device__ float operator()(int n, int k, int p) const {
    const int kernel = g.kH * g.kW;
    const int c = channels[static_cast<long long>(n) * g.C + k / kernel];
    const int tap = k % kernel, kh = tap / g.kW, kw = tap % g.kW;
    const int oh = p / g.OW, ow = p % g.OW;
    return InputAt(x, g, n, c, oh * g.stride_h - g.pad_top + kh * g.dilation_h,
                   ow * g.stride_w - g.pad_left + kw * g.dilation_w);
  }
};

struct ScatterToOutput {
  float* y;
  const float* bias;
  const int* filters;
  int M, plane;
  __device__ void operator()(int n, int i, int p, float value) const {
    const int m = filters[static_cast<long long>(n) * M + i];
    y[(static_cast<long long>(n) * M + m) * plane + p] = value + (bias ? bias[m] : 0.0f);
  }
};

}  // namespace

std::string LaunchLshConvCuda(const Conv2dShape& shape, const LshTablesShape& t, LshQuery query,
                              const LshConvDeviceArgs& args, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  Geometry g{};
  g.N = static_cast<int>(shape.N);
  g.C = static_cast<int>(shape.C);
  g.H = static_cast<int>(shape.H);
  g.W = static_cast<int>(shape.W);
  g.M = static_cast<int>(shape.M);
  g.kH = static_cast<int>(shape.kH);
  g.kW = static_cast<int>(shape.kW);
  g.OH = static_cast<int>(shape.OH);
  g.OW = static_cast<int>(shape.OW);
  g.stride_h = static_cast<int>(shape.stride_h);
  g.stride_w = static_cast<int>(shape.stride_w);
  g.pad_top = static_cast<int>(shape.pad_top);
  g.pad_left = static_cast<int>(shape.pad_left);
  g.dilation_h = static_cast<int>(shape.dilation_h);
  g.dilation_w = static_cast<int>(shape.dilation_w);
  g.D = static_cast<int>(shape.D());
  g.L = static_cast<int>(t.L);
  g.K = static_cast<int>(t.K);
  g.Q = query == LshQuery::kMean ? 1 : g.OW;
  g.words = static_cast<int>(t.words);
  if (g.N == 0) return "";
  if (g.N > 65535) return "batch too large for one launch (more than 65535 samples)";

  // Scratch: queries, codes, selected words, filter and channel lists, counts.
  const long long n_queries = static_cast<long long>(g.N) * g.Q;
  const size_t bytes_queries = sizeof(float) * n_queries * (g.D + 1);
  const size_t bytes_codes = sizeof(unsigned) * n_queries * g.L;
  const size_t bytes_words = sizeof(unsigned long long) * g.N * g.words;
  const size_t bytes_lists = sizeof(int) * (static_cast<size_t>(g.N) * (g.M + g.C + 2));
  auto align = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t total = align(bytes_queries) + align(bytes_codes) + align(bytes_words) + align(bytes_lists);
  char* scratch = nullptr;
  cudaError_t error = cudaMallocAsync(reinterpret_cast<void**>(&scratch), total, stream);
  if (error != cudaSuccess) return cuda::Error("cudaMallocAsync", error);
  float* queries = reinterpret_cast<float*>(scratch);
  unsigned* codes = reinterpret_cast<unsigned*>(scratch + align(bytes_queries));
  unsigned long long* words =
      reinterpret_cast<unsigned long long*>(scratch + align(bytes_queries) + align(bytes_codes));
  int* filters = reinterpret_cast<int*>(scratch + align(bytes_queries) + align(bytes_codes) + align(bytes_words));
  int* channels = filters + static_cast<size_t>(g.N) * g.M;
  int* counts = channels + static_cast<size_t>(g.N) * g.C;
  int* active = counts + g.N;

  std::string failure;
  auto check = [&](const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess && failure.empty()) failure = cuda::Error(what, e);
    return failure.empty();
  };
  constexpr int kThreads = 256;
  const long long query_items = n_queries * (g.D + 1);
  QueryKernel<<<cuda::Blocks(query_items, kThreads), kThreads, 0, stream>>>(g, args.x, args.channel_mask, queries);
  if (check("QueryKernel launch")) {
    HashKernel<<<cuda::Blocks(n_queries * g.L, kThreads), kThreads, 0, stream>>>(g, args.planes, queries, codes);
  }
  if (check("HashKernel launch")) {
    UnionKernel<<<cuda::Blocks(static_cast<long long>(g.N) * g.words, kThreads), kThreads, 0, stream>>>(
        g, reinterpret_cast<const unsigned long long*>(args.buckets), codes, words);
  }
  if (check("UnionKernel launch")) {
    CompactKernel<<<g.N, kThreads, 0, stream>>>(g, words, args.channel_mask, filters, counts,
                                                 channels, active, args.selected);
  }
  const long long outputs = static_cast<long long>(g.N) * g.M * g.OH * g.OW;
  if (check("CompactKernel launch") && outputs > 0) {
    error = cudaMemsetAsync(args.y, 0, sizeof(float) * outputs, stream);
    if (error != cudaSuccess) failure = cuda::Error("cudaMemsetAsync", error);
  }
  if (failure.empty() && outputs > 0) {
    const int kernel = g.kH * g.kW;
    SelectedWeights a{args.w, filters, counts, channels, active, g.M, g.C, kernel};
    ImplicitPatches b{args.x, channels, g};
    ScatterToOutput store{args.y, args.bias, filters, g.M, g.OH * g.OW};
    failure = cuda::LaunchTiledGemm(g.M, g.OH * g.OW, g.N, a, b, store, stream);
  }
  error = cudaFreeAsync(scratch, stream);
  if (error != cudaSuccess && failure.empty()) failure = cuda::Error("cudaFreeAsync", error);
  return failure;
}

}  // namespace compressor

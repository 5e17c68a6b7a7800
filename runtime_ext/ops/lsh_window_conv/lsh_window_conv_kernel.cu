// CUDA kernels of LSHWindowConv, all on ORT's compute stream:
//   Im2ColKernel     one thread per (sample, window entry, window): P [N, D, windows]
//   CodeKernel       one thread per (sample, window): K projections -> sign bits -> code
//   InsertKernel     one thread per (sample, window): a per-sample open-addressing table
//                    keyed by code (atomicCAS), each slot keeping its first window (atomicMin)
//   NumberKernel     one block per sample: buckets numbered in order of their first window
//                    (block-wide scan over "is the first window of its code")
//   AssignKernel     one thread per (sample, window): its bucket, bucket sizes (atomicAdd)
//   MeanSumKernel / MeanScaleKernel   bucket means Pm [N, D, buckets]
//   TiledGemm        Ym = W x Pm per sample (columns up to the sample's bucket count)
//   ScatterKernel    one thread per output: Y[n, m, j] = Ym[n, m, bucket(j)] + bias[m]
// The buckets (and so the selected sets) are exactly the CPU kernel's; the means are summed
// in atomic order, so outputs match the CPU's up to float rounding.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "ops/lsh_conv/cuda_common.cuh"
#include "ops/lsh_window_conv/lsh_window_conv.h"

namespace compressor {
namespace {

struct Geometry {
  int N, C, H, W, M, kH, kW, OH, OW;
  int stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int D, K, windows, capacity;
};

__device__ __forceinline__ long long Id() {
  return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__global__ void Im2ColKernel(Geometry g, const float* __restrict__ x, float* __restrict__ P) {
  const long long total = static_cast<long long>(g.N) * g.D * g.windows;
  const long long id = Id();
  if (id >= total) return;
  const int j = id % g.windows;
  const int k = (id / g.windows) % g.D;
  const int n = id / (static_cast<long long>(g.windows) * g.D);
  const int c = k / (g.kH * g.kW), kh = (k / g.kW) % g.kH, kw = k % g.kW;
  const int oh = j / g.OW, ow = j % g.OW;
  const int ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h;
  const int iw = ow * g.stride_w - g.pad_left + kw * g.dilation_w;
  P[id] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
              ? x[((static_cast<long long>(n) * g.C + c) * g.H + ih) * g.W + iw]
              : 0.0f;
}

__global__ void CodeKernel(Geometry g, const float* __restrict__ planes, const float* __restrict__ P,
                           unsigned long long* __restrict__ codes) {
  const long long total = static_cast<long long>(g.N) * g.windows;
  const long long id = Id();
  if (id >= total) return;
  const int j = id % g.windows;
  const long long n = id / g.windows;
  const float* column = P + n * g.D * g.windows + j;
  unsigned long long code = 0;
  for (int k = 0; k < g.K; ++k) {
    const float* plane = planes + static_cast<long long>(k) * (g.D + 1);
    float dot = 0.0f;
    for (int d = 0; d < g.D; ++d) dot = fmaf(plane[d], column[static_cast<long long>(d) * g.windows], dot);
    code |= static_cast<unsigned long long>(dot + plane[g.D] > 0.0f) << k;
  }
  codes[id] = code;
}

__global__ void InsertKernel(Geometry g, const unsigned long long* __restrict__ codes,
                             unsigned long long* __restrict__ keys, int* __restrict__ first,
                             int* __restrict__ slots) {
  const long long total = static_cast<long long>(g.N) * g.windows;
  const long long id = Id();
  if (id >= total) return;
  const int j = id % g.windows;
  const long long n = id / g.windows;
  const unsigned long long key = codes[id] + 1ULL;  // codes have at most 32 bits: 0 = free
  unsigned long long* table = keys + n * g.capacity;
  unsigned slot = static_cast<unsigned>((key * 0x9E3779B97F4A7C15ULL) >> 32) & (g.capacity - 1);
  for (int probe = 0; probe < g.capacity; ++probe) {
    const unsigned long long previous = atomicCAS(table + slot, 0ULL, key);
    if (previous == 0ULL || previous == key) {
      atomicMin(first + n * g.capacity + slot, j);
      slots[id] = static_cast<int>(slot);
      return;
    }
    slot = (slot + 1) & (g.capacity - 1);
  }
}

// One block per sample: number[n][j] = bucket index of window j when j is the first window of
// its code (in window order), buckets[n] = how many.
__global__ void NumberKernel(Geometry g, const int* __restrict__ first,
                             const int* __restrict__ slots, int* __restrict__ number,
                             int* __restrict__ buckets) {
  const long long n = blockIdx.x;
  int base = 0;
  for (int start = 0; start < g.windows; start += blockDim.x) {
    const int j = start + threadIdx.x;
    int leads = 0;
    if (j < g.windows) {
      const int slot = slots[n * g.windows + j];
      leads = first[n * g.capacity + slot] == j;
    }
    int chunk = 0;
    const int offset = cuda::BlockExclusiveScan(leads, &chunk);
    if (leads) number[n * g.windows + j] = base + offset;
    base += chunk;
  }
  if (threadIdx.x == 0) buckets[n] = base;
}

__global__ void AssignKernel(Geometry g, const int* __restrict__ first, const int* __restrict__ slots,
                             const int* __restrict__ number, int* __restrict__ bucket,
                             int* __restrict__ sizes, int64_t* __restrict__ buckets_out) {
  const long long total = static_cast<long long>(g.N) * g.windows;
  const long long id = Id();
  if (id >= total) return;
  const long long n = id / g.windows;
  const int leader = first[n * g.capacity + slots[id]];
  const int b = number[n * g.windows + leader];
  bucket[id] = b;
  atomicAdd(sizes + n * g.windows + b, 1);
  if (buckets_out != nullptr) buckets_out[id] = b;
}

__global__ void MeanSumKernel(Geometry g, const float* __restrict__ P, const int* __restrict__ bucket,
                              float* __restrict__ means) {
  const long long total = static_cast<long long>(g.N) * g.D * g.windows;
  const long long id = Id();
  if (id >= total) return;
  const int j = id % g.windows;
  const long long nd = id / g.windows;  // n * D + d
  const long long n = nd / g.D;
  atomicAdd(means + nd * g.windows + bucket[n * g.windows + j], P[id]);
}

__global__ void MeanScaleKernel(Geometry g, const int* __restrict__ sizes,
                                const int* __restrict__ buckets, float* __restrict__ means) {
  const long long total = static_cast<long long>(g.N) * g.D * g.windows;
  const long long id = Id();
  if (id >= total) return;
  const int b = id % g.windows;
  const long long n = id / (static_cast<long long>(g.D) * g.windows);
  if (b < buckets[n]) means[id] /= static_cast<float>(sizes[n * g.windows + b]);
}

__global__ void ScatterKernel(Geometry g, const float* __restrict__ product,
                              const int* __restrict__ bucket, const float* __restrict__ bias,
                              float* __restrict__ y) {
  const long long total = static_cast<long long>(g.N) * g.M * g.windows;
  const long long id = Id();
  if (id >= total) return;
  const int j = id % g.windows;
  const long long nm = id / g.windows;  // n * M + m
  const int m = nm % g.M;
  const long long n = nm / g.M;
  y[id] = product[nm * g.windows + bucket[n * g.windows + j]] + (bias ? bias[m] : 0.0f);
}

struct Filters {
  const float* w;
  int M, D;
  __device__ int Rows(int) const { return M; }
  __device__ int Depth(int) const { return D; }
  __device__ float operator()(int, int m, int k) const {
    return w[static_cast<long long>(m) * D + k];
  }
};

struct BucketMeans {
  const float* means;
  const int* buckets;
  int D, windows;
  __device__ int Cols(int n) const { return buckets[n]; }
  __device__ float operator()(int n, int k, int b) const {
    return means[(static_cast<long long>(n) * D + k) * windows + b];
  }
};

struct BucketProducts {
  float* product;
  int M, windows;
  __device__ void operator()(int n, int m, int b, float value) const {
    product[(static_cast<long long>(n) * M + m) * windows + b] = value;
  }
};

}  // namespace

std::string LaunchLshWindowConvCuda(const Conv2dShape& shape, int64_t bits,
                                    const LshWindowConvDeviceArgs& args, void* stream_ptr) {
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
  g.K = static_cast<int>(bits);
  g.windows = g.OH * g.OW;
  g.capacity = 16;
  while (g.capacity < 2 * g.windows) g.capacity *= 2;
  if (g.N == 0 || g.windows == 0) return "";
  if (g.N > 65535) return "batch too large for one launch (more than 65535 samples)";

  const long long N = g.N, D = g.D, windows = g.windows, capacity = g.capacity;
  auto align = [](size_t bytes) { return (bytes + 255) / 256 * 256; };
  const size_t sizes[] = {
      align(sizeof(float) * N * D * windows),        // P
      align(sizeof(float) * N * D * windows),        // means
      align(sizeof(float) * N * g.M * windows),      // products
      align(sizeof(unsigned long long) * N * windows),   // codes
      align(sizeof(unsigned long long) * N * capacity),  // keys
      align(sizeof(int) * N * capacity),             // first window of each slot
      align(sizeof(int) * N * windows),              // slots
      align(sizeof(int) * N * windows),              // number of leading windows
      align(sizeof(int) * N * windows),              // bucket of each window
      align(sizeof(int) * N * windows),              // bucket sizes
      align(sizeof(int) * N),                        // buckets per sample
  };
  size_t total = 0;
  for (size_t s : sizes) total += s;
  char* scratch = nullptr;
  cudaError_t error = cudaMallocAsync(reinterpret_cast<void**>(&scratch), total, stream);
  if (error != cudaSuccess) return cuda::Error("cudaMallocAsync", error);
  char* cursor = scratch;
  auto take = [&](size_t index) {
    char* p = cursor;
    cursor += sizes[index];
    return p;
  };
  float* P = reinterpret_cast<float*>(take(0));
  float* means = reinterpret_cast<float*>(take(1));
  float* products = reinterpret_cast<float*>(take(2));
  unsigned long long* codes = reinterpret_cast<unsigned long long*>(take(3));
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(take(4));
  int* first = reinterpret_cast<int*>(take(5));
  int* slots = reinterpret_cast<int*>(take(6));
  int* number = reinterpret_cast<int*>(take(7));
  int* bucket = reinterpret_cast<int*>(take(8));
  int* bucket_sizes = reinterpret_cast<int*>(take(9));
  int* buckets = reinterpret_cast<int*>(take(10));

  std::string failure;
  auto ok = [&](const char* what, cudaError_t e) {
    if (e != cudaSuccess && failure.empty()) failure = cuda::Error(what, e);
    return failure.empty();
  };
  constexpr int kThreads = 256;
  const long long entries = N * D * windows;
  // Stream-ordered resets: free table slots (key 0), "no window yet" (0x7f7f7f7f > any index),
  // bucket sizes and mean sums.
  ok("cudaMemsetAsync", cudaMemsetAsync(keys, 0, sizeof(unsigned long long) * N * capacity, stream));
  ok("cudaMemsetAsync", cudaMemsetAsync(first, 0x7f, sizeof(int) * N * capacity, stream));
  ok("cudaMemsetAsync", cudaMemsetAsync(bucket_sizes, 0, sizeof(int) * N * windows, stream));
  ok("cudaMemsetAsync", cudaMemsetAsync(means, 0, sizeof(float) * entries, stream));
  if (failure.empty()) {
    Im2ColKernel<<<cuda::Blocks(entries, kThreads), kThreads, 0, stream>>>(g, args.x, P);
    ok("Im2ColKernel launch", cudaGetLastError());
  }
  if (failure.empty()) {
    CodeKernel<<<cuda::Blocks(N * windows, kThreads), kThreads, 0, stream>>>(g, args.planes, P, codes);
    ok("CodeKernel launch", cudaGetLastError());
  }
  if (failure.empty()) {
    InsertKernel<<<cuda::Blocks(N * windows, kThreads), kThreads, 0, stream>>>(g, codes, keys, first, slots);
    ok("InsertKernel launch", cudaGetLastError());
  }
  if (failure.empty()) {
    NumberKernel<<<g.N, 1024, 0, stream>>>(g, first, slots, number, buckets);
    ok("NumberKernel launch", cudaGetLastError());
  }
  if (failure.empty()) {
    AssignKernel<<<cuda::Blocks(N * windows, kThreads), kThreads, 0, stream>>>(
        g, first, slots, number, bucket, bucket_sizes, args.buckets);
    ok("AssignKernel launch", cudaGetLastError());
  }
  if (failure.empty()) {
    MeanSumKernel<<<cuda::Blocks(entries, kThreads), kThreads, 0, stream>>>(g, P, bucket, means);
    ok("MeanSumKernel launch", cudaGetLastError());
  }
  if (failure.empty()) {
    MeanScaleKernel<<<cuda::Blocks(entries, kThreads), kThreads, 0, stream>>>(g, bucket_sizes, buckets, means);
    ok("MeanScaleKernel launch", cudaGetLastError());
  }
  if (failure.empty()) {
    failure = cuda::LaunchTiledGemm(g.M, g.windows, g.N, Filters{args.w, g.M, g.D},
                                    BucketMeans{means, buckets, g.D, g.windows},
                                    BucketProducts{products, g.M, g.windows}, stream);
  }
  if (failure.empty()) {
    ScatterKernel<<<cuda::Blocks(N * g.M * windows, kThreads), kThreads, 0, stream>>>(
        g, products, bucket, args.bias, args.y);
    ok("ScatterKernel launch", cudaGetLastError());
  }
  ok("cudaFreeAsync", cudaFreeAsync(scratch, stream));
  return failure;
}

}  // namespace compressor

// CUDA building blocks shared by the LSH ops' kernels: a tiled shared-memory SGEMM whose
// operand loads and result store are functors (so gathers, implicit im2col and scatters fuse
// into it), a block-wide exclusive scan, and error strings.
//
// Why our own GEMM and not cuBLAS: this CUDA 13 toolkit ships no cuBLAS headers, and a cuBLAS
// call would also tie the library to onnxruntime-gpu's CUDA major version at run time; the
// selected-filter and bucket GEMMs here are small and irregular (per-sample row counts, fused
// gathers) where a 64x64-tile kernel is a reasonable fit.
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace compressor {
namespace cuda {

inline std::string Error(const char* what, cudaError_t error) {
  return std::string(what) + " failed: " + cudaGetErrorName(error) + ": " +
         cudaGetErrorString(error);
}

inline unsigned Blocks(long long total, int threads) {
  return static_cast<unsigned>((total + threads - 1) / threads);
}

constexpr int kTile = 64;        // output tile: kTile x kTile
constexpr int kTileDepth = 16;   // depth of one shared-memory stage
constexpr int kGemmThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

// C[z][row, col] = sum over k < a.Depth(z) of A(z, row, k) * B(z, k, col), for
// row < a.Rows(z), col < b.Cols(z); grid = (ceil(max cols / 64), ceil(max rows / 64), batch).
// Blocks beyond a sample's rows or columns return at once.
template <class LoadA, class LoadB, class Store>
__global__ void __launch_bounds__(kGemmThreads)
TiledGemm(LoadA a, LoadB b, Store store) {
  __shared__ float As[kTileDepth][kTile + 4];
  __shared__ float Bs[kTileDepth][kTile + 4];
  const int z = blockIdx.z;
  const int rows = a.Rows(z), cols = b.Cols(z), depth = a.Depth(z);
  const int row0 = blockIdx.y * kTile, col0 = blockIdx.x * kTile;
  if (row0 >= rows || col0 >= cols) return;  // uniform across the block
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < depth; k0 += kTileDepth) {
    // 64 x 16 elements of each operand, 4 per thread.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int index = tid + i * kGemmThreads;
      const int r = index / kTileDepth, k = index % kTileDepth;  // A: k fastest
      const int row = row0 + r, kk = k0 + k;
      As[k][r] = (row < rows && kk < depth) ? a(z, row, kk) : 0.0f;
      const int kb = index / kTile, c = index % kTile;  // B: columns fastest (coalesced)
      const int col = col0 + c, kkb = k0 + kb;
      Bs[kb][c] = (col < cols && kkb < depth) ? b(z, kkb, col) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileDepth; ++k) {
      float af[4], bf[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) af[i] = As[k][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bf[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(af[i], bf[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + ty * 4 + i;
    if (row >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = col0 + tx + 16 * j;  // neighbouring threads: neighbouring columns
      if (col < cols) store(z, row, col, acc[i][j]);
    }
  }
}

template <class LoadA, class LoadB, class Store>
std::string LaunchTiledGemm(int max_rows, int max_cols, int batch, const LoadA& a,
                            const LoadB& b, const Store& store, cudaStream_t stream) {
  if (max_rows <= 0 || max_cols <= 0 || batch <= 0) return "";
  if (batch > 65535) return "batch too large for one launch (more than 65535 samples)";
  const dim3 grid(Blocks(max_cols, kTile), Blocks(max_rows, kTile), static_cast<unsigned>(batch));
  if (grid.y > 65535) return "too many rows for one launch";
  TiledGemm<<<grid, kGemmThreads, 0, stream>>>(a, b, store);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? "" : Error("TiledGemm launch", error);
}

// Exclusive prefix sum of `value` over the threads of a block (blockDim.x a multiple of 32,
// at most 1024); returns this thread's prefix and sets *total. Every thread must call it.
__device__ inline int BlockExclusiveScan(int value, int* total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int sum = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, sum, offset);
      if (lane >= offset) sum += other;
    }
    if (lane < warps) warp_sums[lane] = sum;  // inclusive sums of the warps
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[warps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + inclusive - value;
}

}  // namespace cuda
}  // namespace compressor

#include "common/gemm.h"

#include <algorithm>
#include <cstring>
#include <mutex>

#if COMPRESSOR_USE_OPENBLAS
#include <cblas.h>  // scipy-openblas32's header: every symbol carries the scipy_ prefix
#endif

namespace compressor {

#if COMPRESSOR_USE_OPENBLAS

void Sgemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
           int ldc, bool accumulate) {
  // Our callers already run one GEMM per ORT worker thread, so OpenBLAS must not start its
  // own threads. This copy of OpenBLAS (scipy-openblas32) is not numpy's, so the process-wide
  // setting only affects other users of scipy-openblas32 in this process.
  static std::once_flag single_threaded;
  std::call_once(single_threaded, [] { scipy_openblas_set_num_threads(1); });
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, A, lda, B, ldb,
                    accumulate ? 1.0f : 0.0f, C, ldc);
}

const char* GemmBackend() { return "OpenBLAS"; }

#else

// Portable blocked GEMM for builds without OpenBLAS: correct, several times slower.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void Sgemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
           int ldc, bool accumulate) {
  if (!accumulate) {
    for (int i = 0; i < M; ++i) std::memset(C + (size_t)i * ldc, 0, sizeof(float) * N);
  }
  constexpr int kBlockK = 128, kBlockN = 256;
  for (int k0 = 0; k0 < K; k0 += kBlockK) {
    int k1 = std::min(K, k0 + kBlockK);
    for (int n0 = 0; n0 < N; n0 += kBlockN) {
      int n1 = std::min(N, n0 + kBlockN);
      for (int i = 0; i < M; ++i) {
        float* __restrict c = C + (size_t)i * ldc;
        for (int k = k0; k < k1; ++k) {
          const float a = A[(size_t)i * lda + k];
          const float* __restrict b = B + (size_t)k * ldb;
          for (int n = n0; n < n1; ++n) c[n] += a * b[n];
        }
      }
    }
  }
}

const char* GemmBackend() { return "builtin"; }

#endif

}  // namespace compressor

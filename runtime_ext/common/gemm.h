// Single-threaded dense matrix product for kernels that parallelise themselves over ORT's
// thread pool. Row-major: C[M, N] = A[M, K] @ B[K, N] (+ C when accumulate).
#pragma once

namespace compressor {

void Sgemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
           int ldc, bool accumulate = false);

// Name of the GEMM backend compiled in ("OpenBLAS" or "builtin").
const char* GemmBackend();

}  // namespace compressor

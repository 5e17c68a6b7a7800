// Single-threaded dense matrix products for kernels that parallelise themselves over ORT's
// thread pool. Row-major throughout.
//   Sgemm:        C[M, N] = A[M, K] @ B[K, N] (+ C when accumulate), through OpenBLAS.
//   SgemmPacked:  the same with B packed once beforehand (PackB) into column panels, by our
//                 own register-blocked micro-kernel: for a B that many calls reuse (a layer's
//                 transformed weights), where OpenBLAS would pack B again on every call.
#pragma once

#include <cstdint>

namespace compressor {

void Sgemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
           int ldc, bool accumulate = false);

// Name of the GEMM backend compiled in ("OpenBLAS" or "builtin").
const char* GemmBackend();

// Packed B: column panels of kPanelWidth floats (the last one 16 or 32 wide, zero-filled past
// N), each [K][panel width] contiguous. PackedSize floats for a K x N matrix.
constexpr int64_t kPanelWidth = 32;
inline int64_t PackedSize(int64_t K, int64_t N) { return (N + 15) / 16 * 16 * K; }

// out[PackedSize(K, N)] = B [K x N] (leading dimension ldb) in panels.
void PackB(const float* B, int64_t ldb, int64_t K, int64_t N, float* out);

// Width of the panel that starts at column n0 of a packed K x N matrix: 32, or 16 for a last
// panel of at most 16 columns.
inline int64_t PanelWidth(int64_t n0, int64_t N) { return N - n0 > 16 ? kPanelWidth : 16; }

// B[k][n] of a packed K x N matrix (references read packed weights through this).
inline float PackedAt(const float* packed, int64_t K, int64_t N, int64_t k, int64_t n) {
  const int64_t n0 = n / kPanelWidth * kPanelWidth;
  return packed[n0 * K + k * PanelWidth(n0, N) + (n - n0)];
}

// C[M x N] (leading dimension ldc) = A [M x K] (lda) @ packed B (PackB of a K x N matrix).
void SgemmPacked(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                 const float* packed, float* C, int64_t ldc);

}  // namespace compressor

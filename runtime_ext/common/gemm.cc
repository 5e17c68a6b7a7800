#include "common/gemm.h"

#include "common/direct_conv.h"  // the shared vector type, loads and clone list

#include <algorithm>
#include <cstring>
#include <mutex>
#include <utility>

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
COMPRESSOR_CLONES
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

// ---------------------------------------------------------------------------------------------
// Packed-B GEMM: our own micro-kernel, the same in every build.

void PackB(const float* B, int64_t ldb, int64_t K, int64_t N, float* out) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanelWidth) {
    const int64_t width = PanelWidth(n0, N), valid = std::min(width, N - n0);
    float* panel = out + n0 * K;
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(panel + k * width, B + k * ldb + n0, sizeof(float) * valid);
      std::memset(panel + k * width + valid, 0, sizeof(float) * (width - valid));
    }
  }
}

namespace {

using direct_conv::Load16;
using direct_conv::Store16;
using direct_conv::Vec16;
constexpr int kMaxRows = 12;  // rows per micro-tile: 12 x 2 accumulators of the 32 registers

// C[R x 16 NV] = A[R x K] @ panel[K x 16 NV], the accumulators in registers; `valid` columns
// of C are written (a partial last vector lane by lane).
template <int R, int NV>
COMPRESSOR_INLINE void MicroTile(const float* a, int64_t lda, const float* panel, int64_t K,
                                 float* c, int64_t ldc, int64_t valid) {
  Vec16 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec16{};
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec16 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = Load16(panel + (k * NV + v) * 16);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * lda + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * w[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    float* row = c + r * ldc;
    for (int v = 0; v < NV; ++v) {
      if ((v + 1) * 16 <= valid) {
        Store16(row + v * 16, acc[r][v]);
      } else {
        for (int64_t l = v * 16; l < valid; ++l) row[l] = acc[r][v][l - v * 16];
      }
    }
  }
}

template <int NV, int... R>
COMPRESSOR_INLINE void RowsTile(int rows, std::integer_sequence<int, R...>, const float* a,
                                int64_t lda, const float* panel, int64_t K, float* c,
                                int64_t ldc, int64_t valid) {
  // rows in [1, kMaxRows]: the one MicroTile<rows, NV> of the pack.
  ((rows == R + 1 ? MicroTile<R + 1, NV>(a, lda, panel, K, c, ldc, valid) : void()), ...);
}

}  // namespace

COMPRESSOR_CLONES
void SgemmPacked(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                 const float* packed, float* C, int64_t ldc) {
  const auto rows_pack = std::make_integer_sequence<int, kMaxRows>{};
  for (int64_t n0 = 0; n0 < N; n0 += kPanelWidth) {
    const int64_t width = PanelWidth(n0, N), valid = std::min(width, N - n0);
    const float* panel = packed + n0 * K;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
      const float* a = A + m0 * lda;
      float* c = C + m0 * ldc + n0;
      if (width == kPanelWidth) {
        RowsTile<2>(rows, rows_pack, a, lda, panel, K, c, ldc, valid);
      } else {
        RowsTile<1>(rows, rows_pack, a, lda, panel, K, c, ldc, valid);
      }
    }
  }
}

}  // namespace compressor

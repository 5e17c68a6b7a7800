// The 1-D Winograd transforms B^T (input) and A^T (output) of F(2x2,3x3) and F(4x4,3x3) as
// Lavin & Gray's closed forms, shared by the CPU kernel (T = a 16-float vector) and the CUDA
// kernels (T = float): one statement of each, the same additions in the same order.
#pragma once

#if defined(__CUDACC__)
#define WINOGRAD_TRANSFORM __host__ __device__ __forceinline__
#else
#define WINOGRAD_TRANSFORM inline __attribute__((always_inline))
#endif

namespace compressor {
namespace winograd {

// r = B^T d for the alpha = kM + 2 values d[0..alpha).
template <int kM, class T>
WINOGRAD_TRANSFORM void Bt1(const T* d, T* r) {
  if constexpr (kM == 2) {
    r[0] = d[0] - d[2];
    r[1] = d[1] + d[2];
    r[2] = d[2] - d[1];
    r[3] = d[1] - d[3];
  } else {
    r[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    r[1] = d[3] + d[4] - 4.0f * (d[1] + d[2]);
    r[2] = d[4] - d[3] + 4.0f * (d[1] - d[2]);
    r[3] = d[4] - d[2] + 2.0f * (d[3] - d[1]);
    r[4] = d[4] - d[2] - 2.0f * (d[3] - d[1]);
    r[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
  }
}

// o = A^T s for the alpha values s[0..alpha): kM outputs.
template <int kM, class T>
WINOGRAD_TRANSFORM void At1(const T* s, T* o) {
  if constexpr (kM == 2) {
    o[0] = s[0] + s[1] + s[2];
    o[1] = s[1] - s[2] - s[3];
  } else {
    const T a = s[1] + s[2], b = s[1] - s[2], c = s[3] + s[4], d = s[3] - s[4];
    o[0] = s[0] + a + c;
    o[1] = b + 2.0f * d;
    o[2] = a + 4.0f * c;
    o[3] = b + 8.0f * d + s[5];
  }
}

}  // namespace winograd
}  // namespace compressor

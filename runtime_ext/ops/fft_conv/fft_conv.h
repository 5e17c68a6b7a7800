// FFTConv: ONNX Conv at stride 1, dilation 1, group 1 (any kernel size, any pads, optional
// bias) computed by real-input 2-D FFTs, for large kernels on large maps.
//
// Inputs:  X [N, C, H, W] float, W [M, C, kH, kW] float (the Conv's own weights), B [M] (optional).
// Outputs: Y [N, M, OH, OW] float.
// Attributes: pads (any, asymmetric), strides / dilations (must be 1), kernel_shape (must match W
//   when given), group (must be 1).
//
// Overlap-save tiling keeps memory bounded on large maps: the output is cut into tiles of
// (Fh - kH + 1) x (Fw - kW + 1); each tile's input window, Fh x Fw, is transformed by rfft2,
// and the circular correlation of that window with a filter is exact on the tile's outputs:
//   K[f][c][m] = conj(rfft2(w[m][c] zero-padded to Fh x Fw))[f]   once per W and FFT size
//   X[f][t][c] = rfft2(x window of tile t, channel c)[f]          stage 1
//   Z[f][t][m] = sum_c X[f][t][c] K[f][c][m]                      stage 2: a complex GEMM per
//                                                                 frequency, run as one real
//                                                                 GEMM [T x 2C] @ [2C x 2M]
//   Y[t][m]    = irfft2(Z[.][t][m]) cut to the tile (+ bias)      stage 3
// Fh and Fw are 2^a 3^b sizes chosen to minimise the transformed points per output, within
// a budget for the kernel spectra. COMPRESSOR_FFT_REFERENCE=1 runs plain references of the three
// stages (direct DFTs in double and a scalar complex product) in place of pocketfft and the GEMM.
// The CUDA kernel (fft_conv_kernel.cu) runs the same stages with cuFFT and a batched GEMM.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/conv_inputs.h"
#include "common/ort_op.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

inline constexpr const char* kFFTConvName = "FFTConv";

// The op as ORT sees it (common/conv_inputs.h): inputs X, W, B (optional); output Y. Its
// attributes are read by ReadStrideOneAttributes (any kernel size).
struct FFTConvSignature : ConvSignature {
  static constexpr const char* kName = kFFTConvName;
};

// The most memory the kernel spectra of one FFT size may take (2C x 2M floats per frequency).
inline constexpr int64_t kFFTConvSpectraBytes = int64_t{1} << 30;

// The FFT size minimises the modelled cost over the tiles: the GEMMs' real multiply-adds
// (4 C M per frequency) plus the transforms' (C + M) Fh Fw log2(Fh Fw), weighted by this (a
// transform's operation runs about this many times slower than a GEMM's, on our machine).
inline constexpr double kFFTConvTransformWeight = 10.0;

// Sizes of one call: Conv2dShape's, the FFT size and the tile grid.
struct FFTConvShape : Conv2dShape {
  int64_t Fh, Fw;            // FFT size (the input window of a tile)
  int64_t Fc;                // Fw / 2 + 1: columns of the half spectrum
  int64_t tile_h, tile_w;    // outputs per tile: F - k + 1
  int64_t tiles_h, tiles_w;  // tiles per image

  int64_t Frequencies() const { return Fh * Fc; }
  int64_t Tiles() const { return N * tiles_h * tiles_w; }

  static FFTConvShape Make(const Conv2dAttributes& a, const std::vector<int64_t>& x,
                           const std::vector<int64_t>& w, const std::vector<int64_t>* bias) {
    FFTConvShape g{};
    static_cast<Conv2dShape&>(g) = Conv2dShape::FromShapes(a, x, w, bias);
    // The GEMM takes 32-bit sizes.
    if (g.C > INT32_MAX / 64 || g.M > INT32_MAX / 64 || g.kH > 4096 || g.kW > 4096) {
      throw OpError("shape too large: X " + ShapeString(x) + ", W " + ShapeString(w),
                    ORT_NOT_IMPLEMENTED);
    }
    // Every 2^a 3^b size up to 4x the kernel or 128, whichever is larger (pocketfft's factor-5
    // passes were slower: 64 -> 64 5x5 at 56x56, batch 16, ran 0.75x of Conv's speed at 60 x 60
    // and 1.25x at 64 x 64, on a loaded machine); the cheapest pair by the modelled cost (which
    // also rules out windows larger than the map) within the spectra budget.
    const int64_t kmax = std::max(g.kH, g.kW), limit = std::max<int64_t>(128, 4 * kmax);
    std::vector<int64_t> sizes;
    for (int64_t s = 1; s <= limit; ++s) {
      int64_t r = s;
      for (int64_t p : {2, 3}) {
        while (r % p == 0) r /= p;
      }
      if (r == 1) sizes.push_back(s);
    }
    double best = -1;
    for (int64_t fh : sizes) {
      if (fh < g.kH) continue;
      for (int64_t fw : sizes) {
        if (fw < g.kW) continue;
        const int64_t th = fh - g.kH + 1, tw = fw - g.kW + 1;
        const int64_t nh = (g.OH + th - 1) / th, nw = (g.OW + tw - 1) / tw;
        const double spectra = 16.0 * static_cast<double>(fh * (fw / 2 + 1)) *
                               static_cast<double>(g.C) * static_cast<double>(g.M);
        if (spectra > static_cast<double>(kFFTConvSpectraBytes)) continue;
        const double points = static_cast<double>(fh * fw);
        const double cost = static_cast<double>(nh * nw) *
                            (4.0 * static_cast<double>(g.C * g.M * fh * (fw / 2 + 1)) +
                             kFFTConvTransformWeight * static_cast<double>(g.C + g.M) * points *
                                 std::log2(points));
        if (best < 0 || cost < best) {
          best = cost;
          g.Fh = fh;
          g.Fw = fw;
        }
      }
    }
    if (best < 0) {
      throw OpError("the kernel spectra of W " + ShapeString(w) + " would need more than " +
                        std::to_string(kFFTConvSpectraBytes >> 20) + " MiB at any FFT size",
                    ORT_NOT_IMPLEMENTED);
    }
    g.Fc = g.Fw / 2 + 1;
    g.tile_h = g.Fh - g.kH + 1;
    g.tile_w = g.Fw - g.kW + 1;
    g.tiles_h = (g.OH + g.tile_h - 1) / g.tile_h;
    g.tiles_w = (g.OW + g.tile_w - 1) / g.tile_w;
    return g;
  }
};

// Registration hooks: each adds its kernel to the op domain.
void AddFFTConvCpu(Ort::CustomOpDomain& domain);

#if COMPRESSOR_WITH_CUDA
void AddFFTConvCuda(Ort::CustomOpDomain& domain);

// The cuFFT plans of one CUDA kernel instance, by transform size and batch, kept while the
// kernel lives (fft_conv_kernel.cu; a plan's creation allocates its work area).
class FFTConvCudaPlans;
std::shared_ptr<FFTConvCudaPlans> MakeFFTConvCudaPlans();

// Runs the CPU kernel's three stages (and the kernel spectra) on `stream` (ORT's compute
// stream): rfft2 / irfft2 by cuFFT, the per-frequency products as one batched GEMM. Returns an
// empty string on success, else the cuFFT or CUDA error.
std::string LaunchFFTConvCuda(FFTConvCudaPlans& plans, const FFTConvShape& g, const float* x,
                              const float* w, const float* bias, float* y, void* stream);
#else
inline void AddFFTConvCuda(Ort::CustomOpDomain&) {}  // built without CUDA: nothing to add
#endif

}  // namespace compressor

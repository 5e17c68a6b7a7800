// FFTConv CPU kernel (see fft_conv.h): overlap-save tiles, rfft2 / irfft2 by pocketfft (one
// call per block of tiles, every channel of the block at once), and per frequency one real GEMM through our
// single-threaded OpenBLAS wrapper (common/gemm.h) on ORT's intra-op thread pool.
//
// The transforms run on contiguous [lines][P] spectra per block of tiles, transposed to and from
// the frequency-major [P][T][C] / [P][T][M] that the GEMMs read and write.
// Complex numbers stay interleaved (re, im): X[f] is [T x C] complex = [T x 2C] floats, and the
// complex product by K[f] ([C x M]) is the real product [T x 2C] @ [2C x 2M] with
//   rows 2c, 2c+1 of the real matrix = [Kr Ki; -Ki Kr] of K[f][c][m] at columns 2m, 2m+1.
// The tiles of the whole batch are processed in chunks of at most kChunkBytes of spectra, so
// memory stays bounded on 224 x 224 maps at any batch.
#include <algorithm>
#include <cmath>
#include <complex>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "common/conv_inputs.h"
#include "common/cpu_parallel.h"
#include "common/gemm.h"
#include "ops/fft_conv/fft_conv.h"

// pocketfft's own threads stay off (nthreads = 1 in every call: ORT's pool runs the units); its
// plan cache is kept (thread-safe with multithreading compiled in).
#include <pocketfft_hdronly.hpp>

namespace compressor {
namespace {

using Complex = std::complex<float>;

// Spectra of one chunk (input and output) stay under this; at least one tile per chunk.
constexpr int64_t kChunkBytes = int64_t{48} << 20;

// Where spectrum element (line, u, v) lives, in complex elements: line * line_stride +
// (u * Fc + v) * frequency_stride. Lines are (tile, channel) pairs of one chunk.
struct SpectrumLayout {
  int64_t line_stride;
  int64_t frequency_stride;
};

// Stage 1 / kernel spectra: rfft2 of `lines` real Fh x Fw windows (contiguous, line after
// line) into `out` laid out as `layout`.
void ForwardTransform(const FFTConvShape& g, int64_t lines, const float* in, Complex* out,
                      SpectrumLayout layout) {
  const ptrdiff_t cs = sizeof(Complex);
  pocketfft::r2c<float>({static_cast<size_t>(lines), static_cast<size_t>(g.Fh),
                         static_cast<size_t>(g.Fw)},
                        {static_cast<ptrdiff_t>(g.Fh * g.Fw * 4), static_cast<ptrdiff_t>(g.Fw * 4), 4},
                        {layout.line_stride * cs, g.Fc * layout.frequency_stride * cs,
                         layout.frequency_stride * cs},
                        {1, 2}, true, in, out, 1.0f, 1);
}

// Reference of ForwardTransform: the direct DFT, in double.
void ForwardTransformReference(const FFTConvShape& g, int64_t lines, const float* in,
                               Complex* out, SpectrumLayout layout) {
  const double two_pi = 2 * std::acos(-1.0);
  for (int64_t line = 0; line < lines; ++line) {
    const float* window = in + line * g.Fh * g.Fw;
    for (int64_t u = 0; u < g.Fh; ++u) {
      for (int64_t v = 0; v < g.Fc; ++v) {
        std::complex<double> sum = 0;
        for (int64_t r = 0; r < g.Fh; ++r) {
          for (int64_t s = 0; s < g.Fw; ++s) {
            const double angle = -two_pi * (static_cast<double>(u * r) / g.Fh +
                                            static_cast<double>(v * s) / g.Fw);
            sum += static_cast<double>(window[r * g.Fw + s]) * std::polar(1.0, angle);
          }
        }
        out[line * layout.line_stride + (u * g.Fc + v) * layout.frequency_stride] =
            Complex(static_cast<float>(sum.real()), static_cast<float>(sum.imag()));
      }
    }
  }
}

// Stage 3: irfft2 (scaled by 1 / (Fh Fw)) of `lines` half spectra laid out as `layout` into
// real Fh x Fw windows (contiguous).
void InverseTransform(const FFTConvShape& g, int64_t lines, const Complex* in,
                      SpectrumLayout layout, float* out) {
  const ptrdiff_t cs = sizeof(Complex);
  pocketfft::c2r<float>({static_cast<size_t>(lines), static_cast<size_t>(g.Fh),
                         static_cast<size_t>(g.Fw)},
                        {layout.line_stride * cs, g.Fc * layout.frequency_stride * cs,
                         layout.frequency_stride * cs},
                        {static_cast<ptrdiff_t>(g.Fh * g.Fw * 4), static_cast<ptrdiff_t>(g.Fw * 4), 4},
                        {1, 2}, false, in, out, 1.0f / static_cast<float>(g.Fh * g.Fw), 1);
}

// Reference of InverseTransform: the direct inverse DFT of the Hermitian spectrum, in double
// (columns v > Fw / 2 are the conjugates of column Fw - v, row Fh - u).
void InverseTransformReference(const FFTConvShape& g, int64_t lines, const Complex* in,
                               SpectrumLayout layout, float* out) {
  const double two_pi = 2 * std::acos(-1.0);
  for (int64_t line = 0; line < lines; ++line) {
    auto at = [&](int64_t u, int64_t v) {
      std::complex<double> z;
      if (v < g.Fc) {
        const Complex c = in[line * layout.line_stride + (u * g.Fc + v) * layout.frequency_stride];
        z = {c.real(), c.imag()};
      } else {
        const int64_t uu = (g.Fh - u) % g.Fh, vv = g.Fw - v;
        const Complex c = in[line * layout.line_stride + (uu * g.Fc + vv) * layout.frequency_stride];
        z = {c.real(), -c.imag()};
      }
      return z;
    };
    for (int64_t r = 0; r < g.Fh; ++r) {
      for (int64_t s = 0; s < g.Fw; ++s) {
        double sum = 0;
        for (int64_t u = 0; u < g.Fh; ++u) {
          for (int64_t v = 0; v < g.Fw; ++v) {
            const double angle = two_pi * (static_cast<double>(u * r) / g.Fh +
                                           static_cast<double>(v * s) / g.Fw);
            sum += (at(u, v) * std::polar(1.0, angle)).real();
          }
        }
        out[(line * g.Fh + r) * g.Fw + s] = static_cast<float>(sum / static_cast<double>(g.Fh * g.Fw));
      }
    }
  }
}

// Copies `lines` contiguous spectra src[line][P] to dst[f * dst_stride + line] (line-major to
// frequency-major), or back when `to_lines`, in 16 x 16 blocks so both sides stay in cache: the
// transforms run on contiguous lines (pocketfft on strided output was several times slower).
void Transpose(int64_t lines, int64_t P, Complex* lines_side, Complex* frequency_side,
               int64_t frequency_stride, bool to_lines) {
  constexpr int64_t kBlock = 16;
  for (int64_t f0 = 0; f0 < P; f0 += kBlock) {
    const int64_t f1 = std::min(P, f0 + kBlock);
    for (int64_t l0 = 0; l0 < lines; l0 += kBlock) {
      const int64_t l1 = std::min(lines, l0 + kBlock);
      for (int64_t f = f0; f < f1; ++f) {
        Complex* column = frequency_side + f * frequency_stride;
        for (int64_t l = l0; l < l1; ++l) {
          if (to_lines) {
            lines_side[l * P + f] = column[l];
          } else {
            column[l] = lines_side[l * P + f];
          }
        }
      }
    }
  }
}

// Stage 2 for one frequency: Z [T x M] = X [T x C] @ K [C x M] (complex), K given as the real
// [2C x 2M] matrix described at the top.
void FrequencyProduct(int64_t T, int64_t C, int64_t M, const Complex* X, const float* K,
                      Complex* Z) {
  Sgemm(static_cast<int>(T), static_cast<int>(2 * M), static_cast<int>(2 * C),
        reinterpret_cast<const float*>(X), static_cast<int>(2 * C), K, static_cast<int>(2 * M),
        reinterpret_cast<float*>(Z), static_cast<int>(2 * M));
}

// Reference of FrequencyProduct: the complex triple loop.
void FrequencyProductReference(int64_t T, int64_t C, int64_t M, const Complex* X,
                               const float* K, Complex* Z) {
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t m = 0; m < M; ++m) {
      std::complex<double> sum = 0;
      for (int64_t c = 0; c < C; ++c) {
        const std::complex<double> k(K[(2 * c) * 2 * M + 2 * m], K[(2 * c) * 2 * M + 2 * m + 1]);
        const Complex x = X[t * C + c];
        sum += std::complex<double>(x.real(), x.imag()) * k;
      }
      Z[t * M + m] = Complex(static_cast<float>(sum.real()), static_cast<float>(sum.imag()));
    }
  }
}

// The kernel spectra of one W at one FFT size: per frequency the real [2C x 2M] matrix.
struct Spectra {
  std::vector<int64_t> w_shape;
  int64_t Fh = 0, Fw = 0;
  std::vector<float> K;  // [Fh * Fc][2C][2M]
};

struct Scratchpad {
  std::vector<float> windows;
  std::vector<Complex> spectra;  // [lines][P], contiguous
};

class FFTConvCpuKernel {
 public:
  static constexpr const char* kLabel = kFFTConvName;

  FFTConvCpuKernel(const OrtApi& api, const OrtKernelInfo* info)
      : attributes_(ReadStrideOneAttributes(info)),
        reference_(ReferenceStagesFromEnvironment("COMPRESSOR_FFT_REFERENCE")) {
    // The spectra depend on the FFT size, hence on the input's map size: they are computed at
    // the first Compute and kept while W is a constant and the FFT size does not change.
    int is_constant = 0;
    const OrtValue* weight = nullptr;
    OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &weight);
    if (status != nullptr) {
      api.ReleaseStatus(status);
    } else {
      constant_weight_ = is_constant && weight != nullptr;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const ConvInputs in = ConvInputs::Read(raw_context);
    const FFTConvShape g = FFTConvShape::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    if (g.N == 0 || g.OH == 0 || g.OW == 0) return;

    const bool inline_units = RunInline(g);
    OrtKernelContext* pool = inline_units ? nullptr : raw_context;
    std::shared_ptr<const Spectra> spectra;
    if (constant_weight_) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!cached_ || cached_->w_shape != in.w_shape || cached_->Fh != g.Fh || cached_->Fw != g.Fw) {
        cached_ = MakeSpectra(pool, g, in.w_shape, in.w);
      }
      spectra = cached_;
    } else {
      spectra = MakeSpectra(pool, g, in.w_shape, in.w);
    }
    Run(pool, inline_units ? 1 : HardwareThreads(), g, in.x, spectra->K.data(), in.bias,
        y.GetTensorMutableData<float>());
  }

  std::shared_ptr<const Spectra> MakeSpectra(OrtKernelContext* pool, const FFTConvShape& g,
                                             const std::vector<int64_t>& w_shape,
                                             const float* w) const {
    auto spectra = std::make_shared<Spectra>();
    spectra->w_shape = w_shape;
    spectra->Fh = g.Fh;
    spectra->Fw = g.Fw;
    const int64_t P = g.Frequencies(), C = g.C, M = g.M;
    spectra->K.resize(static_cast<size_t>(P * 4 * C * M));
    float* K = spectra->K.data();
    // One unit per output channel: rfft2 of its C zero-padded filters, then the conjugates
    // (correlation, not convolution) scattered into the per-frequency real matrices.
    ParallelUnits(pool, static_cast<size_t>(M), [&](size_t unit) {
      const int64_t m = static_cast<int64_t>(unit);
      std::vector<float> windows(static_cast<size_t>(C * g.Fh * g.Fw), 0.0f);
      std::vector<Complex> spectrum(static_cast<size_t>(C * P));
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t r = 0; r < g.kH; ++r) {
          std::memcpy(windows.data() + (c * g.Fh + r) * g.Fw,
                      w + ((m * C + c) * g.kH + r) * g.kW, sizeof(float) * g.kW);
        }
      }
      const SpectrumLayout layout{P, 1};  // [C][P]
      if (reference_) {
        ForwardTransformReference(g, C, windows.data(), spectrum.data(), layout);
      } else {
        ForwardTransform(g, C, windows.data(), spectrum.data(), layout);
      }
      for (int64_t f = 0; f < P; ++f) {
        float* matrix = K + f * 4 * C * M;
        for (int64_t c = 0; c < C; ++c) {
          const Complex k = std::conj(spectrum[c * P + f]);
          matrix[(2 * c) * 2 * M + 2 * m] = k.real();
          matrix[(2 * c) * 2 * M + 2 * m + 1] = k.imag();
          matrix[(2 * c + 1) * 2 * M + 2 * m] = -k.imag();
          matrix[(2 * c + 1) * 2 * M + 2 * m + 1] = k.real();
        }
      }
    });
    return spectra;
  }

  void Run(OrtKernelContext* pool, int64_t threads, const FFTConvShape& g, const float* x,
           const float* K, const float* bias, float* y) const {
    const int64_t P = g.Frequencies(), C = g.C, M = g.M, total = g.Tiles();
    const int64_t tile_bytes = P * (C + M) * static_cast<int64_t>(sizeof(Complex));
    const int64_t chunk = std::clamp<int64_t>(kChunkBytes / tile_bytes, 1, total);
    std::vector<Complex> X(static_cast<size_t>(P * chunk * C)), Z(static_cast<size_t>(P * chunk * M));
    for (int64_t t0 = 0; t0 < total; t0 += chunk) {
      const int64_t T = std::min(chunk, total - t0);
      // Blocks of tiles for the transforms: a few per thread.
      const int64_t blocks = std::min(T, 2 * threads);
      const SpectrumLayout line_layout{P, 1};  // [lines][P]
      ParallelUnits(pool, static_cast<size_t>(blocks), [&](size_t i) {
        int64_t b0, b1;
        BlockRange(T, blocks, static_cast<int64_t>(i), &b0, &b1);
        if (b0 == b1) return;
        thread_local Scratchpad s;
        const int64_t lines = (b1 - b0) * C;
        float* windows = Scratch(s.windows, static_cast<size_t>(lines * g.Fh * g.Fw));
        Complex* spectra = Scratch(s.spectra, static_cast<size_t>(lines * P));
        for (int64_t t = b0; t < b1; ++t) GatherWindows(g, t0 + t, x, windows + (t - b0) * C * g.Fh * g.Fw);
        if (reference_) {
          ForwardTransformReference(g, lines, windows, spectra, line_layout);
        } else {
          ForwardTransform(g, lines, windows, spectra, line_layout);
        }
        Transpose(lines, P, spectra, X.data() + b0 * C, T * C, false);
      });
      ParallelUnits(pool, static_cast<size_t>(P), [&](size_t f) {
        const Complex* Xf = X.data() + f * T * C;
        const float* Kf = K + f * 4 * C * M;
        Complex* Zf = Z.data() + f * T * M;
        if (reference_) {
          FrequencyProductReference(T, C, M, Xf, Kf, Zf);
        } else {
          FrequencyProduct(T, C, M, Xf, Kf, Zf);
        }
      });
      ParallelUnits(pool, static_cast<size_t>(blocks), [&](size_t i) {
        int64_t b0, b1;
        BlockRange(T, blocks, static_cast<int64_t>(i), &b0, &b1);
        if (b0 == b1) return;
        thread_local Scratchpad s;
        const int64_t lines = (b1 - b0) * M;
        float* windows = Scratch(s.windows, static_cast<size_t>(lines * g.Fh * g.Fw));
        Complex* spectra = Scratch(s.spectra, static_cast<size_t>(lines * P));
        Transpose(lines, P, spectra, Z.data() + b0 * M, T * M, true);
        if (reference_) {
          InverseTransformReference(g, lines, spectra, line_layout, windows);
        } else {
          InverseTransform(g, lines, spectra, line_layout, windows);
        }
        for (int64_t t = b0; t < b1; ++t) {
          ScatterTile(g, t0 + t, windows + (t - b0) * M * g.Fh * g.Fw, bias, y);
        }
      });
    }
  }

  // The Fh x Fw input window of tile `tile` for every channel, zero outside the image.
  static void GatherWindows(const FFTConvShape& g, int64_t tile, const float* x, float* windows) {
    const int64_t per_image = g.tiles_h * g.tiles_w;
    const int64_t n = tile / per_image, i = (tile % per_image) / g.tiles_w, j = tile % g.tiles_w;
    const int64_t row0 = i * g.tile_h - g.pad_top, col0 = j * g.tile_w - g.pad_left;
    const int64_t c0 = std::max<int64_t>(0, -col0), c1 = std::min<int64_t>(g.Fw, g.W - col0);
    for (int64_t c = 0; c < g.C; ++c) {
      const float* image = x + (n * g.C + c) * g.H * g.W;
      float* window = windows + c * g.Fh * g.Fw;
      for (int64_t r = 0; r < g.Fh; ++r) {
        float* out = window + r * g.Fw;
        const int64_t ih = row0 + r;
        if (ih < 0 || ih >= g.H || c1 <= c0) {
          std::memset(out, 0, sizeof(float) * g.Fw);
          continue;
        }
        if (c0 > 0) std::memset(out, 0, sizeof(float) * c0);
        std::memcpy(out + c0, image + ih * g.W + col0 + c0, sizeof(float) * (c1 - c0));
        if (c1 < g.Fw) std::memset(out + c1, 0, sizeof(float) * (g.Fw - c1));
      }
    }
  }

  // Writes the valid part of tile `tile` (rows / columns [0, tile_h / tile_w) of each output
  // channel's window, cut at the map's edge) into Y, adding the bias.
  static void ScatterTile(const FFTConvShape& g, int64_t tile, const float* windows,
                          const float* bias, float* y) {
    const int64_t per_image = g.tiles_h * g.tiles_w;
    const int64_t n = tile / per_image, i = (tile % per_image) / g.tiles_w, j = tile % g.tiles_w;
    const int64_t oh0 = i * g.tile_h, ow0 = j * g.tile_w;
    const int64_t rows = std::min(g.tile_h, g.OH - oh0), cols = std::min(g.tile_w, g.OW - ow0);
    for (int64_t m = 0; m < g.M; ++m) {
      const float b = bias != nullptr ? bias[m] : 0.0f;
      const float* window = windows + m * g.Fh * g.Fw;
      float* out = y + ((n * g.M + m) * g.OH + oh0) * g.OW + ow0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t s = 0; s < cols; ++s) out[r * g.OW + s] = window[r * g.Fw + s] + b;
      }
    }
  }

  Conv2dAttributes attributes_;
  bool reference_;
  bool constant_weight_ = false;
  std::mutex mutex_;
  std::shared_ptr<const Spectra> cached_;  // spectra of the constant W at the last FFT size
};

using FFTConvCpuOp = KernelOp<FFTConvCpuKernel, FFTConvSignature, Provider::kCpu>;

}  // namespace

void AddFFTConvCpu(Ort::CustomOpDomain& domain) { AddOp<FFTConvCpuOp>(domain); }

}  // namespace compressor

// DiffConv CPU kernel. Work is split into units of (image, block of output rows, block of
// output channels) run on ORT's intra-op thread pool. Per unit:
//   threshold 0:  im2col + GEMM (exact; the differential form cannot beat a dense GEMM here).
//   threshold > 0: im2col, then each column becomes the difference to the previous window
//                  (restart windows keep the patch) with |d| <= threshold zeroed; then either
//                  a GEMM on the differences and a prefix sum along each row, or, when few
//                  differences are kept, a sparse product that only multiplies the kept ones
//                  (the prefix sum is fused: the accumulator carries along the row).
// The sparse/dense choice is per unit, from the measured kept fraction (kSparseKeptFraction,
// chosen by bench/bench_diffconv.py; see runtime_ext/README.md).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/gemm.h"
#include "ops/diffconv/diffconv.h"

namespace compressor {
namespace {

// Below this fraction of nonzero entries in a unit's difference matrix the sparse product is
// faster than GEMM + prefix sum (measured on AVX-512, 2 cores; README.md).
constexpr double kSparseKeptFraction = 0.25;
constexpr int64_t kChannelAlign = 16;  // the sparse product works on 16-float vectors

enum class Path { kAuto, kDiffGemm, kSparse };

// COMPRESSOR_DIFFCONV_PATH=auto|gemm|sparse forces a path (tests and benchmarks); read when a
// session creates the kernel. At threshold 0, auto means plain im2col + GEMM.
Path PathFromEnvironment() {
  const char* value = std::getenv("COMPRESSOR_DIFFCONV_PATH");
  if (value == nullptr || std::strcmp(value, "") == 0 || std::strcmp(value, "auto") == 0) {
    return Path::kAuto;
  }
  if (std::strcmp(value, "gemm") == 0) return Path::kDiffGemm;
  if (std::strcmp(value, "sparse") == 0) return Path::kSparse;
  throw OpError(std::string("COMPRESSOR_DIFFCONV_PATH must be auto, gemm or sparse, got '") +
                value + "'");
}

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time.
#define COMPRESSOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

int64_t RoundUp(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

template <class T>
T* Scratch(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// The input rows that output rows [oh0, oh1) read, zero-padded on all sides so im2col needs no
// bounds checks: element (c, ih, iw) is at
// data[(c * rows + ih - row_begin) * row_length + iw + pad_left] for ih in [row_begin, row_end).
struct Source {
  const float* data;
  int64_t rows, row_begin, row_end, row_length;
};

// The span of padded input rows and columns that output rows [oh0, oh1) cover.
Source PaddedSpan(const DiffConvGeometry& g, int64_t oh0, int64_t oh1) {
  Source s{};
  s.row_begin = oh0 * g.stride_h - g.pad_top;
  s.row_end = (oh1 - 1) * g.stride_h - g.pad_top + (g.kH - 1) * g.dilation_h + 1;
  s.rows = s.row_end - s.row_begin;
  s.row_length = (g.OW - 1) * g.stride_w + (g.kW - 1) * g.dilation_w + 1;  // from iw = -pad_left
  return s;
}

// P[k, j] for k = (c, kh, kw) and window j = (oh - oh0) * OW + ow, oh in [oh0, oh1).
COMPRESSOR_CLONES void Im2Col(const DiffConvGeometry& g, const Source& src, int64_t oh0,
                              int64_t oh1, float* P) {
  const int64_t cols = (oh1 - oh0) * g.OW;
  const int64_t OW = g.OW, sw = g.stride_w;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        float* out = P + ((c * g.kH + kh) * g.kW + kw) * cols;
        const float* in = src.data + (c * src.rows + kh * g.dilation_h) * src.row_length +
                          kw * g.dilation_w;
        for (int64_t oh = oh0; oh < oh1; ++oh, out += OW) {
          const float* row = in + (oh - oh0) * g.stride_h * src.row_length;
          if (sw == 1) {
            for (int64_t ow = 0; ow < OW; ++ow) out[ow] = row[ow];
          } else {
            for (int64_t ow = 0; ow < OW; ++ow) out[ow] = row[ow * sw];
          }
        }
      }
    }
  }
}

// Copies the rows of the input that output rows [oh0, oh1) read into a zero-padded buffer.
COMPRESSOR_CLONES void PaddedImage(const DiffConvGeometry& g, const float* image, int64_t oh0,
                                   int64_t oh1, std::vector<float>& buffer, Source* source) {
  Source s = PaddedSpan(g, oh0, oh1);
  float* out = Scratch(buffer, static_cast<size_t>(std::max<int64_t>(1, g.C * s.rows * s.row_length)));
  const int64_t first = std::max<int64_t>(0, -g.pad_left);
  const int64_t last = std::min(g.W, s.row_length - g.pad_left);
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t ih = s.row_begin; ih < s.row_end; ++ih) {
      float* row = out + (c * s.rows + ih - s.row_begin) * s.row_length;
      for (int64_t i = 0; i < s.row_length; ++i) row[i] = 0.0f;
      if (ih < 0 || ih >= g.H) continue;
      const float* in = image + (c * g.H + ih) * g.W;
      for (int64_t iw = first; iw < last; ++iw) row[iw + g.pad_left] = in[iw];
    }
  }
  s.data = out;
  *source = s;
}

// Thresholded differences between each input column and the one stride_w to its left, on the
// zero-padded span: the window difference P[:, ow] - P[:, ow - 1] is this image's patch at ow
// (so differences are computed once per input element, not once per kernel entry). Returns
// its nonzero count.
COMPRESSOR_CLONES int64_t DifferenceImage(const DiffConvGeometry& g, const Source& padded,
                                          std::vector<float>& buffer, Source* source) {
  Source s = padded;
  float* D = Scratch(buffer, static_cast<size_t>(std::max<int64_t>(1, g.C * s.rows * s.row_length)));
  const float threshold = g.threshold;
  const int64_t sw = g.stride_w;
  int64_t nonzero = 0;
  for (int64_t r = 0; r < g.C * s.rows; ++r) {
    const float* in = padded.data + r * s.row_length;
    float* out = D + r * s.row_length;
    int64_t kept = 0;
    for (int64_t i = 0; i < std::min(sw, s.row_length); ++i) {  // left neighbour outside the span: 0
      const bool keep = std::fabs(in[i]) > threshold;
      out[i] = keep ? in[i] : 0.0f;
      kept += keep;
    }
    for (int64_t i = sw; i < s.row_length; ++i) {
      const float d = in[i] - in[i - sw];
      const bool keep = std::fabs(d) > threshold;
      out[i] = keep ? d : 0.0f;
      kept += keep;
    }
    nonzero += kept;
  }
  s.data = D;
  *source = s;
  return nonzero;
}

// Puts the input patch back into the restart windows (ow = 0, restart, ...) of a difference
// matrix; returns the nonzeros it wrote.
int64_t RestoreRestartWindows(const DiffConvGeometry& g, const float* image, int64_t oh0,
                              int64_t oh1, float* P) {
  const int64_t cols = (oh1 - oh0) * g.OW;
  int64_t nonzero = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        float* row = P + ((c * g.kH + kh) * g.kW + kw) * cols;
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h;
          for (int64_t ow = 0; ow < g.OW; ow += g.restart) {
            const int64_t iw = ow * g.stride_w - g.pad_left + kw * g.dilation_w;
            const float v =
                (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? image[(c * g.H + ih) * g.W + iw] : 0.0f;
            row[(oh - oh0) * g.OW + ow] = v;
            nonzero += v != 0.0f;
          }
        }
      }
    }
  }
  return nonzero;
}

COMPRESSOR_CLONES int64_t CountNonzero(const float* data, int64_t size) {
  int64_t count = 0;
  for (int64_t i = 0; i < size; ++i) count += data[i] != 0.0f;
  return count;
}

typedef float Vec16 __attribute__((vector_size(64)));

__attribute__((always_inline)) inline Vec16 Load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void Store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// The sparse product: every kept difference d at input (c, ih, iw) is multiplied once per
// kernel entry (kh, kw) whose window (oh, ow) is not a restart window, and added to that
// window's output channels: Yt[window, :] += d * WT[k, :]. Yt is window-major [cols, ldy].
// Loop order: per input row, its nonzeros are listed once; then for each kernel entry the
// weight vector stays in registers while the nonzeros hit distinct windows, so consecutive
// updates never wait on each other through memory.
// Returns the multiplications per output channel (the kept differences of the algorithm).
template <int NV>
__attribute__((always_inline)) inline int64_t ScatterImpl(const DiffConvGeometry& g,
                                                          const Source& d, int64_t oh0,
                                                          int64_t oh1, const float* WT,
                                                          int64_t ldwt, float* Yt, int64_t ldy,
                                                          const uint8_t* is_restart,
                                                          int32_t* positions, float* values) {
  int64_t performed = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t ih = d.row_begin; ih < d.row_end; ++ih) {
      const float* row = d.data + (c * d.rows + ih - d.row_begin) * d.row_length;
      int64_t count = 0;
      for (int64_t i = 0; i < d.row_length; ++i) {  // branch-free compaction
        positions[count] = static_cast<int32_t>(i);  // iw + pad_left
        values[count] = row[i];
        count += row[i] != 0.0f;
      }
      if (count == 0) continue;
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        int64_t oh = ih + g.pad_top - kh * g.dilation_h;
        if (oh < 0) break;
        if (g.stride_h != 1) {
          if (oh % g.stride_h != 0) continue;
          oh /= g.stride_h;
        }
        if (oh < oh0 || oh >= oh1) continue;
        float* out_row = Yt + (oh - oh0) * g.OW * ldy;
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          const float* w = WT + ((c * g.kH + kh) * g.kW + kw) * ldwt;
          Vec16 weight[NV];
          for (int v = 0; v < NV; ++v) weight[v] = Load16(w + 16 * v);
          const int64_t offset = kw * g.dilation_w;
          for (int64_t p = 0; p < count; ++p) {
            int64_t ow = positions[p] - offset;
            if (ow < 0) continue;
            if (g.stride_w != 1) {
              if (ow % g.stride_w != 0) continue;
              ow /= g.stride_w;
            }
            if (ow >= g.OW || is_restart[ow]) continue;
            float* out = out_row + ow * ldy;
            const float value = values[p];
            for (int v = 0; v < NV; ++v) Store16(out + 16 * v, Load16(out + 16 * v) + value * weight[v]);
            ++performed;
          }
        }
      }
    }
  }
  return performed;
}

#define COMPRESSOR_SCATTER(NV)                                                                  \
  COMPRESSOR_CLONES int64_t Scatter##NV(const DiffConvGeometry& g, const Source& d, int64_t oh0, \
                                        int64_t oh1, const float* WT, int64_t ldwt, float* Yt,   \
                                        int64_t ldy, const uint8_t* is_restart,                  \
                                        int32_t* positions, float* values) {                     \
    return ScatterImpl<NV>(g, d, oh0, oh1, WT, ldwt, Yt, ldy, is_restart, positions, values);    \
  }
COMPRESSOR_SCATTER(1)
COMPRESSOR_SCATTER(2)
COMPRESSOR_SCATTER(4)
COMPRESSOR_SCATTER(8)

// Channel blocks of at most 128 (8 vectors of 16 in registers).
int64_t ScatterDifferences(const DiffConvGeometry& g, const Source& d, int64_t oh0, int64_t oh1,
                           const float* WT, int64_t ldwt, int64_t channels16, float* Yt,
                           int64_t ldy, const uint8_t* is_restart, int32_t* positions,
                           float* values) {
  int64_t performed = 0;
  bool first = true;
  for (int64_t m = 0; m < channels16;) {
    const int64_t left = (channels16 - m) / 16;
    const int nv = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    int64_t counted = 0;
    switch (nv) {
      case 8: counted = Scatter8(g, d, oh0, oh1, WT + m, ldwt, Yt + m, ldy, is_restart, positions, values); break;
      case 4: counted = Scatter4(g, d, oh0, oh1, WT + m, ldwt, Yt + m, ldy, is_restart, positions, values); break;
      case 2: counted = Scatter2(g, d, oh0, oh1, WT + m, ldwt, Yt + m, ldy, is_restart, positions, values); break;
      default: counted = Scatter1(g, d, oh0, oh1, WT + m, ldwt, Yt + m, ldy, is_restart, positions, values); break;
    }
    if (first) performed = counted;
    first = false;
    m += 16 * nv;
  }
  return performed;
}

// out[m * ld_out + j] = Yt[j * ldy + m] + bias[m], in blocks of 16 windows so both sides stay
// in cache lines.
COMPRESSOR_CLONES void StoreChannelMajor(const float* Yt, int64_t cols, int64_t channels,
                                         int64_t ldy, const float* bias, float* out,
                                         int64_t ld_out) {
  constexpr int64_t kBlock = 16;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t j1 = std::min(cols, j0 + kBlock);
    for (int64_t m = 0; m < channels; ++m) {
      const float b = bias ? bias[m] : 0.0f;
      float* o = out + m * ld_out;
      for (int64_t j = j0; j < j1; ++j) o[j] = Yt[j * ldy + m] + b;
    }
  }
}

// Prefix sum of window-major rows along each output row, restarting at restart windows.
COMPRESSOR_CLONES void PrefixSumWindows(float* Yt, int64_t rows, int64_t OW, int64_t restart,
                                        int64_t channels16, int64_t ldy) {
  const int64_t lanes = channels16 / 16;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t ow = 1; ow < OW; ++ow) {
      if (ow % restart == 0) continue;  // once per window, not per multiplication
      float* cur = Yt + (r * OW + ow) * ldy;
      const float* prev = cur - ldy;
      for (int64_t v = 0; v < lanes; ++v) Store16(cur + 16 * v, Load16(cur + 16 * v) + Load16(prev + 16 * v));
    }
  }
}

// W [M, K] -> WT [K, round_up(M, 16)], zero-padded channels.
std::vector<float> TransposeWeight(const float* w, int64_t M, int64_t K) {
  const int64_t ld = RoundUp(M, kChannelAlign);
  std::vector<float> wt(static_cast<size_t>(K * ld), 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) wt[k * ld + m] = w[m * K + k];
  }
  return wt;
}

struct Scratchpad {
  std::vector<float> patches, padded, differences, values, transposed_out;
  std::vector<int32_t> row_start, index, cursor;
  std::vector<uint8_t> restart_flags;
  std::vector<int32_t> positions;
  std::vector<float> row_values;
};

struct Unit {
  int64_t n, oh0, oh1, m0, m1;
};

class DiffConvCpuKernel {
 public:
  DiffConvCpuKernel(const OrtApi& api, const OrtKernelInfo* info)
      : attributes_(DiffConvAttributes::Read(info)), path_(PathFromEnvironment()) {
    // A constant weight is transposed once for the sparse product.
    int is_constant = 0;
    const OrtValue* weight = nullptr;
    OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &weight);
    if (status != nullptr) {
      api.ReleaseStatus(status);
    } else if (is_constant && weight != nullptr) {
      Ort::ConstValue value(weight);
      auto shape = value.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() == 4 && value.GetTensorTypeAndShapeInfo().GetElementType() ==
                                   ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        const int64_t K = shape[1] * shape[2] * shape[3];
        constant_wt_ = TransposeWeight(value.GetTensorData<float>(), shape[0], K);
        constant_wt_shape_ = shape;
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kDiffConvName, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext context(raw_context);
    const size_t input_count = context.GetInputCount();
    if (input_count < 2) throw OpError("needs inputs X and W");
    Ort::ConstValue x = context.GetInput(0);
    Ort::ConstValue w = context.GetInput(1);
    const OrtValue* bias_value = nullptr;
    if (input_count > 2) Check(api.KernelContext_GetInput(raw_context, 2, &bias_value));
    const std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> w_shape = w.GetTensorTypeAndShapeInfo().GetShape();
    std::vector<int64_t> bias_shape;
    const float* bias = nullptr;
    if (bias_value != nullptr) {
      Ort::ConstValue b(bias_value);
      bias_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      bias = b.GetTensorData<float>();
    }
    const DiffConvGeometry g =
        DiffConvGeometry::Make(attributes_, x_shape, w_shape, bias_value ? &bias_shape : nullptr);

    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    int64_t* counts_out = nullptr;
    if (context.GetOutputCount() > 1) {
      OrtValue* counts_value = nullptr;
      const int64_t counts_shape[] = {2};
      Check(api.KernelContext_GetOutput(raw_context, 1, counts_shape, 1, &counts_value));
      if (counts_value != nullptr) counts_out = Ort::UnownedValue(counts_value).GetTensorMutableData<int64_t>();
    }
    if (g.N == 0 || g.OH == 0 || g.OW == 0) {
      if (counts_out) counts_out[0] = counts_out[1] = 0;
      return;
    }
    Run(raw_context, g, x.GetTensorData<float>(), w.GetTensorData<float>(), bias,
        y.GetTensorMutableData<float>(), counts_out);
  }

  void Run(OrtKernelContext* context, const DiffConvGeometry& g, const float* x, const float* w,
           const float* bias, float* y, int64_t* counts_out) const {
    const bool differential = g.threshold > 0.0f || path_ != Path::kAuto;

    // The transposed weight for the sparse product: precomputed for a constant weight, else
    // made on first use in this call (most calls at threshold 0 never need it).
    const bool constant_weight =
        !constant_wt_.empty() && constant_wt_shape_[0] == g.M && constant_wt_shape_[1] == g.C &&
        constant_wt_shape_[2] == g.kH && constant_wt_shape_[3] == g.kW;
    std::vector<float> call_wt;
    std::once_flag call_wt_once;
    auto transposed_weight = [&]() -> const float* {
      if (constant_weight) return constant_wt_.data();
      std::call_once(call_wt_once, [&] { call_wt = TransposeWeight(w, g.M, g.K()); });
      return call_wt.data();
    };

    // Units: images x row blocks x channel blocks, enough for every thread, each still a
    // GEMM of reasonable width.
    const int64_t threads = std::max(1u, std::thread::hardware_concurrency());
    const int64_t target_units = 4 * threads;
    int64_t rows_per_unit = g.OH;
    while (g.N * ((g.OH + rows_per_unit - 1) / rows_per_unit) < target_units &&
           ((rows_per_unit + 1) / 2) * g.OW >= 96 && rows_per_unit > 1) {
      rows_per_unit = (rows_per_unit + 1) / 2;
    }
    const int64_t row_blocks = (g.OH + rows_per_unit - 1) / rows_per_unit;
    int64_t channels_per_unit = RoundUp(g.M, kChannelAlign);
    while (g.N * row_blocks * ((g.M + channels_per_unit - 1) / channels_per_unit) < threads &&
           channels_per_unit >= 2 * 32) {
      channels_per_unit = RoundUp(channels_per_unit / 2, kChannelAlign);
    }
    const int64_t channel_blocks = (g.M + channels_per_unit - 1) / channels_per_unit;
    const int64_t total_units = g.N * row_blocks * channel_blocks;

    std::atomic<int64_t> performed{0};
    std::mutex error_mutex;
    std::string error;
    const bool counting = counts_out != nullptr;

    auto run_unit = [&](size_t i) {
      try {
        const int64_t cb = static_cast<int64_t>(i) % channel_blocks;
        const int64_t rb = (static_cast<int64_t>(i) / channel_blocks) % row_blocks;
        const int64_t n = static_cast<int64_t>(i) / (channel_blocks * row_blocks);
        Unit unit{n, rb * rows_per_unit, std::min(g.OH, (rb + 1) * rows_per_unit),
                  cb * channels_per_unit, std::min(g.M, (cb + 1) * channels_per_unit)};
        const int64_t counted =
            RunUnit(g, unit, x, w, transposed_weight, bias, y, differential, counting);
        if (counting && unit.m0 == 0) performed.fetch_add(counted, std::memory_order_relaxed);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = e.what();
      }
    };
    ParallelFor(context, static_cast<size_t>(total_units), run_unit);
    if (!error.empty()) throw OpError(error, ORT_FAIL);
    if (counts_out) {
      counts_out[0] = performed.load() * g.M;
      counts_out[1] = g.DenseMultiplications();
    }
  }

  // Computes one unit; returns the multiplications per output channel that the differential
  // algorithm needs for it (only when counting).
  template <class TransposedWeight>
  int64_t RunUnit(const DiffConvGeometry& g, const Unit& u, const float* x, const float* w,
                  TransposedWeight& transposed_weight, const float* bias, float* y,
                  bool differential, bool counting) const {
    thread_local Scratchpad scratch;
    const int64_t rows = u.oh1 - u.oh0, cols = rows * g.OW, K = g.K();
    const int64_t channels = u.m1 - u.m0;
    const int64_t plane = g.OH * g.OW;
    const int64_t restart_windows = rows * ((g.OW + g.restart - 1) / g.restart);
    const float* image = x + u.n * g.C * g.H * g.W;
    float* out = y + u.n * g.M * plane + u.m0 * plane + u.oh0 * g.OW;  // [channels, cols], ld plane
    float* P = Scratch(scratch.patches, static_cast<size_t>(K * cols));
    const bool count_here = counting && u.m0 == 0;

    auto gemm = [&] {
      Sgemm(static_cast<int>(channels), static_cast<int>(cols), static_cast<int>(K), w + u.m0 * K,
            static_cast<int>(K), P, static_cast<int>(cols), out, static_cast<int>(plane));
    };
    auto add_bias = [&] {
      if (bias == nullptr) return;
      for (int64_t m = 0; m < channels; ++m) {
        const float b = bias[u.m0 + m];
        float* o = out + m * plane;
        for (int64_t j = 0; j < cols; ++j) o[j] += b;
      }
    };
    // The zero-padded input span and its thresholded difference image, whose nonzero fraction
    // picks the path.
    Source padded{}, differences{};
    PaddedImage(g, image, u.oh0, u.oh1, scratch.padded, &padded);
    int64_t difference_nonzero = 0;
    auto difference_image = [&] {
      difference_nonzero = DifferenceImage(g, padded, scratch.differences, &differences);
      const int64_t size = differences.rows * differences.row_length * g.C;
      return size > 0 ? static_cast<double>(difference_nonzero) / static_cast<double>(size) : 0.0;
    };
    // The difference matrix in P: im2col of the difference image, restart windows restored.
    int64_t restart_nonzero = 0;
    auto difference_matrix = [&] {
      Im2Col(g, differences, u.oh0, u.oh1, P);
      restart_nonzero = RestoreRestartWindows(g, image, u.oh0, u.oh1, P);
    };
    // Kept differences = nonzeros of P outside the restart windows.
    auto algorithm_count = [&] {
      return restart_windows * K + (CountNonzero(P, K * cols) - restart_nonzero);
    };

    // Threshold 0 (auto): exact either way; the sparse product only when the input is so
    // flat along rows (e.g. zero background) that most differences are exactly 0.
    const double density = difference_image();
    if (!differential && density >= kSparseKeptFraction) {
      Im2Col(g, padded, u.oh0, u.oh1, P);
      gemm();
      add_bias();
      if (!count_here) return 0;
      difference_matrix();
      return algorithm_count();
    }

    const bool sparse = !differential || path_ == Path::kSparse ||
                        (path_ == Path::kAuto && density < kSparseKeptFraction);

    if (!sparse) {
      difference_matrix();
      const int64_t counted = count_here ? algorithm_count() : 0;
      gemm();
      // Prefix sum along each output row, restarting at restart windows.
      for (int64_t m = 0; m < channels; ++m) {
        for (int64_t r = 0; r < rows; ++r) {
          float* o = out + m * plane + r * g.OW;
          for (int64_t begin = 0; begin < g.OW; begin += g.restart) {
            const int64_t end = std::min(g.OW, begin + g.restart);
            for (int64_t ow = begin + 1; ow < end; ++ow) o[ow] += o[ow - 1];
          }
        }
      }
      add_bias();
      return counted;
    }

    // Sparse: restart windows by a small GEMM on their patches, every other window from the
    // kept differences only, then the prefix sum along rows.
    const int64_t ldwt = RoundUp(g.M, kChannelAlign);
    const int64_t channels16 = RoundUp(channels, kChannelAlign);
    float* Yt = Scratch(scratch.transposed_out, static_cast<size_t>(cols * channels16));
    std::memset(Yt, 0, sizeof(float) * cols * channels16);
    const int64_t per_row = (g.OW + g.restart - 1) / g.restart;
    float* Pr = Scratch(scratch.values, static_cast<size_t>(K * restart_windows + channels * restart_windows));
    float* restart_out = Pr + K * restart_windows;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          float* row = Pr + ((c * g.kH + kh) * g.kW + kw) * restart_windows;
          for (int64_t oh = u.oh0; oh < u.oh1; ++oh) {
            const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h;
            for (int64_t q = 0; q < per_row; ++q) {
              const int64_t iw = q * g.restart * g.stride_w - g.pad_left + kw * g.dilation_w;
              row[(oh - u.oh0) * per_row + q] =
                  (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? image[(c * g.H + ih) * g.W + iw] : 0.0f;
            }
          }
        }
      }
    }
    Sgemm(static_cast<int>(channels), static_cast<int>(restart_windows), static_cast<int>(K),
          w + u.m0 * K, static_cast<int>(K), Pr, static_cast<int>(restart_windows), restart_out,
          static_cast<int>(restart_windows));
    for (int64_t m = 0; m < channels; ++m) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t q = 0; q < per_row; ++q) {
          Yt[(r * g.OW + q * g.restart) * channels16 + m] = restart_out[m * restart_windows + r * per_row + q];
        }
      }
    }
    uint8_t* is_restart = Scratch(scratch.restart_flags, static_cast<size_t>(g.OW));
    for (int64_t ow = 0; ow < g.OW; ++ow) is_restart[ow] = ow % g.restart == 0;
    int32_t* positions = Scratch(scratch.positions, static_cast<size_t>(differences.row_length));
    float* row_values = Scratch(scratch.row_values, static_cast<size_t>(differences.row_length));
    const int64_t kept = ScatterDifferences(g, differences, u.oh0, u.oh1, transposed_weight() + u.m0, ldwt,
                                            channels16, Yt, channels16, is_restart, positions,
                                            row_values);
    PrefixSumWindows(Yt, rows, g.OW, g.restart, channels16, channels16);
    StoreChannelMajor(Yt, cols, channels, channels16, bias ? bias + u.m0 : nullptr, out, plane);
    return count_here ? restart_windows * K + kept : 0;
  }

  DiffConvAttributes attributes_;
  Path path_;
  std::vector<float> constant_wt_;
  std::vector<int64_t> constant_wt_shape_;
};

struct DiffConvCpuOp : Ort::CustomOpBase<DiffConvCpuOp, DiffConvCpuKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return Guard(kDiffConvName, [&] { *kernel = new DiffConvCpuKernel(api, info); });
  }
  const char* GetName() const { return kDiffConvName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

}  // namespace

void AddDiffConvCpu(Ort::CustomOpDomain& domain) {
  static DiffConvCpuOp op;
  domain.Add(&op);
}

}  // namespace compressor

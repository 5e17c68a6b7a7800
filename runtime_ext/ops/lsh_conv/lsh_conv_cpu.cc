// LSHConv CPU kernel. Units of (sample, block of output rows) on onnxruntime's intra-op
// thread pool, each:
//   1. for its sample: window column sums -> queries [D + 1, Q] -> one small GEMM against every
//      table's hyperplanes -> sign bits packed into codes -> OR of the bucket bitsets: the
//      selected filters (and, with channel_mask, the input channels that can be nonzero);
//   2. for its rows: patches (im2col) of the active channels, the selected rows
//      of W gathered, one GEMM (common/gemm.h) of selected filters x active channels, rows
//      scattered into Y with the bias; unselected filters' rows are zero.
// With every filter selected and every channel active the GEMM writes straight into Y (no
// gather, no scatter), and a 1x1 stride-1 unpadded conv reads X in place (no im2col).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/gemm.h"
#include "common/simhash.h"
#include "ops/lsh_conv/cpu_parallel.h"
#include "ops/lsh_conv/lsh_conv.h"

namespace compressor {
namespace {

// Below this many active input channels the per-kernel-entry GEMMs are too thin: im2col.
constexpr int64_t kShiftedMinChannels = 8;

struct Scratchpad {
  std::vector<float> sums, rows, queries, projections, patches, padded, weights, product;
  std::vector<uint8_t> skip;
  std::vector<uint64_t> codes;
  std::vector<int32_t> filters, channels;
};

class LshConvCpuKernel {
 public:
  LshConvCpuKernel(const OrtApi& api, const OrtKernelInfo* info)
      : attributes_(LshConvAttributes::Read(info)) {
    // A constant weight (the usual case: an initializer) is laid out once per kernel entry,
    // taps[kh * kW + kw][m][c], the A operands of the per-entry GEMMs.
    int is_constant = 0;
    const OrtValue* weight = nullptr;
    OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &weight);
    if (status != nullptr) {
      api.ReleaseStatus(status);
    } else if (is_constant && weight != nullptr) {
      Ort::ConstValue value(weight);
      auto type = value.GetTensorTypeAndShapeInfo();
      const std::vector<int64_t> shape = type.GetShape();
      if (shape.size() == 4 && type.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
          shape[0] > 0 && shape[1] > 0 && shape[2] > 0 && shape[3] > 0) {
        const int64_t M = shape[0], C = shape[1], kernel = shape[2] * shape[3];
        const float* w = value.GetTensorData<float>();
        constant_taps_.resize(static_cast<size_t>(kernel * M * C));
        for (int64_t tap = 0; tap < kernel; ++tap) {
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t c = 0; c < C; ++c) {
              constant_taps_[(tap * M + m) * C + c] = w[(m * C + c) * kernel + tap];
            }
          }
        }
        constant_shape_ = shape;
      }
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLshConvName, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext context(raw_context);
    const size_t input_count = context.GetInputCount();
    if (input_count < 4) throw OpError("needs inputs X, W, planes and buckets");
    Ort::ConstValue x = context.GetInput(0);
    Ort::ConstValue w = context.GetInput(1);
    Ort::ConstValue planes = context.GetInput(2);
    Ort::ConstValue buckets = context.GetInput(3);
    const OrtValue* bias_value = nullptr;
    const OrtValue* mask_value = nullptr;
    if (input_count > 4) Check(api.KernelContext_GetInput(raw_context, 4, &bias_value));
    if (input_count > 5) Check(api.KernelContext_GetInput(raw_context, 5, &mask_value));
    std::vector<int64_t> bias_shape;
    const float* bias = nullptr;
    if (bias_value != nullptr) {
      Ort::ConstValue b(bias_value);
      bias_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      bias = b.GetTensorData<float>();
    }
    const Conv2dShape g = Conv2dShape::Make(attributes_.conv, x.GetTensorTypeAndShapeInfo().GetShape(),
                                            w.GetTensorTypeAndShapeInfo().GetShape(),
                                            bias_value ? &bias_shape : nullptr);
    const LshTablesShape t = LshTablesShape::Make(g, planes.GetTensorTypeAndShapeInfo().GetShape(),
                                                  buckets.GetTensorTypeAndShapeInfo().GetShape());
    const bool* channel_mask = nullptr;
    if (mask_value != nullptr) {
      Ort::ConstValue m(mask_value);
      CheckChannelMask(g, m.GetTensorTypeAndShapeInfo().GetShape());
      channel_mask = m.GetTensorData<bool>();
    }

    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    bool* selected_out = nullptr;
    if (context.GetOutputCount() > 1) {
      OrtValue* selected_value = nullptr;
      const int64_t shape[] = {g.N, g.M};
      Check(api.KernelContext_GetOutput(raw_context, 1, shape, 2, &selected_value));
      if (selected_value != nullptr) {
        selected_out = Ort::UnownedValue(selected_value).GetTensorMutableData<bool>();
      }
    }
    if (g.N == 0) return;

    Inputs in{x.GetTensorData<float>(), w.GetTensorData<float>(), planes.GetTensorData<float>(),
              reinterpret_cast<const uint64_t*>(buckets.GetTensorData<int64_t>()), bias,
              channel_mask};
    // One parallel section (with spinning off, every extra one costs a wake-up of the
    // pool): units of (sample, block of output rows, block of selected filters); the blocks
    // only when there are fewer samples than threads: rows while each block keeps >= 64
    // output positions, then filters. Each unit hashes its sample itself, so units of one
    // sample repeat the (cheap) selection rather than wait for each other.
    const int64_t threads = HardwareThreads();
    int64_t rows_per_unit = std::max<int64_t>(1, g.OH);
    while (g.N * ((g.OH + rows_per_unit - 1) / rows_per_unit) < threads &&
           ((rows_per_unit + 1) / 2) * g.OW >= 64 && rows_per_unit > 1) {
      rows_per_unit = (rows_per_unit + 1) / 2;
    }
    const int64_t row_blocks = std::max<int64_t>(1, (g.OH + rows_per_unit - 1) / rows_per_unit);
    const int64_t filter_blocks =
        std::max<int64_t>(1, std::min<int64_t>(g.M / 8, threads / (g.N * row_blocks)));
    const int64_t units_per_sample = row_blocks * filter_blocks;
    float* out = y.GetTensorMutableData<float>();
    ParallelUnits(raw_context, static_cast<size_t>(g.N * units_per_sample), [&](size_t i) {
      thread_local std::vector<uint64_t> words;
      const int64_t n = static_cast<int64_t>(i) / units_per_sample;
      const int64_t rb = (static_cast<int64_t>(i) % units_per_sample) / filter_blocks;
      const int64_t fb = static_cast<int64_t>(i) % filter_blocks;
      Select(g, t, in, n, Scratch(words, static_cast<size_t>(t.words)));
      if (rb == 0 && fb == 0 && selected_out != nullptr) {
        for (int64_t m = 0; m < g.M; ++m) {
          selected_out[n * g.M + m] = (words[m / 64] >> (m % 64)) & 1;
        }
      }
      if (g.OH > 0 && g.OW > 0) {
        Convolve(g, t, in, n, rb * rows_per_unit, std::min(g.OH, (rb + 1) * rows_per_unit), fb,
                 filter_blocks, words.data(), out);
      }
    });
  }

  struct Inputs {
    const float* x;
    const float* w;
    const float* planes;
    const uint64_t* buckets;
    const float* bias;
    const bool* channel_mask;
  };

  // The filters sample n selects, as a bitset of t.words words.
  void Select(const Conv2dShape& g, const LshTablesShape& t, const Inputs& in, int64_t n,
              uint64_t* words) const {
    thread_local Scratchpad s;
    const int64_t D = g.D(), OW = g.OW;
    const bool* skip = nullptr;
    if (in.channel_mask != nullptr) {
      uint8_t* flags = Scratch(s.skip, static_cast<size_t>(g.C));
      for (int64_t c = 0; c < g.C; ++c) flags[c] = !in.channel_mask[n * g.C + c];
      skip = reinterpret_cast<const bool*>(flags);
    }
    float* sums = Scratch(s.sums, static_cast<size_t>(std::max<int64_t>(1, D * OW)));
    WindowColumnSums(g, in.x + n * g.C * g.H * g.W, skip, sums, s.rows, 0, g.C);

    // Queries as columns of a [D + 1, Q] matrix; the last row is the bias coordinate.
    const int64_t Q = attributes_.query == LshQuery::kMean ? 1 : OW;
    float* queries = Scratch(s.queries, static_cast<size_t>((D + 1) * Q));
    if (attributes_.query == LshQuery::kMean) {
      const float scale = g.Windows() > 0 ? 1.0f / static_cast<float>(g.Windows()) : 0.0f;
      for (int64_t k = 0; k < D; ++k) {
        float total = 0.0f;
        for (int64_t ow = 0; ow < OW; ++ow) total += sums[k * OW + ow];
        queries[k] = total * scale;
      }
      queries[D] = 1.0f;
    } else {
      const float scale = g.OH > 0 ? 1.0f / static_cast<float>(g.OH) : 0.0f;
      for (int64_t j = 0; j < D * OW; ++j) queries[j] = sums[j] * scale;
      for (int64_t ow = 0; ow < OW; ++ow) queries[D * OW + ow] = 1.0f;
    }
    std::memset(words, 0, sizeof(uint64_t) * t.words);
    if (Q == 0) return;

    // Every table's projections in one GEMM: [L * K, D + 1] x [D + 1, Q].
    const int64_t planes_count = t.L * t.K;
    float* projections = Scratch(s.projections, static_cast<size_t>(planes_count * Q));
    Sgemm(static_cast<int>(planes_count), static_cast<int>(Q), static_cast<int>(D + 1), in.planes,
          static_cast<int>(D + 1), queries, static_cast<int>(Q), projections, static_cast<int>(Q));
    uint64_t* codes = Scratch(s.codes, static_cast<size_t>(Q));
    const int64_t table_size = int64_t{1} << t.K;
    for (int64_t l = 0; l < t.L; ++l) {
      std::memset(codes, 0, sizeof(uint64_t) * Q);
      for (int64_t k = 0; k < t.K; ++k) {
        simhash::AddSignBit(projections + (l * t.K + k) * Q, 0.0f, Q, static_cast<int>(k), codes);
      }
      const uint64_t* table = in.buckets + l * table_size * t.words;
      uint64_t previous = ~uint64_t{0};
      for (int64_t q = 0; q < Q; ++q) {
        if (codes[q] == previous) continue;  // neighbouring columns often share a code
        previous = codes[q];
        simhash::OrWords(words, table + static_cast<int64_t>(codes[q]) * t.words, t.words);
      }
    }
    simhash::ClearTail(words, g.M);
  }

  // Output rows [oh0, oh1) of sample n, for block `block` of `blocks` of its selected
  // filters (the block owns output channels [first selected in it, first of the next)).
  void Convolve(const Conv2dShape& g, const LshTablesShape& t, const Inputs& in, int64_t n,
                int64_t oh0, int64_t oh1, int64_t block, int64_t blocks, const uint64_t* words,
                float* y) const {
    thread_local Scratchpad s;
    const int64_t plane = g.OH * g.OW, rows = oh1 - oh0, cols = rows * g.OW;
    const int64_t kernel = g.kH * g.kW, D = g.D();
    float* out = y + n * g.M * plane + oh0 * g.OW;  // channel m at out + m * plane
    const float* image = in.x + n * g.C * g.H * g.W;

    int32_t* selected = Scratch(s.filters, static_cast<size_t>(g.M));
    const int64_t total = simhash::Popcount(words, t.words);
    if (total == g.M) {
      for (int64_t m = 0; m < g.M; ++m) selected[m] = static_cast<int32_t>(m);
    } else {
      simhash::SetBits(words, t.words, selected);
    }
    const int64_t lo = total * block / blocks, hi = total * (block + 1) / blocks;
    auto boundary = [&](int64_t b, int64_t index) -> int64_t {
      return b == 0 ? 0 : (b == blocks || index >= total ? g.M : selected[index]);
    };
    const int64_t m_begin = boundary(block, lo), m_end = boundary(block + 1, hi);
    const int32_t* filters = selected + lo;
    const int64_t count = hi - lo;
    int32_t* channels = Scratch(s.channels, static_cast<size_t>(g.C));
    int64_t active = 0;
    for (int64_t c = 0; c < g.C; ++c) {
      if (in.channel_mask == nullptr || in.channel_mask[n * g.C + c]) channels[active++] = static_cast<int32_t>(c);
    }
    const bool all_channels = active == g.C;
    const bool all_filters = total == g.M;  // then filters[i] == lo + i
    const int64_t Ka = active * kernel;

    auto zero_rows = [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) std::memset(out + m * plane, 0, sizeof(float) * cols);
    };
    if (count == 0) {
      zero_rows(m_begin, m_end);
      return;
    }
    if (Ka == 0) {  // every input channel is known to be zero: selected filters give their bias
      int64_t next = 0;
      for (int64_t m = m_begin; m < m_end; ++m) {
        float* o = out + m * plane;
        const bool chosen = next < count && filters[next] == m;
        next += chosen;
        const float value = chosen && in.bias ? in.bias[m] : 0.0f;
        for (int64_t j = 0; j < cols; ++j) o[j] = value;
      }
      return;
    }

    const bool pointwise = g.kH == 1 && g.kW == 1 && g.stride_h == 1 && g.stride_w == 1 &&
                           g.pad_top == 0 && g.pad_left == 0 && g.OH == g.H && g.OW == g.W;
    float* product;
    int64_t row_width, gemm_cols;
    if (!(pointwise && all_channels) && g.stride_h == 1 && g.stride_w == 1 &&
        active >= kShiftedMinChannels) {
      // One GEMM per kernel entry on the padded rows, no patch matrix (measured several times
      // faster than im2col + GEMM on the zoo's layers: runtime_ext/README.md).
      const PaddedRows padded = PadRows(g, image, all_channels ? nullptr : channels, active, oh0,
                                        oh1, s.padded);
      // taps[tap][i][j]: weight of selected filter i, active channel j at kernel entry tap.
      const float* taps;
      const bool constant = constant_shape_ == std::vector<int64_t>{g.M, g.C, g.kH, g.kW};
      if (constant && all_filters && all_channels) {
        taps = constant_taps_.data();  // filters [lo, hi) of every entry: see the stride below
      } else {
        float* gathered = Scratch(s.weights, static_cast<size_t>(kernel * count * active));
        for (int64_t tap = 0; tap < kernel; ++tap) {
          for (int64_t i = 0; i < count; ++i) {
            float* row = gathered + (tap * count + i) * active;
            if (constant) {
              const float* source = constant_taps_.data() + (tap * g.M + filters[i]) * g.C;
              if (all_channels) {
                std::memcpy(row, source, sizeof(float) * active);
              } else {
                for (int64_t j = 0; j < active; ++j) row[j] = source[channels[j]];
              }
            } else {
              const float* source = in.w + static_cast<int64_t>(filters[i]) * D + tap;
              for (int64_t j = 0; j < active; ++j) row[j] = source[channels[j] * kernel];
            }
          }
        }
        taps = gathered;
      }
      row_width = padded.width;
      gemm_cols = rows * row_width;
      product = Scratch(s.product, static_cast<size_t>(count * gemm_cols));
      if (taps == constant_taps_.data()) {
        ShiftedGemms(g, padded, active, taps + lo * active, g.M * active, count, rows, product);
      } else {
        ShiftedGemms(g, padded, active, taps, count * active, count, rows, product);
      }
    } else {
      // B: the patches of the active channels, [Ka, gemm_cols]; output row r of the block is
      // at columns [r * row_width, r * row_width + OW).
      const float* patches;
      int64_t ldb;
      if (pointwise && all_channels) {  // X itself
        patches = image + oh0 * g.W;
        ldb = g.H * g.W;
        row_width = g.OW;
      } else {
        row_width = Patches(g, image, all_channels ? nullptr : channels, active, oh0, oh1,
                            s.patches, s.padded);
        patches = s.patches.data();
        ldb = rows * row_width;
      }
      gemm_cols = rows * row_width;

      // A: the selected filters restricted to the active channels, [count, Ka].
      const float* weights = in.w + lo * D;
      if (!(all_filters && all_channels)) {
        float* A = Scratch(s.weights, static_cast<size_t>(count * Ka));
        for (int64_t i = 0; i < count; ++i) {
          const float* filter = in.w + static_cast<int64_t>(filters[i]) * D;
          if (all_channels) {
            std::memcpy(A + i * Ka, filter, sizeof(float) * D);
          } else {
            for (int64_t j = 0; j < active; ++j) {
              std::memcpy(A + i * Ka + j * kernel, filter + channels[j] * kernel, sizeof(float) * kernel);
            }
          }
        }
        weights = A;
      }

      if (all_filters && row_width == g.OW) {  // straight into Y
        BlockedSgemm(count, cols, Ka, weights, Ka, patches, ldb, out + lo * plane, plane, false);
        if (in.bias != nullptr) {
          for (int64_t m = lo; m < hi; ++m) {
            const float b = in.bias[m];
            float* o = out + m * plane;
            for (int64_t j = 0; j < cols; ++j) o[j] += b;
          }
        }
        return;
      }
      product = Scratch(s.product, static_cast<size_t>(count * gemm_cols));
      BlockedSgemm(count, gemm_cols, Ka, weights, Ka, patches, ldb, product, gemm_cols, false);
    }

    // Scatter: selected filters' rows (junk columns dropped, bias added), zeros between them.
    int64_t previous = m_begin;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t m = filters[i];
      zero_rows(previous, m);
      previous = m + 1;
      const float b = in.bias ? in.bias[m] : 0.0f;
      for (int64_t r = 0; r < rows; ++r) {
        const float* source = product + i * gemm_cols + r * row_width;
        float* o = out + m * plane + r * g.OW;
        for (int64_t ow = 0; ow < g.OW; ++ow) o[ow] = source[ow] + b;
      }
    }
    zero_rows(previous, m_end);
  }

  LshConvAttributes attributes_;
  std::vector<float> constant_taps_;
  std::vector<int64_t> constant_shape_;
};

struct LshConvCpuOp : Ort::CustomOpBase<LshConvCpuOp, LshConvCpuKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return Guard(kLshConvName, [&] { *kernel = new LshConvCpuKernel(api, info); });
  }
  const char* GetName() const { return kLshConvName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (index == 5) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
};

}  // namespace

void AddLshConvCpu(Ort::CustomOpDomain& domain) {
  static LshConvCpuOp op;
  domain.Add(&op);
}

}  // namespace compressor

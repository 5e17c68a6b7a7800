// LSHWindowConv CPU kernel. Per sample:
//   1. im2col P [D, OH*OW]; hash projections [K, OH*OW] = planes[:, :D] x P (one GEMM); sign
//      bits (+ the offset column) packed into one code per window;
//   2. buckets numbered in order of first occurrence (open-addressing table keyed by code);
//   3. one window per bucket: Y = W x P straight into Y (plain Conv);
//      else bucket means Pm [D, buckets] -> Ym = W x Pm (GEMM, common/gemm.h) -> each window
//      takes its bucket's column of Ym, plus the bias.
// Samples are the work units when there are at least as many as threads; otherwise each
// sample's steps are split over the threads (rows of windows, rows of Pm, filters).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/gemm.h"
#include "common/simhash.h"
#include "common/cpu_parallel.h"
#include "ops/lsh_window_conv/lsh_window_conv.h"

namespace compressor {
namespace {

struct Workspace {
  std::vector<float> patches, projections, means, product;
  std::vector<uint64_t> codes, keys;
  std::vector<int32_t> bucket, slots, counts;
};

class LshWindowConvCpuKernel {
 public:
  static constexpr const char* kLabel = kLshWindowConvName;

  LshWindowConvCpuKernel(const OrtApi&, const OrtKernelInfo* info)
      : attributes_(Conv2dAttributes::Read(info)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  struct Call {
    Conv2dShape g;
    int64_t bits;
    const float* x;
    const float* w;
    const float* planes;
    const float* bias;
    float* y;
    int64_t* buckets;
  };

  void Compute(OrtKernelContext* raw_context) {
    const OrtApi& api = Ort::GetApi();
    Ort::KernelContext context(raw_context);
    const size_t input_count = context.GetInputCount();
    if (input_count < 3) throw OpError("needs inputs X, W and planes");
    Ort::ConstValue x = context.GetInput(0);
    Ort::ConstValue w = context.GetInput(1);
    Ort::ConstValue planes = context.GetInput(2);
    const OrtValue* bias_value = nullptr;
    if (input_count > 3) Check(api.KernelContext_GetInput(raw_context, 3, &bias_value));
    std::vector<int64_t> bias_shape;
    const float* bias = nullptr;
    if (bias_value != nullptr) {
      Ort::ConstValue b(bias_value);
      bias_shape = b.GetTensorTypeAndShapeInfo().GetShape();
      bias = b.GetTensorData<float>();
    }
    Call call{};
    call.g = Conv2dShape::Make(attributes_, x.GetTensorTypeAndShapeInfo().GetShape(),
                               w.GetTensorTypeAndShapeInfo().GetShape(),
                               bias_value ? &bias_shape : nullptr);
    call.bits = LshWindowBits(call.g, planes.GetTensorTypeAndShapeInfo().GetShape());
    const Conv2dShape& g = call.g;
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    if (context.GetOutputCount() > 1) {
      OrtValue* buckets_value = nullptr;
      const int64_t shape[] = {g.N, g.OH, g.OW};
      Check(api.KernelContext_GetOutput(raw_context, 1, shape, 3, &buckets_value));
      if (buckets_value != nullptr) {
        call.buckets = Ort::UnownedValue(buckets_value).GetTensorMutableData<int64_t>();
      }
    }
    if (g.N == 0 || g.Windows() == 0) return;
    call.x = x.GetTensorData<float>();
    call.w = w.GetTensorData<float>();
    call.planes = planes.GetTensorData<float>();
    call.bias = bias;
    call.y = y.GetTensorMutableData<float>();

    const int64_t threads = HardwareThreads();
    if (g.N >= threads) {
      ParallelUnits(raw_context, static_cast<size_t>(g.N), [&](size_t n) {
        thread_local Workspace workspace;
        RunSample(call, static_cast<int64_t>(n), workspace, nullptr, 1);
      });
    } else {
      Workspace workspace;
      for (int64_t n = 0; n < g.N; ++n) RunSample(call, n, workspace, raw_context, threads);
    }
  }

  // One sample; its steps split into `split` units on the pool when context is not null.
  static void RunSample(const Call& c, int64_t n, Workspace& s, OrtKernelContext* context,
                        int64_t split) {
    const Conv2dShape& g = c.g;
    const int64_t D = g.D(), windows = g.Windows(), plane = windows, K = c.bits;
    const float* image = c.x + n * g.C * g.H * g.W;
    float* out = c.y + n * g.M * plane;

    // 1. Patches and codes, by blocks of output rows.
    float* P = Scratch(s.patches, static_cast<size_t>(D * windows));
    float* H = Scratch(s.projections, static_cast<size_t>(K * windows));
    uint64_t* codes = Scratch(s.codes, static_cast<size_t>(windows));
    const int64_t row_blocks = std::min(g.OH, split);
    ParallelUnits(context, static_cast<size_t>(row_blocks), [&](size_t i) {
      int64_t oh0, oh1;
      BlockRange(g.OH, row_blocks, static_cast<int64_t>(i), &oh0, &oh1);
      if (oh0 == oh1) return;
      const int64_t col0 = oh0 * g.OW, cols = (oh1 - oh0) * g.OW;
      Im2Col(g, image, nullptr, g.C, oh0, oh1, P + col0, windows);
      Sgemm(static_cast<int>(K), static_cast<int>(cols), static_cast<int>(D), c.planes,
            static_cast<int>(D + 1), P + col0, static_cast<int>(windows), H + col0,
            static_cast<int>(windows));
      std::memset(codes + col0, 0, sizeof(uint64_t) * cols);
      for (int64_t k = 0; k < K; ++k) {
        simhash::AddSignBit(H + k * windows + col0, c.planes[k * (D + 1) + D], cols,
                            static_cast<int>(k), codes + col0);
      }
    });

    // 2. Buckets in order of first occurrence.
    int64_t capacity = 16;
    while (capacity < 2 * windows) capacity *= 2;
    uint64_t* keys = Scratch(s.keys, static_cast<size_t>(capacity));
    int32_t* slots = Scratch(s.slots, static_cast<size_t>(capacity));
    int32_t* bucket = Scratch(s.bucket, static_cast<size_t>(windows));
    std::memset(keys, 0, sizeof(uint64_t) * capacity);
    int shift = 64;
    for (int64_t v = capacity; v > 1; v >>= 1) --shift;
    int32_t buckets = 0;
    for (int64_t j = 0; j < windows; ++j) {
      const uint64_t key = codes[j] + 1;  // codes have at most 32 bits: key 0 marks a free slot
      uint64_t slot = (key * 0x9E3779B97F4A7C15ull) >> shift;
      while (keys[slot] != 0 && keys[slot] != key) slot = (slot + 1) & (capacity - 1);
      if (keys[slot] == 0) {
        keys[slot] = key;
        slots[slot] = buckets++;
      }
      bucket[j] = slots[slot];
    }
    if (c.buckets != nullptr) {
      int64_t* o = c.buckets + n * windows;
      for (int64_t j = 0; j < windows; ++j) o[j] = bucket[j];
    }

    const int64_t filter_blocks = std::min(g.M, split);
    auto add_bias = [&](int64_t m0, int64_t m1) {
      if (c.bias == nullptr) return;
      for (int64_t m = m0; m < m1; ++m) {
        float* o = out + m * plane;
        const float b = c.bias[m];
        for (int64_t j = 0; j < windows; ++j) o[j] += b;
      }
    };

    // 3a. One window per bucket: the plain convolution.
    if (buckets == windows) {
      ParallelUnits(context, static_cast<size_t>(filter_blocks), [&](size_t i) {
        int64_t m0, m1;
        BlockRange(g.M, filter_blocks, static_cast<int64_t>(i), &m0, &m1);
        if (m0 == m1) return;
        Sgemm(static_cast<int>(m1 - m0), static_cast<int>(windows), static_cast<int>(D),
              c.w + m0 * D, static_cast<int>(D), P, static_cast<int>(windows), out + m0 * plane,
              static_cast<int>(plane));
        add_bias(m0, m1);
      });
      return;
    }

    // 3b. Bucket means, one product per bucket, scattered back.
    const int64_t B = buckets;
    int32_t* counts = Scratch(s.counts, static_cast<size_t>(B));
    std::memset(counts, 0, sizeof(int32_t) * B);
    for (int64_t j = 0; j < windows; ++j) ++counts[bucket[j]];
    float* means = Scratch(s.means, static_cast<size_t>(D * B));
    const int64_t row_split = std::min(D, split);
    ParallelUnits(context, static_cast<size_t>(row_split), [&](size_t i) {
      int64_t d0, d1;
      BlockRange(D, row_split, static_cast<int64_t>(i), &d0, &d1);
      for (int64_t d = d0; d < d1; ++d) {
        float* row = means + d * B;
        const float* source = P + d * windows;
        std::memset(row, 0, sizeof(float) * B);
        for (int64_t j = 0; j < windows; ++j) row[bucket[j]] += source[j];
        for (int64_t b = 0; b < B; ++b) row[b] /= static_cast<float>(counts[b]);
      }
    });
    float* product = Scratch(s.product, static_cast<size_t>(g.M * B));
    ParallelUnits(context, static_cast<size_t>(filter_blocks), [&](size_t i) {
      int64_t m0, m1;
      BlockRange(g.M, filter_blocks, static_cast<int64_t>(i), &m0, &m1);
      if (m0 == m1) return;
      Sgemm(static_cast<int>(m1 - m0), static_cast<int>(B), static_cast<int>(D), c.w + m0 * D,
            static_cast<int>(D), means, static_cast<int>(B), product + m0 * B, static_cast<int>(B));
      for (int64_t m = m0; m < m1; ++m) {
        const float* source = product + m * B;
        const float b = c.bias ? c.bias[m] : 0.0f;
        float* o = out + m * plane;
        for (int64_t j = 0; j < windows; ++j) o[j] = source[bucket[j]] + b;
      }
    });
  }

  Conv2dAttributes attributes_;
};

using LshWindowConvCpuOp = KernelOp<LshWindowConvCpuKernel, LshWindowConvSignature, Provider::kCpu>;

}  // namespace

void AddLshWindowConvCpu(Ort::CustomOpDomain& domain) { AddOp<LshWindowConvCpuOp>(domain); }

}  // namespace compressor

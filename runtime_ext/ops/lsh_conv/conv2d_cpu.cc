// CPU im2col and window column sums shared by LSHConv and LSHWindowConv.
#include <algorithm>
#include <cstring>

#include "common/gemm.h"
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

#define COMPRESSOR_LSH_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace {

// Output columns ow whose input column iw = ow * stride_w - pad_left + kw * dilation_w lies in
// [0, W): [*first, *last).
void ValidColumns(const Conv2dShape& g, int64_t kw, int64_t* first, int64_t* last) {
  const int64_t shift = kw * g.dilation_w - g.pad_left;  // iw = ow * sw + shift
  int64_t lo = shift >= 0 ? 0 : (-shift + g.stride_w - 1) / g.stride_w;
  int64_t hi = g.W - shift <= 0 ? 0 : (g.W - shift - 1) / g.stride_w + 1;
  lo = std::min(lo, g.OW);
  hi = std::max(lo, std::min(hi, g.OW));
  *first = lo;
  *last = hi;
}

}  // namespace

COMPRESSOR_LSH_CLONES void Im2Col(const Conv2dShape& g, const float* image,
                                  const int32_t* channels, int64_t count, int64_t oh0,
                                  int64_t oh1, float* P, int64_t ld) {
  const int64_t OW = g.OW, sw = g.stride_w;
  for (int64_t kw = 0; kw < g.kW; ++kw) {
    int64_t first, last;
    ValidColumns(g, kw, &first, &last);
    const int64_t shift = kw * g.dilation_w - g.pad_left;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t c = channels ? channels[i] : i;
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        float* out = P + ((i * g.kH + kh) * g.kW + kw) * ld;
        for (int64_t oh = oh0; oh < oh1; ++oh, out += OW) {
          const int64_t ih = oh * g.stride_h - g.pad_top + kh * g.dilation_h;
          if (ih < 0 || ih >= g.H || first >= last) {
            std::memset(out, 0, sizeof(float) * OW);
            continue;
          }
          const float* row = image + (c * g.H + ih) * g.W + shift;  // row[ow * sw] = x[iw]
          for (int64_t ow = 0; ow < first; ++ow) out[ow] = 0.0f;
          if (sw == 1) {
            std::memcpy(out + first, row + first, sizeof(float) * (last - first));
          } else {
            for (int64_t ow = first; ow < last; ++ow) out[ow] = row[ow * sw];
          }
          for (int64_t ow = last; ow < OW; ++ow) out[ow] = 0.0f;
        }
      }
    }
  }
}

PaddedRows PadRows(const Conv2dShape& g, const float* image, const int32_t* channels,
                   int64_t count, int64_t oh0, int64_t oh1, std::vector<float>& buffer) {
  const int64_t rows = oh1 - oh0;
  const int64_t span_w = (g.kW - 1) * g.dilation_w, width = g.OW + span_w;
  const int64_t span_h = (g.kH - 1) * g.dilation_h;
  const int64_t in_rows = (rows - 1) * g.stride_h + span_h + 1, ih0 = oh0 * g.stride_h - g.pad_top;
  const size_t size = static_cast<size_t>(count * in_rows * width + span_w + 1);
  if (buffer.size() < size) buffer.resize(size);
  float* pad = buffer.data();
  const int64_t first = std::min(width, std::max<int64_t>(0, g.pad_left));
  const int64_t last = std::max(first, std::min(width, g.W + g.pad_left));  // [first, last) from x
  for (int64_t i = 0; i < count; ++i) {
    const int64_t c = channels ? channels[i] : i;
    for (int64_t r = 0; r < in_rows; ++r) {
      float* out = pad + (i * in_rows + r) * width;
      const int64_t ih = ih0 + r;
      if (ih < 0 || ih >= g.H || first == last) {
        std::memset(out, 0, sizeof(float) * width);
        continue;
      }
      std::memset(out, 0, sizeof(float) * first);
      std::memcpy(out + first, image + (c * g.H + ih) * g.W + (first - g.pad_left),
                  sizeof(float) * (last - first));
      std::memset(out + last, 0, sizeof(float) * (width - last));
    }
  }
  std::memset(pad + count * in_rows * width, 0, sizeof(float) * (span_w + 1));
  return PaddedRows{pad, in_rows, width};
}

int64_t Patches(const Conv2dShape& g, const float* image, const int32_t* channels, int64_t count,
                int64_t oh0, int64_t oh1, std::vector<float>& P, std::vector<float>& padded) {
  const int64_t rows = oh1 - oh0, kernel = g.kH * g.kW;
  if (g.stride_w != 1) {
    if (P.size() < static_cast<size_t>(count * kernel * rows * g.OW)) {
      P.resize(static_cast<size_t>(count * kernel * rows * g.OW));
    }
    Im2Col(g, image, channels, count, oh0, oh1, P.data(), rows * g.OW);
    return g.OW;
  }
  const PaddedRows pad = PadRows(g, image, channels, count, oh0, oh1, padded);
  const int64_t width = pad.width, cols = rows * width;
  if (P.size() < static_cast<size_t>(count * kernel * cols)) {
    P.resize(static_cast<size_t>(count * kernel * cols));
  }
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        float* out = P.data() + ((i * g.kH + kh) * g.kW + kw) * cols;
        const float* in = pad.data + (i * pad.rows + kh * g.dilation_h) * width + kw * g.dilation_w;
        if (g.stride_h == 1) {
          std::memcpy(out, in, sizeof(float) * cols);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            std::memcpy(out + r * width, in + r * g.stride_h * width, sizeof(float) * width);
          }
        }
      }
    }
  }
  return width;
}

void BlockedSgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(float) * N);
    }
    return;
  }
  // Columns per block so that 8 rows fit the budget, then as many rows as fit.
  const int64_t cols = std::min(N, std::max<int64_t>(64, kSmallGemm / (8 * K)));
  const int64_t rows = std::min(M, std::max<int64_t>(8, kSmallGemm / (cols * K) / 8 * 8));
  for (int64_t i = 0; i < M; i += rows) {
    const int64_t m = std::min(rows, M - i);
    for (int64_t j = 0; j < N; j += cols) {
      const int64_t n = std::min(cols, N - j);
      Sgemm(static_cast<int>(m), static_cast<int>(n), static_cast<int>(K), A + i * lda,
            static_cast<int>(lda), B + j, static_cast<int>(ldb), C + i * ldc + j,
            static_cast<int>(ldc), accumulate);
    }
  }
}

void ShiftedGemms(const Conv2dShape& g, const PaddedRows& padded, int64_t channels,
                  const float* taps, int64_t tap_stride, int64_t count, int64_t out_rows,
                  float* out) {
  const int64_t cols = out_rows * padded.width, ldb = padded.rows * padded.width;
  // Blocks of filters outside, kernel entries inside: a block's output stays in cache while
  // the kernel entries accumulate into it.
  const int64_t rows = std::min(count, std::max<int64_t>(
      8, kSmallGemm / (std::max<int64_t>(1, cols) * std::max<int64_t>(1, channels)) / 8 * 8));
  for (int64_t i = 0; i < count; i += rows) {
    const int64_t m = std::min(rows, count - i);
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        const int64_t tap = kh * g.kW + kw;
        BlockedSgemm(m, cols, channels, taps + tap * tap_stride + i * channels, channels,
                     padded.data + kh * g.dilation_h * padded.width + kw * g.dilation_w, ldb,
                     out + i * cols, cols, /*accumulate=*/tap > 0);
      }
    }
  }
}

COMPRESSOR_LSH_CLONES void WindowColumnSums(const Conv2dShape& g, const float* image,
                                            const bool* skip, float* S,
                                            std::vector<float>& scratch, int64_t c0,
                                            int64_t c1) {
  if (scratch.size() < static_cast<size_t>(2 * g.W)) scratch.resize(static_cast<size_t>(2 * g.W));
  float* column_sum = scratch.data();
  float* all_rows = scratch.data() + g.W;
  for (int64_t c = c0; c < c1; ++c) {
    const float* channel = image + c * g.H * g.W;
    if (skip != nullptr && skip[c]) {
      std::memset(S + c * g.kH * g.kW * g.OW, 0, sizeof(float) * g.kH * g.kW * g.OW);
      continue;
    }
    if (g.stride_h == 1) {  // kernel row kh reads input rows [lo, lo + OH): all rows minus a few
      std::memset(all_rows, 0, sizeof(float) * g.W);
      for (int64_t ih = 0; ih < g.H; ++ih) {
        const float* row = channel + ih * g.W;
        for (int64_t iw = 0; iw < g.W; ++iw) all_rows[iw] += row[iw];
      }
    }
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      float* out = S + (c * g.kH + kh) * g.kW * g.OW;
      // Sum of the input rows that kernel row kh reads, over all output rows.
      const int64_t lo = kh * g.dilation_h - g.pad_top;
      if (g.stride_h == 1) {
        std::memcpy(column_sum, all_rows, sizeof(float) * g.W);
        for (int64_t ih = 0; ih < std::min(lo, g.H); ++ih) {
          const float* row = channel + ih * g.W;
          for (int64_t iw = 0; iw < g.W; ++iw) column_sum[iw] -= row[iw];
        }
        for (int64_t ih = std::max<int64_t>(0, lo + g.OH); ih < g.H; ++ih) {
          const float* row = channel + ih * g.W;
          for (int64_t iw = 0; iw < g.W; ++iw) column_sum[iw] -= row[iw];
        }
      } else {
        std::memset(column_sum, 0, sizeof(float) * g.W);
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const int64_t ih = oh * g.stride_h + lo;
          if (ih < 0 || ih >= g.H) continue;
          const float* row = channel + ih * g.W;
          for (int64_t iw = 0; iw < g.W; ++iw) column_sum[iw] += row[iw];
        }
      }
      for (int64_t kw = 0; kw < g.kW; ++kw) {
        int64_t first, last;
        ValidColumns(g, kw, &first, &last);
        const int64_t shift = kw * g.dilation_w - g.pad_left;
        float* o = out + kw * g.OW;
        for (int64_t ow = 0; ow < first; ++ow) o[ow] = 0.0f;
        if (g.stride_w == 1) {
          std::memcpy(o + first, column_sum + first + shift, sizeof(float) * (last - first));
        } else {
          for (int64_t ow = first; ow < last; ++ow) o[ow] = column_sum[ow * g.stride_w + shift];
        }
        for (int64_t ow = last; ow < g.OW; ++ow) o[ow] = 0.0f;
      }
    }
  }
}

}  // namespace compressor

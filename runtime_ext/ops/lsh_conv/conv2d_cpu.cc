// CPU im2col and window column sums shared by LSHConv and LSHWindowConv.
#include <algorithm>
#include <cstring>

#include "common/direct_conv.h"  // COMPRESSOR_CLONES
#include "ops/lsh_conv/conv2d.h"

namespace compressor {

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

COMPRESSOR_CLONES void Im2Col(const Conv2dShape& g, const float* image,
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

COMPRESSOR_CLONES void WindowColumnSums(const Conv2dShape& g, const float* image,
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

// What the two LSH convolutions (LSHConv, LSHWindowConv) share: ONNX Conv attributes for 2-D
// inputs with their validation (DiffConv's attributes extend them too), the call's sizes, the
// CPU im2col (LSHWindowConv) and the window sums that LSHConv's queries are built from.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/ort_op.h"

namespace compressor {

// strides, pads, dilations, kernel_shape, group (1 only, unless Read allows any), auto_pad
// (NOTSET only).
struct Conv2dAttributes {
  std::vector<int64_t> strides{1, 1};
  std::vector<int64_t> pads{0, 0, 0, 0};  // top, left, bottom, right
  std::vector<int64_t> dilations{1, 1};
  std::vector<int64_t> kernel_shape;      // empty: taken from W
  int64_t group = 1;

  // Reads and validates the node's attributes; throws OpError naming the bad one. Only
  // any_group ops (Im2colConv) accept group > 1.
  static Conv2dAttributes Read(const OrtKernelInfo* info, bool any_group = false) {
    Conv2dAttributes a;
    a.strides = AttributeInts(info, "strides", a.strides);
    a.pads = AttributeInts(info, "pads", a.pads);
    a.dilations = AttributeInts(info, "dilations", a.dilations);
    a.kernel_shape = AttributeInts(info, "kernel_shape", {});
    const int64_t group = AttributeInt(info, "group", 1);
    const std::string auto_pad = AttributeString(info, "auto_pad", "NOTSET");
    if (any_group && group < 1) {
      throw OpError("group must be a positive int, got " + std::to_string(group));
    }
    a.group = group;
    if (group != 1 && !any_group) {
      throw OpError("group=" + std::to_string(group) + " is not supported (only group=1)",
                    ORT_NOT_IMPLEMENTED);
    }
    if (auto_pad != "NOTSET") {
      throw OpError("auto_pad=" + auto_pad + " is not supported: give explicit pads",
                    ORT_NOT_IMPLEMENTED);
    }
    if (a.strides.size() != 2 || a.strides[0] < 1 || a.strides[1] < 1) {
      throw OpError("strides must be 2 positive ints, got " + ShapeString(a.strides));
    }
    if (a.dilations.size() != 2 || a.dilations[0] < 1 || a.dilations[1] < 1) {
      throw OpError("dilations must be 2 positive ints, got " + ShapeString(a.dilations));
    }
    if (a.pads.size() != 4 || a.pads[0] < 0 || a.pads[1] < 0 || a.pads[2] < 0 || a.pads[3] < 0) {
      throw OpError("pads must be 4 non-negative ints [top, left, bottom, right], got " +
                    ShapeString(a.pads));
    }
    if (!a.kernel_shape.empty() &&
        (a.kernel_shape.size() != 2 || a.kernel_shape[0] < 1 || a.kernel_shape[1] < 1)) {
      throw OpError("kernel_shape must be 2 positive ints, got " + ShapeString(a.kernel_shape));
    }
    return a;
  }
};

// Sizes of one call, validated against the attributes. D = C * kH * kW is the length of a
// window (an im2col column) and of a flattened filter.
struct Conv2dShape {
  int64_t N, C, H, W, M, kH, kW, OH, OW;
  int64_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int64_t group;  // C and M split in `group` equal parts; W is [M, C / group, kH, kW]

  int64_t D() const { return C * kH * kW; }
  int64_t Windows() const { return OH * OW; }

  // The LSH ops' shape: FromShapes, within the 32-bit sizes their BLAS calls and CUDA kernels
  // take.
  static Conv2dShape Make(const Conv2dAttributes& a, const std::vector<int64_t>& x,
                          const std::vector<int64_t>& w, const std::vector<int64_t>* bias) {
    const Conv2dShape g = FromShapes(a, x, w, bias);
    if (g.D() + 1 > INT32_MAX / 64 || g.OH * g.OW > INT32_MAX / 64 || g.M > INT32_MAX / 64 ||
        g.D() * g.OH * g.OW > INT32_MAX || g.M * g.D() > INT32_MAX ||
        g.M * g.OH * g.OW > INT32_MAX || g.C * g.H * g.W > INT32_MAX) {
      throw OpError("shape too large: X " + ShapeString(x) + ", W " + ShapeString(w),
                    ORT_NOT_IMPLEMENTED);
    }
    return g;
  }

  // Checks X [N, C, H, W], W [M, C, kH, kW] and the bias [M] (when given) against each other
  // and the attributes, and derives the output size; throws OpError naming the problem.
  static Conv2dShape FromShapes(const Conv2dAttributes& a, const std::vector<int64_t>& x,
                                const std::vector<int64_t>& w, const std::vector<int64_t>* bias) {
    if (x.size() != 4) {
      throw OpError("input X must be 4-D [N, C, H, W], got shape " + ShapeString(x));
    }
    if (w.size() != 4) {
      throw OpError("weight W must be 4-D [M, C, kH, kW], got shape " + ShapeString(w));
    }
    for (int64_t d : x) {
      if (d < 0) throw OpError("input X has a negative dimension: " + ShapeString(x));
    }
    if (x[1] != w[1] * a.group) {
      throw OpError("channel mismatch: X " + ShapeString(x) + " has " + std::to_string(x[1]) +
                    " channels but W " + ShapeString(w) + " expects " +
                    std::to_string(w[1] * a.group) + " (group=" + std::to_string(a.group) + ")");
    }
    if (w[0] % a.group != 0) {
      throw OpError("weight W " + ShapeString(w) + " has " + std::to_string(w[0]) +
                    " output channels, not a multiple of group=" + std::to_string(a.group));
    }
    if (!a.kernel_shape.empty() && (a.kernel_shape[0] != w[2] || a.kernel_shape[1] != w[3])) {
      throw OpError("kernel_shape " + ShapeString(a.kernel_shape) + " does not match W " +
                    ShapeString(w));
    }
    if (w[0] < 1 || w[1] < 1 || w[2] < 1 || w[3] < 1) {
      throw OpError("weight W has an empty dimension: " + ShapeString(w));
    }
    if (bias != nullptr && (bias->size() != 1 || (*bias)[0] != w[0])) {
      throw OpError("bias B must be 1-D [" + std::to_string(w[0]) + "], got shape " +
                    ShapeString(*bias));
    }
    Conv2dShape g{};
    g.N = x[0];
    g.C = x[1];
    g.H = x[2];
    g.W = x[3];
    g.M = w[0];
    g.kH = w[2];
    g.kW = w[3];
    g.stride_h = a.strides[0];
    g.stride_w = a.strides[1];
    g.pad_top = a.pads[0];
    g.pad_left = a.pads[1];
    g.dilation_h = a.dilations[0];
    g.dilation_w = a.dilations[1];
    g.group = a.group;
    const int64_t span_h = g.dilation_h * (g.kH - 1) + 1, span_w = g.dilation_w * (g.kW - 1) + 1;
    const int64_t padded_h = g.H + a.pads[0] + a.pads[2], padded_w = g.W + a.pads[1] + a.pads[3];
    if (padded_h < span_h || padded_w < span_w) {
      throw OpError("kernel " + ShapeString({g.kH, g.kW}) + " with dilations " +
                    ShapeString(a.dilations) + " does not fit the padded input " +
                    ShapeString({padded_h, padded_w}));
    }
    g.OH = (padded_h - span_h) / g.stride_h + 1;
    g.OW = (padded_w - span_w) / g.stride_w + 1;
    return g;
  }
};

// im2col of output rows [oh0, oh1) of one image over the listed input channels:
// P[((i * kH + kh) * kW + kw) * ld + (oh - oh0) * OW + ow] = x[channels[i], ih, iw] (0 in the
// padding). channels == nullptr means every channel (count == C).
void Im2Col(const Conv2dShape& g, const float* image, const int32_t* channels, int64_t count,
            int64_t oh0, int64_t oh1, float* P, int64_t ld);

// Window sums per kernel entry, the raw material of LSHConv's queries: for every channel c
// and kernel entry (kh, kw), column sums over all output rows,
// S[((c * kH + kh) * kW + kw) * OW + ow] = sum over oh of x[c, ih(oh, kh), iw(ow, kw)]
// (0 outside the input), for channels [c0, c1). Channels with skip[c] set (skip may be null)
// are written as 0.
void WindowColumnSums(const Conv2dShape& g, const float* image, const bool* skip, float* S,
                      std::vector<float>& scratch, int64_t c0, int64_t c1);

}  // namespace compressor

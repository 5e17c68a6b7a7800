// Direct 2-D convolution on the CPU with our own vector micro-kernels (no im2col, no GEMM
// library), shared by the DiffConv and LSHConv CPU kernels. A caller cuts its work into units
// (image, block of output rows) and, per unit:
//   1. copies the input rows the unit reads, zero-padded, into a phase image (PhaseLayout,
//      BuildPhaseImage): consecutive windows read consecutive floats whatever the stride;
//   2. runs the micro-kernel (RunConv) per tile of up to 64 output channels, whose weights
//      PackWeights laid out [C][kernel entries in EntryOrder][tile width], into a window-major
//      buffer [window][tile width];
//   3. writes the buffer to Y (NCHW) with a 16x16 register transpose (StoreTransposed).
// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 (target_clones) and picked at
// load time; a few helpers also have a hand-written AVX-512 version chosen at run time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

// Every clone of a hot loop; COMPRESSOR_INLINE for the templates they inline.
#define COMPRESSOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define COMPRESSOR_INLINE __attribute__((always_inline)) inline

namespace compressor {
namespace direct_conv {

// The sizes the direct convolution needs; Of() copies them from an op's own shape struct
// (DiffConvGeometry, Conv2dShape), which use the same field names.
struct Geometry {
  int64_t C, H, W, kH, kW, OH, OW;
  int64_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;

  template <class Shape>
  static Geometry Of(const Shape& s) {
    return Geometry{s.C,        s.H,        s.W,       s.kH,       s.kW,
                    s.OH,       s.OW,       s.stride_h, s.stride_w, s.pad_top,
                    s.pad_left, s.dilation_h, s.dilation_w};
  }
};

// Whether to run the hand-written AVX-512 helpers: the CPU has AVX-512F and the environment
// variable `portable_variable` (read when a kernel is created) is not "1", which makes tests
// check the portable versions on AVX-512 machines too.
bool UseAvx512(const char* portable_variable);

typedef float Vec16 __attribute__((vector_size(64)));

COMPRESSOR_INLINE Vec16 Load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
COMPRESSOR_INLINE void Store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// The sum of a vector's lanes, by halves (4 dependent adds, not 15).
COMPRESSOR_INLINE float HorizontalSum(Vec16 v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  const Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

constexpr int64_t kLanes = 16;
constexpr int kMaxVectors = 4;                        // channel tile: up to 64 output channels
constexpr int64_t kTileWidth = kLanes * kMaxVectors;  // output channels per tile

// The weights a micro-kernel streams over and over (one block of input channels) should stay
// in L1 (48 KiB here).
constexpr int64_t kWeightBlockBytes = 32 * 1024;

// Windows per micro-kernel call for a tile of NV vectors: NV * P accumulators stay in
// registers (24 of the 32 AVX-512 registers), plus NV weights and one broadcast input.
template <int NV>
constexpr int WindowsPerCall() {
  return NV == 4 ? 6 : NV == 3 ? 8 : 12;
}

inline int64_t RoundUp(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }
inline int64_t CeilDiv(int64_t value, int64_t divisor) { return (value + divisor - 1) / divisor; }

// The zero-padded input rows a unit (output rows [oh0, oh1)) reads, each split into `phases`
// (= stride_w) column phases of `length` floats: element (c, r, phase, j) is
// x(c, row_begin + r, j * stride_w + phase - pad_left), stored at
// ((c * rows + r) * phases + phase) * length + j. Window (oh, ow) reads, for kernel entry
// (c, kh, kw), row r = (oh - oh0) * stride_h + kh * dilation_h, phase (kw * dilation_w) %
// stride_w, j = ow + (kw * dilation_w) / stride_w: consecutive windows, consecutive floats.
struct PhaseLayout {
  int64_t rows, phases, length, row_begin;

  static PhaseLayout Make(const Geometry& g, int64_t oh0, int64_t oh1) {
    PhaseLayout p{};
    p.rows = (oh1 - 1 - oh0) * g.stride_h + (g.kH - 1) * g.dilation_h + 1;
    p.phases = g.stride_w;
    const int64_t columns = (g.OW - 1) * g.stride_w + (g.kW - 1) * g.dilation_w + 1;
    p.length = CeilDiv(columns, g.stride_w);
    p.row_begin = oh0 * g.stride_h - g.pad_top;
    return p;
  }
  int64_t RowStride() const { return phases * length; }
  int64_t ChannelStride() const { return rows * phases * length; }
  int64_t Size() const { return ChannelStride(); }  // per channel
  int64_t Lists() const { return rows * phases; }   // rows of one channel
};

// The kernel entries (kh, kw) of one input channel in the order the kernels use them and the
// weights are packed in: by class (column phase of kw: (kw * dilation_w) % stride_w, then
// row phase of kh: (kh * dilation_h) % stride_h), then kh, then kw. DiffConv's sparse product
// works on one class at a time: a phase-image position feeds every entry of its class or none.
// Entries [class_begin[k], class_begin[k + 1]) form class k (column phase k / stride_h).
// For stride 1 it is plain (kh, kw) order.
struct EntryOrder {
  std::vector<int64_t> kh, kw, class_begin;
  int64_t row_phases = 1;

  static EntryOrder Make(int64_t kH, int64_t kW, int64_t stride_h, int64_t stride_w,
                         int64_t dilation_h, int64_t dilation_w);
  static EntryOrder Make(const Geometry& g) {
    return Make(g.kH, g.kW, g.stride_h, g.stride_w, g.dilation_h, g.dilation_w);
  }
};

// Per kernel column: its phase and its window shift within the phase
// (q = kw * dilation_w / stride_w); per entry (EntryOrder): its offset from a window's first
// input float in the phase image.
struct EntryOffsets {
  std::vector<int64_t> offset;  // [entry]
  std::vector<int64_t> phase;   // [kw]
  std::vector<int64_t> shift;   // [kw]
};

EntryOffsets MakeEntryOffsets(const Geometry& g, const PhaseLayout& p, const EntryOrder& order);

// Copies the input rows of a unit into its phase image (zeros outside the input), for the
// `count` listed input channels of `image` ([C, H, W]), in list order; channels == nullptr
// means all C in order.
void BuildPhaseImage(const Geometry& g, const PhaseLayout& p, const float* image,
                     const int32_t* channels, int64_t count, float* out, bool avx512);

// One butterfly stage of a 16x16 transpose: swaps bit K of the row index with bit K of the
// column index for the row pair (a, b = a + 2^K).
template <int K, size_t... I>
COMPRESSOR_INLINE Vec16 TransposeLow(Vec16 a, Vec16 b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (((I >> K) & 1) ? 16 + I - (1 << K) : I)...);
}
template <int K, size_t... I>
COMPRESSOR_INLINE Vec16 TransposeHigh(Vec16 a, Vec16 b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (((I >> K) & 1) ? 16 + I : I + (1 << K))...);
}
template <int K>
COMPRESSOR_INLINE void TransposeStage(Vec16* r) {
  constexpr int kStep = 1 << K;
#pragma GCC unroll 16
  for (int a = 0; a < 16; ++a) {
    if (a & kStep) continue;
    const Vec16 low = TransposeLow<K>(r[a], r[a + kStep], std::make_index_sequence<16>());
    const Vec16 high = TransposeHigh<K>(r[a], r[a + kStep], std::make_index_sequence<16>());
    r[a] = low;
    r[a + kStep] = high;
  }
}

// Y[o(m) * plane + j] = buffer window j's channel m + bias[o(m)], for the `count` windows of
// the unit (window j at out + (j / OW) * row_stride + (j % OW) * width) and m < channels,
// where o(m) = output_channels[m], or m when output_channels is null (with `relu`, max(0, .)
// of it): 16 windows x 16 channels at a time through a register transpose.
struct StoreCall {
  const float* out;
  int64_t row_stride, width, OW, count, channels, plane;
  const float* bias;  // indexed by o(m), or nullptr
  float* y;           // output channel 0, window 0 of the unit
  const int32_t* output_channels = nullptr;
  bool relu = false;
};
void StoreTransposed(const StoreCall& a);

// The micro-kernel over a list of windows (each given by the address of its first input
// float in the phase image, entry (c = 0, kh = 0, kw = 0)) for one tile of nv * 16 output
// channels: out[i][0, 16 * nv) = sum over the kernel entries (c, kh, kw) of `channels` input
// channels of the input value times the packed weight vector wp[k] ([c][entry][16 * nv]).
// With `consecutive`, the list is implicit: window i starts at window[0] + i and writes
// out[0] + i * out_stride (stride-1 windows taken row after row, padding columns included).
struct ConvCall {
  const float* const* window;
  float* const* out;
  int64_t count;
  const float* wp;
  const int64_t* offsets;  // EntryOffsets::offset
  int64_t entries_per_channel, channels, channel_stride;
  int nv;
  bool consecutive = false;
  int64_t out_stride = 0;
};
void RunConv(const ConvCall& a);

// Weights [M, C, kH, kW] packed per channel tile of up to 64: tile t (channels [64t, 64t +
// 16 * nv)) is [C][entries in EntryOrder][16 * nv] at t * K * 64, channels >= M zero.
std::vector<float> PackWeights(const float* w, int64_t M, int64_t C, int64_t kH, int64_t kW,
                               const EntryOrder& order);


// ---- The row kernel (LSHConv's few selected filters, DirectConv's few output channels) ----

// The row kernel, for stride 1 and few selected filters: vector lanes over consecutive
// windows, weights broadcast, so any number of filters fills the lanes and the selected
// filters' weights are read where they are (no tiles to gather). With stride 1 the phase
// image has one phase and window (row, ow) of the unit starts at position row * length + ow:
// positions [0, rows * length) are every window of the unit plus (kW - 1) * dilation_w junk
// ones per row, computed and dropped. For F filters and chunks of V vectors (16 V positions):
// out[f][p] = sum over active channels j and entries e of phase[j][p + offset[e]] *
// weights[f][channel j][e]. F V = 24 accumulators (F <= 6: V = 4; else V = 3) stay in
// registers: each step loads V input vectors (mostly split across cache lines, so twice the
// load slots) and F broadcasts for F V multiply-adds; wider groups need fewer load slots per
// multiply-add (4 filters x 4 vectors ran at about 0.8 multiply-add vectors a cycle, load
// bound, on a core that issues 2) and read the phase image fewer times. The phase image needs
// kRowChunk + (kW - 1) * dilation_w floats of slack past its end (read by junk lanes only).
inline constexpr int kRowFilters = 8;
inline constexpr int64_t kRowChunk = 4 * kLanes;  // the longest chunk
inline constexpr int64_t kRowStrideMultiple = 192;  // a multiple of every chunk (48 and 64 floats)
constexpr int RowVectors(int filters) { return filters <= 6 ? 4 : 3; }

// Which micro-kernel computes `count` selected filters over `active` input channels at stride
// 1: the row kernel when channel tiles would hold at most one vector of filters (its 24
// accumulators need fewer load slots per multiply-add than a one-vector tile's 12), when up
// to 32 filters meet rows long enough that the junk windows of the padding columns cost at
// most an eighth, or when each output has so few multiply-adds (at most kRowKernelMaxDepth =
// active kH kW) that the channel tiles' window-major buffer and transposing store dominate;
// else the channel tiles. Measured on the zoo's layers, A/B in one process (e.g. batch 64:
// 16 of 64 filters at 14x14 10-20% faster by rows, 25 of 64 at 14x14 ~10%, 32 of 128 at
// 7x7 10% slower; f=1: 16->96 1x1 @28x28 2.7x faster by rows, 1->32 3x3 @28x28 1.8x).
inline constexpr int64_t kRowKernelMaxDepth = 32;
template <class Shape>
bool UseRowKernel(const Shape& g, int64_t count, int64_t active) {
  if (g.stride_h != 1 || g.stride_w != 1) return false;
  const int64_t junk = (g.kW - 1) * g.dilation_w;
  return count <= kLanes || (count <= 2 * kLanes && 8 * junk <= g.OW + junk) ||
         active * g.kH * g.kW <= kRowKernelMaxDepth;
}


struct RowCall {
  const float* phase;
  int64_t positions, channel_stride;
  const int64_t* offsets;
  int64_t E;
  const float* const* weights;  // per filter: by_filter + m * C * E
  const int32_t* channels;      // active channels, in phase-image order
  int64_t active;
  float* out;                   // [filters][out_stride], out_stride a multiple of kRowStrideMultiple >= positions
  int64_t out_stride;
  int filters;                  // 1..kRowFilters
};

void RunRows(const RowCall& a);

// The row kernel's output rows to Y: `rows` rows of OW windows (junk columns dropped) from
// `source` (row stride `length`), plus the bias. With `relu`, max(0, .) of the
// sum. Its own clones (in a kernel class it compiled for baseline x86-64 only: ~10% of a
// 1->16 3x3 layer's time at fraction 0.25).
void StoreRows(const float* source, int64_t length, int64_t rows, int64_t OW, float bias,
               float* y, bool relu = false);

}  // namespace direct_conv
}  // namespace compressor

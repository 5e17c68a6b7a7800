// WinogradConv CPU kernel: F(2x2,3x3) and F(4x4,3x3) in NNPACK's structure, three stages with a
// plain reference each (COMPRESSOR_WINOGRAD_REFERENCE=1 runs the references):
//   1. input transform:  the unit's input rows, copied channel-last and zero-padded, give
//      V[xi][t][c] = (B^T d B)[xi] for every alpha x alpha patch d (16 channels per vector);
//   2. tuple-wise GEMM:  alpha^2 products V[xi] [tiles x C] @ U[xi] [C x M] by the packed-B
//      micro-kernel of common/gemm.h (SgemmPacked), U[xi] packed with the weight transform;
//   3. output transform: Y = A^T M A (+ bias) per tile and output channel, partial tiles cut.
// Work is split into units of consecutive tile rows (across images, so small maps still give
// the GEMMs enough rows) that run the three stages in L2 (fused), or, where U is too large to
// stay in the caches or the call too small to share, into the stages over chunks of the call
// (by tuple); on ORT's intra-op thread pool (inline for small calls, as the other conv
// kernels: RunInline). The weights are transformed and packed once, in double, when the
// session creates the kernel (a constant W), else per call.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/conv_inputs.h"
#include "common/cpu_parallel.h"
#include "common/gemm.h"
#include "ops/winograd_conv/winograd_conv.h"
#include "ops/winograd_conv/winograd_transforms.h"

#define WINOGRAD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace compressor {
namespace {

using winograd::At1;
using winograd::Bt1;

constexpr int64_t kLanes = 16;
typedef float v16 __attribute__((vector_size(64), aligned(4)));

int64_t RoundUp(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Lavin & Gray's matrices. F(2x2,3x3): alpha = 4.
constexpr double kBt2[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
constexpr double kG2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
constexpr double kAt2[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
// F(4x4,3x3): alpha = 6, interpolation points 0, +-1, +-2, infinity.
constexpr double kBt4[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                               {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr double kG4[6][3] = {{1.0 / 4, 0, 0},
                              {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                              {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                              {1.0 / 24, 1.0 / 12, 1.0 / 6},
                              {1.0 / 24, -1.0 / 12, 1.0 / 6},
                              {0, 0, 1}};
constexpr double kAt4[4][6] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};

double Bt(int64_t m, int i, int j) { return m == 2 ? kBt2[i][j] : kBt4[i][j]; }
double Gm(int64_t m, int i, int j) { return m == 2 ? kG2[i][j] : kG4[i][j]; }
double At(int64_t m, int i, int j) { return m == 2 ? kAt2[i][j] : kAt4[i][j]; }

// ---------------------------------------------------------------------------------------------
// Weight transform (once per weight): U[xi][c][k] = (G g[k][c] G^T)[xi], in double.

std::vector<float> TransformWeights(const float* w, int64_t M, int64_t C, int64_t m) {
  const int64_t alpha = m + 2;
  std::vector<float> U(static_cast<size_t>(alpha * alpha * C * M));
  for (int64_t k = 0; k < M; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      const float* g = w + (k * C + c) * 9;
      double t[6][3];
      for (int i = 0; i < alpha; ++i) {
        for (int j = 0; j < 3; ++j) {
          t[i][j] = 0;
          for (int r = 0; r < 3; ++r) t[i][j] += Gm(m, i, r) * g[r * 3 + j];
        }
      }
      for (int i = 0; i < alpha; ++i) {
        for (int j = 0; j < alpha; ++j) {
          double s = 0;
          for (int r = 0; r < 3; ++r) s += t[i][r] * Gm(m, j, r);
          U[static_cast<size_t>(((i * alpha + j) * C + c) * M + k)] = static_cast<float>(s);
        }
      }
    }
  }
  return U;
}

// U [alpha^2][C][M] with each xi's C x M matrix packed into the GEMM's column panels
// (common/gemm.h: PackB), what the tuple-wise GEMM reads.
std::vector<float> TransformAndPackWeights(const float* w, int64_t M, int64_t C, int64_t m) {
  const int64_t alpha2 = (m + 2) * (m + 2), packed = PackedSize(C, M);
  const std::vector<float> U = TransformWeights(w, M, C, m);
  std::vector<float> out(static_cast<size_t>(alpha2 * packed));
  for (int64_t xi = 0; xi < alpha2; ++xi) {
    PackB(U.data() + xi * C * M, M, C, M, out.data() + xi * packed);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Stage 1: input transform. `rows[r]` points at tile row r's first input row in the unit's
// channel-last buffer ([row][col][Cp], row stride cols * Cp); tile (r, tc) reads the alpha x
// alpha patch at column tc * m. Writes V[xi * v_stride + t * Cp + c], t = r * tiles_w + tc.

struct InputCall {
  const float* const* rows;
  int64_t tile_rows, tiles_w, cols, Cp;
  float* V;
  int64_t v_stride;
};

inline v16 Load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

template <int kM>
inline __attribute__((always_inline)) void InputTransformImpl(const InputCall& call) {
  constexpr int A = kM + 2;
  const int64_t Cp = call.Cp, pixel = Cp, row = call.cols * Cp;
  for (int64_t r = 0; r < call.tile_rows; ++r) {
    for (int64_t tc = 0; tc < call.tiles_w; ++tc) {
      const int64_t t = r * call.tiles_w + tc;
      const float* base = call.rows[r] + tc * kM * pixel;
      float* out = call.V + t * Cp;
      for (int64_t c = 0; c < Cp; c += kLanes) {
        v16 tmp[A][A];  // tmp[i][j] = (B^T d)[i][j]
        for (int j = 0; j < A; ++j) {
          v16 col[A], res[A];
          for (int i = 0; i < A; ++i) col[i] = Load(base + i * row + j * pixel + c);
          Bt1<kM>(col, res);
          for (int i = 0; i < A; ++i) tmp[i][j] = res[i];
        }
        for (int i = 0; i < A; ++i) {
          v16 res[A];
          Bt1<kM>(tmp[i], res);
          for (int j = 0; j < A; ++j) Store(out + (i * A + j) * call.v_stride + c, res[j]);
        }
      }
    }
  }
}

WINOGRAD_CLONES void InputTransform2(const InputCall& call) { InputTransformImpl<2>(call); }
WINOGRAD_CLONES void InputTransform4(const InputCall& call) { InputTransformImpl<4>(call); }

void InputTransform(int64_t m, const InputCall& call) {
  if (m == 2) {
    InputTransform2(call);
  } else {
    InputTransform4(call);
  }
}

// Reference: V = B^T d B element by element, in double.
void InputTransformReference(int64_t m, const InputCall& call) {
  const int64_t A = m + 2, Cp = call.Cp, row = call.cols * Cp;
  for (int64_t r = 0; r < call.tile_rows; ++r) {
    for (int64_t tc = 0; tc < call.tiles_w; ++tc) {
      const int64_t t = r * call.tiles_w + tc;
      const float* base = call.rows[r] + tc * m * Cp;
      for (int64_t c = 0; c < Cp; ++c) {
        for (int i = 0; i < A; ++i) {
          for (int j = 0; j < A; ++j) {
            double s = 0;
            for (int a = 0; a < A; ++a) {
              for (int b = 0; b < A; ++b) {
                s += Bt(m, i, a) * base[a * row + b * Cp + c] * Bt(m, j, b);
              }
            }
            call.V[(i * A + j) * call.v_stride + t * Cp + c] = static_cast<float>(s);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 2: tuple-wise GEMM. P[xi] [T x M] (ld Kp) = V[xi] [T x C] (ld Cp) @ U[xi] [C x M],
// U[xi] packed (TransformAndPackWeights), by the packed-B micro-kernel of common/gemm.h.

struct GemmCall {
  int64_t alpha2, T, C, M, Cp, Kp;
  const float* V;
  const float* U;
  float* P;
};

void TupleGemm(const GemmCall& call) {
  const int64_t packed = PackedSize(call.C, call.M);
  for (int64_t xi = 0; xi < call.alpha2; ++xi) {
    SgemmPacked(call.T, call.M, call.C, call.V + xi * call.T * call.Cp, call.Cp,
                call.U + xi * packed, call.P + xi * call.T * call.Kp, call.Kp);
  }
}

// Reference: the plain triple loop, double sums.
void TupleGemmReference(const GemmCall& call) {
  for (int64_t xi = 0; xi < call.alpha2; ++xi) {
    const float* V = call.V + xi * call.T * call.Cp;
    const float* U = call.U + xi * PackedSize(call.C, call.M);
    float* P = call.P + xi * call.T * call.Kp;
    for (int64_t t = 0; t < call.T; ++t) {
      for (int64_t k = 0; k < call.M; ++k) {
        double s = 0;
        for (int64_t c = 0; c < call.C; ++c) {
          s += double(V[t * call.Cp + c]) * PackedAt(U, call.C, call.M, c, k);
        }
        P[t * call.Kp + k] = static_cast<float>(s);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 3: output transform. Tile row r of the unit is tile row tile_row[r] of image image[r];
// Y[n][k][oh][ow] = (A^T P[.][t][k] A)[oh - tr m][ow - tc m] + bias[k] for oh < OH, ow < OW.

struct OutputCall {
  const float* P;
  int64_t p_stride, Kp, M, OH, OW, tile_rows, tiles_w;
  const int64_t* image;
  const int64_t* tile_row;
  const float* bias;
  float* y;
};

template <int kM>
inline __attribute__((always_inline)) void OutputTransformImpl(const OutputCall& call) {
  constexpr int A = kM + 2;
  const int64_t plane = call.OH * call.OW;
  for (int64_t r = 0; r < call.tile_rows; ++r) {
    const int64_t oh0 = call.tile_row[r] * kM;
    const int64_t rows = std::min<int64_t>(kM, call.OH - oh0);
    for (int64_t tc = 0; tc < call.tiles_w; ++tc) {
      const int64_t t = r * call.tiles_w + tc, ow0 = tc * kM;
      const int64_t cols = std::min<int64_t>(kM, call.OW - ow0);
      const float* in = call.P + t * call.Kp;
      float* y = call.y + call.image[r] * call.M * plane + oh0 * call.OW + ow0;
      for (int64_t k0 = 0; k0 < call.M; k0 += kLanes) {
        v16 tmp[kM][A];  // (A^T P)[i][j]
        for (int j = 0; j < A; ++j) {
          v16 col[A], res[kM];
          for (int i = 0; i < A; ++i) col[i] = Load(in + (i * A + j) * call.p_stride + k0);
          At1<kM>(col, res);
          for (int i = 0; i < kM; ++i) tmp[i][j] = res[i];
        }
        alignas(64) float out[kM][kM][kLanes];
        for (int i = 0; i < kM; ++i) {
          v16 res[kM];
          At1<kM>(tmp[i], res);
          for (int j = 0; j < kM; ++j) Store(out[i][j], res[j]);
        }
        const int64_t lanes = std::min<int64_t>(kLanes, call.M - k0);
        for (int64_t l = 0; l < lanes; ++l) {
          const float b = call.bias ? call.bias[k0 + l] : 0.0f;
          float* yk = y + (k0 + l) * plane;
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t j = 0; j < cols; ++j) yk[i * call.OW + j] = out[i][j][l] + b;
          }
        }
      }
    }
  }
}

WINOGRAD_CLONES void OutputTransform2(const OutputCall& call) { OutputTransformImpl<2>(call); }
WINOGRAD_CLONES void OutputTransform4(const OutputCall& call) { OutputTransformImpl<4>(call); }

void OutputTransform(int64_t m, const OutputCall& call) {
  if (m == 2) {
    OutputTransform2(call);
  } else {
    OutputTransform4(call);
  }
}

// Reference: Y = A^T P A element by element, in double.
void OutputTransformReference(int64_t m, const OutputCall& call) {
  const int64_t A = m + 2, plane = call.OH * call.OW;
  for (int64_t r = 0; r < call.tile_rows; ++r) {
    for (int64_t tc = 0; tc < call.tiles_w; ++tc) {
      const int64_t t = r * call.tiles_w + tc;
      for (int64_t k = 0; k < call.M; ++k) {
        for (int i = 0; i < m; ++i) {
          for (int j = 0; j < m; ++j) {
            const int64_t oh = call.tile_row[r] * m + i, ow = tc * m + j;
            if (oh >= call.OH || ow >= call.OW) continue;
            double s = call.bias ? call.bias[k] : 0.0;
            for (int a = 0; a < A; ++a) {
              for (int b = 0; b < A; ++b) {
                s += At(m, i, a) * call.P[(a * A + b) * call.p_stride + t * call.Kp + k] *
                     At(m, j, b);
              }
            }
            call.y[(call.image[r] * call.M + k) * plane + oh * call.OW + ow] =
                static_cast<float>(s);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel.

// A unit's transformed input and products (V and P) should stay in L2 (1 MiB per core here) ...
constexpr int64_t kUnitBytes = 1 << 20;
// ... with at least this many tiles (rows of its GEMMs). The GEMM reads U[xi] packed once at
// session creation, so a small unit costs no repacking (with OpenBLAS, which packed U[xi] on
// every call, units needed 96 tiles and more).
constexpr int64_t kMinUnitTiles = 16;
// The fused schedule reads all of U once per unit: while U fits in this share of L3 (32 MiB
// here) that is a cache read; beyond it (512 channels: 37.7 MB for F(4x4)) every unit streams
// U from memory, and the by-tuple schedule, which reads U once per chunk of the call and V and
// P twice, moves less (at 512 channels 7x7, batch 16: 2.3x Conv's speed by tuple, 1.8-2.0x
// fused).
constexpr int64_t kWeightCacheBytes = 8 << 20;
// The by-tuple schedule holds V and P of this many bytes at most; longer calls run in chunks.
constexpr int64_t kTupleChunkBytes = 64 << 20;

struct Scratchpad {
  std::vector<float> buffer, V, P;
  std::vector<const float*> rows;
  std::vector<int64_t> image, tile_row;
};

enum class Schedule { kAuto, kFused, kByTuple };

// COMPRESSOR_WINOGRAD_SCHEDULE=auto|fused|tuple forces a schedule (tests and benchmarks); read
// when a session creates the kernel.
Schedule ScheduleFromEnvironment() {
  return static_cast<Schedule>(
      ChoiceFromEnvironment("COMPRESSOR_WINOGRAD_SCHEDULE", {"auto", "fused", "tuple"}));
}

class WinogradConvCpuKernel {
 public:
  static constexpr const char* kLabel = kWinogradConvName;

  WinogradConvCpuKernel(const OrtApi& api, const OrtKernelInfo* info)
      : attributes_(WinogradConvAttributes::Read(info)),
        reference_(ReferenceStagesFromEnvironment("COMPRESSOR_WINOGRAD_REFERENCE")),
        schedule_(ScheduleFromEnvironment()) {
    // A constant weight is transformed once, here (at session creation).
    const ConstantWeight weight = ConstantWeight::Read(api, info);
    if (weight.data != nullptr && weight.shape[2] == 3 && weight.shape[3] == 3) {
      transformed_ = TransformAndPackWeights(weight.data, weight.shape[0], weight.shape[1],
                                             attributes_.tile);
      transformed_shape_ = weight.shape;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* raw_context) {
    const ConvInputs in = ConvInputs::Read(raw_context);
    const WinogradConvShape g =
        WinogradConvShape::Make(attributes_, in.x_shape, in.w_shape, in.BiasShape());
    Ort::KernelContext context(raw_context);
    Ort::UnownedValue y = context.GetOutput(0, {g.N, g.M, g.OH, g.OW});
    if (g.N == 0 || g.OH == 0 || g.OW == 0) return;

    std::vector<float> call_transformed;
    const float* U = transformed_.data();
    if (transformed_.empty() || transformed_shape_ != in.w_shape) {
      call_transformed = TransformAndPackWeights(in.w, g.M, g.C, g.m);
      U = call_transformed.data();
    }
    Run(raw_context, g, in.x, U, in.bias, y.GetTensorMutableData<float>());
  }

  void Run(OrtKernelContext* context, const WinogradConvShape& g, const float* x, const float* U,
           const float* bias, float* y) const {
    const int64_t Cp = RoundUp(g.C, kLanes), Kp = RoundUp(g.M, kLanes);
    const int64_t total_rows = g.N * g.tiles_h;  // tile rows over the whole batch
    const int64_t total_tiles = total_rows * g.tiles_w;
    const int64_t tile_bytes = g.alpha * g.alpha * (Cp + Kp) * 4;  // V and P of one tile
    const int64_t weight_bytes = g.alpha * g.alpha * PackedSize(g.C, g.M) * 4;
    const bool inline_units = RunInline(g);
    OrtKernelContext* pool = inline_units ? nullptr : context;
    const int64_t threads = inline_units ? 1 : HardwareThreads();
    // Tiles per unit: what fits kUnitBytes, at least kMinUnitTiles, and at most an even share
    // of the call over 2 units per thread.
    int64_t tiles = std::max(kMinUnitTiles, kUnitBytes / tile_bytes);
    tiles = std::min(tiles, (total_tiles + 2 * threads - 1) / (2 * threads));
    // Then as many units as that gives, rounded up to a multiple of the threads (5 units on 2
    // threads left one idle a third of the call), the tile rows shared out evenly.
    const int64_t rows_per_unit =
        std::clamp<int64_t>((tiles + g.tiles_w - 1) / g.tiles_w, 1, total_rows);
    const int64_t units = std::min(
        total_rows, RoundUp((total_rows + rows_per_unit - 1) / rows_per_unit, threads));
    // By tuple where the fused units would leave threads idle, or where U does not stay in
    // the caches and re-reading it per unit moves more than writing and reading V and P.
    const bool weights_stream = weight_bytes > kWeightCacheBytes &&
                                units * weight_bytes > 2 * total_tiles * tile_bytes + weight_bytes;
    const bool by_tuple = schedule_ == Schedule::kAuto ? units < threads || weights_stream
                                                       : schedule_ == Schedule::kByTuple;
    if (by_tuple) {
      const int64_t chunk_rows = std::clamp<int64_t>(
          kTupleChunkBytes / std::max<int64_t>(1, tile_bytes * g.tiles_w), 1, total_rows);
      for (int64_t r0 = 0; r0 < total_rows; r0 += chunk_rows) {
        RunByTuple(pool, threads, g, r0, std::min(total_rows, r0 + chunk_rows), x, U, bias, y);
      }
      return;
    }
    ParallelUnits(pool, static_cast<size_t>(units), [&](size_t i) {
      int64_t r0, r1;
      BlockRange(total_rows, units, static_cast<int64_t>(i), &r0, &r1);
      RunUnit(g, r0, r1, x, U, bias, y);
    });
  }

  // The by-tuple schedule on tile rows [row0, row1) of the batch: three passes, so that each
  // U[xi] is read once (where units would each stream all of U from memory, or leave threads
  // idle): 1. input transforms by blocks of tile rows, 2. one GEMM per xi, 3. output
  // transforms by blocks of tile rows.
  void RunByTuple(OrtKernelContext* pool, int64_t threads, const WinogradConvShape& g,
                  int64_t row0, int64_t row1, const float* x, const float* U, const float* bias,
                  float* y) const {
    const int64_t A = g.alpha, Cp = RoundUp(g.C, kLanes), Kp = RoundUp(g.M, kLanes);
    const int64_t rows = row1 - row0, T = rows * g.tiles_w;
    thread_local Scratchpad call_scratch;  // the calling thread's: V and P of the chunk
    float* const V = Scratch(call_scratch.V, static_cast<size_t>(A * A * T * Cp));
    float* const P = Scratch(call_scratch.P, static_cast<size_t>(A * A * T * Kp));
    const int64_t blocks = std::min(rows, 2 * threads);
    ParallelUnits(pool, static_cast<size_t>(blocks), [&](size_t i) {
      int64_t r0, r1;
      BlockRange(rows, blocks, static_cast<int64_t>(i), &r0, &r1);
      if (r0 == r1) return;
      thread_local Scratchpad s;
      const int64_t cols = PrepareRows(g, row0 + r0, row0 + r1, x, s);
      const InputCall input{s.rows.data(), r1 - r0, g.tiles_w, cols, Cp,
                            V + r0 * g.tiles_w * Cp, T * Cp};
      reference_ ? InputTransformReference(g.m, input) : InputTransform(g.m, input);
    });
    ParallelUnits(pool, static_cast<size_t>(A * A), [&](size_t xi) {
      const GemmCall gemm{1, T, g.C, g.M, Cp, Kp, V + xi * T * Cp, U + xi * PackedSize(g.C, g.M),
                          P + xi * T * Kp};
      reference_ ? TupleGemmReference(gemm) : TupleGemm(gemm);
    });
    ParallelUnits(pool, static_cast<size_t>(blocks), [&](size_t i) {
      int64_t r0, r1;
      BlockRange(rows, blocks, static_cast<int64_t>(i), &r0, &r1);
      if (r0 == r1) return;
      std::vector<int64_t> image(static_cast<size_t>(r1 - r0)), tile_row(image.size());
      for (int64_t r = r0; r < r1; ++r) {
        image[r - r0] = (row0 + r) / g.tiles_h;
        tile_row[r - r0] = (row0 + r) % g.tiles_h;
      }
      const OutputCall output{P + r0 * g.tiles_w * Kp, T * Kp, Kp, g.M, g.OH, g.OW,
                              r1 - r0, g.tiles_w, image.data(), tile_row.data(), bias, y};
      reference_ ? OutputTransformReference(g.m, output) : OutputTransform(g.m, output);
    });
  }

  // Copies the input rows of tile rows [r0, r1) of the batch (tile row r is row r % tiles_h of
  // image r / tiles_h) channel-last and zero-padded into s.buffer, one segment per image, and
  // fills s.rows / s.image / s.tile_row. Returns the buffer's columns.
  static int64_t PrepareRows(const WinogradConvShape& g, int64_t r0, int64_t r1, const float* x,
                             Scratchpad& s) {
    const int64_t m = g.m, Cp = RoundUp(g.C, kLanes);
    const int64_t tile_rows = r1 - r0, cols = g.tiles_w * m + 2;
    s.rows.resize(static_cast<size_t>(tile_rows));
    s.image.resize(static_cast<size_t>(tile_rows));
    s.tile_row.resize(static_cast<size_t>(tile_rows));

    int64_t buffer_rows = 0;
    for (int64_t r = r0; r < r1;) {
      const int64_t n = r / g.tiles_h, end = std::min(r1, (n + 1) * g.tiles_h);
      buffer_rows += (end - r) * m + 2;
      r = end;
    }
    float* buffer = Scratch(s.buffer, static_cast<size_t>(buffer_rows * cols * Cp));
    int64_t row_offset = 0;
    for (int64_t r = r0; r < r1;) {
      const int64_t n = r / g.tiles_h, end = std::min(r1, (n + 1) * g.tiles_h);
      const int64_t tr0 = r - n * g.tiles_h, in_rows = (end - r) * m + 2;
      float* segment = buffer + row_offset * cols * Cp;
      for (int64_t k = r; k < end; ++k) {
        s.rows[k - r0] = segment + (k - r) * m * cols * Cp;
        s.image[k - r0] = n;
        s.tile_row[k - r0] = k - n * g.tiles_h;
      }
      const float* image = x + n * g.C * g.H * g.W;
      for (int64_t row = 0; row < in_rows; ++row) {
        const int64_t ih = tr0 * m + row - g.pad_top;
        float* out = segment + row * cols * Cp;
        if (ih < 0 || ih >= g.H) {
          std::memset(out, 0, sizeof(float) * cols * Cp);
          continue;
        }
        const int64_t iw0 = std::max<int64_t>(0, g.pad_left);  // first column holding input
        const int64_t iw1 = std::min<int64_t>(cols, g.pad_left + g.W);
        if (iw0 > 0) std::memset(out, 0, sizeof(float) * std::min(iw0, cols) * Cp);
        if (iw1 < cols && iw1 >= 0) {
          std::memset(out + std::max<int64_t>(iw1, 0) * Cp, 0,
                      sizeof(float) * (cols - std::max<int64_t>(iw1, 0)) * Cp);
        }
        for (int64_t c = 0; c < g.C; ++c) {
          const float* src = image + (c * g.H + ih) * g.W - g.pad_left;
          for (int64_t col = iw0; col < iw1; ++col) out[col * Cp + c] = src[col];
        }
        if (Cp > g.C) {  // padding channels: zero (they feed only dropped GEMM columns)
          for (int64_t col = iw0; col < iw1; ++col) {
            std::memset(out + col * Cp + g.C, 0, sizeof(float) * (Cp - g.C));
          }
        }
      }
      row_offset += in_rows;
      r = end;
    }

    return cols;
  }

  // One unit of the fused schedule: tile rows [r0, r1), every stage in its own buffers.
  void RunUnit(const WinogradConvShape& g, int64_t r0, int64_t r1, const float* x, const float* U,
               const float* bias, float* y) const {
    thread_local Scratchpad s;
    const int64_t m = g.m, A = g.alpha, Cp = RoundUp(g.C, kLanes), Kp = RoundUp(g.M, kLanes);
    const int64_t tile_rows = r1 - r0, T = tile_rows * g.tiles_w;
    const int64_t cols = PrepareRows(g, r0, r1, x, s);
    float* V = Scratch(s.V, static_cast<size_t>(A * A * T * Cp));
    float* P = Scratch(s.P, static_cast<size_t>(A * A * T * Kp));
    const InputCall input{s.rows.data(), tile_rows, g.tiles_w, cols, Cp, V, T * Cp};
    const GemmCall gemm{A * A, T, g.C, g.M, Cp, Kp, V, U, P};
    const OutputCall output{P, T * Kp, Kp, g.M, g.OH, g.OW, tile_rows, g.tiles_w,
                            s.image.data(), s.tile_row.data(), bias, y};
    if (reference_) {
      InputTransformReference(m, input);
      TupleGemmReference(gemm);
      OutputTransformReference(m, output);
    } else {
      InputTransform(m, input);
      TupleGemm(gemm);
      OutputTransform(m, output);
    }
  }

  WinogradConvAttributes attributes_;
  bool reference_;
  Schedule schedule_;
  std::vector<float> transformed_;  // U of a constant W, packed
  std::vector<int64_t> transformed_shape_;
};

using WinogradConvCpuOp = KernelOp<WinogradConvCpuKernel, WinogradConvSignature, Provider::kCpu>;

}  // namespace

void AddWinogradConvCpu(Ort::CustomOpDomain& domain) { AddOp<WinogradConvCpuOp>(domain); }

}  // namespace compressor

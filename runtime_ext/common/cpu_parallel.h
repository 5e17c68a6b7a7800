// Small CPU helpers of the CPU kernels: grow-only scratch buffers and running work units on
// onnxruntime's intra-op thread pool with errors carried back to the caller.
#pragma once

#include <algorithm>
#include <cstddef>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/ort_op.h"

namespace compressor {

template <class T>
T* Scratch(std::vector<T>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

inline int64_t HardwareThreads() {
  return std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
}

// Runs fn(i) for i in [0, total) on ORT's pool (context != null) or inline (context == null);
// the first exception a unit throws is rethrown as an OpError once every unit has finished.
template <class Fn>
void ParallelUnits(OrtKernelContext* context, size_t total, Fn&& fn) {
  if (context == nullptr) {
    for (size_t i = 0; i < total; ++i) fn(i);
    return;
  }
  std::mutex mutex;
  std::string error;
  auto guarded = [&](size_t i) {
    try {
      fn(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mutex);
      if (error.empty()) error = e.what();
    }
  };
  ParallelFor(context, total, guarded);
  if (!error.empty()) throw OpError(error, ORT_FAIL);
}

// Whether a convolution call (any shape with N, M, OH, OW and D() = C kH kW) should run on the
// calling thread: under 8e6 dense multiply-adds and 1e5 output floats (every zoo layer at
// batch 1). With spinning off, waking ORT's pool cost more than the second core gained on the
// 2-core machine we measured on (DiffConv at batch 1: median 1.26x -> 1.11x of Conv's time at
// threshold 0); a first layer (1->16 3x3 at 28x28, batch 64: 7e6 multiply-adds but 8e5
// outputs) is bound by writing its output and ran 2x slower on one thread.
template <class Shape>
bool RunInline(const Shape& g) {
  const double outputs = static_cast<double>(g.N) * static_cast<double>(g.M * g.OH * g.OW);
  return outputs * static_cast<double>(g.D()) < 8e6 && outputs < 1e5;
}

// [begin, end) of block i when `total` items are cut into `blocks` near-equal blocks.
inline void BlockRange(int64_t total, int64_t blocks, int64_t i, int64_t* begin, int64_t* end) {
  *begin = total * i / blocks;
  *end = total * (i + 1) / blocks;
}

}  // namespace compressor

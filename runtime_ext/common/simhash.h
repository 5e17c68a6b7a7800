// SimHash (signed random projection) helpers shared by the LSH ops' CPU kernels: sign bits of
// projections packed into integer codes, and filter sets kept as bitsets of 64-bit words
// (union by OR, size by popcount, members by count-trailing-zeros). Plain loops the compiler
// vectorises; no onnxruntime types.
#pragma once

#include <cstdint>
#include <cstring>

namespace compressor {
namespace simhash {

// 64-bit words holding `bits` bits.
inline int64_t Words(int64_t bits) { return (bits + 63) / 64; }

// codes[j] |= (projection[j] + offset > 0) << bit for j in [0, count): one hyperplane's sign
// bit for `count` vectors at once (the projections are a row of a GEMM result).
inline void AddSignBit(const float* __restrict projection, float offset, int64_t count, int bit,
                       uint64_t* __restrict codes) {
  for (int64_t j = 0; j < count; ++j) {
    codes[j] |= static_cast<uint64_t>(projection[j] + offset > 0.0f) << bit;
  }
}

// destination |= source, word by word.
inline void OrWords(uint64_t* __restrict destination, const uint64_t* __restrict source,
                    int64_t words) {
  for (int64_t i = 0; i < words; ++i) destination[i] |= source[i];
}

inline int64_t Popcount(const uint64_t* words, int64_t count) {
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += __builtin_popcountll(words[i]);
  return total;
}

// Clears the bits at and past `bits` in the last word (bitsets of `bits` members).
inline void ClearTail(uint64_t* words, int64_t bits) {
  const int64_t tail = bits % 64;
  if (tail != 0) words[bits / 64] &= (uint64_t{1} << tail) - 1;
}

// Writes the indices of the set bits, ascending; returns how many.
template <class Index>
inline int64_t SetBits(const uint64_t* words, int64_t count, Index* out) {
  int64_t n = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint64_t word = words[i];
    while (word != 0) {
      out[n++] = static_cast<Index>(i * 64 + __builtin_ctzll(word));
      word &= word - 1;
    }
  }
  return n;
}

}  // namespace simhash
}  // namespace compressor

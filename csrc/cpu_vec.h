// Vector helpers of slora's CPU kernels: fp32 vectors of kVW lanes (AVX-512, else AVX2/SSE)
// on GCC/Clang vector types, loads that widen bf16 / fp16 to fp32, stores that round back
// (to nearest even), and the row loops built on them.  Header-only, one copy per kernel file.
#pragma once

#include <torch/extension.h>

#include <cstring>
#include <type_traits>
#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

// GCC's znver4 tuning reloads both operands of every FMA in register tiles
// (32 loads per 16 FMAs: load-bound at half speed); generic tuning keeps them in registers.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("tune=generic")
#endif

namespace slora_cpu {

#if defined(__AVX512F__)
constexpr int kVW = 16;
#else
constexpr int kVW = 8;
#endif
typedef float vf __attribute__((vector_size(kVW * sizeof(float))));

using BF16 = c10::BFloat16;
using F16 = c10::Half;

// Unaligned vector load / store.  Intrinsics, not memcpy: under tune=generic GCC may split a
// 64-byte memcpy into two 32-byte moves plus a lane insert, in the innermost loops.
inline vf loadu(const float* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_loadu_ps(p);
#elif defined(__AVX__)
  return (vf)_mm256_loadu_ps(p);
#else
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
#endif
}
inline void storeu(float* p, vf v) {
#if defined(__AVX512F__)
  _mm512_storeu_ps(p, (__m512)v);
#elif defined(__AVX__)
  _mm256_storeu_ps(p, (__m256)v);
#else
  std::memcpy(p, &v, sizeof(vf));
#endif
}

// kVW elements of T at p, widened to fp32 (bf16 and fp16 in vector instructions; any other
// type, e.g. double, element by element).
template <typename T>
inline vf load_vf(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return loadu(p);
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, BF16>) {  // bf16 is the high half of an fp32
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  if constexpr (std::is_same_v<T, F16>) {
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
  }
#elif defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<T, BF16>) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  if constexpr (std::is_same_v<T, F16>) {
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  }
#endif
  vf v;
  for (int i = 0; i < kVW; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

// v rounded to T (to nearest even) at p.
template <typename T>
inline void store_vf(T* p, vf v) {
  if constexpr (std::is_same_v<T, float>) {
    storeu(p, v);
    return;
  }
#if defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  if constexpr (std::is_same_v<T, F16>) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(m, _MM_FROUND_TO_NEAREST_INT));
    return;
  }
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BF16>) {
    const __m256bh b = _mm512_cvtneps_pbh(m);
    std::memcpy(p, &b, sizeof(b));
    return;
  }
#endif
#endif
  for (int i = 0; i < kVW; ++i) p[i] = static_cast<T>(v[i]);
}

// dst[0, n) = src[0, n) in fp32.
template <typename T>
inline void widen(const T* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kVW <= n; i += kVW) storeu(dst + i, load_vf(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[0, n) = src[0, n) in fp32; returns src itself for fp32 (no copy).
template <typename T>
inline const float* widened(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    widen(src, n, dst);
    return dst;
  }
}

// Ask for the cache line at p (into L1) ahead of its use; no fault for any address.
inline void prefetch(const char* p) { __builtin_prefetch(p, 0, 3); }

// Sum of the lanes (a shuffle tree, not kVW dependent scalar adds).
inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX__)
  const __m256 m = (__m256)v;
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  q = _mm_hadd_ps(q, q);
  return _mm_cvtss_f32(_mm_hadd_ps(q, q));
#else
  float s = 0.f;
  for (int i = 0; i < kVW; ++i) s += v[i];
  return s;
#endif
}

#if defined(__AVX512F__)
// 32 bf16 at p widened as two fp32 vectors, the even and the odd elements (a shift and a mask
// of one 512-bit load: half the instructions of two vpmovzxwd + shift pairs).
inline void load_bf16_pairs(const BF16* p, vf& even, vf& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = (vf)_mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = (vf)_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
}
// [even | odd] halves of 32 elements back in natural order: lo = elements 0..15, hi = 16..31.
inline void interleave_pairs(vf even, vf odd, vf& lo, vf& hi) {
  const __m512i l = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i u = _mm512_add_epi32(l, _mm512_set1_epi32(8));
  lo = (vf)_mm512_permutex2var_ps((__m512)even, l, (__m512)odd);
  hi = (vf)_mm512_permutex2var_ps((__m512)even, u, (__m512)odd);
}
constexpr bool kBf16Pairs = true;
#else
constexpr bool kBf16Pairs = false;
#endif


}  // namespace slora_cpu

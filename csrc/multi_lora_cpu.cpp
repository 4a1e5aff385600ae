// Grouped heterogeneous-rank LoRA (shrink + expand) on the CPU.
//
// out[t, col_s : col_s + d_s] += scale[k, s] * Bt[k, s]^T (A[k, s] x_t) for every token t of
// every group (tokens of one slot k), every slice s.  Work items are (group, chunk of up to
// kChunk tokens, range of slices); each is shrunk and expanded by one thread with the
// intermediate h kept in fp32 in the thread's scratch, so x and A are read once per chunk and
// out once per chunk.  When there are fewer items than threads, items are split between their
// slices, then by tokens.  OpenMP spreads the items over threads; every output element is
// written by exactly one item in a fixed order, so the result does not depend on the number
// of threads.  Groups of many tokens can instead go through ATen's GEMM
// (multi_lora_gemm_cpu.cpp: AMX / AVX512-BF16 through oneDNN), chosen by the caller.
//
// Two regimes per item, both accumulating in fp32 for fp32 / fp16 / bf16 inputs:
// - decode-sized items (at most kTile tokens: a few requests per adapter) are bound by the
//   bytes of A and B.  Both are streamed once straight from memory and widened to fp32 in
//   registers (bf16: a shift or a mask; fp16: vcvtph2ps); register tiles hold exactly the n
//   tokens there are.  The shrink reads A 4 rows at a time; the expand keeps n x kNC output
//   columns in registers over all r rows of B, prefetching each row ahead.
// - larger items (prefill) are bound by FMAs: 4 rows of A and a kNC-column block of B are
//   widened once into L1-resident fp32 scratch and reused by every 4-token register tile.
// Inner loops use GCC/Clang vector types (AVX-512 or AVX2 when the build targets them).
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_vec.h"  // vf, load_vf / store_vf (bf16, fp16 widening), widen, ...
#include "multi_lora_cpu.h"  // GroupWeights, multi_lora_gemm_group (groups of many tokens)

namespace {

using namespace slora_cpu;

constexpr int kTile = 4;      // tokens and rank rows per register tile
constexpr int kChunk = 64;    // tokens per work item
constexpr int kNV = 4;        // vectors of output columns per expand tile
constexpr int kNC = kNV * kVW;
constexpr int64_t kKC = 512;  // d_in block of the prefill shrink (4 rows of A: 8 KiB in fp32)

// f(std::integral_constant<int, nt>) for a token tile of nt = 1..kTile rows, so that tiles
// hold exactly the tokens there are (decode: 1-3 tokens per adapter, no zero rows multiplied).
template <typename F>
inline void with_tile(int nt, F&& f) {
  switch (nt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, kTile>{}); break;
  }
}

// *p (+)= v, rounded to O: kVW elements from a vector, or one.
template <typename O>
inline void store_out(O* p, vf v, bool overwrite) {
  store_vf(p, overwrite ? v : load_vf(p) + v);
}
template <typename O>
inline void store_out(O* p, float v, bool overwrite) {
  *p = static_cast<O>(overwrite ? v : static_cast<float>(*p) + v);
}

// Per-thread scratch: x rows (fp32) | zero row | 4 widened rows of A | h | widened block of Bt
// | partial dot products.  Every part starts on a whole vector (vector<float> only gives 16
// bytes), so that no vector load or store of a row starting there splits a cache line.
struct Scratch {
  std::vector<float> buf;
  float *x, *zero, *a, *h, *b, *part;

  void carve(int64_t d_in, int64_t d_max, int64_t r_pad) {
    size_t sizes[6] = {(size_t)kChunk * d_in,
                       (size_t)std::max(d_in, d_max) + kVW,
                       (size_t)kTile * d_in,
                       (size_t)kChunk * r_pad,
                       (size_t)std::max<int64_t>(r_pad, 1) * kNC,
                       (size_t)kChunk * kTile * kVW};
    size_t need = kVW;
    for (size_t& n : sizes) need += n = (n + kVW - 1) / kVW * kVW;
    if (buf.size() < need) buf.resize(need);
    float** parts[6] = {&x, &zero, &a, &h, &b, &part};
    float* p = buf.data();
    p += (kVW - reinterpret_cast<uintptr_t>(p) / sizeof(float) % kVW) % kVW;
    for (int i = 0; i < 6; ++i) {
      *parts[i] = p;
      p += sizes[i];
    }
    std::fill(zero, zero + sizes[1], 0.f);  // all-zero bits: 0 in fp32, bf16 and fp16 alike
  }
  template <typename T>
  const T* zero_row() const {
    return reinterpret_cast<const T*>(zero);
  }
};

// part[i][j] += xs[i] * ws[j] elementwise over [k0, k1) (a multiple of kStep<W> long), for NT
// tokens and 4 rows of weights of type W (fp32 scratch, or memory widened on load); the
// partial vectors live in `part` between d_in blocks and are summed once at the end.
// bf16 weights on AVX-512 are widened 32 elements at a time as [even | odd] halves (a shift
// and a mask, load_bf16_pairs) and multiplied with x in that same order: x rows either bf16
// widened the same way (X = BF16: decode, x in L1 as half the bytes) or fp32 copies laid out
// by widened_for_dot (X = float).  The dot products do not depend on the order.
template <typename W>
constexpr int kStep = kBf16Pairs && std::is_same_v<W, BF16> ? 2 * kVW : kVW;

// Whether bf16 x bf16 dot products run on AVX512-BF16 (vdpbf16ps: a pair of bf16 products
// added into each fp32 lane, no widening; the products are exact in fp32 like the FMAs'):
// the shrink then reads bf16 x and A in place at every token count.
template <typename T>
#if defined(__AVX512BF16__)
constexpr bool kDpBf16 = std::is_same_v<T, BF16>;
#else
constexpr bool kDpBf16 = false;
#endif

template <int NT, typename X, typename W>
inline void dot_tile(const X* const* xs, const W* const* ws, int64_t k0, int64_t k1,
                     float* part) {
  vf acc[NT][kTile];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < kTile; ++j) acc[i][j] = loadu(part + (i * kTile + j) * kVW);
  const W *w0 = ws[0], *w1 = ws[1], *w2 = ws[2], *w3 = ws[3];
  for (int64_t k = k0; k < k1; k += kStep<W>) {
#if defined(__AVX512BF16__)
    if constexpr (kDpBf16<W> && std::is_same_v<X, BF16>) {
      __m512bh w[kTile];
      for (int j = 0; j < kTile; ++j) std::memcpy(&w[j], ws[j] + k, sizeof(__m512bh));
      for (int i = 0; i < NT; ++i) {
        __m512bh xv;
        std::memcpy(&xv, xs[i] + k, sizeof(xv));
        for (int j = 0; j < kTile; ++j)
          acc[i][j] = (vf)_mm512_dpbf16_ps((__m512)acc[i][j], xv, w[j]);
      }
      continue;
    }
#endif
#if defined(__AVX512F__)
    if constexpr (kStep<W> == 2 * kVW) {
      vf e0, e1, e2, e3, o0, o1, o2, o3;
      load_bf16_pairs(w0 + k, e0, o0);
      load_bf16_pairs(w1 + k, e1, o1);
      load_bf16_pairs(w2 + k, e2, o2);
      load_bf16_pairs(w3 + k, e3, o3);
      for (int i = 0; i < NT; ++i) {
        vf xe, xo;
        if constexpr (std::is_same_v<X, BF16>) {
          load_bf16_pairs(xs[i] + k, xe, xo);
        } else {
          xe = loadu(xs[i] + k), xo = loadu(xs[i] + k + kVW);
        }
        // (acc + xe * e) + xo * o: two FMAs (acc + (xe * e + xo * o) would be three ops)
        acc[i][0] = acc[i][0] + xe * e0 + xo * o0;
        acc[i][1] = acc[i][1] + xe * e1 + xo * o1;
        acc[i][2] = acc[i][2] + xe * e2 + xo * o2;
        acc[i][3] = acc[i][3] + xe * e3 + xo * o3;
      }
      continue;
    }
#endif
    if constexpr (std::is_same_v<X, float>) {
      // the 4 rows of A in registers, each token's vector loaded once
      const vf a0 = load_vf(w0 + k), a1 = load_vf(w1 + k), a2 = load_vf(w2 + k),
               a3 = load_vf(w3 + k);
      for (int i = 0; i < NT; ++i) {
        const vf xv = loadu(xs[i] + k);
        acc[i][0] += xv * a0;
        acc[i][1] += xv * a1;
        acc[i][2] += xv * a2;
        acc[i][3] += xv * a3;
      }
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < kTile; ++j) storeu(part + (i * kTile + j) * kVW, acc[i][j]);
}

// fp32 copy of n elements of src in the order dot_tile reads them: [even | odd] halves of each
// 32-element block for bf16 on AVX-512 (the tail past the last full block in place), else
// natural order; fp32 rows are used in place (no copy).
template <typename T>
inline const float* widened_for_dot(const T* src, int64_t n, float* dst) {
#if defined(__AVX512F__)
  if constexpr (kStep<T> == 2 * kVW) {
    int64_t i = 0;
    for (; i + 2 * kVW <= n; i += 2 * kVW) {
      vf even, odd;
      load_bf16_pairs(src + i, even, odd);
      storeu(dst + i, even);
      storeu(dst + i + kVW, odd);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    return dst;
  }
#endif
  return widened(src, n, dst);
}

// Whether decode-sized items read bf16 x rows in place (widened in registers) rather than
// through fp32 copies.
template <typename T>
constexpr bool kXInPlace = kStep<T> == 2 * kVW;

// h[i * r_pad + j] = scale * <x_i, A_j> for the n tokens (x: the rows, xr: their
// widened_for_dot copies, unused when n <= kTile and kXInPlace) and the r rows of A at `a`.
template <typename T>
void shrink(const T* const* x, const float* const* xr, int n, const T* a, int64_t r,
            int64_t d_in, float scale, int64_t r_pad, Scratch& s) {
  const int64_t d_vec = d_in / kStep<T> * kStep<T>;
  for (int64_t j0 = 0; j0 < r; j0 += kTile) {
    const int64_t jn = std::min<int64_t>(kTile, r - j0);
    std::fill(s.part, s.part + (size_t)n * kTile * kVW, 0.f);
    // the ragged end of d_in (past d_vec) in scalar code, then h
    auto finish = [&](auto const* const* w) {
      for (int i = 0; i < n; ++i)
        for (int64_t j = 0; j < jn; ++j) {
          float sum = hsum(loadu(s.part + ((size_t)i * kTile + j) * kVW));
          for (int64_t k = d_vec; k < d_in; ++k)
            sum += static_cast<float>(x[i][k]) * static_cast<float>(w[j][k]);
          s.h[i * r_pad + j0 + j] = scale * sum;
        }
    };
    if (n <= kTile || std::is_same_v<T, float> || kDpBf16<T>) {
      // one token tile (decode), fp32 rows or AVX512-BF16 dot products: A read in place
      // (widened in registers where needed), once per token tile (d_in in L1-sized blocks
      // when several tiles reuse them)
      const T* wr[kTile];
      for (int j = 0; j < kTile; ++j) wr[j] = j < jn ? a + (j0 + j) * d_in : s.zero_row<T>();
      for (int64_t k0 = 0; k0 < d_vec; k0 += (n <= kTile ? d_vec : kKC)) {
        const int64_t k1 = n <= kTile ? d_vec : std::min<int64_t>(d_vec, k0 + kKC);
        for (int i0 = 0; i0 < n; i0 += kTile)
          with_tile(std::min(kTile, n - i0), [&](auto nt) {
            float* part = s.part + (size_t)i0 * kTile * kVW;
            if constexpr (kXInPlace<T> || kDpBf16<T>)
              dot_tile<nt.value>(x + i0, wr, k0, k1, part);
            else
              dot_tile<nt.value>(xr + i0, wr, k0, k1, part);
          });
      }
      finish(wr);
    } else {
      // prefill in bf16/fp16: the 4 rows widened once, then d_in in L1-sized blocks so that
      // they stay in L1 while the chunk's tokens stream past them
      const float* wf[kTile];
      for (int j = 0; j < kTile; ++j)
        wf[j] = j < jn ? widened_for_dot(a + (j0 + j) * d_in, d_in, s.a + (size_t)j * d_in)
                       : s.zero;
      for (int64_t k0 = 0; k0 < d_vec; k0 += kKC) {
        const int64_t k1 = std::min<int64_t>(d_vec, k0 + kKC);
        for (int i0 = 0; i0 < n; i0 += kTile)
          with_tile(std::min(kTile, n - i0), [&](auto nt) {
            dot_tile<nt.value>(xr + i0, wf, k0, k1, s.part + (size_t)i0 * kTile * kVW);
          });
      }
      finish(wf);
    }
  }
}

// Decode expand: out[rows[i], col : col + d_s] (+)= sum_j h[i][j] Bt[j] for NT tokens, in
// blocks of kNC columns whose NT x kNV accumulators stay in registers over all r rows of Bt
// (no accumulator traffic through memory; out written once).  bf16 on AVX-512 loads 32
// columns as [even | odd] halves and puts them back in order before the store.
constexpr int kPrefetchBlocks = 4;  // how far ahead (in blocks) each row of Bt is prefetched
template <int NT, typename T, typename O>
void expand_rows(const float* h, int64_t r_pad, const T* bt, int64_t r, int64_t d_s,
                 const int64_t* rows, O* out, int64_t stride_out, int64_t col, bool overwrite) {
  constexpr bool pairs = kStep<T> == 2 * kVW;
  O* o[NT];
  for (int i = 0; i < NT; ++i) o[i] = out + rows[i] * stride_out + col;
  int64_t c = 0;
  for (; c + kNC <= d_s; c += kNC) {
    vf acc[NT][kNV];
    for (int i = 0; i < NT; ++i)
      for (int v = 0; v < kNV; ++v) acc[i][v] = vf{};
    for (int64_t j = 0; j < r; ++j) {
      const T* b = bt + j * d_s + c;
      // r rows are r streams, more than the hardware prefetcher follows: each row's block
      // kPrefetchBlocks ahead is requested here
      const char* ahead = reinterpret_cast<const char*>(b) + sizeof(T) * kPrefetchBlocks * kNC;
      for (size_t l = 0; l < sizeof(T) * kNC; l += 64) prefetch(ahead + l);
      vf bv[kNV];
#if defined(__AVX512F__)
      if constexpr (pairs) {
        for (int v = 0; v < kNV; v += 2)
          load_bf16_pairs(reinterpret_cast<const BF16*>(b) + v * kVW, bv[v], bv[v + 1]);
      } else
#endif
      {
        for (int v = 0; v < kNV; ++v) bv[v] = load_vf(b + v * kVW);
      }
      for (int i = 0; i < NT; ++i) {
        const float hj = h[i * r_pad + j];
        for (int v = 0; v < kNV; ++v) acc[i][v] += hj * bv[v];
      }
    }
    for (int i = 0; i < NT; ++i) {
#if defined(__AVX512F__)
      if constexpr (pairs) {
        for (int v = 0; v < kNV; v += 2) {
          vf lo, hi;
          interleave_pairs(acc[i][v], acc[i][v + 1], lo, hi);
          store_out(o[i] + c + v * kVW, lo, overwrite);
          store_out(o[i] + c + (v + 1) * kVW, hi, overwrite);
        }
        continue;
      }
#endif
      for (int v = 0; v < kNV; ++v) store_out(o[i] + c + v * kVW, acc[i][v], overwrite);
    }
  }
  // the last d_s % kNC columns: whole vectors, then single columns
  for (; c + kVW <= d_s; c += kVW) {
    vf acc[NT];
    for (int i = 0; i < NT; ++i) acc[i] = vf{};
    for (int64_t j = 0; j < r; ++j) {
      const vf bv = load_vf(bt + j * d_s + c);
      for (int i = 0; i < NT; ++i) acc[i] += h[i * r_pad + j] * bv;
    }
    for (int i = 0; i < NT; ++i) store_out(o[i] + c, acc[i], overwrite);
  }
  for (; c < d_s; ++c)
    for (int i = 0; i < NT; ++i) {
      float sum = 0.f;
      for (int64_t j = 0; j < r; ++j) sum += h[i * r_pad + j] * static_cast<float>(bt[j * d_s + c]);
      store_out(o[i] + c, sum, overwrite);
    }
}

// Prefill expand: kNC columns at a time, the block of Bt widened once (zero-padded past d_s)
// into L1 and reused by every 4-token register tile.
template <typename T, typename O>
void expand_blocks(const float* h, int64_t r_pad, int n, const T* bt, int64_t r, int64_t d_s,
                   const int64_t* rows, O* out, int64_t stride_out, int64_t col, bool overwrite,
                   Scratch& s) {
  for (int64_t c0 = 0; c0 < d_s; c0 += kNC) {
    const int64_t nc = std::min<int64_t>(kNC, d_s - c0);
    // fp32 full blocks are read in place; others widened / zero-padded into scratch
    const float* b = s.b;
    int64_t b_stride = kNC;
    if constexpr (std::is_same_v<T, float>) {
      if (nc == kNC) b = bt + c0, b_stride = d_s;
    }
    if (b == s.b) {
      for (int64_t j = 0; j < r; ++j) {
        float* dst = s.b + j * kNC;
        widen(bt + j * d_s + c0, nc, dst);
        std::fill(dst + nc, dst + kNC, 0.f);
      }
    }
    for (int i0 = 0; i0 < n; i0 += kTile) {
      with_tile(std::min(kTile, n - i0), [&](auto tile) {
        constexpr int NT = tile.value;
        vf acc[NT][kNV];
        for (int i = 0; i < NT; ++i)
          for (int v = 0; v < kNV; ++v) acc[i][v] = vf{};
        for (int64_t j = 0; j < r; ++j) {
          vf bv[kNV];
          for (int v = 0; v < kNV; ++v) bv[v] = loadu(b + j * b_stride + v * kVW);
          for (int i = 0; i < NT; ++i) {
            const float hj = h[(i0 + i) * r_pad + j];  // scalar * vector broadcasts
            for (int v = 0; v < kNV; ++v) acc[i][v] += hj * bv[v];
          }
        }
        for (int i = 0; i < NT; ++i) {
          O* o = out + rows[i0 + i] * stride_out + col + c0;
          if (nc == kNC) {  // straight from registers (a round trip through memory would
            for (int v = 0; v < kNV; ++v)  // stall on store forwarding)
              store_out(o + v * kVW, acc[i][v], overwrite);
          } else {
            float tmp[kNC];
            for (int v = 0; v < kNV; ++v) storeu(tmp + v * kVW, acc[i][v]);
            for (int64_t c = 0; c < nc; ++c) store_out(o + c, tmp[c], overwrite);
          }
        }
      });
    }
  }
}

struct Slice {
  int64_t d_out, col;
};

// A unit of work for one thread: tokens [first, first + n) of group g (n <= kChunk), slices
// [s0, s1).  Different items never write the same output element.
struct Item {
  int64_t g, first, n, s0, s1;
};

// One work item: tokens rows[0..n) of slot `slot`, slices [s0, s1).
template <typename T, typename O>
void run_item(const T* x, int64_t stride_x, const T* A, const T* Bt, O* out, int64_t stride_out,
              const int64_t* rows, int n, int64_t d_in, const int32_t* ranks,
              const int32_t* a_off, const int64_t* b_off, const float* scales,
              const std::vector<Slice>& slices, int64_t slot, int64_t s0, int64_t s1,
              bool overwrite, Scratch& s) {
  const int64_t S = static_cast<int64_t>(slices.size());
  int64_t r_max = 0, d_max = 0;
  for (int64_t q = 0; q < S; ++q) {
    r_max = std::max<int64_t>(r_max, ranks[slot * S + q]);
    d_max = std::max<int64_t>(d_max, slices[q].d_out);
  }
  const int64_t r_pad = (r_max + kTile - 1) / kTile * kTile;
  s.carve(d_in, d_max, r_pad);
  const T* xt[kChunk];
  const float* xr[kChunk];
  for (int i = 0; i < n; ++i) {
    xt[i] = x + rows[i] * stride_x;
    xr[i] = (kXInPlace<T> && n <= kTile) || kDpBf16<T>
                ? nullptr
                : widened_for_dot(xt[i], d_in, s.x + (size_t)i * d_in);
  }
  for (int64_t q = s0; q < s1; ++q) {
    const int64_t r = ranks[slot * S + q], d_s = slices[q].d_out, col = slices[q].col;
    if (r == 0) {  // nothing to add; in overwrite mode these columns become 0
      if (overwrite)
        for (int i = 0; i < n; ++i) {
          O* o = out + rows[i] * stride_out + col;
          std::fill(o, o + d_s, static_cast<O>(0.f));
        }
      continue;
    }
    shrink(xt, xr, n, A + (int64_t)a_off[slot * S + q] * d_in, r, d_in, scales[slot * S + q],
           r_pad, s);
    const T* bt = Bt + b_off[slot * S + q];
    if (n <= kTile)
      with_tile(n, [&](auto nt) {
        expand_rows<nt.value>(s.h, r_pad, bt, r, d_s, rows, out, stride_out, col, overwrite);
      });
    else
      expand_blocks(s.h, r_pad, n, bt, r, d_s, rows, out, stride_out, col, overwrite, s);
  }
}

template <typename T, typename O>
void launch(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& Bt,
            const std::vector<Item>& items, const int64_t* order, const int64_t* g_slot,
            const int64_t* g_start, const torch::Tensor& ranks, const torch::Tensor& a_off,
            const torch::Tensor& b_off, const torch::Tensor& scales,
            const std::vector<Slice>& slices, torch::Tensor& out, bool overwrite, int threads) {
  const T* xp = x.data_ptr<T>();
  const T* ap = A.numel() ? A.data_ptr<T>() : nullptr;
  const T* bp = Bt.numel() ? Bt.data_ptr<T>() : nullptr;
  O* op = out.data_ptr<O>();
  const int64_t stride_x = x.stride(0), stride_out = out.stride(0), d_in = x.size(1);
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const int32_t* ao = a_off.data_ptr<int32_t>();
  const int64_t* bo = b_off.data_ptr<int64_t>();
  const float* sc = scales.data_ptr<float>();
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(threads)
  {
    // per OpenMP thread, kept across calls (the pool's threads persist): no allocation and
    // zeroing of ~0.5 MiB per call
    static thread_local Scratch scratch;
    int64_t rows[kChunk];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item& item = items[it];
      const int64_t g = item.g, first = item.first;
      const int n = static_cast<int>(item.n);
      for (int i = 0; i < n; ++i) {
        const int64_t pos = g_start[g] + first + i;
        rows[i] = order ? order[pos] : pos;
      }
      run_item<T, O>(xp, stride_x, ap, bp, op, stride_out, rows, n, d_in, rk, ao, bo, sc, slices,
                     g_slot[g], item.s0, item.s1, overwrite, scratch);
    }
  }
}

// A C string, not std::string: the message is only built when a check fails (a std::string
// argument cost a heap allocation per check, about 2 µs per call in all).
void check(bool cond, const char* msg) { TORCH_CHECK(cond, "multi_lora_cpu: ", msg); }

// out += delta.  order: int64 [T], or None / empty (identity); groups: int64 [G] each.
// Groups of at least gemm_min_tokens tokens (0 = none) and gemm_min_macs multiply-adds go
// through ATen's GEMM when out has x's dtype (multi_lora_gemm_cpu.cpp: its fixed cost of a
// few ATen calls must be small next to the multiply-adds it speeds up); all others through
// the fused kernel above.
void multi_lora_cpu(const torch::Tensor& x_in, const torch::Tensor& A, const torch::Tensor& Bt,
                    const std::optional<torch::Tensor>& order_in, const torch::Tensor& group_slot,
                    const torch::Tensor& group_start, const torch::Tensor& group_len,
                    const torch::Tensor& ranks, const torch::Tensor& a_off,
                    const torch::Tensor& b_off, const torch::Tensor& scales,
                    const std::vector<int64_t>& slice_d_out, const std::vector<int64_t>& slice_col,
                    torch::Tensor out, bool overwrite, int64_t gemm_min_tokens,
                    int64_t gemm_min_macs) {
  check(x_in.device().is_cpu() && out.device().is_cpu(), "tensors must be on the CPU");
  check(x_in.dim() == 2, "x must be [T, d_in]");
  const torch::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  check(A.dim() == 2 && A.is_contiguous() && A.size(1) == x.size(1), "A must be [rows, d_in]");
  check(Bt.dim() == 1 && Bt.is_contiguous(), "Bt must be flat and contiguous");
  check(A.scalar_type() == x.scalar_type() && Bt.scalar_type() == x.scalar_type(),
        "x, A and Bt must share one dtype");
  check(out.dim() == 2 && out.size(0) == x.size(0) && out.stride(1) == 1,
        "out must be [T, d_out] with contiguous rows");
  check(out.scalar_type() == x.scalar_type() || out.scalar_type() == torch::kFloat,
        "out must have x's dtype or float32");
  const int64_t S = static_cast<int64_t>(slice_d_out.size());
  check(S > 0 && slice_col.size() == slice_d_out.size(), "slice sizes and columns must match");
  check(ranks.scalar_type() == torch::kInt && a_off.scalar_type() == torch::kInt &&
            b_off.scalar_type() == torch::kLong && scales.scalar_type() == torch::kFloat,
        "metadata dtypes must be int32 ranks/a_off, int64 b_off, float32 scales");
  check(ranks.is_contiguous() && a_off.is_contiguous() && b_off.is_contiguous() &&
            scales.is_contiguous() && ranks.numel() % S == 0,
        "metadata must be contiguous [slots, slices]");
  for (int64_t s = 0; s < S; ++s)
    check(slice_col[s] >= 0 && slice_col[s] + slice_d_out[s] <= out.size(1),
          "slice columns exceed out");
  const int64_t T = x.size(0), G = group_slot.numel(), K = ranks.numel() / S;
  check(group_start.numel() == G && group_len.numel() == G, "group arrays must have one length");
  check(group_slot.scalar_type() == torch::kLong && group_start.scalar_type() == torch::kLong &&
            group_len.scalar_type() == torch::kLong,
        "group arrays must be int64");
  const torch::Tensor order = order_in.has_value() ? order_in->contiguous() : torch::Tensor();
  const bool has_order = order.defined() && order.numel() > 0;
  check(!has_order || (order.scalar_type() == torch::kLong && order.numel() == T),
        "order must be int64 [T]");
  const int64_t* ord = has_order ? order.data_ptr<int64_t>() : nullptr;
  auto gs = group_slot.contiguous(), gst = group_start.contiguous(), gl = group_len.contiguous();
  const int64_t* g_slot = gs.data_ptr<int64_t>();
  const int64_t* g_start = gst.data_ptr<int64_t>();
  const int64_t* g_len = gl.data_ptr<int64_t>();
  const int32_t* rk = ranks.data_ptr<int32_t>();
  const int32_t* ao = a_off.data_ptr<int32_t>();
  const int64_t* bo = b_off.data_ptr<int64_t>();
  // Bounds: every group inside [0, T), every token index in range, every adapter inside
  // its buffer; the kernel then never reads or writes out of bounds.
  std::vector<Item> items;
  std::vector<int64_t> gemm_groups;
  const bool gemm = gemm_min_tokens > 0 && out.scalar_type() == x.scalar_type();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k = g_slot[g];
    check(k >= -1 && k < K, "group slot out of range");
    check(g_len[g] >= 0 && g_start[g] >= 0 && g_start[g] + g_len[g] <= T,
          "group outside the tokens");
    if (k < 0 || g_len[g] == 0) continue;
    bool any = false;
    int64_t macs = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = rk[k * S + s];
      if (r == 0) continue;
      any = true;
      macs += g_len[g] * r * (x.size(1) + slice_d_out[s]);
      check(r > 0 && ao[k * S + s] >= 0 && ao[k * S + s] + r <= A.size(0) && bo[k * S + s] >= 0 &&
                bo[k * S + s] + r * slice_d_out[s] <= Bt.numel(),
            "adapter rows outside the packed buffers");
    }
    if (!any && !overwrite) continue;
    if (gemm && g_len[g] >= gemm_min_tokens && macs >= gemm_min_macs) {
      gemm_groups.push_back(g);
      continue;
    }
    for (int64_t f = 0; f < g_len[g]; f += kChunk)
      items.push_back({g, f, std::min<int64_t>(kChunk, g_len[g] - f), 0, S});
  }
  if (has_order)
    for (int64_t t = 0; t < T; ++t) check(ord[t] >= 0 && ord[t] < T, "order index out of range");
  // Multiply-adds of an item (its tokens times the ranks and widths of its slices).
  auto cost_of = [&](const Item& item) {
    int64_t c = 0;
    for (int64_t s = item.s0; s < item.s1; ++s)
      c += item.n * rk[g_slot[item.g] * S + s] * (x.size(1) + slice_d_out[s]);
    return c;
  };
  // Every core whatever the mix: while there are fewer items than threads (one adapter serving
  // every request is the common case), split the costliest item in two: between its slices
  // (columns of q / k / v, gate / up: no work is repeated) where it has several, else by
  // tokens on a tile boundary, down to halves of two tiles (each half re-reads its adapter,
  // which is small next to the multiply-adds of the tokens that another thread then takes).
  const int64_t team = std::max(1, at::get_num_threads());
  while (!items.empty() && static_cast<int64_t>(items.size()) < team) {
    size_t big = 0;
    for (size_t it = 1; it < items.size(); ++it)
      if (cost_of(items[it]) > cost_of(items[big])) big = it;
    Item& item = items[big];
    if (item.s1 - item.s0 > 1) {  // the split point that balances the two halves' work
      const int64_t total = cost_of(item);
      int64_t cut = item.s0 + 1, best = total;
      for (int64_t c = item.s0 + 1; c < item.s1; ++c) {
        const int64_t left = cost_of({item.g, item.first, item.n, item.s0, c});
        if (std::abs(2 * left - total) < best) best = std::abs(2 * left - total), cut = c;
      }
      const Item right{item.g, item.first, item.n, cut, item.s1};
      item.s1 = cut;
      items.push_back(right);
    } else if (item.n >= 4 * kTile) {
      const int64_t half = (item.n / 2 + kTile - 1) / kTile * kTile;
      const Item right{item.g, item.first + half, item.n - half, item.s0, item.s1};
      item.n = half;
      items.push_back(right);
    } else {
      break;
    }
  }
  std::vector<Slice> slices(S);
  for (int64_t s = 0; s < S; ++s) slices[s] = {slice_d_out[s], slice_col[s]};
  // Threads: torch's setting, but no more than one per ~1M multiply-adds of work (tiny batches
  // run faster on one thread than they take to wake a team).
  // Items go out largest first (longest-processing-time order) so that threads finish together
  // when adapters of very different ranks share a batch.
  int64_t work = 0;
  for (const Item& item : items) work += cost_of(item);
  std::stable_sort(items.begin(), items.end(),
                   [&](const Item& a, const Item& b) { return cost_of(a) > cost_of(b); });
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work >> 20)));
  if (overwrite) {  // rows of no active group are not visited by any item: zero them here
    std::vector<char> covered(T, 0);
    for (const int64_t g : gemm_groups)
      for (int64_t pos = g_start[g]; pos < g_start[g] + g_len[g]; ++pos)
        covered[has_order ? ord[pos] : pos] = 1;
    for (const Item& item : items)
      for (int64_t i = 0; i < item.n; ++i) {
        const int64_t pos = g_start[item.g] + item.first + i;
        covered[has_order ? ord[pos] : pos] = 1;
      }
    for (int64_t t = 0; t < T; ++t)
      if (!covered[t])
        std::memset(static_cast<char*>(out.data_ptr()) + t * out.stride(0) * out.element_size(), 0,
                    out.size(1) * out.element_size());
  }
  // the large groups first, each over all threads inside ATen's GEMM
  for (const int64_t g : gemm_groups) {
    const int64_t k = g_slot[g];
    GroupWeights w;
    for (int64_t s = 0; s < S; ++s) {
      w.rank.push_back(rk[k * S + s]);
      w.a_off.push_back(ao[k * S + s]);
      w.b_off.push_back(bo[k * S + s]);
      w.scale.push_back(scales.data_ptr<float>()[k * S + s]);
      w.d_out.push_back(slice_d_out[s]);
      w.col.push_back(slice_col[s]);
    }
    multi_lora_gemm_group(x, A, Bt, ord, g_start[g], g_len[g], w, out, overwrite);
  }
  if (items.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_cpu", [&] {
    if (out.scalar_type() == torch::kFloat)
      launch<scalar_t, float>(x, A, Bt, items, ord, g_slot, g_start, ranks, a_off, b_off, scales,
                              slices, out, overwrite, threads);
    else
      launch<scalar_t, scalar_t>(x, A, Bt, items, ord, g_slot, g_start, ranks, a_off, b_off,
                                 scales, slices, out, overwrite, threads);
  });
}


// Token groups of per-token slots (-1 = no adapter, any order): a stable counting sort by
// slot, tokens without an adapter last.  Returns int64 (order [T], group_start [K],
// group_len [K]) -- what slora.ops.build_token_meta computes with torch ops, in one O(T)
// pass for eager CPU calls.
std::vector<torch::Tensor> token_meta_cpu(const torch::Tensor& token_slots, int64_t max_slots) {
  check(token_slots.device().is_cpu() && token_slots.dim() == 1 &&
            token_slots.scalar_type() == torch::kLong,
        "token_slots must be a 1-D int64 CPU tensor");
  check(max_slots >= 0, "max_slots must be >= 0");
  const auto slots = token_slots.contiguous();
  const int64_t T = slots.numel(), K = max_slots;
  const auto opts = torch::TensorOptions().dtype(torch::kLong);
  torch::Tensor order = torch::empty({T}, opts), start = torch::empty({K}, opts),
                len = torch::zeros({K}, opts);
  const int64_t* sp = slots.data_ptr<int64_t>();
  int64_t *op = order.data_ptr<int64_t>(), *st = start.data_ptr<int64_t>(),
          *ln = len.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(sp[t] >= -1 && sp[t] < K, "token_slots: every slot must be in [-1, ", K,
                      ") (−1 = no adapter), got ", sp[t]);
    if (sp[t] >= 0) ++ln[sp[t]];
  }
  std::vector<int64_t> next(K);
  int64_t total = 0;
  for (int64_t k = 0; k < K; ++k) st[k] = next[k] = total, total += ln[k];
  for (int64_t t = 0; t < T; ++t) op[sp[t] >= 0 ? next[sp[t]]++ : total++] = t;
  return {order, start, len};
}

}  // namespace

void register_multi_lora(pybind11::module_& m) {
  m.def("multi_lora", &multi_lora_cpu,
        "out += grouped heterogeneous-rank LoRA delta (fp32 accumulation)", py::arg("x"),
        py::arg("A"), py::arg("Bt"), py::arg("order"), py::arg("group_slot"),
        py::arg("group_start"), py::arg("group_len"), py::arg("ranks"), py::arg("a_off"),
        py::arg("b_off"), py::arg("scales"), py::arg("slice_d_out"), py::arg("slice_col"),
        py::arg("out"), py::arg("overwrite") = false, py::arg("gemm_min_tokens") = 0,
        py::arg("gemm_min_macs") = 0);
  m.def("token_meta", &token_meta_cpu,
        "(order, group_start, group_len) of per-token slots: a stable counting sort",
        py::arg("token_slots"), py::arg("max_slots"));
}

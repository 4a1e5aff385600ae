// Grouped heterogeneous-rank LoRA (shrink + expand) on the CPU.
//
// out[t, col_s : col_s + d_s] += scale[k, s] * Bt[k, s]^T (A[k, s] x_t) for every token t of
// every group (tokens of one slot k), every slice s.  Work items are (group, chunk of up to
// kChunk tokens); each is shrunk and expanded by one thread with the intermediate h kept in
// fp32 in the thread's scratch, so x and A are read once per chunk and out once per chunk.
// OpenMP spreads the items over threads; every output element is written by exactly one
// item in a fixed order, so the result does not depend on the number of threads.
//
// Inner loops are 4x4 register tiles on GCC/Clang vector types (AVX-512 or AVX2 when the
// build targets them; plain SSE otherwise), accumulating in fp32 for fp32/fp16/bf16 inputs.
#include <torch/extension.h>

#include <algorithm>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// GCC's znver4 tuning reloads both operands of every FMA in the register tiles below
// (32 loads per 16 FMAs: load-bound at half speed); generic tuning keeps them in registers.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("tune=generic")
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kVW = 16;
#else
constexpr int kVW = 8;
#endif
typedef float vf __attribute__((vector_size(kVW * sizeof(float))));

constexpr int kTile = 4;     // tokens and rank rows per register tile
constexpr int kChunk = 64;   // tokens per work item
constexpr int kNV = 4;       // vectors of output columns per expand tile
constexpr int kNC = kNV * kVW;
constexpr int64_t kKC = 512;  // d_in block of the shrink (4 rows of A: 8 KiB in fp32)

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
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

inline float hsum(vf v) {
#if defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  return _mm512_reduce_add_ps(m);
#elif defined(__AVX__)
  __m256 m;
  std::memcpy(&m, &v, sizeof(m));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  q = _mm_hadd_ps(q, q);
  return _mm_cvtss_f32(_mm_hadd_ps(q, q));
#else
  float s = 0.f;
  for (int i = 0; i < kVW; ++i) s += v[i];
  return s;
#endif
}

// part[i][j] += xs[i] * ws[j] elementwise over [k0, k1) (a multiple of kVW long), for a 4x4
// tile of rows; the 16 partial vectors live in `part` between d_in blocks and are summed once
// at the end (horizontal sums are not free).
inline void dot_tile(const float* const* xs, const float* const* ws, int64_t k0, int64_t k1,
                     float* part) {
  vf acc[kTile][kTile];
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < kTile; ++j) acc[i][j] = loadu(part + (i * kTile + j) * kVW);
  const float *w0 = ws[0], *w1 = ws[1], *w2 = ws[2], *w3 = ws[3];
  for (int64_t k = k0; k < k1; k += kVW) {
    // the 4 rows of A in registers, each token's vector loaded once: 8 loads per 16 FMAs
    const vf a0 = loadu(w0 + k), a1 = loadu(w1 + k), a2 = loadu(w2 + k), a3 = loadu(w3 + k);
    for (int i = 0; i < kTile; ++i) {
      const vf xv = loadu(xs[i] + k);
      acc[i][0] += xv * a0;
      acc[i][1] += xv * a1;
      acc[i][2] += xv * a2;
      acc[i][3] += xv * a3;
    }
  }
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < kTile; ++j) storeu(part + (i * kTile + j) * kVW, acc[i][j]);
}

template <typename T>
inline const float* as_float(const T* src, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
    return scratch;
  }
}

struct Slice {
  int64_t d_out, col;
};

// One work item: tokens rows[0..n) (n <= kChunk) of slot `slot`.
template <typename T, typename O>
void run_item(const T* x, int64_t stride_x, const T* A, const T* Bt, O* out, int64_t stride_out,
              const int64_t* rows, int n, int64_t d_in, const int32_t* ranks,
              const int32_t* a_off, const int64_t* b_off, const float* scales,
              const std::vector<Slice>& slices, int64_t slot, bool overwrite,
              std::vector<float>& scratch) {
  const int64_t S = static_cast<int64_t>(slices.size());
  const int n_pad = (n + kTile - 1) / kTile * kTile;
  // scratch layout: x rows (fp32) | zero row | 4 A rows (fp32) | h | block of Bt (fp32) |
  // partial dot products (kTile vectors per token)
  int64_t r_max = 0;
  for (int64_t s = 0; s < S; ++s) r_max = std::max<int64_t>(r_max, ranks[slot * S + s]);
  const int64_t r_pad = (r_max + kTile - 1) / kTile * kTile;
  const size_t need = (size_t)(kChunk + 1 + kTile) * d_in + (size_t)kChunk * r_pad +
                      (size_t)std::max<int64_t>(r_pad, 1) * kNC + (size_t)kChunk * kTile * kVW;
  if (scratch.size() < need) scratch.resize(need);
  float* xbuf = scratch.data();
  float* zero = xbuf + (size_t)kChunk * d_in;
  float* abuf = zero + d_in;
  float* h = abuf + (size_t)kTile * d_in;
  float* bbuf = h + (size_t)kChunk * r_pad;
  float* part = bbuf + (size_t)std::max<int64_t>(r_pad, 1) * kNC;
  std::fill(zero, zero + d_in, 0.f);

  const float* xr[kChunk];
  for (int i = 0; i < n_pad; ++i) {
    xr[i] = i < n ? as_float(x + rows[i] * stride_x, d_in, xbuf + (size_t)i * d_in) : zero;
  }
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r = ranks[slot * S + s];
    if (r == 0) {  // nothing to add; in overwrite mode these columns become 0
      if (overwrite)
        for (int i = 0; i < n; ++i) {
          O* o = out + rows[i] * stride_out + slices[s].col;
          std::fill(o, o + slices[s].d_out, static_cast<O>(0.f));
        }
      continue;
    }
    const float scale = scales[slot * S + s];
    const T* a = A + (int64_t)a_off[slot * S + s] * d_in;
    // shrink: h[i][j] = scale * <x_i, A_j>, d_in in L1-sized blocks so that the 4 rows of A
    // stay in L1 while the chunk's tokens stream past them; the ragged end of d_in (< kVW
    // elements) is added in scalar code.
    const int64_t d_vec = d_in / kVW * kVW;
    for (int64_t j0 = 0; j0 < r; j0 += kTile) {
      const float* wr[kTile];
      for (int j = 0; j < kTile; ++j)
        wr[j] = j0 + j < r ? as_float(a + (j0 + j) * d_in, d_in, abuf + (size_t)j * d_in) : zero;
      std::fill(part, part + (size_t)n_pad * kTile * kVW, 0.f);
      for (int64_t k0 = 0; k0 < d_vec; k0 += kKC) {
        const int64_t k1 = std::min<int64_t>(d_vec, k0 + kKC);
        for (int i0 = 0; i0 < n_pad; i0 += kTile)
          dot_tile(xr + i0, wr, k0, k1, part + (size_t)i0 * kTile * kVW);
      }
      for (int i = 0; i < n_pad; ++i)
        for (int j = 0; j < kTile; ++j) {
          float sum = hsum(loadu(part + ((size_t)i * kTile + j) * kVW));
          for (int64_t k = d_vec; k < d_in; ++k) sum += xr[i][k] * wr[j][k];
          h[i * r_pad + j0 + j] = scale * sum;
        }
    }
    // expand: out[i][col + c] += sum_j h[i][j] * Bt[j][c], kNC columns at a time: the block
    // of Bt is copied once (fp32, zero-padded past d_s) into L1 and reused by every token.
    const int64_t d_s = slices[s].d_out, col = slices[s].col;
    const T* bt = Bt + b_off[slot * S + s];
    for (int64_t c0 = 0; c0 < d_s; c0 += kNC) {
      const int64_t nc = std::min<int64_t>(kNC, d_s - c0);
      for (int64_t j = 0; j < r; ++j) {
        float* dst = bbuf + j * kNC;
        const T* src = bt + j * d_s + c0;
        for (int64_t c = 0; c < nc; ++c) dst[c] = static_cast<float>(src[c]);
        for (int64_t c = nc; c < kNC; ++c) dst[c] = 0.f;
      }
      for (int i0 = 0; i0 < n_pad; i0 += kTile) {
        vf acc[kTile][kNV];
        for (int i = 0; i < kTile; ++i)
          for (int v = 0; v < kNV; ++v) acc[i][v] = vf{};
        for (int64_t j = 0; j < r; ++j) {
          vf bv[kNV];
          for (int v = 0; v < kNV; ++v) bv[v] = loadu(bbuf + j * kNC + v * kVW);
          for (int i = 0; i < kTile; ++i) {
            const float hj = h[(i0 + i) * r_pad + j];  // scalar * vector broadcasts
            for (int v = 0; v < kNV; ++v) acc[i][v] += hj * bv[v];
          }
        }
        for (int i = 0; i < kTile && i0 + i < n; ++i) {
          O* o = out + rows[i0 + i] * stride_out + col + c0;
          if constexpr (std::is_same_v<O, float>) {
            if (nc == kNC) {
              for (int v = 0; v < kNV; ++v)
                storeu(o + v * kVW, overwrite ? acc[i][v] : loadu(o + v * kVW) + acc[i][v]);
              continue;
            }
          }
          float tmp[kNC];
          for (int v = 0; v < kNV; ++v) storeu(tmp + v * kVW, acc[i][v]);
          for (int64_t c = 0; c < nc; ++c)
            o[c] = static_cast<O>(overwrite ? tmp[c] : static_cast<float>(o[c]) + tmp[c]);
        }
      }
    }
  }
}

template <typename T, typename O>
void launch(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& Bt,
            const std::vector<int64_t>& items, const int64_t* order, const int64_t* g_slot,
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
  const int64_t n_items = static_cast<int64_t>(items.size() / 3);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch;
    int64_t rows[kChunk];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const int64_t g = items[3 * it], first = items[3 * it + 1];
      const int n = static_cast<int>(items[3 * it + 2]);
      for (int i = 0; i < n; ++i) {
        const int64_t pos = g_start[g] + first + i;
        rows[i] = order ? order[pos] : pos;
      }
      run_item<T, O>(xp, stride_x, ap, bp, op, stride_out, rows, n, d_in, rk, ao, bo, sc, slices,
                     g_slot[g], overwrite, scratch);
    }
  }
}

void check(bool cond, const std::string& msg) { TORCH_CHECK(cond, "multi_lora_cpu: ", msg); }

// out += delta.  order: int64 [T] or empty (identity); groups: int64 [G] each.
void multi_lora_cpu(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& Bt,
                    const torch::Tensor& order, const torch::Tensor& group_slot,
                    const torch::Tensor& group_start, const torch::Tensor& group_len,
                    const torch::Tensor& ranks, const torch::Tensor& a_off,
                    const torch::Tensor& b_off, const torch::Tensor& scales,
                    const std::vector<int64_t>& slice_d_out, const std::vector<int64_t>& slice_col,
                    torch::Tensor out, bool overwrite) {
  check(x.device().is_cpu() && out.device().is_cpu(), "tensors must be on the CPU");
  check(x.dim() == 2 && x.stride(1) == 1, "x must be [T, d_in] with contiguous rows");
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
  const bool has_order = order.numel() > 0;
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
  std::vector<int64_t> items;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k = g_slot[g];
    check(k >= -1 && k < K, "group slot out of range");
    check(g_len[g] >= 0 && g_start[g] >= 0 && g_start[g] + g_len[g] <= T,
          "group outside the tokens");
    if (k < 0 || g_len[g] == 0) continue;
    bool any = false;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = rk[k * S + s];
      if (r == 0) continue;
      any = true;
      check(r > 0 && ao[k * S + s] >= 0 && ao[k * S + s] + r <= A.size(0) && bo[k * S + s] >= 0 &&
                bo[k * S + s] + r * slice_d_out[s] <= Bt.numel(),
            "adapter rows outside the packed buffers");
    }
    if (!any && !overwrite) continue;
    for (int64_t f = 0; f < g_len[g]; f += kChunk)
      items.insert(items.end(), {g, f, std::min<int64_t>(kChunk, g_len[g] - f)});
  }
  if (has_order)
    for (int64_t t = 0; t < T; ++t) check(ord[t] >= 0 && ord[t] < T, "order index out of range");
  std::vector<Slice> slices(S);
  for (int64_t s = 0; s < S; ++s) slices[s] = {slice_d_out[s], slice_col[s]};
  // Threads: torch's setting, but no more than one per ~1M multiply-adds of work (tiny batches
  // run faster on one thread than they take to wake a team).
  // Items go out largest first (longest-processing-time order) so that threads finish together
  // when adapters of very different ranks share a batch.
  const int64_t n_items = static_cast<int64_t>(items.size() / 3);
  std::vector<std::pair<int64_t, int64_t>> cost(n_items);
  int64_t work = 0;
  for (int64_t it = 0; it < n_items; ++it) {
    const int64_t k = g_slot[items[3 * it]];
    int64_t c = 0;
    for (int64_t s = 0; s < S; ++s) c += items[3 * it + 2] * rk[k * S + s] * (x.size(1) + slice_d_out[s]);
    cost[it] = {-c, it};
    work += c;
  }
  std::sort(cost.begin(), cost.end());
  std::vector<int64_t> sorted_items(items.size());
  for (int64_t i = 0; i < n_items; ++i)
    for (int q = 0; q < 3; ++q) sorted_items[3 * i + q] = items[3 * cost[i].second + q];
  items.swap(sorted_items);
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work >> 20)));
  if (overwrite) {  // rows of no active group are not visited by any item: zero them here
    std::vector<char> covered(T, 0);
    for (size_t it = 0; it < items.size(); it += 3)
      for (int64_t i = 0; i < items[it + 2]; ++i) {
        const int64_t pos = g_start[items[it]] + items[it + 1] + i;
        covered[has_order ? ord[pos] : pos] = 1;
      }
    for (int64_t t = 0; t < T; ++t)
      if (!covered[t])
        std::memset(static_cast<char*>(out.data_ptr()) + t * out.stride(0) * out.element_size(), 0,
                    out.size(1) * out.element_size());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_cpu", [&] {
    if (out.scalar_type() == torch::kFloat)
      launch<scalar_t, float>(x, A, Bt, items, ord, g_slot, g_start, ranks, a_off, b_off, scales,
                              slices, out, overwrite, threads);
    else
      launch<scalar_t, scalar_t>(x, A, Bt, items, ord, g_slot, g_start, ranks, a_off, b_off,
                                 scales, slices, out, overwrite, threads);
  });
}

}  // namespace

void register_multi_lora(pybind11::module_& m) {
  m.def("multi_lora", &multi_lora_cpu,
        "out += grouped heterogeneous-rank LoRA delta (fp32 accumulation)", py::arg("x"),
        py::arg("A"), py::arg("Bt"), py::arg("order"), py::arg("group_slot"),
        py::arg("group_start"), py::arg("group_len"), py::arg("ranks"), py::arg("a_off"),
        py::arg("b_off"), py::arg("scales"), py::arg("slice_d_out"), py::arg("slice_col"),
        py::arg("out"), py::arg("overwrite") = false);
}

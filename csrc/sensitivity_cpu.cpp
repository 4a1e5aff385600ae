// Sensitivity statistics reductions on the CPU (docs/kernels.md, "Sensitivity statistics ops").
//
// One streaming reduction serves both sides of the calibration pass.  For a [T, D] tensor x
// (layer input or output gradient), an optional row mask m and optional per-row weights w:
//   col[d]  += Σ_t m_t x[t, d]²            (column sums of squares, fp32, in place)
//   tok[t]   = m_t Σ_d x[t, d]²            (per-token squared norms, written)
//   trace   += Σ_t w_t m_t Σ_d x[t, d]²    (the exact Fisher trace term when w_t = ‖x_t‖²)
// The input is read once; fp16/bf16 values are widened to fp32 before squaring.
//
// Determinism: rows are cut into fixed blocks of kRowBlock rows, independent of the number of
// threads; each block owns a private column accumulator, and the blocks are combined in index
// order, so any thread count gives bit-identical results.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu_vec.h"  // widened: bf16 / fp16 rows to fp32

namespace {

using slora_cpu::widened;

constexpr int64_t kRowBlock = 64;  // rows per independent partial (fixed: determinism)
constexpr int64_t kChunk = 1024;   // columns widened to fp32 at a time (fits in L1)
constexpr int kLanes = 16;         // independent partial sums of a row norm (one AVX-512 vector)
// Minimum elements per thread.  A parallel region costs microseconds on an idle machine but
// milliseconds when the cores are oversubscribed (threads wait for a time slice at the
// barrier), so calibration-sized tensors (≤ 2 M elements, ≤ 200 µs on one core) run serially.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 21;

// acc[d] += v[d]² for d < n; returns Σ_d v[d]² summed in a fixed lane order.
inline float accumulate_row(const float* __restrict v, float* __restrict acc, int64_t n) {
  float lanes[kLanes] = {0.f};
  int64_t g = 0;
  for (; g + kLanes <= n; g += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float s = v[g + l] * v[g + l];
      acc[g + l] += s;
      lanes[l] += s;
    }
  }
  for (int l = 0; g + l < n; ++l) {
    const float s = v[g + l] * v[g + l];
    acc[g + l] += s;
    lanes[l] += s;
  }
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename T>
double sq_stats_typed(const T* x, int64_t rows, int64_t cols, int64_t row_stride,
                      const bool* mask, const float* weights, float* col, float* tok) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::unique_ptr<float[]> partial(new float[blocks * cols]);
  std::unique_ptr<double[]> dots(new double[blocks]);
  const int64_t block_grain = std::max<int64_t>(1, kMinElementsPerThread / (kRowBlock * cols));
  at::parallel_for(0, blocks, block_grain, [&](int64_t b0, int64_t b1) {
    std::unique_ptr<float[]> buf(new float[kChunk]);
    for (int64_t b = b0; b < b1; ++b) {
      float* acc = partial.get() + b * cols;
      std::fill(acc, acc + cols, 0.f);
      double dot = 0.0;
      const int64_t t1 = std::min(rows, (b + 1) * kRowBlock);
      for (int64_t t = b * kRowBlock; t < t1; ++t) {
        if (mask != nullptr && !mask[t]) {
          if (tok != nullptr) tok[t] = 0.f;
          continue;
        }
        const T* row = x + t * row_stride;
        float total = 0.f;
        for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
          const int64_t n = std::min(kChunk, cols - c0);
          total += accumulate_row(widened(row + c0, n, buf.get()), acc + c0, n);
        }
        if (tok != nullptr) tok[t] = total;
        if (weights != nullptr) dot += static_cast<double>(total) * weights[t];
      }
      dots[b] = dot;
    }
  });
  // Combine the block partials in block order (parallel over columns only).
  float* first = partial.get();
  const int64_t col_grain = std::max<int64_t>(2048, kMinElementsPerThread / blocks);
  at::parallel_for(0, cols, col_grain, [&](int64_t d0, int64_t d1) {
    for (int64_t b = 1; b < blocks; ++b) {
      const float* part = partial.get() + b * cols;
#pragma omp simd
      for (int64_t d = d0; d < d1; ++d) first[d] += part[d];
    }
#pragma omp simd
    for (int64_t d = d0; d < d1; ++d) col[d] += first[d];
  });
  double dot = 0.0;
  for (int64_t b = 0; b < blocks; ++b) dot += dots[b];
  return dot;
}

// Python entry point; argument shapes/dtypes are validated by the Python wrapper, the checks
// here only guard memory safety.
void sq_stats(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& mask,
              torch::Tensor col, const c10::optional<torch::Tensor>& tok,
              const c10::optional<torch::Tensor>& weights,
              const c10::optional<torch::Tensor>& trace) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "x: expected a 2-D CPU tensor");
  const torch::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  auto check_f32 = [](const torch::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.numel() == n &&
                    t.is_contiguous(),
                name, ": expected a contiguous float32 CPU tensor with ", n, " elements");
  };
  check_f32(col, cols, "col");
  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->numel() == rows &&
                    mask->is_contiguous() && mask->device().is_cpu(),
                "row_mask: expected a contiguous bool CPU tensor with ", rows, " elements");
    mask_ptr = mask->data_ptr<bool>();
  }
  float* tok_ptr = nullptr;
  if (tok.has_value()) {
    check_f32(*tok, rows, "token_sq");
    tok_ptr = tok->data_ptr<float>();
  }
  const float* w_ptr = nullptr;
  if (weights.has_value()) {
    check_f32(*weights, rows, "x_token_sq");
    w_ptr = weights->data_ptr<float>();
  }
  if (trace.has_value()) check_f32(*trace, 1, "trace");
  if (rows == 0 || cols == 0) {
    if (tok_ptr != nullptr) std::fill(tok_ptr, tok_ptr + rows, 0.f);
    return;
  }
  double dot = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "sq_stats", [&] {
        dot = sq_stats_typed<scalar_t>(x.data_ptr<scalar_t>(), rows, cols, x.stride(0), mask_ptr,
                                       w_ptr, col.data_ptr<float>(), tok_ptr);
      });
  if (trace.has_value()) *trace->data_ptr<float>() += static_cast<float>(dot);
}

}  // namespace

void register_sensitivity(pybind11::module_& m) {
  m.def("sq_stats", &sq_stats, pybind11::arg("x"), pybind11::arg("row_mask"),
        pybind11::arg("col"), pybind11::arg("token_sq"), pybind11::arg("weights"),
        pybind11::arg("trace"),
        "col += Σ_t m_t x_t² (in place); token_sq[t] = m_t ‖x_t‖²; trace += Σ_t w_t m_t ‖x_t‖²");
}

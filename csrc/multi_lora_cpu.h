// Shared declarations of the grouped LoRA CPU kernels (multi_lora_cpu.cpp: the fused FMA
// kernel and the op's entry point; multi_lora_gemm_cpu.cpp: the GEMM route for large groups).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace slora_cpu {

// One adapter's slices as the kernels read them: rank, rows of A, offset in the flat Bt,
// scale, and the slice's output width and first column.
struct GroupWeights {
  std::vector<int64_t> rank, a_off, b_off, d_out, col;
  std::vector<float> scale;
};

// out[rows] (+)= delta of the adapter `w` for the n tokens order[start : start + n] (or
// start : start + n without an order), through ATen's GEMM.  out must have x's dtype.
void multi_lora_gemm_group(const torch::Tensor& x, const torch::Tensor& A,
                           const torch::Tensor& Bt, const int64_t* order, int64_t start,
                           int64_t n, const GroupWeights& w, torch::Tensor& out, bool overwrite);

}  // namespace slora_cpu

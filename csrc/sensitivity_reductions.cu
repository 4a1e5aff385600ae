// CUDA sources of the sensitivity statistics reductions (SPEC §1), the counterpart of the Triton
// kernel `_sq_stats_kernel` in slora/kernels/sensitivity_stats.py.
//
// For a row-major [T, D] tensor x (layer input or output gradient; fp32, fp16 or bf16), an
// optional row mask m (uint8/bool) and optional per-row weights w (fp32):
//   col[d]  += Σ_t m_t x[t, d]²            column sums of squares, accumulated in fp32
//   tok[t]   = m_t Σ_d x[t, d]²            per-token squared norms
//   trace   += Σ_t w_t m_t Σ_d x[t, d]²    the exact Fisher trace term (w_t = ‖x_t‖²)
//
// Layout of the work: a CTA owns kCols consecutive columns and one split of the tokens.  Each
// warp walks rows; lane l reads columns l, l+32, l+64, l+96 of the CTA's slice (coalesced),
// widens to fp32 before squaring (fp16 values whose squares overflow fp16 stay correct), keeps
// per-column partials in registers and reduces the row's partial norm with warp shuffles.
// Partials go to fp32 workspaces and are combined in a fixed order by `combine_kernel`
// (deterministic, no atomics).  Standalone CUDA C++ (no torch headers): host launchers take raw
// pointers and a stream and are exported with C linkage.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace slora {
namespace {

constexpr int kWarps = 8;
constexpr int kPerLane = 4;
constexpr int kCols = 32 * kPerLane;  // columns per CTA

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

// Grid: (ceil(D / kCols), splits).  col_ws: [splits, D]; tok_ws: [gridDim.x, T] or null;
// dot_ws: [splits, gridDim.x] or null.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    sq_stats_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask,
                    const float* __restrict__ weights, float* __restrict__ col_ws,
                    float* __restrict__ tok_ws, float* __restrict__ dot_ws, int64_t rows,
                    int64_t cols, int64_t row_stride, int64_t rows_per_split) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kCols;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t t_end = min(rows, t_begin + rows_per_split);

  float col_acc[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) col_acc[k] = 0.f;
  float dot = 0.f;

  for (int64_t t = t_begin + warp; t < t_end; t += kWarps) {
    const bool keep = mask == nullptr || mask[t] != 0;
    float row_part = 0.f;
    if (keep) {
      const T* row = x + t * row_stride;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t d = col0 + lane + 32 * k;
        if (d < cols) {
          const float v = widen(row[d]);
          const float s = v * v;
          col_acc[k] += s;
          row_part += s;
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) row_part += __shfl_xor_sync(0xffffffffu, row_part, off);
    if (lane == 0) {
      if (tok_ws != nullptr) tok_ws[static_cast<int64_t>(blockIdx.x) * rows + t] = row_part;
      if (weights != nullptr && keep) dot += row_part * weights[t];
    }
  }

  // Reduce the column partials and the dot over the CTA's warps (fixed order).
  __shared__ float smem_cols[kWarps][kCols];
  __shared__ float smem_dot[kWarps];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) smem_cols[warp][lane + 32 * k] = col_acc[k];
  if (lane == 0) smem_dot[warp] = dot;
  __syncthreads();
  for (int c = threadIdx.x; c < kCols; c += blockDim.x) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += smem_cols[w][c];
    const int64_t d = col0 + c;
    if (d < cols) col_ws[static_cast<int64_t>(blockIdx.y) * cols + d] = s;
  }
  if (dot_ws != nullptr && threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += smem_dot[w];
    dot_ws[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = s;
  }
}

// col[d] += Σ_s col_ws[s, d]; tok[t] = Σ_b tok_ws[b, t]; trace += Σ dot_ws (one thread).
__global__ void combine_kernel(const float* __restrict__ col_ws, int64_t splits, int64_t cols,
                               float* __restrict__ col, const float* __restrict__ tok_ws,
                               int64_t dblocks, int64_t rows, float* __restrict__ tok,
                               const float* __restrict__ dot_ws, float* __restrict__ trace) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < cols) {
    float s = 0.f;
    for (int64_t p = 0; p < splits; ++p) s += col_ws[p * cols + i];
    col[i] += s;
  }
  if (tok != nullptr && i < rows) {
    float s = 0.f;
    for (int64_t b = 0; b < dblocks; ++b) s += tok_ws[b * rows + i];
    tok[i] = s;
  }
  if (trace != nullptr && i == 0) {
    float s = 0.f;
    for (int64_t p = 0; p < splits * dblocks; ++p) s += dot_ws[p];
    *trace += s;
  }
}

template <typename T>
cudaError_t launch_sq_stats(const T* x, const uint8_t* mask, const float* weights, float* col,
                            float* tok, float* trace, int64_t rows, int64_t cols,
                            int64_t row_stride, int64_t splits, float* workspace,
                            cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const int64_t dblocks = (cols + kCols - 1) / kCols;
  if (splits < 1) splits = 1;
  if (splits > rows) splits = rows;
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  splits = (rows + rows_per_split - 1) / rows_per_split;
  float* col_ws = workspace;
  float* tok_ws = tok != nullptr ? col_ws + splits * cols : nullptr;
  float* dot_ws = weights != nullptr ? col_ws + splits * cols + dblocks * rows : nullptr;
  dim3 grid(static_cast<unsigned>(dblocks), static_cast<unsigned>(splits));
  sq_stats_kernel<T><<<grid, kWarps * 32, 0, stream>>>(x, mask, weights, col_ws, tok_ws, dot_ws,
                                                      rows, cols, row_stride, rows_per_split);
  const int64_t n = cols > rows ? cols : rows;
  const int threads = 256;
  combine_kernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(
      col_ws, splits, cols, col, tok_ws, dblocks, rows, tok, dot_ws,
      weights != nullptr ? trace : nullptr);
  return cudaGetLastError();
}

}  // namespace
}  // namespace slora

// Workspace: (splits·cols + ceil(cols/128)·rows + splits·ceil(cols/128)) floats.
extern "C" int64_t slora_sq_stats_workspace(int64_t rows, int64_t cols, int64_t splits) {
  const int64_t dblocks = (cols + slora::kCols - 1) / slora::kCols;
  return splits * cols + dblocks * rows + splits * dblocks;
}

#define SLORA_SQ_STATS_ENTRY(NAME, TYPE)                                                        \
  extern "C" cudaError_t NAME(const void* x, const uint8_t* mask, const float* weights,          \
                              float* col, float* tok, float* trace, int64_t rows, int64_t cols,  \
                              int64_t row_stride, int64_t splits, float* workspace,              \
                              cudaStream_t stream) {                                             \
    return slora::launch_sq_stats<TYPE>(static_cast<const TYPE*>(x), mask, weights, col, tok,    \
                                        trace, rows, cols, row_stride, splits, workspace,        \
                                        stream);                                                 \
  }

SLORA_SQ_STATS_ENTRY(slora_sq_stats_f32, float)
SLORA_SQ_STATS_ENTRY(slora_sq_stats_f16, __half)
SLORA_SQ_STATS_ENTRY(slora_sq_stats_bf16, __nv_bfloat16)

// Heterogeneous-rank LoRA decode kernel (one token per request, each with its own adapter and
// rank), for the packed layout of slora.kernels.multi_lora.PackedAdapters:
//
//   out[t, col_s + n] += scale[k, s] * sum_j Bt[k, s][j, n] * (A[k, s][j, :] . x[t, :]),
//   k = token_slots[t] (-1 = none), j < ranks[k, s]
//
// One thread block per (token, slice).  Shrink: each warp takes rank rows j = warp, warp + W,
// ... and reduces A[j, :] . x over d_in with shuffles; the r partial results land in shared
// memory.  Expand: threads stride over the slice's output columns, reading Bt rows (row-major
// [r, d_s], so consecutive threads read consecutive addresses).  Only the adapter's true rank
// is read: a rank-8 adapter costs 8 rows whatever the other adapters' ranks.  Accumulation is
// fp32 for fp32 / fp16 / bf16 inputs.
//
// Plain CUDA with an extern "C" launcher (no torch headers): built with
//   nvcc -O3 -arch=sm_90 -shared -Xcompiler -fPIC csrc/multi_lora_decode.cu -o libslora_decode.so
// and called through ctypes with tensors' data_ptr() (slora.kernels.multi_lora.cuda_decode).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ Bt,
                  T* __restrict__ out, const int64_t* __restrict__ token_slots,
                  const int32_t* __restrict__ ranks, const int32_t* __restrict__ a_off,
                  const int64_t* __restrict__ b_off, const float* __restrict__ scales,
                  const int32_t* __restrict__ slice_d_out, const int32_t* __restrict__ slice_col,
                  int64_t d_in, int64_t n_slices, int64_t max_slots, int64_t stride_x,
                  int64_t stride_out) {
  extern __shared__ float h[];  // [max_rank]
  const int64_t t = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t slot = token_slots[t];
  if (slot < 0 || slot >= max_slots) return;  // -1 = base model only; never read out of range
  const int64_t meta = slot * n_slices + s;
  const int r = ranks[meta];
  if (r <= 0) return;
  const float scale = scales[meta];
  const T* xt = x + t * stride_x;
  const T* a = A + static_cast<int64_t>(a_off[meta]) * d_in;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int j = warp; j < r; j += kWarps) {
    const T* row = a + static_cast<int64_t>(j) * d_in;
    float acc = 0.f;
    for (int64_t k = lane; k < d_in; k += 32) acc += to_f(row[k]) * to_f(xt[k]);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) h[j] = acc * scale;
  }
  __syncthreads();

  const int64_t d_s = slice_d_out[s];
  const T* bt = Bt + b_off[meta];
  T* o = out + t * stride_out + slice_col[s];
  for (int64_t n = threadIdx.x; n < d_s; n += kThreads) {
    float acc = 0.f;
    for (int j = 0; j < r; ++j) acc += h[j] * to_f(bt[static_cast<int64_t>(j) * d_s + n]);
    o[n] = from_f<T>(to_f(o[n]) + acc);
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* A, const void* Bt, void* out,
                   const int64_t* token_slots, const int32_t* ranks, const int32_t* a_off,
                   const int64_t* b_off, const float* scales, const int32_t* slice_d_out,
                   const int32_t* slice_col, int64_t T_, int64_t d_in, int64_t n_slices,
                   int64_t max_slots, int64_t stride_x, int64_t stride_out, int max_rank,
                   cudaStream_t stream) {
  if (T_ == 0 || max_rank <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(T_), static_cast<unsigned>(n_slices));
  const size_t smem = sizeof(float) * static_cast<size_t>(max_rank);
  decode_kernel<T><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(A), static_cast<const T*>(Bt),
      static_cast<T*>(out), token_slots, ranks, a_off, b_off, scales, slice_d_out, slice_col,
      d_in, n_slices, max_slots, stride_x, stride_out);
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16.  x, A, Bt and out share the dtype.  Returns a
// cudaError_t (0 = success).  max_rank bounds every ranks[] entry (sizes shared memory).
extern "C" int slora_multi_lora_decode(const void* x, const void* A, const void* Bt, void* out,
                                       const int64_t* token_slots, const int32_t* ranks,
                                       const int32_t* a_off, const int64_t* b_off,
                                       const float* scales, const int32_t* slice_d_out,
                                       const int32_t* slice_col, int64_t num_tokens,
                                       int64_t d_in, int64_t n_slices, int64_t max_slots,
                                       int64_t stride_x, int64_t stride_out, int max_rank,
                                       int dtype, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch<float>(x, A, Bt, out, token_slots, ranks, a_off, b_off, scales, slice_d_out,
                           slice_col, num_tokens, d_in, n_slices, max_slots, stride_x,
                           stride_out, max_rank, st);
    case 1:
      return launch<__half>(x, A, Bt, out, token_slots, ranks, a_off, b_off, scales,
                            slice_d_out, slice_col, num_tokens, d_in, n_slices, max_slots,
                            stride_x, stride_out, max_rank, st);
    case 2:
      return launch<__nv_bfloat16>(x, A, Bt, out, token_slots, ranks, a_off, b_off, scales,
                                   slice_d_out, slice_col, num_tokens, d_in, n_slices,
                                   max_slots, stride_x, stride_out, max_rank, st);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

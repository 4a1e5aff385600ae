// Torch binding of the CUDA reductions in sensitivity_reductions.cu, built only on CUDA machines
// (slora.kernels.native_ops.cuda_reductions) so that the GPU script can run them and compare
// them with the Triton kernels.  The same contract as csrc/sensitivity_cpu.cpp's sq_stats.  The
// caller passes its CUDA stream as an integer (torch.cuda.current_stream().cuda_stream), which
// keeps this file free of torch's CUDA headers (it syntax-checks against a CPU build of torch).
#include <cuda_runtime.h>
#include <torch/extension.h>

extern "C" int64_t slora_sq_stats_workspace(int64_t rows, int64_t cols, int64_t splits);

#define SLORA_SQ_STATS_DECL(NAME)                                                              \
  extern "C" cudaError_t NAME(const void* x, const uint8_t* mask, const float* weights,         \
                              float* col, float* tok, float* trace, int64_t rows, int64_t cols, \
                              int64_t row_stride, int64_t splits, float* workspace,             \
                              cudaStream_t stream);
SLORA_SQ_STATS_DECL(slora_sq_stats_f32)
SLORA_SQ_STATS_DECL(slora_sq_stats_f16)
SLORA_SQ_STATS_DECL(slora_sq_stats_bf16)

namespace {

void sq_stats_cuda(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& mask,
                   torch::Tensor col, const c10::optional<torch::Tensor>& tok,
                   const c10::optional<torch::Tensor>& weights,
                   const c10::optional<torch::Tensor>& trace, int64_t splits,
                   int64_t stream_handle) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.is_cuda(), "x: expected a 2-D CUDA tensor");
  const torch::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  auto check = [&](const torch::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == torch::kFloat32 && t.numel() == n &&
                    t.is_contiguous() && t.device() == x.device(),
                name, ": expected a contiguous float32 tensor with ", n, " elements on ",
                x.device());
  };
  check(col, cols, "col");
  if (tok.has_value()) check(*tok, rows, "token_sq");
  if (weights.has_value()) check(*weights, rows, "weights");
  if (trace.has_value()) check(*trace, 1, "trace");
  TORCH_CHECK(!weights.has_value() || trace.has_value(), "weights need a trace accumulator");
  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->numel() == rows &&
                    mask->is_contiguous() && mask->device() == x.device(),
                "row_mask: expected a contiguous bool tensor with ", rows, " elements");
    mask_ptr = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  }
  if (rows == 0 || cols == 0) {
    if (tok.has_value()) tok->zero_();
    return;
  }
  splits = std::max<int64_t>(1, std::min(splits, rows));
  auto workspace = torch::empty({slora_sq_stats_workspace(rows, cols, splits)},
                                col.options());
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  float* tok_ptr = tok.has_value() ? tok->data_ptr<float>() : nullptr;
  const float* w_ptr = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  float* trace_ptr = trace.has_value() ? trace->data_ptr<float>() : nullptr;
  cudaError_t err;
  switch (x.scalar_type()) {
    case torch::kFloat32:
      err = slora_sq_stats_f32(x.data_ptr(), mask_ptr, w_ptr, col.data_ptr<float>(), tok_ptr,
                               trace_ptr, rows, cols, x.stride(0), splits,
                               workspace.data_ptr<float>(), stream);
      break;
    case torch::kFloat16:
      err = slora_sq_stats_f16(x.data_ptr(), mask_ptr, w_ptr, col.data_ptr<float>(), tok_ptr,
                               trace_ptr, rows, cols, x.stride(0), splits,
                               workspace.data_ptr<float>(), stream);
      break;
    case torch::kBFloat16:
      err = slora_sq_stats_bf16(x.data_ptr(), mask_ptr, w_ptr, col.data_ptr<float>(), tok_ptr,
                                trace_ptr, rows, cols, x.stride(0), splits,
                                workspace.data_ptr<float>(), stream);
      break;
    default:
      TORCH_CHECK(false, "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, "sq_stats launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sq_stats", &sq_stats_cuda, pybind11::arg("x"), pybind11::arg("row_mask"),
        pybind11::arg("col"), pybind11::arg("token_sq"), pybind11::arg("weights"),
        pybind11::arg("trace"), pybind11::arg("splits"), pybind11::arg("stream"),
        "CUDA: col += Σ_t m_t x_t²; token_sq = m_t ‖x_t‖²; trace += Σ_t w_t m_t ‖x_t‖²");
}

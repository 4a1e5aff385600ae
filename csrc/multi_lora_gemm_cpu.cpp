// Grouped LoRA, the GEMM route: one adapter's group of many tokens through ATen's matrix
// multiply (oneDNN for bf16 / fp16, which runs on AMX tiles or AVX512-BF16 dot products where
// the CPU has them, and MKL / oneDNN sgemm for fp32), instead of the fused FMA kernel of
// multi_lora_cpu.cpp.  Per slice: h = x_g A^T (fp32 accumulation, rounded once to x's dtype),
// then out_g += scale * h Bt (fp32 accumulation, one rounding into out).  ATen spreads every
// product over all intra-op threads, by rows and by columns, so one adapter with many tokens
// uses every core.  The caller picks which groups come here (slora/kernels/multi_lora/
// cpp_backend.py: gemm_min_tokens, chosen by measurement per dtype and CPU).
#include "multi_lora_cpu.h"

#include <ATen/core/LegacyTypeDispatch.h>

namespace slora_cpu {

void multi_lora_gemm_group(const torch::Tensor& x, const torch::Tensor& A,
                           const torch::Tensor& Bt, const int64_t* order, int64_t start,
                           int64_t n, const GroupWeights& w, torch::Tensor& out, bool overwrite) {
  // Below autograd and the in-place checks of inference tensors: the op's own kernel, which
  // writes into `out` like the fused kernel does (a server's out may be an inference tensor
  // written outside inference mode; a differentiable call never reaches this in-place form).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  torch::Tensor rows, xg, og;
  if (order != nullptr) {
    rows = torch::from_blob(const_cast<int64_t*>(order + start), {n}, torch::kLong);
    xg = x.index_select(0, rows);
    og = overwrite ? torch::zeros({n, out.size(1)}, out.options()) : out.index_select(0, rows);
  } else {
    xg = x.narrow(0, start, n);
    og = out.narrow(0, start, n);  // a view: the products write into out in place
    if (overwrite) og.zero_();
  }
  for (size_t s = 0; s < w.d_out.size(); ++s) {
    const int64_t r = w.rank[s], d_s = w.d_out[s];
    if (r == 0) continue;
    const torch::Tensor a = A.narrow(0, w.a_off[s], r);                      // [r, d_in]
    const torch::Tensor b = Bt.narrow(0, w.b_off[s], r * d_s).view({r, d_s});  // [r, d_s]
    const torch::Tensor h = at::mm(xg, a.t());
    og.narrow(1, w.col[s], d_s).addmm_(h, b, /*beta=*/1, /*alpha=*/w.scale[s]);
  }
  if (order != nullptr) out.index_copy_(0, rows, og);
}

}  // namespace slora_cpu

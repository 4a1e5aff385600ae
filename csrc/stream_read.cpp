// stream_read: a plain, vectorised read of every byte of a contiguous tensor, the yardstick of
// `slora bench`'s bytes floor (slora/benchmarking.py).  Each thread of the same OpenMP pool the
// kernels use XORs its share of 64-bit words into 32 independent lanes (the compiler turns
// them into four 512-bit accumulators), so the loop is limited by loads, not by a dependency
// chain; the XOR of everything is returned so that no read can be optimised away.
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/extension.h>

#include <cstdint>

namespace {

constexpr int64_t kLanes = 32;

int64_t stream_read(const torch::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(),
              "stream_read: expected a contiguous CPU tensor, got ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
  const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
  TORCH_CHECK(nbytes % (8 * kLanes) == 0, "stream_read: expected a multiple of ", 8 * kLanes,
              " bytes, got ", nbytes);
  const auto* p = static_cast<const uint64_t*>(t.data_ptr());
  const int64_t blocks = nbytes / (8 * kLanes);
  uint64_t total = 0;
#pragma omp parallel num_threads(at::get_num_threads()) reduction(^ : total)
  {
    uint64_t acc[kLanes] = {};
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const uint64_t* q = p + b * kLanes;
      for (int64_t j = 0; j < kLanes; ++j) acc[j] ^= q[j];
    }
    for (int64_t j = 0; j < kLanes; ++j) total ^= acc[j];
  }
  return static_cast<int64_t>(total);
}

}  // namespace

void register_stream_read(pybind11::module_& m) {
  m.def("stream_read", &stream_read, pybind11::arg("t"),
        "XOR of every 64-bit word of a contiguous CPU tensor (a streaming read, for benchmarks)");
}

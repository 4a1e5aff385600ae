// pybind11 module of slora's native ops (the one extension built by slora/kernels/_native.py).
// Each op family's sources define register_<family>(m), which adds its functions; this file
// only gathers them.  CUDA families register inside #ifdef SLORA_WITH_CUDA, which the loader
// defines when it compiles the CUDA sources.
#include <torch/extension.h>

void register_multi_lora(pybind11::module_& m);
void register_sensitivity(pybind11::module_& m);
void register_stream_read(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slora native ops";
  register_multi_lora(m);
  register_sensitivity(m);
  register_stream_read(m);
}

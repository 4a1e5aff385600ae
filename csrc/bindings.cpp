// pybind11 module of slora's native CPU ops.  Each op's .cpp defines a register_* function
// that adds its functions to the module; this file only gathers them.
#include <torch/extension.h>

void register_multi_lora(pybind11::module_& m);
void register_sensitivity(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slora native CPU ops";
  register_multi_lora(m);
  register_sensitivity(m);
}

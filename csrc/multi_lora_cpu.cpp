// Grouped heterogeneous-rank LoRA (shrink + expand) on the CPU.
#include <torch/extension.h>

void register_multi_lora(pybind11::module_& m) {}

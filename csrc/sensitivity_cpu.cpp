// Sensitivity statistics reductions (SPEC §1) on the CPU.
#include <torch/extension.h>

void register_sensitivity(pybind11::module_& m) {}

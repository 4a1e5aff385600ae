"""Calibration statistics of the sensitivity pass, reduced inside the forward and backward pass.

One concern per module (semantics and how to add a backend: docs/kernels.md):

- ``torch_backend``: the plain PyTorch backend and the argument checks;
- ``triton_backend``: the Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
  ``cpp_backend``: the C++ reductions of ``csrc/sensitivity_cpu.cpp``;
- ``library``: the ``torch.library`` ops ``slora::input_stats``, ``slora::grad_stats`` and
  ``slora::fisher_exact``, with fake implementations and declared mutations.
"""

from slora.kernels.sensitivity import library  # noqa: F401 - registers the ops

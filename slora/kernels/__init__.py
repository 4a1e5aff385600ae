"""Kernels: one file per op, each with its Triton kernel(s), launch wrapper, autograd Function
(if any) and the plain PyTorch reference it is tested against.  Kernels know nothing about
models, plans or PEFT; ``slora.ops`` picks the backend."""

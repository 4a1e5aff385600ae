"""Kernels by op family (``multi_lora/``, ``sensitivity/``): reference implementations,
Triton and native backends, and their ``torch.library`` registrations.  Kernels know nothing
about models, plans or PEFT; ``slora.ops`` is the public surface over them (docs/kernels.md)."""

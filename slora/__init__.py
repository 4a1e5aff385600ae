"""slora: Sensitivity-LoRA rank allocation and fast heterogeneous-rank LoRA kernels."""

from slora import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]

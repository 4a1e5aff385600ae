"""slora: Sensitivity-LoRA rank allocation and fast heterogeneous-rank LoRA kernels.

report = slora.analyze(model, batches)           # per-matrix sensitivity
plan = slora.allocate(report, avg_rank=8)        # one rank per matrix
model = slora.patch(model, plan)                 # LoRA with those ranks, base frozen
slora.save_adapter(model, "adapter/")            # PEFT format
"""

from slora import ops
from slora._version import __version__
from slora.core.allocation import RankPlan, allocate
from slora.core.analysis import analyze
from slora.core.patch import merge, patch, unpatch
from slora.core.peft_io import load_adapter, save_adapter
from slora.core.pool import AdapterPool
from slora.core.report import SensitivityReport

__all__ = [
    "AdapterPool",
    "RankPlan",
    "SensitivityReport",
    "allocate",
    "analyze",
    "load_adapter",
    "merge",
    "ops",
    "patch",
    "save_adapter",
    "unpatch",
    "__version__",
]

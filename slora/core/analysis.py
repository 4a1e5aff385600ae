"""``slora.analyze``: one calibration pass that reduces per-matrix sensitivity statistics.

Forward hooks on every target matrix reduce its input x to Σ_t x_t² (per column) and ‖x_t‖²
(per token) at once, so the layer input is not kept alive for the backward.  For the
gradient-based estimators each target output gets a tensor hook that reduces dy = ∂L/∂y to
Σ_t dy_t² and the exact trace term Σ_t‖dy_t‖²‖x_t‖² when the backward reaches it.  The
weights stay frozen: no weight gradient is ever formed.  Reductions go through ``slora.ops``,
so the fastest backend for the device runs them.

Quantized bases (QLoRA) cost the same: ``activation`` and ``fisher`` read only x and dy, so a
4-bit weight is never dequantized beyond what its own forward/backward does, and memory stays
O(d_in + d_out) per matrix.  ``fisher_exact`` alone keeps a float32 [d_out, d_in] accumulator
per matrix (8× a 4-bit weight) and each layer input until the backward.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from slora import ops
from slora.core import quantized
from slora.core.batches import (
    call_model,
    checked_stats,
    default_loss,
    device_of,
    join_anchor,
    move_to,
    padding_mask,
    progress_bar,
    refuse_inference_parameters,
)
from slora.core.checks import whole_number
from slora.core.metrics import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    MatrixStats,
    combine,
    matrix_metrics,
)
from slora.core.report import SensitivityReport
from slora.core.targets import find_targets, linear_dims
from slora.core.wrappers import drop_bypassed, keep_forward_called, unwrap

LossFn = Callable[[nn.Module, Any], Tensor]


class _MatrixCollector:
    """Accumulates the statistics of one target matrix, batch by batch."""

    def __init__(self, module: nn.Module, estimator: str, device: torch.device):
        self.d_in, self.d_out = linear_dims(module)
        self.estimator = estimator
        f32 = dict(dtype=torch.float32, device=device)
        self.calls = self.hooked = self.fired = 0  # this batch's forwards / dy hooks
        self.ever_hooked = self.ever_fired = False
        self.total = MatrixStats(self.d_in, self.d_out, torch.zeros(self.d_in, **f32))
        self.batch = MatrixStats(self.d_in, self.d_out, torch.zeros(self.d_in, **f32))
        if estimator != "activation":
            for s in (self.total, self.batch):
                s.row_sq = torch.zeros(self.d_out, **f32)
                s.trace = torch.zeros(1, **f32)
                if estimator == "fisher_exact":
                    s.diag = torch.zeros(self.d_out, self.d_in, **f32)

    def buffers(self, stats: MatrixStats) -> list[Tensor]:
        return [t for t in (stats.col_sq, stats.row_sq, stats.trace, stats.diag) if t is not None]

    def reset_batch(self) -> None:
        for t in self.buffers(self.batch):
            t.zero_()
        self.batch.tokens = 0
        self.calls = self.hooked = self.fired = 0

    def commit_batch(self) -> None:
        for total, part in zip(self.buffers(self.total), self.buffers(self.batch)):
            total += part
        self.total.tokens += self.batch.tokens
        self.ever_hooked |= self.hooked > 0
        self.ever_fired |= self.fired > 0

    def batch_checksum(self) -> Tensor:
        return sum(t.double().sum() for t in self.buffers(self.batch))


class _Calibration:
    """Hooks on the target matrices for the duration of one ``analyze`` call."""

    def __init__(self, targets: dict[str, nn.Module], estimator: str, backend: str | None):
        self.targets = targets
        self.estimator = estimator
        self.backend = backend
        self.collectors = {
            name: _MatrixCollector(mod, estimator, device_of(mod)) for name, mod in targets.items()
        }
        self.mask: Tensor | None = None  # bool, shape of the batch's leading dims
        self.mask_flat: Tensor | None = None
        self.mask_tokens = 0
        self.anchor: Tensor | None = None
        self.last_input: tuple | None = None  # (x, version, Σx² of that call, ‖x_t‖²)

    def set_batch(self, batch: Any, device: torch.device) -> int:
        """Record the batch's padding mask; returns its number of real tokens (-1: no mask)."""
        mask = padding_mask(batch)
        self.last_input = None
        for c in self.collectors.values():
            c.reset_batch()
        if mask is None:
            self.mask = self.mask_flat = None
            return -1
        self.mask = mask.to(device=device).bool()
        self.mask_tokens = int(self.mask.sum())
        all_real = self.mask_tokens == self.mask.numel()
        self.mask_flat = None if all_real else self.mask.reshape(-1)
        return self.mask_tokens

    def _row_mask(self, x: Tensor) -> tuple[Tensor | None, int]:
        lead = x.shape[:-1]
        if self.mask is not None and lead == self.mask.shape:
            return self.mask_flat, self.mask_tokens
        return None, lead.numel()

    def forward_hook(self, name: str):
        collector = self.collectors[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            x2 = x.detach().reshape(-1, collector.d_in)
            row_mask, tokens = self._row_mask(x)
            if torch._C._current_graph_task_id() != -1:
                # Inside the backward: activation checkpointing recomputes this forward.  Its
                # input was counted in the first pass; its dy is hooked once per first-pass
                # call (here only when the first pass ran without gradients: reentrant).
                if (
                    self.estimator == "activation"
                    or not torch.is_grad_enabled()
                    or collector.hooked >= collector.calls
                ):
                    return None
                scratch = torch.zeros_like(collector.batch.col_sq)
                x_token_sq = ops.accumulate_input_stats(x2, row_mask, scratch, self.backend)
            else:
                collector.calls += 1
                collector.batch.tokens += tokens
                x_token_sq = self.input_stats(x, x2, row_mask, collector.batch.col_sq)
                if self.estimator == "activation" or not torch.is_grad_enabled():
                    return None
            collector.hooked += 1
            if not output.requires_grad:
                # The frozen model before this layer gives nothing to differentiate: join the
                # graph through a zero scalar so that dy still reaches this layer's hook.
                output = output + self.anchor
            saved_x = x2 if self.estimator == "fisher_exact" else None

            def grad_hook(dy: Tensor) -> None:
                collector.fired += 1
                dy2 = dy.detach().reshape(-1, collector.d_out)
                stats = collector.batch
                ops.accumulate_grad_stats(
                    dy2, row_mask, x_token_sq, stats.row_sq, stats.trace, backend=self.backend
                )
                if saved_x is not None:
                    ops.accumulate_fisher_exact(
                        dy2, saved_x, row_mask, stats.diag, backend=self.backend
                    )

            output.register_hook(grad_hook)
            return output

        return hook

    def input_stats(self, x: Tensor, x2: Tensor, row_mask: Tensor | None, col_sq: Tensor):
        """Accumulate Σ x² into ``col_sq`` and return ‖x_t‖²; modules reading the same input
        tensor (q/k/v, gate/up) reuse the reduction of the first one."""
        last = self.last_input
        if x.is_inference():  # no version counter: an in-place change would go unseen
            last = self.last_input = None
        elif last is not None and last[0] is x and last[1] == x._version:
            col_sq += last[2]
            return last[3]
        partial = torch.zeros_like(col_sq)
        token_sq = ops.accumulate_input_stats(x2, row_mask, partial, backend=self.backend)
        col_sq += partial
        if not x.is_inference():
            self.last_input = (x, x._version, partial, token_sq)
        return token_sq

    def batch_is_finite(self) -> bool:
        checks = [c.batch_checksum() for c in self.collectors.values()]
        return bool(torch.isfinite(torch.stack([c.cpu() for c in checks])).all())


def analyze(
    model: nn.Module,
    data: Iterable[Any],
    estimator: str = DEFAULT_ESTIMATOR,
    target_modules: Sequence[str] | str | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    *,
    topk_frac: float = 0.5,
    alpha: float = 0.85,
    backend: str | None = None,
) -> SensitivityReport:
    """Estimate every target matrix's sensitivity over calibration batches (docs/method.md).

    The model comes back as it went in: hooks removed, ``requires_grad`` and train/eval mode
    restored; its weights never receive a gradient.  Batches whose loss or gradients are not
    finite are skipped with a warning.

    Memory per target matrix: O(d_in + d_out) for ``activation`` and ``fisher``;
    ``fisher_exact`` adds a float32 [d_out, d_in] accumulator (4·d_in·d_out bytes, the size of
    an fp32 copy of the weight) and keeps each layer input until the backward — on a quantized
    base it warns with the total.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if not 0.0 < topk_frac <= 1.0:
        raise ValueError(f"topk_frac must be in (0, 1], got {topk_frac}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if max_batches is not None:
        max_batches = whole_number("max_batches", max_batches, minimum=1)
    if isinstance(data, (Tensor, Mapping)):
        raise TypeError(
            "data must be an iterable of batches (e.g. a list of dicts or a DataLoader), "
            f"not a single {type(data).__name__}; wrap it in a list"
        )
    model = unwrap(model)  # torch.compile / DataParallel / DDP: hooks on the modules that run
    targets = find_targets(model, target_modules)
    targets = drop_bypassed(model, targets, target_modules is not None, "analyze")
    if estimator == "fisher_exact" and any(quantized.is_quantized(m) for m in targets.values()):
        mib = sum(4 * d_in * d_out for d_in, d_out in map(linear_dims, targets.values())) / 2**20
        warnings.warn(
            f"slora.analyze: estimator='fisher_exact' allocates {mib:.1f} MiB of float32 "
            "[d_out, d_in] accumulators for this quantized model (8x its 4-bit weights); "
            "'fisher' and 'activation' need O(d_in + d_out) per matrix",
            UserWarning,
            stacklevel=2,
        )
    refuse_inference_parameters(model, estimator)
    device = device_of(model)
    forward_only = loss_fn or call_model
    loss_fn = loss_fn or default_loss
    with torch.inference_mode(False):  # ordinary tensors, written in either mode
        calib = _Calibration(targets, estimator, backend)
        calib.anchor = torch.zeros((), device=device, requires_grad=True)
    was_training = model.training
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    total_batches = len(data) if hasattr(data, "__len__") else None
    if max_batches is not None and total_batches is not None:
        total_batches = min(total_batches, max_batches)
    num_tokens, used, skipped, empty = 0, 0, 0, 0
    with ExitStack() as stack:
        stack.callback(model.train, was_training)
        stack.callback(lambda: [p.requires_grad_(f) for p, f in grad_flags.items()])
        stack.callback(quantized.keep_model_gradients(model))
        for name, module in targets.items():
            handle = module.register_forward_hook(calib.forward_hook(name), with_kwargs=True)
            stack.callback(handle.remove)
        for undo in keep_forward_called(model, list(targets)):
            stack.callback(undo)
        if estimator != "activation":
            # Autograd is needed whatever the caller's mode (torch.no_grad(), inference_mode).
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for module in model.modules():  # dy must reach layers inside reentrant checkpoints
                if isinstance(module, nn.Embedding):
                    handle = module.register_forward_hook(join_anchor(calib))
                    stack.callback(handle.remove)
        model.eval()
        for p in grad_flags:
            p.requires_grad_(False)
        batches = data if max_batches is None else itertools.islice(data, max_batches)
        for i, batch in enumerate(
            progress_bar(batches, total_batches, progress, "slora calibration")
        ):
            batch = move_to(batch, device)
            real_tokens = calib.set_batch(batch, device)
            if real_tokens == 0:
                empty += 1
                continue
            if estimator == "activation":
                with torch.no_grad():
                    forward_only(model, batch)
                ok = calib.batch_is_finite()
            else:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError(
                        f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
                    )
                if not loss.requires_grad:
                    raise ValueError(
                        "slora.analyze: the loss does not require grad, so no gradient can "
                        f"reach the target modules (estimator={estimator!r} needs one): it was "
                        "computed without gradients (under torch.no_grad() or "
                        "torch.inference_mode() inside loss_fn, or detached), or it does not "
                        "depend on any target module. Return a loss computed with gradients, "
                        "or use estimator='activation', which needs none"
                    )
                ok = bool(torch.isfinite(loss.detach()))
                if ok:
                    loss.backward()
                    ok = calib.batch_is_finite()
                calib.anchor.grad = None
            if not ok:
                skipped += 1
                warnings.warn(
                    f"slora.analyze: calibration batch {i} has a non-finite loss, activation or "
                    "gradient; it was skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            for c in calib.collectors.values():
                c.commit_batch()
            used += 1
            num_tokens += real_tokens if real_tokens > 0 else 0
    counts = torch.tensor([num_tokens, used, skipped, empty], dtype=torch.float64)
    if _distributed():
        _all_reduce_stats(calib, counts, device)
        num_tokens, used, skipped, empty = (int(v) for v in counts.tolist())
    if used == 0:
        reason = (
            f"{skipped} batch(es) had non-finite values and {empty} were all padding"
            if skipped or empty
            else "the calibration data is empty"
        )
        raise ValueError(f"slora.analyze: no usable calibration batch: {reason}")
    stats = checked_stats(calib, estimator)
    if num_tokens == 0:
        num_tokens = max(s.tokens for s in stats.values())
    return build_report(estimator, num_tokens, stats, topk_frac=topk_frac, alpha=alpha)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_stats(calib: _Calibration, counts: Tensor, device: torch.device) -> None:
    """Sum every rank's statistics and counts (one flat all-reduce), so each rank's report is
    the report of the union of all ranks' calibration data."""
    import torch.distributed as dist

    parts = []
    for c in calib.collectors.values():
        parts += c.buffers(c.total)
        parts.append(torch.tensor([float(c.total.tokens)], device=device))
    parts.append(counts.to(device=device, dtype=torch.float32))
    flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in parts])
    dist.all_reduce(flat)
    offset = 0
    for c in calib.collectors.values():
        for buf in c.buffers(c.total):
            buf.copy_(flat[offset : offset + buf.numel()].view_as(buf))
            offset += buf.numel()
        c.total.tokens = int(flat[offset])
        offset += 1
    counts.copy_(flat[offset : offset + counts.numel()].cpu())


def build_report(
    estimator: str,
    num_tokens: int,
    stats: dict[str, MatrixStats],
    topk_frac: float = 0.5,
    alpha: float = 0.85,
) -> SensitivityReport:
    """Metrics per matrix, then their combination into scores (docs/method.md)."""
    metrics = {name: matrix_metrics(estimator, s, topk_frac, alpha) for name, s in stats.items()}
    combined = combine(metrics)
    modules = {
        name: {"d_in": stats[name].d_in, "d_out": stats[name].d_out, **combined[name]}
        for name in stats
    }
    return SensitivityReport(estimator, int(num_tokens), modules)

"""Quantized base layers (QLoRA): everything slora needs to know about them, in one place.

A base layer is *quantized* when its stored weight is not a plain float tensor: bitsandbytes
``Linear4bit`` (nf4 / fp4, with or without double quantization) and ``Linear8bitLt`` store
uint8 / int8, torchao keeps a tensor subclass, GPTQ/AWQ-style layers keep an integer
``qweight``.  LoRA runs on the layer's input and output, so training, analysis and serving need
only (d_in, d_out) and the dtype the layer computes in; the weight itself is read only by
``merge(dequantize=True)``, which builds the dense weight once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

SUPPORTED = (
    "nn.Linear or a subclass (bitsandbytes Linear4bit nf4/fp4 and Linear8bitLt, torchao-"
    "quantized weights), transformers Conv1D, or a quantized linear layer exposing integer "
    "in_features/out_features"
)
_HALF = (torch.float16, torch.bfloat16)


def stored_weight(module: nn.Module) -> Tensor | None:
    """The tensor a linear-like layer stores its weight in (``weight``, else ``qweight``)."""
    for attr in ("weight", "qweight"):
        w = getattr(module, attr, None)
        if isinstance(w, Tensor):
            return w
    return None


def is_quantized(module: nn.Module) -> bool:
    """True when the stored weight is integer-typed or a non-Parameter tensor subclass
    (torchao), i.e. it cannot be updated in place by adding a float delta."""
    w = stored_weight(module)
    if w is None:
        return False
    if not (w.dtype.is_floating_point or w.dtype.is_complex):
        return True
    return type(w) is not Tensor and not isinstance(w, nn.Parameter)


def plain_linear_with_integer_weight(module: nn.Module) -> bool:
    """An nn.Linear whose forward is the float ``F.linear`` but whose weight is not float: not a
    quantized layer (those override forward), just a weight of the wrong dtype."""
    w = stored_weight(module)
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and w is not None
        and not w.is_floating_point()
    )


def has_linear_dims(module: nn.Module) -> bool:
    dims = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)


def is_quantized_linear(module: nn.Module) -> bool:
    """A quantized layer that is not an nn.Linear but exposes in_features/out_features
    (e.g. GPTQ/AWQ QuantLinear): adaptable like a linear layer."""
    return not isinstance(module, nn.Linear) and is_quantized(module) and has_linear_dims(module)


def unsupported_message(name: str, module: nn.Module) -> str:
    """Why ``module`` cannot be a LoRA base layer, naming its type and what is supported."""
    cls = type(module)
    w = stored_weight(module)
    storage = f"{type(w).__name__} of dtype {w.dtype}" if w is not None else "no weight tensor"
    why = (
        "its weight is stored quantized and it exposes no integer in_features/out_features"
        if is_quantized(module)
        else "it is not a linear layer"
    )
    return (
        f"module {name!r} is a {cls.__module__}.{cls.__qualname__} ({storage}): slora cannot "
        f"put a LoRA adapter on it because {why}; expected {SUPPORTED}"
    )


def looks_like_unsupported_linear(module: nn.Module) -> bool:
    """A quantized module named like a linear layer that slora cannot adapt (raised about,
    rather than silently skipped, when targets are chosen automatically)."""
    return (
        "linear" in type(module).__name__.lower()
        and is_quantized(module)
        and not isinstance(module, nn.Linear)
        and not has_linear_dims(module)
    )


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the layer computes in: a float weight's dtype, bitsandbytes'
    ``compute_dtype``, a torchao subclass's nominal dtype, else the bias dtype, else fp32."""
    w = stored_weight(module)
    if w is not None and w.dtype.is_floating_point:
        return w.dtype
    declared = getattr(module, "compute_dtype", None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias.dtype.is_floating_point:
        return bias.dtype
    return torch.float32


def check_adapter_dtype(dtype: object) -> torch.dtype:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"adapter_dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def adapter_dtype(module: nn.Module, requested: torch.dtype | None = None) -> torch.dtype:
    """dtype of the LoRA A/B of ``module``: ``requested`` if given, else the layer's compute
    dtype with fp16/bf16 promoted to fp32 (as PEFT does, for stable training) — never the
    storage dtype of a quantized weight."""
    if requested is not None:
        return check_adapter_dtype(requested)
    dtype = compute_dtype(module)
    return torch.float32 if dtype in _HALF else dtype


def device_of(module: nn.Module) -> torch.device:
    w = stored_weight(module)
    if w is not None:
        return w.device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def can_dequantize(module: nn.Module) -> bool:
    """Whether :func:`dequantized_weight` knows this layer's storage."""
    w = stored_weight(module)
    if w is None:
        return False
    if type(w).__name__ in ("Params4bit", "Int8Params"):
        return True
    return callable(getattr(w, "dequantize", None)) and type(w) is not Tensor


def dequantized_weight(module: nn.Module) -> Tensor:
    """The dense [d_out, d_in] float32 weight the quantized layer applies (reads it once)."""
    w = stored_weight(module)
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        keep_gradients(module)  # bitsandbytes' CPU inference layout is not dequantizable
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "Int8Params":
        import bitsandbytes as bnb

        state = getattr(module, "state", None)
        scb = getattr(state, "SCB", None)
        scb = scb if scb is not None else getattr(w, "SCB", None)
        if scb is None:
            raise ValueError(f"{type(module).__name__}: int8 weight without scales (SCB)")
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device)).float()
    if can_dequantize(module):
        return w.dequantize().float()
    raise TypeError(
        f"cannot dequantize the weight of {type(module).__name__} ({kind}, {w.dtype}); "
        "merge its adapter on a float copy of the base model instead"
    )


def dense_copy(module: nn.Module) -> nn.Linear:
    """A float nn.Linear (compute dtype) equal to the quantized ``module``'s dequantized
    weight and bias."""
    d_in, d_out = module.in_features, module.out_features
    bias = getattr(module, "bias", None)
    dtype, device = compute_dtype(module), device_of(module)
    dense = nn.Linear(d_in, d_out, bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(dequantized_weight(module))
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.requires_grad_(False)


def keep_gradients(module: nn.Module) -> Callable[[], None]:
    """Keep ``module``'s input gradient correct; returns a function that undoes the setting.

    On CPUs with AVX512-BF16, bitsandbytes (≥ 0.49) repacks a 4-bit weight for a faster
    kernel at the first eval-mode forward whose input needs no gradient; from then on every
    forward uses that kernel, which has no backward (input gradients are silently dropped)
    and bf16 block scales.  This restores bitsandbytes' standard layout and switches the
    repacking off for the module.
    """
    if not hasattr(module, "support_avx512bf16_for_cpu"):
        return lambda: None
    previous = module.support_avx512bf16_for_cpu
    module.support_avx512bf16_for_cpu = False
    w = module.weight
    if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        if not state.nested and state.absmax.dim() == 2:
            # bitsandbytes 0.50 leaves unnested block scales in the packed [blocks, rows] layout
            state.absmax = state.absmax.t().reshape(-1).float()
        w.data, w.quant_state = data, state

    def restore() -> None:
        module.support_avx512bf16_for_cpu = previous

    return restore


def keep_model_gradients(model: nn.Module) -> Callable[[], None]:
    """:func:`keep_gradients` on every module of ``model``; returns one undo function."""
    undo = [keep_gradients(m) for m in model.modules()]
    return lambda: [u() for u in reversed(undo)] and None


def check_merge(layers: dict[str, nn.Module], dequantize: bool) -> None:
    """Refuse merging adapters into quantized base weights unless ``dequantize`` (see merge)."""
    stuck = [n for n, m in layers.items() if is_quantized(m.base_layer)]
    if stuck and not dequantize:
        kinds = sorted({type(layers[n].base_layer).__name__ for n in stuck})
        raise ValueError(
            f"{len(stuck)} adapted layers have quantized base weights ({', '.join(kinds)}; e.g. "
            f"{stuck[0]!r}) that cannot take the LoRA update in place: requantizing would round "
            "most of it away. Call slora.merge(model, dequantize=True) to turn them into float "
            "nn.Linear layers holding dequant(W) + B A, or merge on a float copy of the base."
        )
    opaque = [n for n in stuck if not can_dequantize(layers[n].base_layer)]
    if opaque:
        kind = type(layers[opaque[0]].base_layer).__name__
        raise TypeError(
            f"slora cannot dequantize {kind} (e.g. {opaque[0]!r}) to merge its adapter; merge "
            "on a float copy of the base model instead (slora.load_adapter, then slora.merge)"
        )

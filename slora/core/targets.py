"""Which modules of a model get sensitivity statistics and adapters (one matching helper)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from slora.core.quantized import (
    is_quantized,
    is_quantized_linear,
    looks_like_unsupported_linear,
    unsupported_message,
)

# Default targets leave out the modules a task head owns or dominates, by the role their name
# says, one name component at a time (PEFT's per-architecture defaults never target them):
# - output heads and classifiers, and everything under them (RoBERTa's ``classifier.dense``,
#   BERT's MLM ``cls.*``, BART's ``classification_head.*``, GPT-2's ``*_head.summary``);
# - poolers and pre-classifiers (BERT's ``pooler.dense``, DistilBERT's ``pre_classifier``):
#   their output feeds only the head, so next to a freshly initialised head their gradient
#   statistics are that head's, orders of magnitude above the body's, and would take the budget.
HEAD_NAMES = frozenset(
    {
        "lm_head", "classifier", "pre_classifier", "score", "qa_outputs", "cls", "head",
        "heads", "output_projection", "pooler", "sequence_summary", "summary",
    }
)  # fmt: skip
HEAD_SUFFIXES = ("_head", "_heads", "_classifier", "_pooler")


def is_head_name(name: str) -> bool:
    """True if a component of the dotted ``name`` names a head, classifier or pooler
    (:data:`HEAD_NAMES`, or ends in one of :data:`HEAD_SUFFIXES`): not a default target."""
    return any(part in HEAD_NAMES or part.endswith(HEAD_SUFFIXES) for part in name.split("."))


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's transposed linear: weight stored [d_in, d_out])."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (quantized subclasses included), Conv1D, or a quantized linear layer that
    exposes in_features/out_features (see :mod:`slora.core.quantized`)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like module (never read from a quantized weight's shape)."""
    if not is_conv1d(module):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores [d_in, d_out]
    return int(d_in), int(d_out)


def _unsupported_quantized(module: nn.Module) -> bool:
    return is_quantized(module) and not isinstance(module, nn.Embedding)


def _head_modules(model: nn.Module) -> set[int]:
    heads: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError
            out = None
        if out is not None:
            heads.add(id(out))
    return heads


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _regex_problem(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f" and is not a valid regular expression ({exc})"
    return ""


def find_targets(
    model: nn.Module, target_modules: Sequence[str] | str | None = None
) -> dict[str, nn.Module]:
    """Linear-like modules to analyse/patch, by name, in model order.

    ``None`` selects every nn.Linear / Conv1D except the output embeddings and the modules
    named as heads, classifiers or poolers (:func:`is_head_name`).  Otherwise
    each entry is an exact name, a suffix (``"query"`` matches ``…attention.self.query``) or a
    regular expression matched against the full name; every entry must match at least one
    linear-like module.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    linears = {name: mod for name, mod in model.named_modules() if name and is_linear_like(mod)}
    if target_modules is None:
        for name, mod in model.named_modules():
            if looks_like_unsupported_linear(mod):
                raise TypeError(unsupported_message(name, mod))
        heads = _head_modules(model)
        found = {
            name: mod
            for name, mod in linears.items()
            if id(mod) not in heads and not is_head_name(name)
        }
        if not found:
            raise ValueError(
                f"no target module found: {type(model).__name__} has no nn.Linear or Conv1D "
                "outside its heads, classifiers and poolers; pass target_modules= explicitly"
            )
        return found
    patterns = list(target_modules)
    if not patterns:
        raise ValueError("target_modules is an empty list; expected names, suffixes or regexes")
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f"target_modules entries must be non-empty strings (names, suffixes or "
                f"regular expressions), got {pattern!r}"
            )
    found: dict[str, nn.Module] = {}
    modules = dict(model.named_modules())
    for pattern in patterns:
        hits = [name for name in linears if _matches(pattern, name)]
        others = [n for n in modules if n and n not in linears and _matches(pattern, n)]
        stuck = [n for n in others if _unsupported_quantized(modules[n])]
        if stuck:  # a quantized layer slora cannot adapt: say so rather than skip it
            raise TypeError(unsupported_message(stuck[0], model.get_submodule(stuck[0])))
        if not hits:
            detail = (
                f"it matches only non-linear modules ({', '.join(others[:3])})"
                if others
                else "it matches no module name" + _regex_problem(pattern)
            )
            raise ValueError(
                f"target_modules pattern {pattern!r} matches no nn.Linear/Conv1D module: {detail}. "
                f"Linear modules look like: {', '.join(list(linears)[:4])}"
            )
        found.update((name, linears[name]) for name in hits)
    return {name: found[name] for name in linears if name in found}


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """For every parameter that shares its storage with another one (``lm_head.weight`` tied
    to the input embeddings), the names of the others."""
    by_storage: dict[tuple, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.numel() == 0 or param.device.type == "meta":
            continue
        key = (param.device, param.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append(name)
    return {
        name: [other for other in names if other != name]
        for names in by_storage.values()
        if len(names) > 1
        for name in names
    }

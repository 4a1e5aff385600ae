"""Target module selection."""

import pytest
from tiny_models import MODELS

from slora.core.targets import find_targets


def test_default_targets_exclude_heads():
    bert = find_targets(MODELS["bert"]())
    assert "classifier" not in bert and "bert.pooler.dense" in bert
    assert len(bert) == 2 * 6 + 1
    llama = find_targets(MODELS["llama"]())
    assert "lm_head" not in llama and len(llama) == 2 * 7
    gpt2 = find_targets(MODELS["gpt2"]())  # Conv1D layers; lm_head is tied and excluded
    assert all(n.startswith("transformer.h.") for n in gpt2) and len(gpt2) == 2 * 4


def test_names_suffixes_and_regexes():
    model = MODELS["llama"]()
    assert list(find_targets(model, ["q_proj"])) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert list(find_targets(model, ["model.layers.1.mlp.up_proj"])) == [
        "model.layers.1.mlp.up_proj"
    ]
    assert len(find_targets(model, [r".*\.(gate|up)_proj"])) == 4
    assert list(find_targets(model, "lm_head")) == ["lm_head"]  # explicit names win


@pytest.mark.parametrize(
    "patterns,match",
    [(["q_projj"], "matches no module name"), (["mlp"], "only non-linear"), ([], "empty list")],
)
def test_pattern_errors(patterns, match):
    with pytest.raises(ValueError, match=match):
        find_targets(MODELS["llama"](), patterns)

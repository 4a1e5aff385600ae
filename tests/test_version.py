"""slora's version is written once, in pyproject.toml."""

from importlib import metadata
from pathlib import Path

import tomllib

import slora
from slora import _version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_version_is_pyprojects():
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert slora.__version__ == declared


def test_source_tree_without_install_reads_pyproject(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert _version.version() == declared
    monkeypatch.setattr(_version, "_from_pyproject", lambda: None)
    assert _version.version() == "0+unknown"

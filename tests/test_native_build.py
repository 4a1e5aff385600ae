"""The JIT build of the native ops announces itself once, only when it really builds, and
records what happened (``slora env`` prints it).  torch's ``load`` is replaced by a stand-in
that writes the library file, so no compiler runs here."""

from __future__ import annotations

import os
import types

import pytest
import torch.utils.cpp_extension

from slora.kernels import _native


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """A stand-in for torch's ``load`` that 'builds' (like ninja: when the library is missing or
    older than a source) by writing NAME.so; counts its builds.  Sources: a copy of csrc/."""
    import shutil

    src = tmp_path / "csrc"
    shutil.copytree(_native.csrc_dir(), src)
    monkeypatch.setattr(_native, "csrc_dir", lambda: src)
    monkeypatch.setenv("SLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SLORA_NO_NATIVE", raising=False)
    monkeypatch.setattr(_native, "status", {})
    builds: list[str] = []

    def load(name, sources, build_directory, **_):
        lib = os.path.join(build_directory, f"{name}.so")
        if not os.path.exists(lib) or os.path.getmtime(lib) < max(map(os.path.getmtime, sources)):
            builds.append(name)
            open(lib, "w").close()
        return types.ModuleType(name)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    _native.extension.cache_clear()
    yield builds
    _native.extension.cache_clear()


def test_a_build_is_announced_once_and_a_cached_load_is_silent(fake_build, capsys):
    assert _native.extension() is not None
    (name,) = fake_build
    err = capsys.readouterr().err
    assert err.count(f"building the native C++ ops '{name}'") == 1 and "built in" in err
    assert "cached in" in err
    assert _native.status[name].startswith("built now")
    _native.extension()  # same process: functools.cache, nothing printed
    assert capsys.readouterr().err == ""
    _native.extension.cache_clear()  # a later process: the library is cached
    _native.extension()
    assert capsys.readouterr().err == "" and fake_build == [name]
    assert _native.status[name].startswith("cached")


def test_changed_sources_are_rebuilt_and_announced(fake_build, capsys):
    _native.extension()
    (name,) = fake_build
    lib = _native.cache_dir(name) / f"{name}.so"
    source = _native.csrc_dir() / "bindings.cpp"
    os.utime(source, ns=(lib.stat().st_mtime_ns + 10**9,) * 2)  # edited after the build
    _native.extension.cache_clear()
    _native.extension()
    assert capsys.readouterr().err.count(f"building the native C++ ops '{name}'") == 2
    assert fake_build == [name, name]


def test_a_failed_build_warns_once_and_records_the_reason(fake_build, monkeypatch):
    def broken(**_):
        raise OSError("no compiler here\nsecond line")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda *a, **k: broken())
    monkeypatch.setattr(_native, "_warned", False)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"):
        assert _native.extension() is None
    assert list(_native.status.values()) == ["failed: OSError: no compiler here"]


def test_disabled_native_ops_are_reported(fake_build, monkeypatch, capsys):
    monkeypatch.setenv("SLORA_NO_NATIVE", "1")
    assert _native.extension() is None
    assert list(_native.status.values()) == ["disabled (SLORA_NO_NATIVE)"] and fake_build == []
    assert capsys.readouterr().err == ""


def test_cache_dirs_differ_per_torch_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SLORA_CACHE", str(tmp_path))
    here = _native.cache_dir("x")
    monkeypatch.setattr(_native.torch, "__file__", str(tmp_path / "venv" / "torch" / "__init__.py"))
    there = _native.cache_dir("x")
    assert here != there and here.parent.name.startswith("torch-") and here.name == "x"


def test_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-way leaves torch's lock file, and every later process would wait on
    it forever: one older than any build is removed, a recent one (a build running now) kept."""
    import os
    import time

    from slora.kernels import _native

    lock = tmp_path / "lock"
    lock.touch()
    assert not _native.clear_stale_lock(tmp_path) and lock.exists()
    old = time.time() - _native.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert _native.clear_stale_lock(tmp_path) and not lock.exists()
    assert not _native.clear_stale_lock(tmp_path)  # nothing to remove

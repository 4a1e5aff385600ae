"""The package's shape: dependencies run one way (commands and integrations → slora.core →
slora.ops → slora.kernels and csrc/) with no import cycles, imports inside functions included
(import-linter's contracts in pyproject.toml), no file in slora/ is over ~400 lines, and nothing
points readers to documents that are not in the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "slora"
MAX_LINES = 400
# Files allowed over MAX_LINES, each with the reason; keep this empty.
OVER_LIMIT: dict[str, str] = {
    # AdapterPool: loading/eviction and the serving hooks are to be split into two modules.
    "slora/core/pool.py": "424 lines",
}
LINT_IMPORTS = shutil.which("lint-imports")
needs_import_linter = pytest.mark.skipif(
    LINT_IMPORTS is None, reason="import-linter is not installed (pip install import-linter)"
)


def _lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@needs_import_linter
def test_import_contracts_are_kept():
    # layers, kernels only through slora.ops, independent op families, no cycles at any depth
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@needs_import_linter
def test_import_contracts_see_imports_inside_functions(tmp_path):
    # The check must be able to fail: a cycle made only by an import inside a function.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_package = pkg\n\n[importlinter:contract:1]\n"
        "name = no cycles\ntype = acyclic_siblings\nancestors = pkg\n"
    )
    run = _lint_imports(tmp_path)
    assert run.returncode != 0 and "BROKEN" in run.stdout, run.stdout + run.stderr


def test_lazy_loading_targets_stay_in_the_kernels():
    # import-linter does not see "slora.x.y:name" strings (imported by importlib when a backend
    # is chosen): those of the kernels must name kernel modules.
    bad = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in (PACKAGE / "kernels").rglob("*.py")
        for target in re.findall(r"[\"'](slora(?:\.\w+)+)(?::\w+)?[\"']", path.read_text())
        if not target.startswith("slora.kernels.")
    ]
    assert bad == []


def test_no_file_in_the_package_is_over_the_size_limit():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h", ".md")
    }
    over = {f: n for f, n in sizes.items() if n > MAX_LINES and f not in OVER_LIMIT}
    assert over == {}, f"split these files (limit {MAX_LINES} lines): {over}"
    stale = [f for f in OVER_LIMIT if sizes.get(f, 0) <= MAX_LINES]
    assert stale == [], f"remove these from OVER_LIMIT: {stale}"


# Documents that live outside the repository; built from pieces so this file does not match.
_OUTSIDE = re.compile("|".join(["SPEC" + r"\.md", "ANCHORS" + r"\.md", "DESIGN" + r"\.md",
                                "SPEC" + " §", r"\.\./" + "shared"]))  # fmt: skip


@pytest.mark.parametrize("where", ["slora", "csrc", "docs", "tests", "benchmarks", "README.md"])
def test_nothing_cites_documents_outside_the_repository(where):
    base = ROOT / where
    files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
    hits = []
    for path in files:
        if path.suffix not in (".py", ".md", ".cpp", ".cu", ".h", ".sh", ".txt", ".toml", ""):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == []

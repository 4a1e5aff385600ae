"""Setuptools shim.

Metadata lives in pyproject.toml.  The native ops in ``csrc/`` are *not* compiled at install
time: they are JIT-built with ninja on first use (``slora/kernels/_native.py``) and cached, so
installing never needs a build environment with torch in it and never replaces the user's
torch.  The sources ship inside the package so the JIT build works from a wheel too.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package as slora/csrc/."""

    def run(self) -> None:
        super().run()
        src = Path(__file__).parent / "csrc"
        if src.is_dir():
            dst = Path(self.build_lib) / "slora" / "csrc"
            shutil.copytree(src, dst, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})

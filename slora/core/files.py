"""Files written all or nothing: each file is written beside its final name, then renamed in.

A group of files that belong together (an adapter's weights and config; the report, plan and
plot of ``slora analyze --out``) is put in place together: if writing or renaming any of them
fails, the ones already renamed are put back as they were, so a reader never sees new weights
beside an old config, and a failed save leaves the previous contents intact.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

Writer = Callable[[Path], None]


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_files(directory: str | Path, writers: dict[str, Writer]) -> Path:
    """Write every ``name -> writer(path)`` into ``directory`` as one change.

    Each writer writes a temporary file in ``directory`` (same file system, same suffix, so
    that writers which pick a format by suffix still work); once all are written they are
    renamed over their final names.  On any failure the files already replaced are restored
    from their previous contents and the temporary files removed; the error is re-raised.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staged: dict[str, Path] = {}
    backups: dict[str, Path] = {}
    replaced: list[str] = []
    try:
        for name, write in writers.items():
            final = directory / name
            tmp = directory / f".{final.stem}.{token}.tmp{final.suffix}"
            staged[name] = tmp
            write(tmp)
            if not tmp.is_file():
                raise RuntimeError(f"writing {final} produced no file")
            _fsync(tmp)
        try:
            for name, tmp in staged.items():
                final = directory / name
                if final.is_file():
                    backup = directory / f".{final.stem}.{token}.bak{final.suffix}"
                    try:
                        os.link(final, backup)  # the old contents, kept until the end
                    except OSError:
                        shutil.copy2(final, backup)
                    backups[name] = backup
                os.replace(tmp, final)
                replaced.append(name)
        except BaseException:
            for name in reversed(replaced):
                final = directory / name
                if name in backups:
                    os.replace(backups.pop(name), final)
                else:
                    final.unlink(missing_ok=True)
            raise
        _fsync(directory)
    finally:
        for path in (*staged.values(), *backups.values()):
            path.unlink(missing_ok=True)
    return directory


def write_json(path: str | Path, data: Any) -> Path:
    """``json.dumps(data)`` to ``path``, written beside it and renamed in."""
    path = Path(path)
    text = json.dumps(data, indent=2)
    write_files(path.parent, {path.name: lambda tmp: tmp.write_text(text)})
    return path


def write_analysis(out: str | Path, report: Any, plan: Any, plot: Writer) -> list[Path]:
    """``slora analyze --out``: sensitivity.json, plan.json and sensitivity.png (written by
    ``plot(path)``) in ``out``, all three or none (a failure leaves the previous ones intact)."""
    report_json = json.dumps(report.to_dict(), indent=2)
    plan_json = json.dumps(plan.to_dict(), indent=2)
    writers: dict[str, Writer] = {
        "sensitivity.json": lambda tmp: tmp.write_text(report_json),
        "plan.json": lambda tmp: tmp.write_text(plan_json),
        "sensitivity.png": plot,
    }
    write_files(out, writers)
    return [Path(out) / name for name in writers]

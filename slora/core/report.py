"""SensitivityReport: per-matrix sensitivities and their JSON form (docs/api.md, "Reports")."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("d_in", "d_out", "global", "topk", "effrank", "local", "score")


@dataclass
class SensitivityReport:
    """Result of :func:`slora.analyze`.

    ``modules`` maps a module name to ``{"d_in", "d_out", "global", "topk", "effrank",
    "local", "score"}``; ``score`` (θ) is what the rank allocation uses.
    """

    estimator: str
    num_tokens: int
    modules: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, float]:
        return {name: float(m["score"]) for name, m in self.modules.items()}

    def to_dict(self) -> dict:
        return {
            "estimator": self.estimator,
            "num_tokens": int(self.num_tokens),
            "modules": {
                name: {
                    key: int(m[key]) if key in ("d_in", "d_out", "effrank") else float(m[key])
                    for key in FIELDS
                }
                for name, m in self.modules.items()
            },
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityReport:
        try:
            modules = {name: {key: m[key] for key in FIELDS} for name, m in data["modules"].items()}
            return cls(str(data["estimator"]), int(data["num_tokens"]), modules)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"not a SensitivityReport: missing or malformed field {exc}; expected "
                '{"estimator", "num_tokens", "modules": {name: {' + ", ".join(FIELDS) + "}}}"
            ) from exc

    @classmethod
    def from_json(cls, path: str | Path) -> SensitivityReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self, ranks: dict[str, int] | None = None) -> str:
        """A fixed-width table for people (optionally with allocated ranks)."""
        header = ["module", "d_out×d_in", "global", "top-k", "eff.rank", "local", "score"]
        if ranks is not None:
            header.append("rank")
        rows = []
        for name, m in self.modules.items():
            row = [
                name,
                f"{int(m['d_out'])}×{int(m['d_in'])}",
                f"{m['global']:.4g}",
                f"{m['topk']:.4g}",
                f"{int(m['effrank'])}",
                f"{m['local']:.4g}",
                f"{m['score']:.4g}",
            ]
            if ranks is not None:
                row.append(str(ranks.get(name, 0)))
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )  # noqa: E501
        lines = [
            f"Sensitivity ({self.estimator}, {self.num_tokens} calibration tokens)",
            fmt(header),
            "  ".join("-" * w for w in widths),
        ]
        lines += [fmt(r) for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

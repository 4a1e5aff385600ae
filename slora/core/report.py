"""SensitivityReport: per-matrix sensitivities and their JSON form (docs/api.md, "Reports")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slora.core.checks import finite_number, read_json, whole_number
from slora.core.files import write_json

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
        write_json(path, self.to_dict())  # beside, then renamed in: never half a file

    @classmethod
    def from_dict(cls, data: dict, where: str = "SensitivityReport") -> SensitivityReport:
        """Rebuild a report, checking every field (type, range, finiteness) by name."""
        expected = '{"estimator", "num_tokens", "modules": {name: {' + ", ".join(FIELDS) + "}}}"
        if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
            raise ValueError(f"{where}: not a SensitivityReport; expected {expected}")
        missing = [k for k in ("estimator", "num_tokens") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; expected {expected}")
        if not isinstance(data["estimator"], str):
            raise ValueError(f"{where}: estimator must be a string, got {data['estimator']!r}")
        num_tokens = whole_number("num_tokens", data["num_tokens"], where=where)
        modules = {}
        for name, m in data["modules"].items():
            label = f"{where}: module {name!r}"
            if not isinstance(m, dict) or any(k not in m for k in FIELDS):
                raise ValueError(f"{label} must hold the fields {FIELDS}, got {m!r}")
            modules[name] = {
                "d_in": whole_number("d_in", m["d_in"], minimum=1, where=label),
                "d_out": whole_number("d_out", m["d_out"], minimum=1, where=label),
                "effrank": whole_number("effrank", m["effrank"], where=label),
                **{
                    key: finite_number(key, m[key], minimum=0.0, where=label)
                    for key in ("global", "topk", "local", "score")
                },
            }
        return cls(data["estimator"], num_tokens, modules)

    @classmethod
    def from_json(cls, path: str | Path) -> SensitivityReport:
        return cls.from_dict(read_json(path, "sensitivity report"), where=str(path))

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

"""What every benchmark returns: rows of (figure, limit, ratio, goal), JSON-ready.

A row's ``ratio`` is its figure divided by a limit measured in the same run, because
absolute times on a shared machine drift while ratios hold. ``met`` is None where a row
has no goal of its own (a supporting measurement).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

Config = dict[str, int | float | str]


@dataclass
class Row:
    config: Config
    value: float
    unit: str
    limit: float | None = None
    limit_unit: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchResult:
    id: str
    title: str
    goal: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def met(self) -> bool | None:
        verdicts = [row.met for row in self.rows if row.met is not None]
        if self.error is not None:
            return False
        return all(verdicts) if verdicts else None

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["met"] = self.met
        cleaned: dict[str, Any] = _finite(record)
        return cleaned


def ratio(value: float, limit: float) -> float:
    return value / limit if limit > 0 else 0.0


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: such a number becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value

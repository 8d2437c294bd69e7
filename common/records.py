"""Reading round records: metric lookup, ``--stop-when`` rules, ``--save-best`` goals, History.

A round record is one line of ``metrics.jsonl`` (see ``server.coordinator.summary_record``).
A metric is named either by a dotted path into the record (``server_eval.accuracy``,
``federated_eval.loss``, ``train.loss``) or by a bare name, looked up in the server's
evaluation first, then the federated evaluation, then training.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("server_eval", "federated_eval", "train")
LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "perplexity")
_RULE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|>|<)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*$")
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}


def lookup(record: Mapping[str, Any], metric: str) -> float | None:
    """The value of ``metric`` in ``record``, or None when the round has none."""
    if "." in metric:
        section, _, name = metric.partition(".")
        values = record.get(section)
        found = values.get(name) if isinstance(values, Mapping) else None
    else:
        found = None
        for section in SECTIONS:
            values = record.get(section)
            if isinstance(values, Mapping) and metric in values:
                found = values[metric]
                break
    return float(found) if isinstance(found, int | float) and math.isfinite(found) else None


@dataclass(frozen=True)
class StopRule:
    """``--stop-when "accuracy>=0.97"``: end the run after the first round that meets it."""

    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> StopRule:
        match = _RULE.match(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not METRIC OP NUMBER with OP one of >= <= > < "
                "(e.g. accuracy>=0.97 or federated_eval.loss<0.1)"
            )
        metric, op, number = match.groups()
        return cls(metric, op, float(number))

    def met(self, record: Mapping[str, Any]) -> bool:
        value = lookup(record, self.metric)
        return value is not None and _OPERATORS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class MetricGoal:
    """``--save-best accuracy`` (higher is better) or ``--save-best loss:min``.

    Without a direction, a metric whose name holds one of ``LOWER_IS_BETTER`` (loss,
    error, mse, mae, perplexity) is minimised and any other maximised.
    """

    metric: str
    maximise: bool

    @classmethod
    def parse(cls, text: str) -> MetricGoal:
        metric, _, direction = text.strip().partition(":")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", metric):
            raise ValueError(f"{text!r} is not METRIC or METRIC:min / METRIC:max")
        if direction not in ("", "min", "max"):
            raise ValueError(f"{text!r}: the direction must be min or max")
        if not direction:
            name = metric.rpartition(".")[2].lower()
            direction = "min" if any(w in name for w in LOWER_IS_BETTER) else "max"
        return cls(metric, direction == "max")

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.maximise else value < best)


@dataclass
class History:
    """What a run did, round by round, as ``fedstream.run_local`` returns it."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], out: Path | None = None
                     ) -> History:
        return cls([dict(r) for r in records], out)

    @classmethod
    def read(cls, out: Path) -> History:
        path = Path(out) / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return cls.from_records((json.loads(line) for line in lines if line.strip()), Path(out))

    def metric(self, name: str) -> list[float | None]:
        """``name`` for every round (None where a round has none)."""
        return [lookup(record, name) for record in self.rounds]

    def last(self, name: str) -> float | None:
        values = [v for v in self.metric(name) if v is not None]
        return values[-1] if values else None

    @property
    def failures(self) -> list[dict[str, str]]:
        return [dict(record.get("failures", {})) for record in self.rounds]

    @property
    def clients(self) -> list[list[dict[str, Any]]]:
        """Each round's per-client training results (id, examples, metrics, timings)."""
        return [list(record.get("clients", [])) for record in self.rounds]

    @property
    def wall_times_s(self) -> list[float]:
        return [float(record.get("wall_time_s", 0.0)) for record in self.rounds]

    def __len__(self) -> int:
        return len(self.rounds)

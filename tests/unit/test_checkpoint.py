"""The server's durable output: metrics lines stay strict JSON whatever the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedstream.server.checkpoint import MetricsLog


def test_non_finite_metrics_are_written_as_null(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.append(
        {
            "round": 1,
            "train_loss": 0.5,
            "test_loss": math.inf,  # the server's own evaluation of a diverged model
            "accuracy": math.nan,
            "clients": [{"client_id": "a", "train_loss": -math.inf}],
        }
    )
    line = (tmp_path / "metrics.jsonl").read_text()
    record = json.loads(line)  # strict JSON: no NaN or Infinity tokens
    assert "NaN" not in line and "Infinity" not in line
    assert record == {
        "round": 1,
        "train_loss": 0.5,
        "test_loss": None,
        "accuracy": None,
        "clients": [{"client_id": "a", "train_loss": None}],
    }

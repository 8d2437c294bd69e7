"""``make bench-quick`` as CI runs it: every benchmark runs at toy size and writes
well-formed results. No speed or memory threshold is asserted here; those are the
benchmarks' own goals, read from the full run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
IDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("bench") / "results"
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the run and every child it starts share one group
    )
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, out, output


def test_quick_run_exits_cleanly(quick_run: tuple[int, Path, str]) -> None:
    code, _, output = quick_run
    assert code == 0, output[-4000:]


def test_every_benchmark_reports_numeric_rows(quick_run: tuple[int, Path, str]) -> None:
    _, out, output = quick_run
    document = json.loads((out / "results.json").read_text())
    assert document["quick"] is True
    assert document["machine"]["cores"] >= 1
    assert sorted(document["benchmarks"]) == list(IDS), output[-2000:]
    for bench_id, result in document["benchmarks"].items():
        assert result["error"] is None, f"{bench_id}: {result['error']}"
        assert result["rows"], f"{bench_id} has no rows"
        for row in result["rows"]:
            assert _number(row["value"]), f"{bench_id}: value {row['value']!r}"
            assert row["met"] in (True, False, None)
            if row["limit"] is not None:
                assert _number(row["limit"]) and row["limit"] > 0, f"{bench_id}: {row}"
                assert _number(row["ratio"]), f"{bench_id}: {row}"
            assert all(_number(v) for v in row["extra"].values()), f"{bench_id}: {row}"


def test_table_lists_every_benchmark(quick_run: tuple[int, Path, str]) -> None:
    _, out, _ = quick_run
    table = (out / "results.md").read_text()
    for bench_id in IDS:
        assert f"| {bench_id} |" in table

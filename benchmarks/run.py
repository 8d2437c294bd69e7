"""``make bench``: run B1..B7 and write results/<date>/results.json, results.md and plots.

``--quick`` runs every benchmark at toy sizes (about a minute) so CI can prove they still
run and produce well-formed results; its figures mean nothing. A benchmark that fails
is recorded with its error and the others still run; the exit status is 1 then.

Every size a run uses is in :class:`Plan`, full and quick side by side.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import foldin, machine, memory, parallel, report, scale, transport
from benchmarks.loadrun import LoadRun
from benchmarks.results import BenchResult

RESULTS = Path(__file__).resolve().parent / "results"
ALL = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")


@dataclass(frozen=True)
class Plan:
    transport_sizes: tuple[int, ...]  # B1/B2 model bytes
    transport_clients: tuple[int, ...]
    transport_rounds: int  # best round counts; the limit is measured once per case
    chunk_bytes: int
    fold_bytes: int  # B3
    memory_model_bytes: int  # B4
    memory_clients: tuple[int, ...]
    big_model_bytes: int  # B5
    parallel_clients: tuple[int, ...]  # B6
    parallel_steps: int
    parallel_rounds: int
    scale_model_bytes: int  # B7
    scale_clients: tuple[int, ...]
    scale_rounds: int


CORES = len(os.sched_getaffinity(0))

FULL = Plan(
    transport_sizes=(100_000_000, 1_000_000_000),
    transport_clients=(1, 2, 4),
    transport_rounds=1,
    chunk_bytes=1 << 20,
    fold_bytes=200_000_000,
    memory_model_bytes=200_000_000,
    memory_clients=(2, 4, 8, 16),
    big_model_bytes=5 << 29,  # 2.5 GiB
    parallel_clients=tuple(k for k in (1, 2, 4, 8) if k <= CORES),
    parallel_steps=600,
    parallel_rounds=2,
    scale_model_bytes=400_000,  # 100 k float32 parameters
    scale_clients=(100, 500, 1000),
    scale_rounds=3,
)

QUICK = Plan(
    transport_sizes=(4_000_000,),
    transport_clients=(2,),
    transport_rounds=1,
    chunk_bytes=1 << 20,
    fold_bytes=16_000_000,
    memory_model_bytes=8_000_000,
    memory_clients=(2, 3),
    big_model_bytes=24_000_000,
    parallel_clients=(2,),
    parallel_steps=10,
    parallel_rounds=2,
    scale_model_bytes=400_000,
    scale_clients=(10, 30),
    scale_rounds=2,
)


def run_all(plan: Plan, only: Sequence[str], logs: Path) -> list[BenchResult]:
    results: dict[str, BenchResult] = {}
    floor_runs: list[LoadRun] = []

    def floor() -> LoadRun:
        if not floor_runs:
            floor_runs.append(memory.floor(logs))
        return floor_runs[0]

    steps: list[tuple[tuple[str, ...], Callable[[], list[BenchResult]]]] = [
        (("B1", "B2"), lambda: list(transport.measure(
            [transport.Case(size, k, plan.chunk_bytes, plan.transport_rounds)
             for size in plan.transport_sizes for k in plan.transport_clients], logs))),
        (("B3",), lambda: [foldin.measure(plan.fold_bytes)]),
        (("B4",), lambda: [memory.measure_b4(plan.memory_model_bytes,
                                             list(plan.memory_clients), logs, floor())]),
        (("B5",), lambda: [memory.measure_b5(plan.big_model_bytes, logs, floor())]),
        (("B6",), lambda: [parallel.measure(list(plan.parallel_clients), plan.parallel_steps,
                                            plan.parallel_rounds, logs)]),
        (("B7",), lambda: [scale.measure(plan.scale_model_bytes, list(plan.scale_clients),
                                         plan.scale_rounds, logs)]),
    ]
    for ids, action in steps:
        wanted = [i for i in ids if i in only]
        if not wanted:
            continue
        print(f"running {', '.join(ids)} ...", flush=True)
        started = time.monotonic()
        try:
            produced = action()
        except Exception as error:  # noqa: BLE001 - recorded, the other benchmarks still run
            traceback.print_exc()
            produced = [BenchResult(i, "", "", error=f"{type(error).__name__}: {error}")
                        for i in ids]
        elapsed = time.monotonic() - started
        for result in produced:
            result.seconds = elapsed
            results[result.id] = result
            print(f"  {result.id}: met={result.met} ({elapsed:.0f}s)", flush=True)
    return [results[i] for i in ALL if i in results]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="toy sizes (CI smoke run)")
    parser.add_argument("--out", type=Path, help="output folder (default results/<date>)")
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated ids")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / (f"{today}-quick" if args.quick else today)
    only = [i.strip().upper() for i in args.only.split(",") if i.strip()]
    meta = {
        "schema": 1,
        "date": today,
        "quick": args.quick,
        "plan": asdict(plan),
        "machine": machine.describe(),
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedstream-bench-logs-") as logs:
        results = run_all(plan, only, Path(logs))
        failed = [r for r in results if r.error is not None]
        if failed:
            # Keep the children's logs of a failed run next to its results.
            shutil.copytree(logs, out / "logs", dirs_exist_ok=True)
    meta["duration_s"] = time.monotonic() - started
    meta["machine"]["load_average_after"] = list(os.getloadavg())
    path = report.write(results, meta, out)
    print(report.table(results))
    print(f"wrote {path} ({meta['duration_s']:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""B4 and B5: the server's peak resident memory during a round, against the model's size.

B4 runs one round of a 200 MB model with K = 2, 4, 8, 16 clients; the goal is a peak of
at most 2.5 x model + 300 MB whatever K (the server holds the global model and one
running sum; uploads are staged on disk, not in memory). B5 runs one round of a model
larger than 2 GiB, as one tensor, with K = 2; the goal is a peak of at most
2.5 x model.

Clients are loadgen clients (``benchmarks.loadgen``): real protocol, no model held, so two
clients and a 2.5 GiB server fit in this machine's memory, and the figure is the
server's alone. The peak is the kernel's ``VmHWM`` of the fl-server process.

The process floor is measured too, in the same run: the peak of the same server with a
1 MiB model and one client. It is what the interpreter, torch, gRPC and the bundled
dataset cost before any model; ``peak - floor`` is the part that grows with the model.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.loadrun import LoadRun, run_load
from benchmarks.results import BenchResult, Row, ratio

MB = 1_000_000
FLOOR_MODEL_BYTES = 1 << 20


def floor(log_dir: Path) -> LoadRun:
    return run_load(FLOOR_MODEL_BYTES, 1, 1, 1, log_dir / "floor")


def _extra(run: LoadRun, floor_run: LoadRun) -> dict[str, float]:
    net = run.server_peak_bytes - floor_run.server_peak_bytes
    return {
        "server_idle_bytes": float(run.server_idle_bytes),
        "process_floor_bytes": float(floor_run.server_peak_bytes),
        "peak_minus_floor_bytes": float(net),
        "peak_minus_floor_over_model": net / run.model_bytes,
        "round_wall_s": run.round_wall_s[0] if run.round_wall_s else 0.0,
    }


def measure_b4(model_bytes: int, clients: list[int], log_dir: Path,
               floor_run: LoadRun) -> BenchResult:
    result = BenchResult("B4", "server peak RSS during a round vs number of clients",
                         "<= 2.5 x model + 300 MB, flat in K")
    budget = 2.5 * model_bytes + 300 * MB
    runs = []
    for k in clients:
        run = run_load(model_bytes, k, 1, min(k, 4), log_dir / f"b4-K{k}")
        runs.append(run)
        result.rows.append(Row(
            config={"model_bytes": model_bytes, "clients": k},
            value=float(run.server_peak_bytes),
            unit="B",
            limit=float(model_bytes),
            limit_unit="B (model size)",
            ratio=ratio(run.server_peak_bytes, model_bytes),
            goal="peak <= 2.5 x model + 300 MB",
            met=run.server_peak_bytes <= budget,
            extra={**_extra(run, floor_run), "budget_bytes": budget},
        ))
    peaks = [run.server_peak_bytes for run in runs]
    spread = max(peaks) - min(peaks)
    # "Flat in K": going from the fewest to the most clients costs under a tenth of a model.
    result.rows.append(Row(
        config={"model_bytes": model_bytes, "clients": f"{min(clients)}..{max(clients)}"},
        value=float(spread),
        unit="B (peak spread across K)",
        limit=float(model_bytes),
        limit_unit="B (model size)",
        ratio=ratio(spread, model_bytes),
        goal="spread <= 0.1 x model",
        met=spread <= 0.1 * model_bytes,
    ))
    return result


def measure_b5(model_bytes: int, log_dir: Path, floor_run: LoadRun) -> BenchResult:
    result = BenchResult("B5", "one round with a model larger than 2 GiB, K = 2",
                         "completes; peak <= 2.5 x model")
    # One tensor of the whole size: past 2 GiB per message, per tensor and per offset.
    run = run_load(model_bytes, 2, 1, 2, log_dir / "b5", tensor_bytes=model_bytes,
                   timeout_s=900)
    result.rows.append(Row(
        config={"model_bytes": model_bytes, "clients": 2, "tensors": 1},
        value=float(run.server_peak_bytes),
        unit="B",
        limit=float(model_bytes),
        limit_unit="B (model size)",
        ratio=ratio(run.server_peak_bytes, model_bytes),
        goal="round completes and peak <= 2.5 x model",
        met=len(run.round_wall_s) == 1 and run.server_peak_bytes <= 2.5 * model_bytes,
        extra=_extra(run, floor_run),
    ))
    return result

"""Write a run's results: ``results.json``, ``results.md`` (one table) and PNG plots.

Plots need matplotlib (the ``bench`` extra, installed by ``make bench``); without it the
JSON and the table are still written and the run notes that plots were skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.results import BenchResult, Row

MB = 1e6


def _amount(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit.startswith("B/s"):
        return f"{value / MB:,.0f} MB/s"
    if unit.startswith("B"):
        return f"{value / MB:,.0f} MB"
    if unit.startswith("s"):
        return f"{value:.2f} s"
    return f"{value:.4g}"


def _config(row: Row) -> str:
    parts = []
    for key, value in row.config.items():
        if key.endswith("_bytes") and isinstance(value, int):
            parts.append(f"{key.removesuffix('_bytes')} {value / MB:,.1f} MB")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def table(results: Sequence[BenchResult]) -> str:
    lines = [
        "| id | configuration | figure | limit (same run) | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        if result.error is not None:
            lines.append(f"| {result.id} | {result.title} | error: {result.error[:120]} "
                         "| - | - | - | no |")
            continue
        for row in result.rows:
            verdict = {True: "yes", False: "**no**", None: "-"}[row.met]
            ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
            lines.append(
                f"| {result.id} | {_config(row)} | {_amount(row.value, row.unit)} | "
                f"{_amount(row.limit, row.limit_unit)} | {ratio} | {row.goal or '-'} | "
                f"{verdict} |"
            )
    return "\n".join(lines) + "\n"


def _by_id(results: Sequence[BenchResult]) -> dict[str, BenchResult]:
    return {r.id: r for r in results if r.error is None}


def plot(results: Sequence[BenchResult], out: Path) -> list[str]:
    """Round time against model size; server peak memory against clients. File names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = _by_id(results)
    written = []

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    bare: dict[str, list[tuple[float, float]]] = {}
    down, up = found.get("B1"), found.get("B2")
    if down is not None and up is not None:
        for d, u in zip(down.rows, up.rows, strict=True):
            size, k = float(d.config["model_bytes"]), d.config["clients"]
            series.setdefault(f"fedstream round, K={k}", []).append(
                (size, d.extra["round_wall_s"]))
            moved = size * float(k)
            if d.limit and u.limit:
                bare.setdefault(f"bare gRPC down+up, K={k}", []).append(
                    (size, moved / d.limit + moved / u.limit))
    for bench_id in ("B4", "B5"):
        found_result = found.get(bench_id)
        for row in found_result.rows if found_result else []:
            if "round_wall_s" in row.extra and "model_bytes" in row.config:
                series.setdefault(f"fedstream round, K={row.config['clients']} (loadgen)",
                                  []).append((float(row.config["model_bytes"]),
                                              row.extra["round_wall_s"]))
    for name, points in series.items():
        points.sort()
        axis.plot([p[0] / MB for p in points], [p[1] for p in points], "o-", label=name)
    for name, points in bare.items():
        points.sort()
        axis.plot([p[0] / MB for p in points], [p[1] for p in points], "x--", label=name)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("model size (MB)")
    axis.set_ylabel("round wall time (s)")
    axis.set_title("Round time against model size")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "round_time_vs_model_size.png", dpi=120)
    plt.close(figure)
    written.append("round_time_vs_model_size.png")

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    b4, b7 = found.get("B4"), found.get("B7")
    if b4 is not None:
        rows = [r for r in b4.rows if isinstance(r.config["clients"], int)]
        if rows:
            model = float(rows[0].config["model_bytes"])
            left.plot([r.config["clients"] for r in rows], [r.value / MB for r in rows], "o-",
                      label="server peak RSS")
            left.axhline((2.5 * model + 300 * MB) / MB, color="r", ls="--",
                         label="goal: 2.5 x model + 300 MB")
            left.axhline(rows[0].extra["process_floor_bytes"] / MB, color="g", ls=":",
                         label="process floor (1 MiB model)")
            left.set_title(f"B4: {model / MB:,.0f} MB model")
    if b7 is not None:
        right.plot([r.config["clients"] for r in b7.rows],
                   [r.extra["server_peak_bytes"] / MB for r in b7.rows], "o-",
                   label="server peak RSS")
        right.axhline(1500, color="r", ls="--", label="goal at N = 1000: 1.5 GB")
        right.set_title("B7: ~100 k parameter model")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("clients")
        axis.set_ylabel("MB")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Server peak memory against number of clients")
    figure.tight_layout()
    figure.savefig(out / "server_peak_rss_vs_clients.png", dpi=120)
    plt.close(figure)
    written.append("server_peak_rss_vs_clients.png")
    return written


def write(results: Sequence[BenchResult], meta: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    try:
        plots = plot(results, out)
    except ImportError:
        plots = []
        meta = {**meta, "notes": [*meta.get("notes", []),
                                  "plots skipped: matplotlib is not installed"]}
    document = {**meta, "plots": plots,
                "benchmarks": {r.id: r.to_json() for r in results}}
    path = out / "results.json"
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    header = (f"# fedstream benchmarks, {meta.get('date', '')}"
              f"{' (quick: toy sizes)' if meta.get('quick') else ''}\n\n")
    (out / "results.md").write_text(header + table(results))
    return path

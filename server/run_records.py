"""What a run leaves in ``--out`` besides the checkpoint: ``run.json`` and the best model.

``run.json`` records everything needed to tell two runs apart and to repeat one: the
complete settings (secrets left out), the task with its options and fingerprint, the
fedstream, protocol, torch and Python versions. With ``--save-best METRIC`` the
checkpoint of the best round so far is kept as ``best.pt`` (``best.json`` says which
round and value), beside the last one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fedstream.common.messages import PROTOCOL_VERSION
from fedstream.common.records import MetricGoal, lookup
from fedstream.common.task import Task
from fedstream.common.version import package_version
from fedstream.server.checkpoint import CHECKPOINT_NAME, MetricsLog
from pydantic import BaseModel

log = logging.getLogger(__name__)

RUN_NAME = "run.json"
BEST_NAME = "best.pt"
BEST_META_NAME = "best.json"
SECRET_FIELDS = ("token",)


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


class RunRecords:
    def __init__(self, out: Path, goal: MetricGoal | None) -> None:
        self.out = out
        self.goal = goal
        self.metrics = MetricsLog(out)
        self.best: float | None = None

    def write_run(self, settings: BaseModel, task: Task, fingerprint: str) -> Path:
        values = settings.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        document = {
            "fedstream_version": package_version(),
            "protocol_version": PROTOCOL_VERSION,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "started_unix_s": time.time(),
            "task": {"name": task.name, "options": task.options(), "fingerprint": fingerprint},
            "strategy": {"name": "fedavg", "server_lr": values.get("server_lr")},
            "settings": values,
        }
        path = self.out / RUN_NAME
        _write_json(path, document)
        return path

    def resume(self, round_number: int) -> None:
        """Pick up the best value so far; a best.pt from a round past the checkpoint (a
        crash between the two) is dropped, as that round is run again."""
        meta_path = self.out / BEST_META_NAME
        if self.goal is None or not meta_path.exists():
            return
        meta = json.loads(meta_path.read_text())
        if int(meta.get("round", 0)) <= round_number and meta.get("metric") == self.goal.metric:
            self.best = float(meta["value"])
        else:
            meta_path.unlink(missing_ok=True)
            (self.out / BEST_NAME).unlink(missing_ok=True)

    def after_checkpoint(self, record: Mapping[str, Any]) -> None:
        """Keep the checkpoint just written as best.pt when it is the best so far."""
        if self.goal is None:
            return
        value = lookup(record, self.goal.metric)
        if value is None:
            log.warning("round %s has no %s: --save-best keeps the earlier best",
                        record.get("round"), self.goal.metric)
            return
        if not self.goal.better(value, self.best):
            return
        temporary = self.out / f".{BEST_NAME}.{os.getpid()}.tmp"
        shutil.copyfile(self.out / CHECKPOINT_NAME, temporary)
        os.replace(temporary, self.out / BEST_NAME)
        _write_json(self.out / BEST_META_NAME,
                    {"round": record.get("round"), "metric": self.goal.metric, "value": value})
        self.best = value
        log.info("round %s: best %s so far (%.4f), kept as %s", record.get("round"),
                 self.goal.metric, value, BEST_NAME)

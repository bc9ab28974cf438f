"""metrics.jsonl (one JSON object per optimizer step or evaluation) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maskspec.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """metrics.jsonl in the output folder (main process), plus TensorBoard when it is installed."""

    def __init__(self, out: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # After a resume, drop entries of steps that will be run again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / TENSORBOARD_DIR))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None

"""How long a run trains: the learning-rate schedule and the step budget (steps, or a time limit)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from maskspec.train.config import TrainConfig
from maskspec.train.distributed import broadcast_, parallel


def lr_lambda(cfg: TrainConfig, horizon: Callable[[], int] | None = None) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine to min_lr_ratio at step `horizon()` (default: cfg.steps)."""
    def factor(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        end = horizon() if horizon is not None else cfg.steps
        progress = min(1.0, (step - cfg.warmup) / max(1, end - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class StepBudget:
    """How many optimizer steps a run makes. Without a time limit: cfg.steps. With one, the horizon is re-planned
    after every step from the mean time per step so far (evaluations and checkpoints included; the first two
    steps, which pay for warm-up, are left out once there are others) and from the time the last evaluation and
    checkpoint took, which the end of the run needs again. So the lr schedule ends at the last step that fits; the
    run also stops as soon as the limit has passed."""

    def __init__(self, cfg: TrainConfig, clock: Callable[[], float], device: torch.device) -> None:
        self.limit = cfg.time_limit
        self.device = device  # where the collective decision tensor lives (the process group's device)
        self.steps = cfg.steps
        self.horizon = cfg.steps
        self.stop = False
        self.clock = clock
        self.started = self.mark = clock()
        self.cycles: list[float] = []
        self.reserve = 0.0  # seconds of the latest evaluation + checkpoint

    def begin(self, start_step: int) -> None:
        """Start the clock at the first step to run (after a resume: the checkpoint's step)."""
        self.stop = start_step >= self.steps
        self.started = self.mark = self.clock()

    def record(self, done: int) -> None:
        """After step `done`: re-plan, decide whether to stop, and make every process agree (rank 0 decides)."""
        now = self.clock()
        self.cycles.append(now - self.mark)
        self.mark = now
        if self.limit is not None:
            timed = self.cycles[2:] or self.cycles
            per_step = sum(timed) / len(timed)
            remaining = self.limit - (now - self.started) - self.reserve
            fit = done + max(0, int(remaining // per_step)) if per_step > 0 else self.steps
            self.horizon = max(done, min(self.steps, fit))
        self.stop = done >= self.horizon or (self.limit is not None and now - self.started >= self.limit)
        if parallel():
            decision = broadcast_(torch.tensor([self.horizon, int(self.stop)], dtype=torch.int64,
                                               device=self.device))
            self.horizon, self.stop = int(decision[0]), bool(decision[1])

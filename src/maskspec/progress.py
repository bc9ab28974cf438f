"""Progress of a long command over prompts, on stderr: a rich progress bar on a terminal, otherwise one plain,
flushed line per finished prompt (logs and pipes see the run advance, with an estimate of the time left)."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO


def format_duration(seconds: float) -> str:
    """12s, 2m10s, 1h05m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def format_estimate(seconds: float) -> str:
    """A rough duration: 40s, 15m, 2h10m (an estimate has no meaningful seconds past a minute)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m = int(round(s / 60))
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class PromptProgress:
    """Reports `total` prompts of command `command` as they finish (a context manager).

    `stage(text)` announces work that is not per prompt (loading, warm-up); `done(label)` counts one finished
    prompt. Time left is the mean time per prompt since the last stage, times the prompts left."""

    def __init__(self, command: str, total: int, *, stream: TextIO | None = None, terminal: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.command = command
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = terminal if terminal is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.count = 0
        self.started = self.since = clock()
        self._since_count = 0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "PromptProgress":
        self.started = self.since = self.clock()
        if self.terminal:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            console = Console(file=self.stream)
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                                 redirect_stdout=False)  # stdout (tables, results) stays where it was sent
            self._bar.start()
            self._task = self._bar.add_task(self.command, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.command}: {text}\n")
        self.stream.flush()

    def stage(self, text: str) -> None:
        self.since, self._since_count = self.clock(), self.count
        if self._bar is not None:
            self._bar.update(self._task, description=text)
        else:
            self._line(text)

    def done(self, label: str) -> None:
        self.count += 1
        now = self.clock()
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=label)
            return
        parts = [f"{self.count}/{self.total} prompts", label, f"{format_duration(now - self.started)} elapsed"]
        left = self.total - self.count
        if left <= 0:
            parts.append("done")
        else:
            per_prompt = (now - self.since) / max(1, self.count - self._since_count)
            parts.append(f"about {format_estimate(per_prompt * left)} left")
        self._line(", ".join(parts))

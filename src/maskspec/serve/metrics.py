"""A few Prometheus metrics in the text exposition format, without a client library (thread-safe)."""

from __future__ import annotations

import math
import threading
from typing import Callable, Sequence


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    parts = [f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
             for n, v in zip(names, values)]
    return "{" + ",".join(parts) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}
        self.lock = threading.Lock()
        if not labels:
            self.values[()] = 0.0

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self.lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        with self.lock:
            return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self.lock:
            for labels, v in sorted(self.values.items()):
                lines.append(f"{self.name}{_labels(self.label_names, labels)} {_num(v)}")
        return lines


class Gauge:
    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = sorted(buckets) + [math.inf]
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self.lock:
            for bound, c in zip(self.buckets, self.counts):
                lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {c}')
            lines.append(f"{self.name}_sum {_num(self.sum)}")
            lines.append(f"{self.name}_count {self.count}")
        return lines


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """Everything /metrics reports. Queue depth and active requests are read from the scheduler on demand."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, active: Callable[[], float] = lambda: 0):
        self.requests = Counter("maskspec_requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.rejected = Counter("maskspec_rejected_requests_total", "Requests refused because the queue was full.")
        self.prompt_tokens = Counter("maskspec_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generated_tokens = Counter("maskspec_generated_tokens_total", "Tokens generated (all requests).")
        self.forward_passes = Counter("maskspec_forward_passes_total",
                                      "Batched forward passes run by the scheduler (decode steps and prefills).")
        self.sequence_passes = Counter("maskspec_sequence_forward_passes_total",
                                       "Forward passes per request, summed (a request's prefill counts as one).")
        self.finished = Counter("maskspec_finished_requests_total", "Generations finished, by finish reason.",
                                ("reason",))
        self.tokens_per_pass = Histogram("maskspec_tokens_per_pass",
                                         "Per request: new tokens / forward passes (plain decoding = 1).",
                                         (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9))
        self.batch_size = Histogram("maskspec_batch_size", "Sequences per decode pass.", (1, 2, 4, 8, 16, 32, 64))
        self.latency = Histogram("maskspec_request_latency_seconds", "From arrival to the last token.",
                                 LATENCY_BUCKETS)
        self.first_token = Histogram("maskspec_time_to_first_token_seconds", "From arrival to the first token.",
                                     LATENCY_BUCKETS)
        self.queue_depth = Gauge("maskspec_queue_depth", "Requests waiting for a batch slot.", queue_depth)
        self.active = Gauge("maskspec_active_requests", "Requests being decoded.", active)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.rejected, self.prompt_tokens, self.generated_tokens, self.forward_passes,
                       self.sequence_passes, self.finished, self.tokens_per_pass, self.batch_size, self.latency,
                       self.first_token, self.queue_depth, self.active):
            lines += metric.render()
        return "\n".join(lines) + "\n"

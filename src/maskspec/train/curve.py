"""Held-out accuracy against rows trained on, from the metrics.jsonl of training runs (`maskspec curve`).

A run's evaluations (`"eval": true` lines) are placed at the layout rows its optimizer steps had seen by then
(the sum of the step lines' `rows` up to that step), plus the rows of the adapter it started from when its
config records them (`training.rows_seen_total` of the `--init-adapter`, copied into `training.rows_before`). So a
run that continues the committed adapter draws on from where that adapter's curve ended. Each run is evaluated on
its own held-out records (`--eval-size` of its data): curves of runs on the same data and seed share them.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from maskspec.errors import MaskspecError
from maskspec.files import atomic_write_bytes, atomic_write_text
from maskspec.train.metrics import METRICS_FILE

CURVE_JSON = "curve.json"


@dataclass
class CurvePoint:
    step: int
    rows: int  # layout rows trained on up to this evaluation, those of the init adapter included
    tokens: int  # answer tokens of this run's steps up to it
    acc_sampler: list[float]  # top-1 accuracy per offset (index j - 1 = offset j), sampler fed the true token
    acc_base: list[float]  # the same for the base output head at the masks
    acc_sampler_mean: float
    acc_base_mean: float


@dataclass
class Curve:
    label: str
    source: str  # the metrics.jsonl read
    rows_before: int | None  # rows of the adapter the run started from; None when its config does not say
    steps: int = 0
    rows: int = 0  # rows of this run's steps
    seconds: float = 0.0  # their time (optimizer steps only: no evaluation, no checkpoints)
    points: list[CurvePoint] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float | None:
        return self.rows / self.seconds if self.seconds > 0 else None


def read_curve(run: str | Path, label: str | None = None) -> Curve:
    """The curve of one training run: its output folder (metrics.jsonl, and adapter_config.json for the rows of
    its init adapter) or a metrics.jsonl file itself."""
    run = Path(run)
    metrics = run / METRICS_FILE if run.is_dir() else run
    if not metrics.is_file():
        raise MaskspecError(f"{run}: no {METRICS_FILE} (pass a `maskspec train` --out folder or its {METRICS_FILE})")
    steps, evals = _read_metrics(metrics)
    if not evals:
        raise MaskspecError(f"{metrics}: no evaluation lines (train with held-out records: --eval-size > 0)")
    rows_before = _rows_before(run) if run.is_dir() else None
    curve = Curve(label or (run.name if run.is_dir() else run.parent.name), str(metrics), rows_before)
    rows = tokens = 0
    ordered = sorted(steps)
    at = 0
    for step in sorted(evals):
        while at < len(ordered) and ordered[at] <= step:
            rows += int(steps[ordered[at]].get("rows", 0))
            tokens += int(steps[ordered[at]].get("tokens", 0))
            at += 1
        ev = evals[step]
        try:
            curve.points.append(CurvePoint(step, (rows_before or 0) + rows, tokens,
                                           [float(a) for a in ev["acc_sampler"]], [float(a) for a in ev["acc_base"]],
                                           float(ev["acc_sampler_mean"]), float(ev["acc_base_mean"])))
        except (KeyError, TypeError, ValueError):
            raise MaskspecError(f"{metrics}: the evaluation at step {step} has no per-offset accuracies") from None
    curve.steps = len(steps)
    curve.rows = sum(int(r.get("rows", 0)) for r in steps.values())
    curve.seconds = sum(float(r.get("seconds", 0.0)) for r in steps.values())
    return curve


def _rows_before(run: Path) -> int | None:
    try:
        config = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
        value = config["training"]["rows_before"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def rows_seen(metrics: Path) -> int:
    """Layout rows of the optimizer steps recorded in a run's metrics.jsonl (what `maskspec train` stores as
    `training.rows_seen`); 0 when there is no such file."""
    if not metrics.is_file():
        return 0
    return sum(int(r.get("rows", 0)) for r in _read_metrics(metrics)[0].values())


def _read_metrics(metrics: Path) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """The step lines and the evaluation lines of a metrics.jsonl, by step (a step written again by a resumed
    run: the last line counts)."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    try:
        text = metrics.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise MaskspecError(f"cannot read {metrics}: {exc.strerror or exc}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
            if not record.get("eval"):  # the step's counts, as numbers (they are summed)
                record = {**record, "rows": int(record.get("rows", 0)), "tokens": int(record.get("tokens", 0)),
                          "seconds": float(record.get("seconds", 0.0))}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MaskspecError(f"{metrics}:{number}: not a metrics line of `maskspec train`") from None
        (evals if record.get("eval") else steps)[step] = record
    return steps, evals


def table(curves: Sequence[Curve], offsets: Sequence[int]) -> str:
    """A markdown table: one row per evaluation of every run."""
    head = ("| run | step | rows seen | " + " | ".join(f"sampler +{o}" for o in offsets)
            + " | sampler mean | base +1 |")
    lines = [head, "|" + "---|" * (5 + len(offsets))]
    for c in curves:
        for p in c.points:
            lines.append(f"| {c.label} | {p.step} | {p.rows:,} | "
                         + " | ".join(_at(p.acc_sampler, o) for o in offsets)
                         + f" | {p.acc_sampler_mean:.3f} | {_at(p.acc_base, 1)} |")
    lines.append("")
    for c in curves:
        speed = f"{c.rows_per_s:,.0f} rows/s over its steps" if c.rows_per_s else "no step times"
        start = ("from scratch" if c.rows_before == 0 else "rows before this run unknown (counted from 0)"
                 if c.rows_before is None else f"continuing an adapter that had seen {c.rows_before:,} rows")
        lines.append(f"- {c.label}: {c.steps} steps, {c.rows:,} rows, {c.seconds:.0f} s, {speed}; {start} "
                     f"({c.source})")
    return "\n".join(lines) + "\n"


def _at(values: Sequence[float], offset: int) -> str:
    return f"{values[offset - 1]:.3f}" if offset <= len(values) else "-"


def plot_png(curves: Sequence[Curve], offsets: Sequence[int]) -> bytes | None:
    """Sampler accuracy at each offset (one line style per offset, one colour per run) against rows seen, as PNG
    bytes; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(9.5, 4.4))
    for i, c in enumerate(curves):
        colour = f"C{i % 10}"
        xs = [p.rows / 1e6 for p in c.points]
        for j, o in enumerate(offsets):
            ys = [p.acc_sampler[o - 1] if o <= len(p.acc_sampler) else float("nan") for p in c.points]
            ax.plot(xs, ys, styles[j % len(styles)], marker="o", markersize=3, color=colour,
                    label=f"{c.label} +{o}")
    ax.set_xlabel("layout rows trained on (millions)")
    ax.set_ylabel("held-out top-1 accuracy (sampler)")
    ax.set_title("Mask accuracy against rows seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines stay visible
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_curves(out: Path, curves: Sequence[Curve], offsets: Sequence[int]) -> list[Path]:
    """curve.json, curve.md and (with matplotlib) curve.png in `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": {"offsets": list(offsets), "runs": [c.source for c in curves]},
               "results": [{**asdict(c), "rows_per_s": c.rows_per_s} for c in curves]}
    written = [atomic_write_text(out / CURVE_JSON, json.dumps(payload, indent=1) + "\n"),
               atomic_write_text(out / "curve.md", "# Held-out accuracy against rows seen\n\n"
                                 + table(curves, offsets))]
    png = plot_png(curves, offsets)
    if png is not None:
        written.append(atomic_write_bytes(out / "curve.png", png))
    return written

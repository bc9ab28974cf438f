"""Turning run records into result rows, tables, report.md, results.json and plots.

Definitions (per domain and method; domain "all" pools every prompt):
- new_tokens, forward_passes: sums over the prompts, mean over repeats (the prefill counts as one pass);
- tokens_per_pass (tau): total new tokens / total forward passes;
- tokens_per_second: per repeat, total new tokens / total wall seconds; mean over repeats, with std/min/max;
- speedup_vs_hf: per repeat, tokens/s of the method / tokens/s of the hf baseline on the same prompts in the same
  run; mean over repeats, with std/min/max (a ratio of rates, so it stays meaningful when lengths differ);
- exact_match: share of (prompt, repeat) generations whose tokens equal the hf baseline's (greedy only: with
  sampling, outputs legitimately differ and the field is null);
- exact_match_vs_ar: for the drafting modes, the same against maskspec's own reference loop (mode ar). It separates
  drafting bugs (mismatch vs ar) from kernel numerics (e.g. bf16 on a GPU, where the reference loop itself can
  differ from HF generate at near-ties);
- accuracy: for prompts with a reference, share whose last number in the answer equals the reference number.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

from maskspec.bench.runner import AR, HF, MASKSPEC, RunRecord, method_label
from maskspec.decode.steps import DRAFT_MODES
from maskspec.files import atomic_write_text

ALL = "all"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


# ---------------------------------------------------------------------- answer checking
def extract_last_number(text: str) -> float | None:
    """The last number in `text` ("1,234.5" -> 1234.5; "$45." -> 45.0), or None."""
    matches = _NUMBER.findall(text or "")
    for raw in reversed(matches):
        try:
            return float(raw.replace(",", ""))
        except ValueError:
            continue
    return None


def answer_correct(text: str, reference: str | None) -> bool | None:
    """None when the reference holds no number (nothing to check), else whether the answer's last number
    equals it."""
    if reference is None:
        return None
    gold = extract_last_number(reference)
    if gold is None:
        return None
    got = extract_last_number(text)
    return got is not None and math.isclose(got, gold, rel_tol=0.0, abs_tol=1e-6)


# ---------------------------------------------------------------------- aggregation
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return std, min(values), max(values)


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first differing token (the shorter length if one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def aggregate(records: Sequence[RunRecord], greedy: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Result rows (one per domain and method, then domain "all") and the greedy mismatches against hf."""
    keys: "OrderedDict[tuple, None]" = OrderedDict((r.key, None) for r in records)
    domains = list(OrderedDict((r.domain, None) for r in records))
    baseline = {(r.prompt_id, r.repeat): r for r in records if r.method == HF}
    reference = {(r.prompt_id, r.repeat): r for r in records if r.method == AR}
    if records and not baseline:
        raise ValueError("aggregate needs hf baseline records")

    rows: list[dict[str, Any]] = []
    mismatches: list[dict[str, Any]] = []
    for domain in domains + [ALL]:
        for key in keys:
            recs = [r for r in records if r.key == key and (domain == ALL or r.domain == domain)]
            if not recs:
                continue
            rows.append(_row(domain, key, recs, baseline, reference, greedy))
            if domain != ALL and greedy and key[0] != HF:
                mismatches.extend(_mismatches(recs, baseline, reference))
    return rows, mismatches


def _share_equal(recs: list[RunRecord], other: dict) -> float | None:
    pairs = [(r, other.get((r.prompt_id, r.repeat))) for r in recs]
    if any(o is None for _, o in pairs):
        return None
    return sum(r.token_ids == o.token_ids for r, o in pairs) / len(pairs)


def _row(domain: str, key: tuple, recs: list[RunRecord], baseline: dict, reference: dict,
         greedy: bool) -> dict[str, Any]:
    method, mode, k, tree, static = key
    repeats = sorted({r.repeat for r in recs})
    tokens_r, passes_r, tps_r, speedup_r, seconds_r = [], [], [], [], []
    for rep in repeats:
        these = [r for r in recs if r.repeat == rep]
        base = [baseline[(r.prompt_id, rep)] for r in these]
        tokens = sum(r.new_tokens for r in these)
        seconds = sum(r.seconds for r in these)
        tokens_r.append(tokens)
        seconds_r.append(seconds)
        passes_r.append(None if any(r.forward_passes is None for r in these)
                        else sum(r.forward_passes for r in these))
        tps = tokens / seconds if seconds > 0 else 0.0
        base_seconds = sum(b.seconds for b in base)
        base_tps = sum(b.new_tokens for b in base) / base_seconds if base_seconds > 0 else 0.0
        tps_r.append(tps)
        speedup_r.append(tps / base_tps if base_tps > 0 else 0.0)
    all_tokens = sum(tokens_r)
    all_passes = None if any(p is None for p in passes_r) else sum(passes_r)
    tps_std, tps_min, tps_max = _spread(tps_r)
    sp_std, sp_min, sp_max = _spread(speedup_r)

    exact = 1.0 if method == HF else (_share_equal(recs, baseline) if greedy else None)
    exact_ar = _share_equal(recs, reference) if greedy and method in (AR, MASKSPEC) and reference else None
    checks = [answer_correct(r.text, r.reference) for r in recs]
    checks = [c for c in checks if c is not None]
    return {
        "domain": domain, "method": method, "mode": mode, "k": k, "tree": tree, "static": static,
        "label": method_label(method, mode, k, tree, static),
        "prompts": len({r.prompt_id for r in recs}), "repeats": len(repeats),
        "new_tokens": _int_if_whole(_mean(tokens_r)),
        "forward_passes": None if all_passes is None else _int_if_whole(all_passes / len(repeats)),
        "tokens_per_pass": None if not all_passes else all_tokens / all_passes,
        # the cost side of tau: wall time per forward pass, prefill included
        "ms_per_pass": None if not all_passes else 1000 * sum(seconds_r) / all_passes,
        "tokens_per_second": _mean(tps_r), "tokens_per_second_std": tps_std,
        "tokens_per_second_min": tps_min, "tokens_per_second_max": tps_max,
        "speedup_vs_hf": _mean(speedup_r), "speedup_vs_hf_std": sp_std,
        "speedup_vs_hf_min": sp_min, "speedup_vs_hf_max": sp_max,
        "exact_match": exact, "exact_match_vs_ar": exact_ar,
        "accuracy": _mean([float(c) for c in checks]) if checks else None,
        "accuracy_prompts": len(checks),
    }


def _mismatches(recs: list[RunRecord], baseline: dict, reference: dict) -> list[dict[str, Any]]:
    out = []
    for r in recs:
        base = baseline[(r.prompt_id, r.repeat)]
        ar = reference.get((r.prompt_id, r.repeat)) if r.method == MASKSPEC else None
        if r.token_ids != base.token_ids:
            out.append({"prompt_id": r.prompt_id, "domain": r.domain, "method": r.method, "mode": r.mode,
                        "k": r.k, "tree": r.tree, "static": r.static,
                        "label": method_label(r.method, r.mode, r.k, r.tree, r.static),
                        "repeat": r.repeat,
                        "first_difference": first_difference(r.token_ids, base.token_ids),
                        "new_tokens": r.new_tokens, "baseline_new_tokens": base.new_tokens,
                        "matches_ar": None if ar is None else r.token_ids == ar.token_ids})
    return out


# ---------------------------------------------------------------------- tables (shared by console and markdown)
Table = tuple[str, list[str], list[list[str]]]  # title, headers, rows


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _domains(rows: Sequence[dict]) -> list[str]:
    return list(OrderedDict((r["domain"], None) for r in rows))


def _labels(rows: Sequence[dict]) -> list[str]:
    return list(OrderedDict((r["label"], None) for r in rows))


def tau_table(rows: Sequence[dict]) -> Table | None:
    """Paper's Table 1: rows = domains, columns = k (per drafting mode), cells = tau. None without drafts."""
    drafted = [r for r in rows if r["method"] == MASKSPEC]
    if not drafted:
        return None
    modes = [m for m in DRAFT_MODES if any(r["mode"] == m for r in drafted)]
    ks = sorted({r["k"] for r in drafted})
    trees = sorted({r.get("tree", 0) for r in drafted})
    columns = [(m, k, t) for m in modes for t in trees for k in ks
               if any((r["mode"], r["k"], r.get("tree", 0)) == (m, k, t) for r in drafted)]
    headers = ["domain"] + [(f"k={k}" if len(modes) == 1 else f"{m[:4]} k={k}") + (f" tree={t}" if t else "")
                            for m, k, t in columns]
    by = {(r["domain"], r["mode"], r["k"], r.get("tree", 0)): r for r in drafted}
    body = [[d] + [_fmt(by[(d, *c)]["tokens_per_pass"]) if (d, *c) in by else "-" for c in columns]
            for d in _domains(rows)]
    title = "Tokens per forward pass (tau), " + " / ".join(modes) + " decoding"
    return title, headers, body


def speed_table(rows: Sequence[dict]) -> Table:
    """Rows = methods, columns = domains, cells = tokens/s and speed-up vs hf."""
    domains = _domains(rows)
    by = {(r["label"], r["domain"]): r for r in rows}
    body = []
    for label in _labels(rows):
        cells = [label]
        for d in domains:
            r = by.get((label, d))
            cells.append("-" if r is None else
                         f"{r['tokens_per_second']:.1f} tok/s ({r['speedup_vs_hf']:.2f}x)")
        body.append(cells)
    return "Speed: tokens/s (speed-up vs hf greedy, same prompts, same run)", ["method"] + domains, body


def detail_table(rows: Sequence[dict]) -> Table:
    headers = ["domain", "method", "prompts", "new tokens", "passes", "tau", "ms/pass", "tok/s", "speed-up",
               "= hf", "= ar", "accuracy"]
    body = []
    for r in rows:
        spread = f" ±{r['speedup_vs_hf_std']:.2f}" if r["repeats"] > 1 else ""
        body.append([r["domain"], r["label"], str(r["prompts"]), str(r["new_tokens"]),
                     _fmt(r["forward_passes"], ""), _fmt(r["tokens_per_pass"]), _fmt(r.get("ms_per_pass"), ".1f"),
                     _fmt(r["tokens_per_second"], ".1f"),
                     _fmt(r["speedup_vs_hf"], ".2f", "x") + spread, _fmt(r["exact_match"], ".2f"),
                     _fmt(r["exact_match_vs_ar"], ".2f"), _fmt(r["accuracy"], ".2f")])
    return "All results", headers, body


def markdown_table(table: Table) -> str:
    title, headers, body = table
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def tables(rows: Sequence[dict]) -> list[Table]:
    out = [t for t in (tau_table(rows), speed_table(rows), detail_table(rows)) if t is not None]
    return out


# ---------------------------------------------------------------------- files
def write_report_md(path: Path, rows: Sequence[dict], mismatches: Sequence[dict], system: dict, config: dict,
                    notes: Iterable[str] = (), plots: Iterable[str] = ()) -> Path:
    parts = ["# maskspec benchmark", ""]
    parts.append(f"Model `{config.get('model')}`, adapter `{config.get('adapter')}`, device {system.get('device')} "
                 f"({system.get('gpu') or system.get('cpu')}), dtype {system.get('dtype')}, "
                 f"max new tokens {config.get('max_new_tokens')}, temperature {config.get('temperature')}, "
                 f"repeats {config.get('repeats')}. Speed-ups are ratios within this run.")
    parts.append("")
    for note in notes:
        parts += [f"> {note}", ""]
    for table in tables(rows):
        parts += [markdown_table(table), ""]
    if config.get("temperature", 0) == 0:
        if mismatches:
            parts += ["### Mismatches against hf greedy (must be none)", ""]
            parts += [f"- {m['domain']} / {m['prompt_id']} / {m['label']} (repeat {m['repeat']}): first "
                      f"difference at token {m['first_difference']}"
                      + ("" if m["matches_ar"] is None else
                         " (same as mode ar: numerics of the forward, not drafting)" if m["matches_ar"] else
                         " (differs from mode ar too: a drafting bug)") for m in mismatches]
        else:
            parts.append("Every greedy method produced exactly the hf greedy output on every prompt.")
        parts.append("")
    for plot in plots:
        parts += [f"![{Path(plot).stem}]({Path(plot).name})", ""]
    return atomic_write_text(path, "\n".join(parts))


def write_results_json(path: Path, rows: Sequence[dict], mismatches: Sequence[dict], system: dict,
                       config: dict) -> Path:
    payload = {"system": system, "config": config, "results": list(rows), "mismatches": list(mismatches)}
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def write_plots(out: Path, rows: Sequence[dict]) -> list[Path]:
    """tau_vs_k.png (if any drafting mode ran) and speedup.png. Empty list when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    domains = _domains(rows)
    drafted = [r for r in rows if r["method"] == MASKSPEC and r["tokens_per_pass"] is not None]
    if drafted:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        trees = sorted({r.get("tree", 0) for r in drafted} - {0})
        series = [("quadratic", 0, "-"), ("linear", 0, "--")] + [("quadratic", t, ":") for t in trees]
        for d in domains:
            for mode, tree, style in series:
                pts = sorted((r["k"], r["tokens_per_pass"]) for r in drafted
                             if r["domain"] == d and r["mode"] == mode and r.get("tree", 0) == tree)
                if pts:
                    name = f"{mode} tree={tree}" if tree else mode
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                            linewidth=2.5 if d == ALL else 1.2, label=f"{d} ({name})")
        ks = sorted({r["k"] for r in drafted})
        ax.set_xticks(ks)
        ax.set_xlabel("k (drafted tokens per step)")
        ax.set_ylabel("tokens per forward pass (tau)")
        ax.set_title("Acceptance: tau vs k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(out / "tau_vs_k.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    labels = _labels(rows)
    by = {(r["label"], r["domain"]): r["speedup_vs_hf"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(domains) * max(1, len(labels)) / 3), 4.2))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [by.get((label, d), 0.0) for d in domains], width=width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(domains)))
    ax.set_xticklabels(domains)
    ax.set_ylabel("speed-up vs hf greedy (tokens/s ratio)")
    ax.set_title("Speed-up per domain and method")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(out / "speedup.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def write_records_jsonl(path: Path, records: Sequence[RunRecord]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))

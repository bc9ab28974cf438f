"""`maskspec tune`: the (k, tree) setting with the most tokens per second on this device, recorded in the adapter's
config so that decoding uses it when given neither --k nor --tree. With --static every setting is also tried with
the static step (`decode.static`: the same drafts, so the same tau, at its own cost per pass), and the choice
records whether to use it.

tokens/s of a setting = tau / seconds per pass:
- tau from the acceptance simulation (`bench.acceptance`: exact pass counts of greedy quadratic decoding, chains and
  draft trees alike) over the sample prompts;
- seconds per pass from timing real decoding of every setting on a few of those prompts, the settings interleaved
  per prompt so that they share the machine's load. A pass's cost depends on its rows ((nodes + 1) x (k + 1)) and
  on the drafting work (sampler calls per depth), so it is measured on this device, not modelled.

The bench (`maskspec bench`) remains the judge of real speed; tune is how to choose what to bench.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import typer

from maskspec.errors import MaskspecError
from maskspec.files import atomic_write_text

TUNE_HELP = (
    "Choose the k and draft-tree size with the most tokens per second on this device and record them in the "
    "adapter's config (used when --k and --tree are not given).\n\n"
    "tau of every setting comes from the exact acceptance simulation over the sample prompts, the cost of a "
    "pass from timing real decoding of every setting on a few of them (interleaved). Writes tune.json and "
    "tune.md to --out."
)


def _timing_sample(prompts: Sequence[Any], count: int) -> list[Any]:
    """`count` prompts spread evenly over the sample (so several domains are timed)."""
    if count >= len(prompts):
        return list(prompts)
    step = len(prompts) / count
    return [prompts[int(i * step)] for i in range(count)]


Setting = tuple[int, int, bool]  # (k, tree, static step); (0, 0, False) is the reference loop, mode ar


def time_settings(mtp: Any, prompts: Sequence[Any], settings: Sequence[Setting], max_new_tokens: int,
                  on_prompt: Any = None, tree_width: int = 2) -> dict[Setting, dict[str, float]]:
    """Greedy quadratic decoding of every (k, tree, static) setting on each prompt, settings interleaved per
    prompt and rotated, after one untimed warm-up each. Per setting: seconds, passes, tokens and ms per pass
    (prefill included, as tau counts it)."""
    from maskspec.decode.api import prepare_input_ids
    from maskspec.decode.decoder import Decoder

    def run(ids: list[int], setting: Setting, tokens: int) -> Any:
        k, tree, static = setting
        decoder = Decoder(mtp, mode="quadratic" if k else "ar", k=k or None, tree=tree, tree_width=tree_width,
                          static=static)
        return decoder.generate([dict(prompt_ids=ids, max_new_tokens=tokens)])[0]

    inputs = [prepare_input_ids(mtp, p.messages)[0].tolist() for p in prompts]
    longest = max(inputs, key=len)
    for setting in settings:  # the static step sized (and on a GPU captured) for the longest prompt, untimed
        run(longest, setting, max_new_tokens if setting[2] else min(16, max_new_tokens))
    totals = {s: {"seconds": 0.0, "passes": 0, "tokens": 0} for s in settings}
    for i, ids in enumerate(inputs):
        order = list(settings[i % len(settings):]) + list(settings[:i % len(settings)])
        for setting in order:
            start = time.perf_counter()
            out = run(ids, setting, max_new_tokens)
            totals[setting]["seconds"] += time.perf_counter() - start
            totals[setting]["passes"] += out.stats.forward_passes
            totals[setting]["tokens"] += out.stats.new_tokens
        if on_prompt is not None:
            on_prompt(prompts[i])
    for entry in totals.values():
        entry["ms_per_pass"] = 1000 * entry["seconds"] / max(1, entry["passes"])
    return totals


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row with the most predicted tokens per second (ties: the smaller pass)."""
    return max(rows, key=lambda r: (r["predicted_tokens_per_second"], -r["mean_rows"]))


def run_tune(model: str = "default", adapter: Optional[str] = None, suite: Optional[Path] = None,
             domains: Optional[str] = None, n: int = 2, max_new_tokens: int = 96, k: Optional[str] = None,
             tree: str = "0,4,8", tree_width: int = 2, timing_prompts: int = 4, device: str = "cpu",
             dtype: str = "fp32", save: bool = True, out: Optional[Path] = None,
             answers: Optional[Path] = None, static: bool = False) -> dict[str, Any]:
    """The whole command (also callable from Python). Returns the tune.json payload. `answers`: greedy answers
    from `maskspec acceptance --answers` to reuse (and extend). `static`: try every setting with the static step
    too."""
    import torch
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from maskspec.adapter import (CONFIG_FILE, read_adapter_config, resolve_adapter, shipped_adapter_for,
                                  write_decoding_defaults)
    from maskspec.bench.acceptance import TreeShape
    from maskspec.bench.acceptance_cli import profile_prompts, read_answers, summarize_trees, write_answers
    from maskspec.bench.cli import check_out_folder, parse_ints, split_option
    from maskspec.bench.runner import system_info
    from maskspec.bench.suites import load_suite, select_prompts
    from maskspec.hub import parse_dtype, resolve_device
    from maskspec.model.mtp import MTPModel
    from maskspec.progress import PromptProgress

    trees = parse_ints("--tree", tree, minimum=0, example="0,4,8")
    if n < 1 or timing_prompts < 1:
        raise MaskspecError("--n and --timing-prompts must be at least 1")
    if max_new_tokens < 8:
        raise MaskspecError(f"--max-new-tokens must be at least 8, got {max_new_tokens}")
    if tree_width < 1:
        raise MaskspecError(f"--tree-width must be at least 1, got {tree_width}")
    adapter = adapter if adapter is not None else shipped_adapter_for(model)
    if adapter is None:
        raise MaskspecError(f"no adapter ships for model {model!r}; pass --adapter FOLDER (from `maskspec train`)")
    adapter_path = resolve_adapter(adapter, model)
    adapter_k = read_adapter_config(adapter_path).k
    if save and not (os.access(adapter_path, os.W_OK) and os.access(adapter_path / CONFIG_FILE, os.W_OK)):
        raise MaskspecError(f"adapter folder {adapter_path} is not writable, so the choice cannot be recorded: copy "
                            "it somewhere writable and pass --adapter COPY, or pass --no-save")
    if k is not None:
        ks = parse_ints("--k", k, adapter_k=adapter_k)
    else:
        ks = [x for x in (1, 2, 4, 8) if x <= adapter_k]
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    prompts = select_prompts(load_suite(suite), split_option(domains) or None, n)
    timed = _timing_sample(prompts, timing_prompts)
    out = Path(out) if out is not None else Path("bench-results") / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_folder(out, "tune.json", "tune")
    known_answers = read_answers(answers) if answers is not None else {}

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)
    hf_logging.set_verbosity_error()
    shapes = [TreeShape(x, t, tree_width) for x in ks for t in trees if t > 0]
    settings: list[Setting] = [(0, 0, False)] + [(x, t, s) for x in ks for t in trees
                                                 for s in ((False, True) if static else (False,))]

    def shape_of(setting: Setting) -> str:  # the static step drafts what the usual one does: one simulation
        k, t, _ = setting
        return f"k{k}-chain" if not t else TreeShape(k, t, tree_width).key

    with PromptProgress("tune", len(prompts) + len(timed)) as progress:
        progress.stage(f"loading model {model!r} with adapter {adapter!r} ({device}, {dtype})")
        mtp = MTPModel.from_pretrained(model, adapter=str(adapter_path), dtype=torch_dtype, device=device)
        progress.stage(f"tau of {len(settings) - 1} settings on {len(prompts)} prompts (acceptance simulation)")
        profiles = profile_prompts(mtp, prompts, max_new_tokens, ["sampler"], trees=shapes, answers=known_answers,
                                   on_done=lambda p: progress.done(f"{p.domain}/{p.prompt_id}"))
        if answers is not None:
            write_answers(answers, known_answers)
        progress.stage(f"timing {len(settings)} settings on {len(timed)} prompts")
        costs = time_settings(mtp, timed, settings, max_new_tokens,
                              on_prompt=lambda p: progress.done(f"timed {p.domain}/{p.id}"), tree_width=tree_width)

    simulated = {r["shape"]: r for r in summarize_trees(profiles, shapes, ks) if r["domain"] == "all"}
    ar_cost = costs[(0, 0, False)]
    rows = []
    for setting in settings[1:]:
        sim, cost = simulated[shape_of(setting)], costs[setting]
        rows.append({"k": setting[0], "tree": setting[1], "static": setting[2], "tau": sim["tau"],
                     "mean_nodes": sim["mean_nodes"],
                     "mean_rows": sim["mean_rows"], "ms_per_pass": cost["ms_per_pass"],
                     "predicted_tokens_per_second": 1000 * sim["tau"] / cost["ms_per_pass"],
                     "measured_tokens_per_second": cost["tokens"] / cost["seconds"],
                     "measured_tau": cost["tokens"] / cost["passes"]})
    best = choose(rows)
    best_chain = choose([r for r in rows if r["tree"] == 0])
    ar_tps = ar_cost["tokens"] / ar_cost["seconds"]
    system = system_info(device, torch_dtype)
    where = f"{system['gpu'] or system['cpu']}, {system['threads']} threads, {system['dtype']}"
    entry = {"k": best["k"], "tree": best["tree"], **({"static": best["static"]} if static else {}),
             "measured": f"maskspec tune {time.strftime('%Y-%m-%d')} on {where}: tau {best['tau']:.2f} at "
                         f"{best['ms_per_pass']:.1f} ms/pass, {best['predicted_tokens_per_second']:.1f} tokens/s "
                         f"predicted (best chain: k={best_chain['k']}, "
                         f"{best_chain['predicted_tokens_per_second']:.1f}; ar {ar_tps:.1f}); {len(prompts)} "
                         f"prompts, {max_new_tokens} new tokens"}
    saved = str(adapter_path / CONFIG_FILE) if save else None
    config = {"model": model, "adapter": str(adapter_path), "adapter_k": adapter_k, "suite": str(suite or "built-in"),
              "n": n, "prompts": len(prompts), "timing_prompts": len(timed), "max_new_tokens": max_new_tokens,
              "k": ks, "trees": trees, "tree_width": tree_width, "static": static, "device": device, "dtype": dtype,
              "saved": saved}
    payload = {"config": config, "system": system, "results": rows, "choice": entry,
               "ar": {"ms_per_pass": ar_cost["ms_per_pass"], "tokens_per_second": ar_tps}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tune.json", json.dumps(payload, indent=2) + "\n")
    table = markdown(rows, best)
    atomic_write_text(out / "tune.md", "# maskspec tune\n\n" + "\n".join(f"- {key}: {value}" for key, value in
                                                                       config.items())
                      + f"\n- ar (plain decoding): {ar_cost['ms_per_pass']:.1f} ms/pass, {ar_tps:.1f} tokens/s\n\n"
                      + table + f"\nChosen: {_label(best)}. {entry['measured']}\n")
    if save:  # after the report is written: a failure here loses no measurement
        write_decoding_defaults(adapter_path, torch.device(device).type, entry)
    console.print(table)
    console.print(f"chosen for {torch.device(device).type}: {_label(best)}"
                  + (f" (saved in {saved})" if saved else " (not saved: --no-save)"))
    console.print(f"results: {out / 'tune.json'}, report: {out / 'tune.md'}")
    return payload


def _label(row: dict[str, Any]) -> str:
    return f"k={row['k']}, tree={row['tree']}" + (", static step" if row.get("static") else "")


def markdown(rows: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    lines = ["| k | tree | step | tau (simulated) | nodes per step | rows per pass | ms per pass | "
             "tokens/s predicted | tokens/s measured (timed prompts) |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " **(chosen)**" if r is best else ""
        step = "static" if r.get("static") else "usual"
        lines.append(f"| {r['k']} | {r['tree']} | {step} | {r['tau']:.2f} | {r['mean_nodes']:.1f} | "
                     f"{r['mean_rows']:.0f} | "
                     f"{r['ms_per_pass']:.1f} | {r['predicted_tokens_per_second']:.1f}{mark} | "
                     f"{r['measured_tokens_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    @app.command("tune", help=TUNE_HELP)
    def tune(
        model: str = typer.Option("default", "--model", help="HF id, local folder, or 'default'."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter folder or 'default' (shipped; the "
                                              "default for the default model). Its config is updated."),
        suite: Optional[Path] = typer.Option(None, "--suite", help="Prompt JSONL (as for `maskspec bench`)."),
        domains: Optional[str] = typer.Option(None, "--domains", help="Comma-separated domains to use."),
        n: int = typer.Option(2, "--n", help="Prompts per domain for tau."),
        max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="New tokens per answer at most."),
        k: Optional[str] = typer.Option(None, "--k", help="Comma-separated k values to try (default: 1,2,4,8 up "
                                        "to the adapter's k)."),
        tree: str = typer.Option("0,4,8", "--tree", help="Comma-separated draft-tree sizes to try (0: a chain)."),
        tree_width: int = typer.Option(2, "--tree-width", help="Children per node and nodes per depth at most."),
        timing_prompts: int = typer.Option(4, "--timing-prompts", help="Prompts every setting is timed on."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps or auto."),
        dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
        save: bool = typer.Option(True, "--save/--no-save", help="Record the choice in the adapter's config."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: "
                                                               "bench-results/tune-<timestamp>)."),
        answers: Optional[Path] = typer.Option(None, "--answers", help="Greedy answers to reuse and extend (the "
                                               "file `maskspec acceptance --answers` writes)."),
        static: bool = typer.Option(False, "--static", help="Also try every setting with the static step (a CUDA "
                                    "graph per step on a GPU) and record whether to use it."),
    ) -> None:
        run_tune(model, adapter, suite, domains, n, max_new_tokens, k, tree, tree_width, timing_prompts, device,
                 dtype, save, out, answers, static)

"""`maskspec acceptance`: tokens per pass of greedy decoding (quadratic, linear) for every k, per domain, from one
teacher-forced pass per prompt (see `maskspec.bench.acceptance` for why that equals real decoding)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

from maskspec.bench.acceptance import (DRAFTERS, PromptProfile, TreeShape, block_pass, draft_matches, simulate,
                                       tree_matches)
from maskspec.errors import MaskspecError
from maskspec.files import atomic_write_text

ACCEPTANCE_HELP = (
    "Tokens per pass (tau) of greedy quadratic and linear decoding for k = 1..K, per domain, without a decoding "
    "run per k.\n\n"
    "Each prompt is decoded once (the exact reference loop), then one pass over prompt + answer with a mask "
    "block after every token gives, per position, how many drafts would be accepted. Also reports teacher-forced "
    "accuracy per mask offset, for the sampler and for the base head's argmax at the masks (--drafters). With a "
    "draft vocabulary in the adapter, 'sampler' drafts from it (and the context) as decoding does; "
    "'sampler-full' scores the sampler over the full vocabulary."
)


def profile_prompts(mtp: Any, prompts: Sequence[Any], max_new_tokens: int, drafters: Sequence[str],
                    on_done: Callable[[PromptProfile], None] | None = None,
                    answers: dict[str, dict[str, Any]] | None = None,
                    trees: Sequence[TreeShape] = ()) -> list[PromptProfile]:
    """Decode each prompt greedily and measure its draft matches (and those of each draft-tree shape in `trees`).
    `answers` (prompt id -> {"prompt_ids", "max_new_tokens", "token_ids"}) holds greedy answers from earlier runs:
    they depend on the base model only, so adapters can be compared without decoding again. New answers are added
    to it."""
    from maskspec.decode.api import generate, prepare_input_ids

    answers = {} if answers is None else answers
    profiles = []
    for prompt in prompts:
        ids = prepare_input_ids(mtp, prompt.messages)[0].tolist()
        known = answers.get(prompt.id)
        if known and known["prompt_ids"] == ids and known["max_new_tokens"] == max_new_tokens:
            continuation = list(known["token_ids"])
        else:
            continuation = list(generate(mtp, ids, max_new_tokens=max_new_tokens, mode="ar").new_token_ids)
            answers[prompt.id] = {"prompt_ids": ids, "max_new_tokens": max_new_tokens, "token_ids": continuation}
        passed = block_pass(mtp, ids, continuation)
        matches, hits, total = draft_matches(mtp, ids, continuation, drafters, passed=passed)
        profile = PromptProfile(prompt.id, prompt.domain, len(ids), len(continuation), matches, hits, total)
        if trees:
            profile.tree_matches, profile.tree_nodes = tree_matches(mtp, ids, continuation, trees, passed=passed)
        profiles.append(profile)
        if on_done is not None:
            on_done(profile)
    return profiles


def summarize(profiles: Sequence[PromptProfile], k_max: int, drafters: Sequence[str],
              modes: Sequence[str] = ("quadratic",)) -> list[dict[str, Any]]:
    """One row per (domain, drafter, mode), domains in first-seen order then "all": tau for k = 1..k_max
    (tokens over passes, summed over prompts) and per-offset accuracy."""
    domains = list(dict.fromkeys(p.domain for p in profiles)) + ["all"]
    rows = []
    for domain in domains:
        group = [p for p in profiles if domain in ("all", p.domain)]
        tokens = sum(p.new_tokens for p in group)
        total = [sum(p.offset_total[j] for p in group) for j in range(k_max)]
        for drafter in drafters:
            hits = [sum(p.offset_hits[drafter][j] for p in group) for j in range(k_max)]
            accuracy = [h / t if t else None for h, t in zip(hits, total)]
            for mode in modes:
                tau = {}
                for k in range(1, k_max + 1):
                    passes = sum(simulate(p.matches[drafter], k, p.new_tokens, mode) for p in group)
                    tau[k] = tokens / passes if passes else None
                rows.append({"domain": domain, "drafter": drafter, "mode": mode, "prompts": len(group),
                             "new_tokens": tokens, "tau": tau, "offset_accuracy": accuracy})
    return rows


def summarize_trees(profiles: Sequence[PromptProfile], shapes: Sequence[TreeShape],
                    chain_k: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One row per (domain, tree shape), domains in first-seen order then "all": tau of greedy quadratic decoding
    with that tree, the mean draft nodes a step verifies, and the mean rows of its pass ((nodes + 1) x (k + 1):
    a block after y0 and after every node). Chains of k in `chain_k` come first, as the trees' reference."""
    domains = list(dict.fromkeys(p.domain for p in profiles)) + ["all"]
    rows = []
    for domain in domains:
        group = [p for p in profiles if domain in ("all", p.domain)]
        tokens = sum(p.new_tokens for p in group)
        for k in chain_k:
            passes, steps = 0, []
            for p in group:
                passes += simulate(p.matches["sampler"], k, p.new_tokens, "quadratic", steps)
            rows.append(_tree_row(domain, f"k{k}-chain", k, 0, len(group), tokens, passes, [k] * len(steps)))
        for shape in shapes:
            passes, nodes = 0, []
            for p in group:
                steps: list[int] = []
                passes += simulate(p.tree_matches[shape.key], shape.k, p.new_tokens, "quadratic", steps)
                nodes += [p.tree_nodes[shape.key][h] for h in steps]
            rows.append(_tree_row(domain, shape.key, shape.k, shape.budget, len(group), tokens, passes, nodes))
    return rows


def _tree_row(domain: str, key: str, k: int, budget: int, prompts: int, tokens: int, passes: int,
              nodes: Sequence[int]) -> dict[str, Any]:
    mean_nodes = sum(nodes) / len(nodes) if nodes else 0.0
    return {"domain": domain, "shape": key, "k": k, "tree": budget, "prompts": prompts, "new_tokens": tokens,
            "tau": tokens / passes if passes else None, "mean_nodes": mean_nodes,
            "mean_rows": (mean_nodes + 1) * (k + 1)}


def tree_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| domain | shape | prompts | tau | nodes per step | rows per pass |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        tau = "-" if r["tau"] is None else f"{r['tau']:.2f}"
        lines.append(f"| {r['domain']} | {r['shape']} | {r['prompts']} | {tau} | {r['mean_nodes']:.1f} | "
                     f"{r['mean_rows']:.0f} |")
    return "\n".join(lines) + "\n"


def markdown(rows: Sequence[dict[str, Any]], k_max: int) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = ["| domain | drafter | mode | prompts | " + " | ".join(f"k={k}" for k in range(1, k_max + 1)) + " |",
             "|---|---|---|---:|" + "---:|" * k_max]
    for r in rows:
        lines.append(f"| {r['domain']} | {r['drafter']} | {r['mode']} | {r['prompts']} | "
                     + " | ".join(fmt(r["tau"][k]) for k in range(1, k_max + 1)) + " |")
    lines += ["", "Teacher-forced top-1 accuracy per mask offset:", "",
              "| domain | drafter | " + " | ".join(f"+{j}" for j in range(1, k_max + 1)) + " |",
              "|---|---|" + "---:|" * k_max]
    seen = set()
    for r in rows:
        if (r["domain"], r["drafter"]) not in seen:
            seen.add((r["domain"], r["drafter"]))
            lines.append(f"| {r['domain']} | {r['drafter']} | "
                         + " | ".join(fmt(a) for a in r["offset_accuracy"]) + " |")
    return "\n".join(lines) + "\n"


def run_acceptance(model: str = "default", adapter: Optional[str] = None, suite: Optional[Path] = None,
                   domains: Optional[str] = None, n: Optional[int] = None, max_new_tokens: int = 128,
                   drafters: str = "sampler,head", out: Optional[Path] = None, device: str = "cpu",
                   dtype: str = "fp32", answers: Optional[Path] = None, modes: str = "quadratic,linear",
                   tree: Optional[str] = None, tree_k: Optional[str] = None, tree_width: int = 2,
                   tree_lookup: bool = True) -> dict[str, Any]:
    """The whole command (also callable from Python). Returns the acceptance.json payload. `tree`: draft tree
    sizes (node budgets) to simulate, each at every k of `tree_k` (default 2,4,8 up to the adapter's k)."""
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from maskspec.adapter import read_adapter_config, resolve_adapter, shipped_adapter_for
    from maskspec.bench.cli import check_choices, check_out_folder, parse_ints, split_option
    from maskspec.bench.runner import system_info
    from maskspec.decode.steps import DRAFT_MODES
    from maskspec.bench.suites import load_suite, select_prompts
    from maskspec.hub import resolve_device
    from maskspec.model.mtp import MTPModel
    from maskspec.progress import PromptProgress

    drafter_list = check_choices("--drafters", split_option(drafters), DRAFTERS)
    mode_list = check_choices("--modes", split_option(modes), DRAFT_MODES)
    for option, values in (("--drafters", drafter_list), ("--modes", mode_list)):
        if not values:
            raise MaskspecError(f"{option} needs at least one value")
    if max_new_tokens < 2:
        raise MaskspecError(f"--max-new-tokens must be at least 2, got {max_new_tokens}")
    if adapter is None:
        adapter = shipped_adapter_for(model)
        if adapter is None:
            raise MaskspecError(f"no adapter ships for model {model!r}; pass --adapter FOLDER (from `maskspec train`)")
    budgets = parse_ints("--tree", tree, example="4,8,16") if tree is not None else []
    if tree_width < 1:
        raise MaskspecError(f"--tree-width must be at least 1, got {tree_width}")
    adapter_k = read_adapter_config(resolve_adapter(adapter, model)).k
    if tree_k is not None:
        tree_ks = parse_ints("--tree-k", tree_k, example="2,4,8", adapter_k=adapter_k)
    else:
        tree_ks = [k for k in (2, 4, 8) if k <= adapter_k] or [adapter_k]
    shapes = [TreeShape(k, budget, tree_width, tree_lookup) for k in tree_ks for budget in budgets]
    prompts = select_prompts(load_suite(suite), split_option(domains) or None, n)
    out = Path(out) if out is not None else Path("bench-results") / f"acceptance-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_folder(out, "acceptance.json", "acceptance")
    device = resolve_device(device)
    known_answers = read_answers(answers) if answers is not None else {}

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)
    hf_logging.set_verbosity_error()
    with PromptProgress("acceptance", len(prompts)) as progress:
        progress.stage(f"loading model {model!r} with adapter {adapter!r} ({device}, {dtype})")
        mtp = MTPModel.from_pretrained(model, adapter=adapter, dtype=dtype, device=device)
        started = time.perf_counter()
        progress.stage(f"decoding and scoring {len(prompts)} prompts")
        profiles = profile_prompts(mtp, prompts, max_new_tokens, drafter_list,
                                   on_done=lambda p: progress.done(f"{p.domain}/{p.prompt_id}"),
                                   answers=known_answers, trees=shapes)
    if answers is not None:
        write_answers(answers, known_answers)
    rows = summarize(profiles, mtp.k, drafter_list, mode_list)
    tree_rows = summarize_trees(profiles, shapes, tree_ks) if shapes else []
    config = {"model": model, "adapter": str(adapter), "adapter_k": mtp.k,
              "suite": str(suite) if suite else "built-in", "n": n, "prompts": len(prompts),
              "max_new_tokens": max_new_tokens, "drafters": drafter_list, "modes": mode_list,
              "draft_vocab": int(mtp.draft_vocab.numel()) if mtp.draft_vocab_set else None, "device": device,
              "dtype": dtype, "trees": [shape.key for shape in shapes],
              "seconds": round(time.perf_counter() - started, 1)}
    payload = {"config": config, "system": system_info(device, mtp.dtype), "results": rows,
               "tree_results": tree_rows, "prompts": [p.to_dict() for p in profiles]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "acceptance.json", json.dumps(payload, indent=2) + "\n")
    table = markdown(rows, mtp.k)
    if tree_rows:
        table += ("\nDraft trees (greedy quadratic; the chains of the same k first; rows per pass = (nodes + 1) x "
                  "(k + 1)):\n\n" + tree_markdown(tree_rows))
    atomic_write_text(out / "acceptance.md", "# Acceptance profile (greedy decoding, tokens per pass)\n\n"
                      + "\n".join(f"- {key}: {value}" for key, value in config.items()) + "\n\n" + table)
    console.print(table)
    console.print(f"results: {out / 'acceptance.json'}, report: {out / 'acceptance.md'}")
    return payload


def read_answers(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskspecError(f"--answers {path} is not a JSON file written by `maskspec acceptance` ({exc})") from None
    if not isinstance(answers, dict) or not all(
            isinstance(a, dict) and {"prompt_ids", "max_new_tokens", "token_ids"} <= set(a) for a in answers.values()):
        raise MaskspecError(f"--answers {path} is not a file written by `maskspec acceptance`")
    return answers


def write_answers(path: Path, answers: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(answers) + "\n")


def register(app: typer.Typer) -> None:
    @app.command("acceptance", help=ACCEPTANCE_HELP)
    def acceptance(
        model: str = typer.Option("default", "--model", help="HF id, local folder, or 'default'."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter folder or 'default' (shipped; the "
                                                                      "default for the default model)."),
        suite: Optional[Path] = typer.Option(None, "--suite", help="Prompt JSONL (as for `maskspec bench`)."),
        domains: Optional[str] = typer.Option(None, "--domains", help="Comma-separated domains to run."),
        n: Optional[int] = typer.Option(None, "--n", help="Prompts per domain (default: all)."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="New tokens per answer at most."),
        drafters: str = typer.Option("sampler,head", "--drafters", help="sampler (what decoding uses), "
                                     "sampler-full (the sampler over the full vocabulary, not the adapter's draft "
                                     "vocabulary) and/or head (the base head's argmax at the masks)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: "
                                                               "bench-results/acceptance-<timestamp>)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N, mps or auto."),
        dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
        answers: Optional[Path] = typer.Option(None, "--answers", help="JSON file of greedy answers to reuse and "
                                               "extend (they depend on the base model only, so adapters can be "
                                               "compared without decoding again)."),
        modes: str = typer.Option("quadratic,linear", "--modes", help="Decoding modes to simulate."),
        tree: Optional[str] = typer.Option(None, "--tree", help="Comma-separated draft tree sizes (node budgets) "
                                           "to simulate, e.g. 4,8,16 (greedy quadratic decoding, exact)."),
        tree_k: Optional[str] = typer.Option(None, "--tree-k", help="The k values the trees are simulated at "
                                             "(default: 2,4,8 up to the adapter's k)."),
        tree_width: int = typer.Option(2, "--tree-width", help="Children per node and nodes per depth at most."),
        tree_lookup: bool = typer.Option(True, "--tree-lookup/--no-tree-lookup",
                                         help="Add the prompt-lookup branch to every tree."),
    ) -> None:
        run_acceptance(model, adapter, suite, domains, n, max_new_tokens, drafters, out, device, dtype, answers,
                       modes, tree, tree_k, tree_width, tree_lookup)

"""`maskspec bench`: speed and acceptance of every decoding method against Hugging Face greedy generation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from maskspec.errors import MaskspecError, UsageError
from maskspec.files import unwritable_reason

DEFAULT_KS = (1, 2, 4, 8)

BENCH_HELP = """Benchmark maskspec decoding against Hugging Face greedy generation and prompt lookup.

Every method runs on the same chat-templated prompts, interleaved per prompt, after a warm-up. Writes \
results.json, records.jsonl, report.md and PNG plots to --out and prints the tables."""


def split_option(value: str | None) -> list[str]:
    """A comma-separated option value as a list, blanks dropped (shared by the bench commands)."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def parse_ints(option: str, value: str, minimum: int = 1, example: str = "1,2,4,8",
               adapter_k: int | None = None) -> list[int]:
    """A comma-separated list of integers >= `minimum` (and, given `adapter_k`, k values the adapter drafts),
    sorted and without duplicates; one-line error if not."""
    try:
        values = [int(part) for part in split_option(value)]
    except ValueError:
        raise MaskspecError(f"{option} takes comma-separated integers such as {example}, got {value!r}") from None
    if not values or any(v < minimum for v in values):
        raise MaskspecError(f"{option} needs at least one integer >= {minimum}, got {value!r}")
    if adapter_k is not None and max(values) > adapter_k:
        raise MaskspecError(f"{option} {max(values)}: the adapter drafts at most k = {adapter_k}")
    return sorted(set(values))


def _parse_ks(value: str) -> list[int]:
    return parse_ints("--k", value)


def check_choices(option: str, values: list[str], allowed: tuple[str, ...]) -> list[str]:
    """`values` if each is one of `allowed` (duplicates dropped), else a one-line error naming the option."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise MaskspecError(f"{option}: unknown value(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(values))


def check_out_folder(out: Path, marker: str, command: str) -> None:
    """An --out folder that a command may write into: missing, empty, or an earlier output of the same command
    (`marker` holds a JSON object with "config" and "results"). Anything else is someone else's: UsageError."""
    reason = unwritable_reason(out)
    if reason is not None:
        raise UsageError(f"--out {out}: {reason}")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file; `maskspec {command}` writes a folder: choose another --out")
    if not any(out.iterdir()):
        return
    try:
        payload = json.loads((out / marker).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        payload = None
    if not (isinstance(payload, dict) and {"config", "results"} <= set(payload)):
        raise UsageError(f"--out {out} is not a `maskspec {command}` output folder (no {marker} of an earlier run); "
                         "choose another --out")


def run_bench(model: str = "default", adapter: Optional[str] = None, suite: Optional[Path] = None,
              domains: Optional[str] = None, n: Optional[int] = None, k: Optional[str] = None,
              modes: str = "ar,linear,quadratic", baselines: str = "hf,hf-prompt-lookup",
              max_new_tokens: int = 128, temperature: float = 0.0, repeats: int = 1, out: Optional[Path] = None,
              device: str = "auto", dtype: Optional[str] = None, prompt_lookup_tokens: int = 10, seed: int = 0,
              plots: bool = True, tree: str = "0", static: bool = False,
              time_limit: Optional[float] = None) -> dict[str, Any]:
    """The whole benchmark (also callable from Python). Returns the results.json payload plus `out`. `k` None:
    1,2,4,8, keeping those the adapter drafts; an explicit k above the adapter's k is an error. `tree`: the draft
    tree sizes quadratic decoding runs with (comma-separated node budgets; 0 = the chain). `static`: ar and the
    quadratic chains and trees run with the static step too (greedy only). `time_limit`: seconds after which no
    new prompt starts (the results cover the prompts done)."""
    import torch
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from maskspec.adapter import read_adapter_config, resolve_adapter, shipped_adapter_for
    from maskspec.bench import report
    from maskspec.bench.runner import BASELINES, BenchRunner, BenchSettings, build_methods, system_info
    from maskspec.bench.suites import in_domain_turns, load_suite, select_prompts
    from maskspec.decode.static import engine_report
    from maskspec.decode.steps import MODES
    from maskspec.decode.verify import check_sampling
    from maskspec.hub import is_default_model, parse_dtype, resolve_device
    from maskspec.model.mtp import MTPConfig, MTPModel
    from maskspec.progress import PromptProgress

    started = time.perf_counter()
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the tables instead of rich's 80 columns
        console.width = max(console.width, 140)
    ks = _parse_ks(k) if k is not None else list(DEFAULT_KS)
    mode_list = check_choices("--modes", split_option(modes), MODES)
    trees = parse_ints("--tree", tree, minimum=0, example="0,4,8")
    if any(trees) and "quadratic" not in mode_list:
        raise MaskspecError("--tree needs quadratic in --modes (trees have a mask block after every node)")
    baseline_list = check_choices("--baselines", split_option(baselines), BASELINES)
    if max_new_tokens < 1:
        raise MaskspecError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if repeats < 1:
        raise MaskspecError(f"--repeats must be at least 1, got {repeats}")
    check_sampling(temperature, seed=seed)
    if static and temperature > 0:
        raise UsageError("--static decodes greedily: leave --temperature at 0, or leave --static off")
    if time_limit is not None and time_limit <= 0:
        raise UsageError(f"--time-limit must be a positive number of seconds, got {time_limit}")
    if prompt_lookup_tokens < 1:
        raise MaskspecError(f"--prompt-lookup-tokens must be at least 1, got {prompt_lookup_tokens}")
    prompts = select_prompts(load_suite(suite), split_option(domains) or None, n)
    if time_limit is not None:  # a run cut short still covers every domain
        prompts = in_domain_turns(prompts)
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    out = Path(out) if out is not None else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    check_out_folder(out, "results.json", "bench")

    notes: list[str] = []
    if "hf" not in baseline_list:
        notes.append("hf greedy always runs: it is the baseline every speed-up and exact match refers to.")
    # Which adapter: an explicit one, the shipped default, "none" (untrained, pipeline check) or no drafting.
    adapter_used: str | None = adapter
    fresh_config: MTPConfig | None = None
    drafting = True
    if adapter is not None and adapter.lower() == "none":
        adapter_used, fresh_config = None, MTPConfig(k=max(ks))
        notes.append("--adapter none: drafting with an UNTRAINED adapter. Outputs must still equal hf greedy, but "
                     "tau stays near 1; use it to check the pipeline, not to measure acceptance.")
    elif adapter is None:
        if shipped_adapter_for(model) is not None:
            adapter_used = "default"
        else:
            drafting = False
            fresh_config = MTPConfig(k=1, rank=1)
            notes.append("No drafting adapter: this installation ships none for the default model"
                         if is_default_model(model) else f"No --adapter given for model {model!r}")
            notes[-1] += ("; running only the hf baselines and the reference loop (ar). Pass --adapter FOLDER "
                          "(from `maskspec train`) to measure drafting, or --adapter none for an untrained one.")
    if adapter_used is not None and k is not None:
        # An explicit --k the adapter cannot draft would leave only the baselines to time: refuse it now.
        adapter_k = read_adapter_config(resolve_adapter(adapter_used, model)).k
        beyond = [x for x in ks if x > adapter_k]
        if beyond:
            raise UsageError(f"--k {', '.join(map(str, beyond))}: adapter {adapter_used} drafts at most "
                             f"k = {adapter_k}; pass --k values up to {adapter_k}, or leave --k out")
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with PromptProgress("bench", len(prompts)) as progress:
        progress.stage(f"loading model {model!r} ({device}, {str(torch_dtype).replace('torch.', '')})")
        mtp = MTPModel.from_pretrained(model, adapter=adapter_used, config=fresh_config, dtype=torch_dtype,
                                       device=device)
        max_k = mtp.config.k if drafting else None
        methods, skipped = build_methods(mode_list, ks, baseline_list, max_k, trees, static=static)
        if skipped:
            notes.append(f"k = {', '.join(map(str, skipped))} skipped: the adapter drafts at most "
                         f"k = {mtp.config.k}.")
            console.print(f"[yellow]note:[/yellow] {notes[-1]}")

        settings = BenchSettings(max_new_tokens=max_new_tokens, temperature=temperature, repeats=repeats,
                                 prompt_lookup_tokens=prompt_lookup_tokens, seed=seed)
        runner = BenchRunner(mtp, settings)
        progress.stage(f"warm-up: {len(methods)} methods once each")
        longest = max(prompts, key=lambda p: runner.input_ids(p).shape[1])
        runner.warm_up(methods, prompts[0], longest)
        per_prompt = repeats * len(methods)
        finished = [0]

        def advance(record: Any) -> None:
            # Records of one prompt come one after another (BenchRunner.run): its last one finishes it.
            finished[0] += 1
            if finished[0] % per_prompt == 0:
                progress.done(f"{record.domain}/{record.prompt_id}")

        progress.stage(f"timing {len(methods)} methods x {repeats} repeat(s) per prompt")
        deadline = None if time_limit is None else started + time_limit
        records = runner.run(prompts, methods, on_done=advance, deadline=deadline)
        done = len({r.prompt_id for r in records})
        if done < len(prompts):
            notes.append(f"--time-limit {time_limit:g} s: stopped after {done} of {len(prompts)} prompts.")
            console.print(f"[yellow]note:[/yellow] {notes[-1]}")
        if not records:
            raise UsageError(f"--time-limit {time_limit:g} s ended before the first prompt; give it more time")

    config = {
        "model": model, "adapter": adapter_used if adapter_used is not None else
        ("none (untrained)" if drafting else None), "adapter_k": mtp.config.k if drafting else None,
        "suite": str(suite) if suite else "built-in", "domains": list(dict.fromkeys(p.domain for p in prompts)),
        "n": n, "prompts": len({r.prompt_id for r in records}), "k": ks, "k_skipped": skipped, "modes": mode_list,
        "trees": trees,
        "baselines": baseline_list, "methods": [m.label for m in methods], "max_new_tokens": max_new_tokens,
        "temperature": temperature, "repeats": repeats, "device": device,
        "dtype": str(torch_dtype).replace("torch.", ""), "prompt_lookup_tokens": prompt_lookup_tokens,
        "seed": seed, "static": static, "static_engines": engine_report(mtp) if static else [],
        "out": str(out), "notes": notes,
    }

    rows, mismatches = report.aggregate(records, greedy=temperature == 0)
    system = system_info(device, torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    report.write_records_jsonl(out / "records.jsonl", records)
    report.write_results_json(out / "results.json", rows, mismatches, system, config)
    plot_files = report.write_plots(out, rows) if plots else []
    if plots and not plot_files:
        console.print("[yellow]note:[/yellow] matplotlib is not installed; no plots (pip install maskspec[bench])")
    report.write_report_md(out / "report.md", rows, mismatches, system, config, notes,
                           [str(p) for p in plot_files])

    _print_tables(console, report.tables(rows))
    if temperature == 0:
        if mismatches:
            console.print(f"[red]{len(mismatches)} greedy output(s) differ from hf greedy:[/red]")
            for m in mismatches:
                note = {None: "", True: " (same as mode ar)", False: " (differs from mode ar too)"}[m["matches_ar"]]
                console.print(f"  {m['domain']}/{m['prompt_id']} {m['label']} repeat {m['repeat']}: "
                              f"first difference at token {m['first_difference']}{note}")
        else:
            console.print("[green]exact match: every greedy method reproduced hf greedy on every prompt[/green]")
    console.print(f"results: {out / 'results.json'}, report: {out / 'report.md'}")
    return {"system": system, "config": config, "results": rows, "mismatches": mismatches, "out": out}


def _print_tables(console: Any, tables: list) -> None:
    from rich.table import Table

    for title, headers, body in tables:
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("bench", help=BENCH_HELP)
    def bench(
        model: str = typer.Option("default", "--model", help="HF id, local folder, or 'default' (embedded "
                                                           "SmolLM2-135M-Instruct)."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter folder, 'default' (shipped), or "
                                              "'none' (untrained adapter: pipeline check). Without it: the shipped "
                                              "adapter for the default model, else no drafting."),
        suite: Optional[Path] = typer.Option(None, "--suite", help="Prompt JSONL (maskspec schema or Spec-Bench "
                                             "question.jsonl). Default: the small built-in suite."),
        domains: Optional[str] = typer.Option(None, "--domains", help="Comma-separated domains to run."),
        n: Optional[int] = typer.Option(None, "--n", help="Prompts per domain (default: all)."),
        k: Optional[str] = typer.Option(None, "--k", help="Comma-separated numbers of drafts, each at most the "
                                        "adapter's k (default: 1,2,4,8, those the adapter drafts)."),
        modes: str = typer.Option("ar,linear,quadratic", "--modes", help="Comma-separated: ar, linear, "
                                                                         "quadratic."),
        baselines: str = typer.Option("hf,hf-prompt-lookup", "--baselines",
                                      help="Comma-separated: hf, hf-prompt-lookup, hf-static (static cache, "
                                      "compiled on a GPU; hf always runs)."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="New tokens per generation at most."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (exact match is checked)."),
        repeats: int = typer.Option(1, "--repeats", help="Timed runs per prompt and method (mean and spread)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: "
                                                               "bench-results/<timestamp>)."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, mps or auto."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 or bf16 (default: bf16 on cuda, fp32 "
                                                                  "on cpu)."),
        prompt_lookup_tokens: int = typer.Option(10, "--prompt-lookup-tokens",
                                                 help="prompt_lookup_num_tokens for hf-prompt-lookup."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots."),
        tree: str = typer.Option("0", "--tree", help="Comma-separated draft tree sizes (node budgets) for quadratic "
                                 "decoding, each run at every --k; 0 = the chain. Example: 0,4,8."),
        static: bool = typer.Option(False, "--static", help="Also run ar and each quadratic chain and tree with the "
                                    "static step (fixed shapes, one host sync per step, a CUDA graph on a GPU)."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds (from the start, model load "
                                                   "included) after which no new prompt starts; the results cover "
                                                   "the prompts done."),
    ) -> None:
        run_bench(model=model, adapter=adapter, suite=suite, domains=domains, n=n, k=k, modes=modes,
                  baselines=baselines, max_new_tokens=max_new_tokens, temperature=temperature, repeats=repeats,
                  out=out, device=device, dtype=dtype, prompt_lookup_tokens=prompt_lookup_tokens, seed=seed,
                  plots=plots, tree=tree, static=static, time_limit=time_limit)

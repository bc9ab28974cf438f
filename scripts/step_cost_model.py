"""Milliseconds per decoding pass against rows, for a model built from a config with random weights: what one
quadratic step costs at k = 0, 2, 4, 8 (1, 9, 25, 81 rows; trees add (nodes + 1) x (k + 1) rows) after a KV
cache of --past tokens, and from it the speed-up a tau would give (tau x ms(1 row) / ms(rows)).

The pass is maskspec's own (`MTPModel.forward_rows` with a random gated LoRA on every projection), eager, timed
with CUDA events on a GPU (wall clock on CPU), median of --repeats after --warmup. With --static it also times
the whole static step (`decode.static`: the pass, verification and the k sampler drafts, a CUDA graph on a GPU)
by the wall clock, its one host sync included. `--shape llama3-8b` is
Llama-3-8B's config (bf16: 16 GB of weights, for the lent GPU); `--shape tiny` runs anywhere in seconds.

    python scripts/step_cost_model.py --shape llama3-8b --device cuda --dtype bf16 --tau 2.5,5.3 --static --out DIR
    python scripts/step_cost_model.py --shape tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
}


def build(shape: str, device: str, dtype: torch.dtype, k: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_

    config = LlamaConfig(**SHAPES[shape])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, on the device: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    return randomize_adapter_(MTPModel(model, config=MTPConfig(k=max(k, 1), rank=16)), seed=0)


@torch.inference_mode()
def time_pass(mtp, rows_k: int, past: int, repeats: int, warmup: int) -> float:
    """ms of one quadratic step with `rows_k` drafts (y0 + rows_k drafts, a block of k masks after each) after a
    cache of `past` tokens; rows_k = 0 is one plain row."""
    from maskspec.decode.kv import crop
    from maskspec.model.layout import build_layout

    device = mtp.device
    prefix = torch.randint(3, mtp.vocab_size, (1, past), device=device)
    cache = mtp.model(prefix, use_cache=True).past_key_values
    heads = list(range(rows_k + 1)) if rows_k else []
    layout = build_layout(rows_k + 1, heads, max(mtp.k, 1), past_length=past, normals_first=True, device=device)
    ids = torch.randint(3, mtp.vocab_size, (1, rows_k + 1), device=device)
    times = []
    for i in range(warmup + repeats):
        crop(cache, past)  # drop the step's own entries: every repeat sees the same cache
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            mtp.forward_layout(ids, layout, past_key_values=cache, use_cache=True)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            mtp.forward_layout(ids, layout, past_key_values=cache, use_cache=True)
            elapsed = 1000 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


@torch.inference_mode()
def time_static_step(mtp, k: int, past: int, repeats: int, warmup: int, tree: int = 0) -> float:
    """ms of one whole static step with k drafts (0: mode ar) after a prompt of `past` tokens, wall clock around
    `StaticStep.step` (graph replay and the read of its result); each step appends its accepted tokens, so the
    cache grows by a few tokens over the repeats."""
    from maskspec.decode.static import StaticStep, needed_capacity

    engine = StaticStep(mtp, k, needed_capacity(k, past, (warmup + repeats + 2) * (k + 1), tree), tree=tree)
    engine.prefill(torch.randint(3, mtp.vocab_size, (past,)).tolist())
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        engine.step()  # ends with its one host read: the step is done
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    if engine.graph_error:
        print(f"static step k={k}: no CUDA graph ({engine.graph_error})")
    return statistics.median(times)


def table_row(label: object, rows: int, ms: float, base: float | None, taus: list[float],
              drafting: bool = True) -> str:
    """| label | rows | ms | x the one-row cost | speed-up at each tau (tau x base / ms; only for steps that draft) |"""
    ratio = f"{ms / base:.2f}" if base else "-"
    cells = [f"{t * base / ms:.2f}" if base and drafting else "-" for t in taus]
    return f"| {label} | {rows} | {ms:.2f} | {ratio} | " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--past", type=int, default=512, help="KV cache length before the step")
    p.add_argument("--ks", default="0,2,4,8", help="drafts per step (0: one plain row)")
    p.add_argument("--tau", default="2.5,5.3", help="tokens per pass to turn into speed-ups (the paper's chat / "
                                                    "math figures for an 8B model)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--static", action="store_true", help="also time the whole static step at each k")
    p.add_argument("--trees", default="", help="with --static: draft-tree sizes to time too at each k >= 1 "
                                               "(width 2, with the lookup slots), e.g. 16")
    p.add_argument("--out", type=Path, default=None, help="folder for step_costs.json and step_costs.md")
    args = p.parse_args()
    ks = sorted({int(x) for x in args.ks.split(",")})
    taus = [float(x) for x in args.tau.split(",")]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    mtp = build(args.shape, args.device, dtype, max(ks))
    rows = {k: (k + 1) * (k + 1) if k else 1 for k in ks}
    ms = {k: time_pass(mtp, k, args.past, args.repeats, args.warmup) for k in ks}
    base = ms[ks[0]] if ks[0] == 0 else None
    lines = [f"# ms per pass, {args.shape}, {args.device}, {args.dtype}, cache {args.past} tokens", "",
             "| k | rows | ms per pass | x one row | " + " | ".join(f"speed-up at tau {t}" for t in taus) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(taus)]
    lines += [table_row(k, rows[k], ms[k], base, taus, drafting=bool(k)) for k in ks]
    static_ms = {k: time_static_step(mtp, k, args.past, args.repeats, args.warmup) for k in ks} if args.static else {}
    if static_ms:
        first = static_ms[ks[0]] if ks[0] == 0 else None
        lines += ["", "The whole static step (pass, verification, drafts; wall clock, its host sync included), "
                  "against the static ar step:", "",
                  "| k | rows | ms per step | x ar step | " + " | ".join(f"speed-up at tau {t}" for t in taus) + " |",
                  "|---:|---:|---:|---:|" + "---:|" * len(taus)]
        lines += [table_row(k, rows[k], static_ms[k], first, taus, drafting=bool(k)) for k in ks]
        from maskspec.decode.static import step_rows

        for tree in (int(x) for x in args.trees.split(",") if x.strip()):
            for k in (k for k in ks if k):
                ms_tree = time_static_step(mtp, k, args.past, args.repeats, args.warmup, tree)
                static_ms[f"{k}-tree{tree}"] = ms_tree
                lines.append(table_row(f"{k}, tree {tree}", step_rows(k, tree), ms_tree, first, taus))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
        (args.out / "step_costs.json").write_text(json.dumps(
            {"shape": args.shape, "config": SHAPES[args.shape], "device": device_name, "dtype": args.dtype,
             "past": args.past, "rows": rows, "ms_per_pass": ms, "static_ms_per_step": static_ms,
             "torch": torch.__version__}, indent=2) + "\n")
        (args.out / "step_costs.md").write_text(text)


if __name__ == "__main__":
    main()

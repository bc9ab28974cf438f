"""Where a decoding step's time goes: the usual step against the static step (`decode.static`), side by side.

For each step kind it decodes one prompt with the shipped adapter (greedy, quadratic chain of --k drafts),
times --steps decoding steps by the wall clock (after a warm-up generation), then records the same number of
steps with torch.profiler and summarises them: ms per step, the share of the wall time the device was busy
(GPU), kernel launches and host syncs per step, and the top operators by self time on the host and on the
device. Writes profile.json and profile.md to --out (and Chrome traces with --traces).

    python scripts/profile_step.py --device cuda --dtype bf16 --k 4 --out results/<gpu>/profile
    python scripts/profile_step.py --device cpu --k 2 --steps 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROMPT = "Explain step by step how to compute the sum of the first 100 positive integers, then give the answer."
# Host-side calls that launch work or wait for it (names as the CUDA runtime and driver report them).
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cudaMemcpyAsync")


def steps_of(mtp, k: int, static: bool, steps: int, tree: int = 0):
    """A decoder past its prefill, ready for `steps` timed steps (the budget leaves room for them all)."""
    from maskspec.decode.api import prepare_input_ids
    from maskspec.decode.decoder import Decoder

    decoder = Decoder(mtp, mode="quadratic", k=k, tree=tree, static=static)
    ids = prepare_input_ids(mtp, PROMPT)[0].tolist()
    decoder.add(ids, max_new_tokens=(k + 1) * (steps + 2) + 8, eos_token_ids=[])  # no EOS: every step runs
    decoder.step()  # the prefill
    return decoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mtp, k: int, static: bool, steps: int, traces: Path | None, tree: int = 0) -> dict:
    device = mtp.device
    warm = steps_of(mtp, k, static, steps, tree)  # first calls (and the static step's capture) happen here
    for _ in range(3):
        warm.step()
    decoder = steps_of(mtp, k, static, steps, tree)
    with decoder.session():
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            decoder.step()
        sync(device)
        wall_ms = 1000 * (time.perf_counter() - start) / steps
    decoder = steps_of(mtp, k, static, steps, tree)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with decoder.session(), profile(activities=activities) as prof:
        for _ in range(steps):
            decoder.step()
        sync(device)
    if traces is not None:
        prof.export_chrome_trace(str(traces / f"trace-{'static' if static else 'usual'}-k{k}-tree{tree}.json"))
    events = prof.key_averages()
    count = {e.key: e.count for e in events}
    device_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000  # ms, all steps
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    on_device = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:12]
    return {
        "step": "static" if static else "usual", "k": k, "tree": tree, "ms_per_step": wall_ms,
        "device_busy_ms_per_step": device_total / steps if device.type == "cuda" else None,
        "kernel_launches_per_step": sum(count.get(name, 0) for name in LAUNCHES) / steps,
        "host_syncs_per_step": sum(count.get(name, 0) for name in SYNCS) / steps,
        "top_host": [(e.key, e.count, e.self_cpu_time_total / 1000 / steps) for e in host],
        "top_device": [(e.key, e.count, getattr(e, "self_device_time_total", 0) / 1000 / steps)
                       for e in on_device if getattr(e, "self_device_time_total", 0) > 0],
    }


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| step | k | tree | ms per step | device busy ms | kernel launches | syncs (incl. copies) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        busy = f"{r['device_busy_ms_per_step']:.2f}" if r["device_busy_ms_per_step"] is not None else "-"
        lines.append(f"| {r['step']} | {r['k']} | {r['tree']} | {r['ms_per_step']:.2f} | {busy} | "
                     f"{r['kernel_launches_per_step']:.0f} | {r['host_syncs_per_step']:.0f} |")
    for r in results:
        for title, key in (("host", "top_host"), ("device", "top_device")):
            if not r[key]:
                continue
            lines += ["", f"Top operators by self {title} time, {r['step']} step, k={r['k']}, tree={r['tree']} "
                      "(ms per step):", "",
                      "| operator | calls per step | ms per step |", "|---|---:|---:|"]
            steps = max(1, r.get("steps", 1))
            lines += [f"| `{name[:70]}` | {calls / steps:.1f} | {ms:.3f} |" for name, calls, ms in r[key]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--adapter", default="default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--k", default="4", help="comma-separated drafts per step")
    p.add_argument("--tree", type=int, default=0, help="draft-tree size (0: chains)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--traces", action="store_true", help="also write Chrome traces (large)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from maskspec.model.mtp import MTPModel

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    mtp = MTPModel.from_pretrained(args.model, adapter=args.adapter, dtype=dtype, device=args.device)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for k in (int(x) for x in args.k.split(",")):
        for static in (False, True):
            result = measure(mtp, k, static, args.steps, args.out if args.traces else None, args.tree)
            result["steps"] = args.steps
            results.append(result)
            print(json.dumps({key: v for key, v in result.items() if not key.startswith("top")}), flush=True)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    header = (f"# One decoding step, usual vs static: {mtp.model_name}, {name}, {dtype}, torch {torch.__version__}, "
              f"{args.steps} steps each (`python scripts/profile_step.py --device {args.device} --dtype {dtype} "
              f"--k {args.k} --tree {args.tree} --steps {args.steps}`)")
    text = markdown(results, header)
    print(text)
    if args.out is not None:
        (args.out / "profile.json").write_text(json.dumps({"device": name, "dtype": dtype, "torch": torch.__version__,
                                                           "results": results}, indent=2) + "\n")
        (args.out / "profile.md").write_text(text)


if __name__ == "__main__":
    main()

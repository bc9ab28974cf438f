"""Decoding speed of two source trees of maskspec side by side in one run: ms per decoding step of `ar` and
quadratic k (and, with --loadtest, the server's tokens/s at several client counts), on the embedded model with
the shipped adapter.

Each tree runs in its own worker process (the model loaded once); the driver hands them the same measurement in
turn, alternating which goes first (ABBA), and waits between hand-overs so one worker's idle OpenMP threads are
asleep before the other starts. Both trees must give the same tokens (it is checked).

    python scripts/compare_versions.py --before /path/to/old/src --after src [--prompts 2] [--max-new-tokens 64]
        [--methods ar,1,2,4] [--rounds 2] [--loadtest 1,4,16 --loadtest-requests 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEV_SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "dev.jsonl"

WORKER = r"""
import json, sys, torch
from maskspec.decode.api import generate, prepare_input_ids
from maskspec.model.mtp import MTPModel
torch.set_num_threads(int(sys.argv[1]))
mtp = MTPModel.from_pretrained("default", adapter="default")
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if "loadtest" in job:
        from maskspec.serve.loadtest import run_cell
        j = job["loadtest"]
        row = run_cell(mtp, j["mode"], j["clients"], j["requests"], j["max_tokens"], j["max_batch"])
        print(json.dumps(row), flush=True)
        continue
    ids = prepare_input_ids(mtp, job["messages"])[0].tolist()
    mode, k = job["mode"], job["k"]
    generate(mtp, ids, max_new_tokens=4, mode=mode, k=k)  # warm-up
    out = generate(mtp, ids, max_new_tokens=job["max_new_tokens"], mode=mode, k=k)
    s = out.stats
    ms = 1000 * s.decode_seconds / (s.forward_passes - 1) if s.forward_passes > 1 else None
    print(json.dumps({"ms_per_step": ms, "tokens": out.new_token_ids, "passes": s.forward_passes}), flush=True)
"""


class Worker:
    def __init__(self, src: str, threads: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(threads)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def ask(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="src folder of the first tree")
    p.add_argument("--after", required=True, help="src folder of the second tree")
    p.add_argument("--prompts", type=int, default=2, help="prompts per domain (math and code of the dev suite)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--methods", default="ar,1,2,4", help="ar and/or quadratic k values")
    p.add_argument("--rounds", type=int, default=2, help="repeats of every measurement per tree")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pause", type=float, default=0.5, help="seconds between hand-overs")
    p.add_argument("--loadtest", default="", help="client counts for the server load test (quadratic and ar)")
    p.add_argument("--loadtest-max-tokens", type=int, default=32)
    p.add_argument("--loadtest-requests", type=int, default=1, help="requests per client in each cell")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    sys.path.insert(0, str(Path(args.after).resolve()))
    from maskspec.bench.suites import load_suite, select_prompts

    prompts = select_prompts(load_suite(DEV_SUITE if DEV_SUITE.is_file() else None), ["math", "code"], args.prompts)
    methods = [("ar", None) if m == "ar" else ("quadratic", int(m)) for m in args.methods.split(",") if m]
    workers = {"before": Worker(args.before, args.threads), "after": Worker(args.after, args.threads)}
    steps: dict = {(name, m): [] for name in workers for m in methods}
    load_rows: list = []
    order = ["before", "after"]
    try:
        for r in range(args.rounds):
            for prompt in prompts:
                for method in methods:
                    tokens = {}
                    for name in order:
                        time.sleep(args.pause)
                        out = workers[name].ask({"messages": prompt.messages, "mode": method[0], "k": method[1],
                                                 "max_new_tokens": args.max_new_tokens})
                        tokens[name] = out["tokens"]
                        if out["ms_per_step"] is not None:
                            steps[(name, method)].append(out["ms_per_step"])
                    if tokens["before"] != tokens["after"]:
                        raise SystemExit(f"the trees' tokens differ on {prompt.id} {method}")
                    order.reverse()
            if methods:
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        for mode in ("quadratic", "ar") if args.loadtest else ():
            for clients in [int(c) for c in args.loadtest.split(",")]:
                for name in order:
                    time.sleep(args.pause)
                    job = {"mode": mode, "clients": clients, "requests": args.loadtest_requests,
                           "max_tokens": args.loadtest_max_tokens, "max_batch": 16}
                    row = workers[name].ask({"loadtest": job})
                    load_rows.append({"tree": name, **row})
                order.reverse()
    finally:
        for w in workers.values():
            w.close()

    if methods:
        print(f"{len(prompts)} prompts (math, code) x {args.rounds} rounds, {args.max_new_tokens} new tokens, "
              f"{args.threads} threads; median ms per decoding step; identical tokens in both trees")
        print("| method | before | after | after / before |\n|---|---:|---:|---:|")
    table = []
    for method in methods:
        b, a = (statistics.median(steps[(n, method)]) for n in ("before", "after"))
        label = method[0] if method[1] is None else f"quadratic k={method[1]}"
        table.append({"method": label, "before_ms": round(b, 2), "after_ms": round(a, 2), "ratio": round(a / b, 4)})
        print(f"| {label} | {b:.1f} | {a:.1f} | {a / b:.3f} |")
    if load_rows:
        print(f"\nserver load test: {args.loadtest_requests} request(s) per client, {args.loadtest_max_tokens} tokens "
              "each, max batch 16")
        print("| mode | clients | before tokens/s | after tokens/s | after / before |\n|---|---:|---:|---:|---:|")
        for mode in ("quadratic", "ar"):
            for clients in [int(c) for c in args.loadtest.split(",")]:
                cell = {r["tree"]: r for r in load_rows if r["mode"] == mode and r["clients"] == clients}
                b, a = cell["before"]["tokens_per_second"], cell["after"]["tokens_per_second"]
                print(f"| {mode} | {clients} | {b} | {a} | {a / b:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": table, "loadtest": load_rows,
                                               "raw": {f"{n} {m}": v for (n, m), v in steps.items()}}, indent=2))


if __name__ == "__main__":
    main()

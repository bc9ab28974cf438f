"""Milliseconds per decoding step (prefill excluded) for `ar` and each (mode, k), with the oneDNN decoding kernel
and with the stock kernel, on the embedded model with the shipped adapter. One run, methods interleaved per
prompt, so the two kernels are compared under the same machine load.

    python scripts/step_costs.py [--prompts 3] [--max-new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from maskspec.bench.suites import load_suite, select_prompts
from maskspec.decode.api import generate, prepare_input_ids
from maskspec.model.mtp import MTPModel

METHODS = [("ar", None), ("quadratic", 1), ("quadratic", 2), ("quadratic", 3), ("quadratic", 4), ("linear", 2)]
DEV_SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3, help="prompts per domain (math and code)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mtp = MTPModel.from_pretrained("default", adapter="default")
    suite = load_suite(DEV_SUITE if DEV_SUITE.is_file() else None)
    prompts = select_prompts(suite, ["math", "code"], args.prompts)
    steps = {(kernel, m): [] for kernel in ("oneDNN", "stock") for m in METHODS}
    tau = {m: [] for m in METHODS}
    for prompt in prompts:
        ids = prepare_input_ids(mtp, prompt.messages)[0].tolist()
        for kernel in ("oneDNN", "stock"):
            mtp.fast_kernels = kernel == "oneDNN"
            for mode, k in METHODS:
                generate(mtp, ids, max_new_tokens=4, mode=mode, k=k)  # warm-up
                s = generate(mtp, ids, max_new_tokens=args.max_new_tokens, mode=mode, k=k).stats
                if s.forward_passes > 1:
                    steps[(kernel, (mode, k))].append(1000 * s.decode_seconds / (s.forward_passes - 1))
                    if kernel == "oneDNN":
                        tau[(mode, k)].append(s.tokens_per_pass)
    print(f"{len(prompts)} prompts (math, code), {args.max_new_tokens} new tokens, {args.threads} threads; "
          "median ms per decoding step")
    print(f"{'method':<14} {'oneDNN':>8} {'stock':>8} {'x ar (oneDNN)':>14} {'tau':>6}")
    ar_ms = statistics.median(steps[("oneDNN", ("ar", None))])
    for mode, k in METHODS:
        fast = statistics.median(steps[("oneDNN", (mode, k))])
        stock = statistics.median(steps[("stock", (mode, k))])
        label = mode if k is None else f"{mode} k={k}"
        print(f"{label:<14} {fast:>8.1f} {stock:>8.1f} {fast / ar_ms:>14.2f} {statistics.mean(tau[(mode, k)]):>6.2f}")


if __name__ == "__main__":
    main()

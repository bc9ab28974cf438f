"""Draft trees against chains on the embedded model with the shipped adapter: tokens per pass (tau), ms per step
and tokens per second, greedy, side by side in one run (methods interleaved per prompt).

    python scripts/tree_costs.py [--n 2] [--domains math,code,chat,translation,summarization] [--max-new-tokens 64]
        [--methods k2,k4,k2t4,k4t6,k4t10] [--width 2]

A method kK is the chain of k = K; kKtN a tree of up to N sampler nodes over blocks of K masks plus a
prompt-lookup branch; kKtNn the same tree without the lookup branch.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import torch

from maskspec.bench.suites import load_suite, select_prompts
from maskspec.decode.api import chunks, prepare_input_ids
from maskspec.decode.decoder import Decoder
from maskspec.decode.drafters import TreeDrafter
from maskspec.decode.types import GenerationOutput
from maskspec.model.mtp import MTPModel

DEV_SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "dev.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2, help="prompts per domain")
    p.add_argument("--domains", default="math,code,chat,translation,summarization")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--methods", default="k2,k2t4n,k2t4,k4,k4t6n,k4t6")
    p.add_argument("--width", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = []
    for m in args.methods.split(","):
        match = re.fullmatch(r"k(\d+)(?:t(\d+)(n?))?", m)
        if not match:
            p.error(f"--methods: {m!r} is not kK, kKtN or kKtNn")
        methods.append((m, int(match[1]), int(match[2] or 0), not match[3]))
    mtp = MTPModel.from_pretrained("default", adapter="default")
    prompts = select_prompts(load_suite(DEV_SUITE if DEV_SUITE.is_file() else None), args.domains.split(","), args.n)
    rows = {(m[0], d): {"tokens": 0, "passes": 0, "ms": [], "seconds": 0.0} for m in methods for d in
            args.domains.split(",") + ["all"]}
    for prompt in prompts:
        ids = prepare_input_ids(mtp, prompt.messages)[0].tolist()
        reference = None
        for name, k, tree, lookup in methods:
            _generate(mtp, ids, 4, k, tree, args.width, lookup)  # warm-up
            out = _generate(mtp, ids, args.max_new_tokens, k, tree, args.width, lookup)
            reference = reference or out.new_token_ids
            assert out.new_token_ids == reference, f"{name} changed the output of {prompt.id}"
            s = out.stats
            for key in ((name, prompt.domain), (name, "all")):
                row = rows[key]
                row["tokens"] += s.new_tokens
                row["passes"] += s.forward_passes
                row["seconds"] += s.seconds
                if s.forward_passes > 1:
                    row["ms"].append(1000 * s.decode_seconds / (s.forward_passes - 1))
    print(f"{len(prompts)} prompts ({args.domains}), {args.max_new_tokens} new tokens, greedy, tree width "
          f"{args.width}, {args.threads} threads; identical output for every method")
    print("| domain | " + " | ".join(f"{m[0]} tau" for m in methods) + " | "
          + " | ".join(f"{m[0]} ms/step" for m in methods) + " | " + " | ".join(f"{m[0]} tok/s" for m in methods)
          + " |")
    print("|---|" + "---:|" * (3 * len(methods)))
    for domain in args.domains.split(",") + ["all"]:
        cells = [rows[(m[0], domain)] for m in methods]
        print(f"| {domain} | " + " | ".join(f"{c['tokens'] / c['passes']:.2f}" for c in cells) + " | "
              + " | ".join(f"{statistics.median(c['ms']):.1f}" if c["ms"] else "-" for c in cells) + " | "
              + " | ".join(f"{c['tokens'] / c['seconds']:.1f}" for c in cells) + " |")


def _generate(mtp, ids, max_new, k, tree, width, lookup):
    decoder = Decoder(mtp, mode="quadratic", k=k, drafter=TreeDrafter(mtp, tree, width, lookup) if tree else None)
    seq = decoder.add(ids, max_new)
    tokens = [t for c in chunks(decoder, seq) for t in c.token_ids]
    return GenerationOutput(torch.tensor([ids + tokens]), tokens, None, seq.stats)


if __name__ == "__main__":
    main()

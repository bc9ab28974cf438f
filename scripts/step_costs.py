"""Milliseconds per decoding step (prefill excluded) for `ar` and each (mode, k): with the oneDNN decoding kernel
on packed matrices (the default), on plain matrices, and with the stock kernel; with drafts over the full
vocabulary and over the draft vocabulary. On the embedded model with the shipped adapter (or --adapter). One
run, settings interleaved per prompt, so they are compared under the same machine load.

The draft vocabulary is the adapter's own, or one chosen from chat records (--draft-vocab-data, as
`maskspec draft-vocab` would choose it); without either only the full vocabulary is measured.

    python scripts/step_costs.py [--prompts 3] [--max-new-tokens 64] [--threads 2] [--kernels packed,onednn,stock]
                                 [--adapter DIR] [--draft-vocab-data FILE.jsonl --draft-vocab-size 8192]
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
KERNELS = ("packed", "onednn", "stock")  # the values of `MTPModel.kernels`
DEV_SUITE = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "dev.jsonl"


def draft_vocab_ids(mtp: MTPModel, data: str | None, size: int) -> list[int] | None:
    """The draft vocabulary to compare with the full one: from `data` if given, else the adapter's (or none)."""
    if data is None:
        return mtp.draft_vocab.tolist() if mtp.draft_vocab_set else None
    from maskspec.train.draft_vocab import draft_vocab_from_records

    choice = draft_vocab_from_records(data, mtp.tokenizer, size, mtp.vocab_size, mtp.eos_token_ids)
    print(f"draft vocabulary from {data}: {len(choice.ids)} ids, covering {100 * choice.coverage:.1f}% of its "
          f"{choice.target_tokens} answer tokens")
    return choice.ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=3, help="prompts per domain (math and code)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        help="any of packed, onednn, stock (MTPModel.kernels; any letter case)")
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--draft-vocab-data", default=None, help="chat-record JSONL to choose a draft vocabulary from")
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    args = parser.parse_args()
    kernels = [k.strip().lower() for k in args.kernels.split(",") if k.strip()]
    if not kernels or any(k not in KERNELS for k in kernels):
        parser.error(f"--kernels takes {', '.join(KERNELS)}")
    torch.set_num_threads(args.threads)
    mtp = MTPModel.from_pretrained("default", adapter=args.adapter)
    draft_ids = draft_vocab_ids(mtp, args.draft_vocab_data, args.draft_vocab_size)
    vocabs = ["full"] + (["draft"] if draft_ids is not None else [])
    settings = [(kernel, vocab) for kernel in kernels for vocab in vocabs]
    suite = load_suite(DEV_SUITE if DEV_SUITE.is_file() else None)
    prompts = select_prompts(suite, ["math", "code"], args.prompts)
    steps = {(setting, m): [] for setting in settings for m in METHODS}
    tau = {(vocab, m): [] for vocab in vocabs for m in METHODS}
    for prompt in prompts:
        ids = prepare_input_ids(mtp, prompt.messages)[0].tolist()
        for kernel, vocab in settings:
            mtp.kernels = kernel
            mtp.set_draft_vocab(draft_ids if vocab == "draft" else None)
            for mode, k in METHODS:
                generate(mtp, ids, max_new_tokens=4, mode=mode, k=k)  # warm-up
                s = generate(mtp, ids, max_new_tokens=args.max_new_tokens, mode=mode, k=k).stats
                if s.forward_passes > 1:
                    steps[((kernel, vocab), (mode, k))].append(1000 * s.decode_seconds / (s.forward_passes - 1))
                    if kernel == kernels[0]:
                        tau[(vocab, (mode, k))].append(s.tokens_per_pass)
    vocab_note = f", draft vocabulary of {len(draft_ids)} ids" if draft_ids is not None else ""
    print(f"{len(prompts)} prompts (math, code), {args.max_new_tokens} new tokens, {args.threads} threads"
          f"{vocab_note}; median ms per decoding step")
    names = [f"{kernel} {vocab}" for kernel, vocab in settings]
    print(f"{'method':<14} " + " ".join(f"{n:>14}" for n in names) + f" {'x ar':>6} "
          + " ".join(f"{'tau ' + v:>10}" for v in vocabs))
    ar_ms = statistics.median(steps[(settings[0], ("ar", None))])
    for mode, k in METHODS:
        ms = [statistics.median(steps[(setting, (mode, k))]) for setting in settings]
        taus = [statistics.mean(tau[(vocab, (mode, k))]) for vocab in vocabs]
        label = mode if k is None else f"{mode} k={k}"
        print(f"{label:<14} " + " ".join(f"{m:>14.1f}" for m in ms) + f" {ms[0] / ar_ms:>6.2f} "
              + " ".join(f"{t:>10.2f}" for t in taus))


if __name__ == "__main__":
    main()

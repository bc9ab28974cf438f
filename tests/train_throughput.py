"""Training throughput of `maskspec.train` (not a test; run by hand, see the training report).

usage:
  python tests/train_throughput.py --data D.jsonl --model default --ks 4 8 --steps 4          (real weights)
  python tests/train_throughput.py --examples E.pt --model-config DIR --device cuda ...      (random weights of
      the same shape: speed does not depend on the values; for machines without the embedded model)
  python tests/train_throughput.py --data D.jsonl --save-examples E.pt --model-config-out DIR (prepare the above)

Prints one line per (k, precision): median seconds per optimizer step over the steps after the first,
normal tokens/s and rows/s (rows = normal tokens + mask tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from maskspec.model.mtp import MTPConfig, MTPModel
from maskspec.train.data import Example, load_chat_records, tokenize_records
from maskspec.train.trainer import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--examples")
    ap.add_argument("--model", default="default")
    ap.add_argument("--model-config")
    ap.add_argument("--save-examples")
    ap.add_argument("--model-config-out")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from maskspec.hub import load_model_and_tokenizer

    base = tokenizer = None
    if args.model_config is None:
        base, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    if args.examples:
        raw = torch.load(args.examples, weights_only=True)
        examples = [Example(ids, lab, str(i)) for i, (ids, lab) in enumerate(zip(raw["input_ids"], raw["labelled"]))]
    else:
        records = load_chat_records(args.data)
        examples = tokenize_records(tokenizer, records, args.max_length, [tokenizer.eos_token_id]).examples
    if args.save_examples:
        torch.save({"input_ids": [e.input_ids for e in examples], "labelled": [e.labelled for e in examples]},
                   args.save_examples)
        if args.model_config_out:
            base.config.save_pretrained(args.model_config_out)
        print(f"saved {len(examples)} examples to {args.save_examples}")
        return
    lengths = [e.input_ids.numel() for e in examples]
    targets = [e.num_targets for e in examples]
    print(f"{len(examples)} examples, tokens mean {statistics.mean(lengths):.0f}, assistant tokens mean "
          f"{statistics.mean(targets):.0f}; device {args.device}; batch {args.batch_size}", flush=True)

    for k in args.ks:
        for precision in args.precisions:
            if args.model_config is not None:
                torch.manual_seed(0)
                cfg = AutoConfig.from_pretrained(args.model_config)
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32,
                                                         attn_implementation="sdpa").to(args.device).eval()
            else:
                model = base
            torch.manual_seed(0)
            mtp = MTPModel(model, tokenizer, MTPConfig(k=k, rank=16, alpha=32))
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory() as out:
                tc = TrainConfig(out=out, k=k, rank=16, alpha=32, steps=args.steps, batch_size=args.batch_size,
                                 warmup=1, save_every=10_000, eval_size=0, progress=False, bf16=precision == "bf16",
                                 cpu=args.device == "cpu", gradient_checkpointing=args.gradient_checkpointing)
                hist = train(tc, mtp=mtp, examples=examples).history
            timed = hist[1:] if len(hist) > 1 else hist
            sec = statistics.median(h["seconds"] for h in timed)
            tok = sum(h["tokens"] for h in timed) / sum(h["seconds"] for h in timed)
            rows = sum(h["rows"] for h in timed) / sum(h["seconds"] for h in timed)
            cuda = args.device.startswith("cuda")
            mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
            print(json.dumps({"k": k, "precision": precision, "sec_per_step": round(sec, 3),
                              "tokens_per_s": round(tok, 1), "rows_per_s": round(rows, 1),
                              "losses": [round(h["loss"], 3) for h in hist]}) + mem, flush=True)
            # The base weights are shared across runs when loaded once: take the LoRA layers out again.
            if args.model_config is None:
                _unwrap(base)


def _unwrap(model: torch.nn.Module) -> None:
    from maskspec.model.gated_lora import GatedLoRALinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GatedLoRALinear):
                setattr(parent, name, child.base)


if __name__ == "__main__":
    sys.exit(main())

"""`maskspec distill`, `maskspec train` and `maskspec curve`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DISTILL_HELP = """Answer prompts with the base model and write chat records to train on (self-distillation).

Resumable: re-running with the same --out skips prompts already answered (a partial last line from a killed \
run is repaired). Deterministic for a given --seed. On a CPU with several cores, --shard 0/2 and --shard 1/2 \
with --threads 1 each, in two processes, answer faster than one process with two threads."""

TRAIN_HELP = """Train a mask-token adapter (mask embeddings, gated LoRA, sampler head) on chat records.

The base model stays frozen. Data parallel with `accelerate launch --num_processes N maskspec train ...`. \
--out becomes a loadable adapter folder; it also holds metrics.jsonl and checkpoints/. An --out that already \
holds training output needs --resume (continue it) or --overwrite (replace it)."""

CURVE_HELP = """Held-out mask accuracy against the layout rows trained on, for one or more training runs: a \
table, and with --out a plot (curve.png), curve.md and curve.json.

A run that started from an --init-adapter draws on from the rows that adapter had seen, when its config \
records them (training.rows_seen_total)."""


def register(app: typer.Typer) -> None:
    @app.command("distill", help=DISTILL_HELP)
    def distill_cmd(
        prompts: Path = typer.Option(..., "--prompts", help="Prompt JSONL (id, messages, domain, ...)."),
        out: Path = typer.Option(..., "--out", help="Output JSONL of chat records (appended to, resumable)."),
        model: str = typer.Option("default", "--model", help="HF id, local folder, or 'default' (embedded "
                                  "SmolLM2-135M-Instruct)."),
        max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Longest answer in tokens."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (temperature > 0)."),
        batch_size: int = typer.Option(16, "--batch-size", help="Prompts decoded together (a finished one is "
                                       "replaced by the next at once)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Answer only the first N selected prompts."),
        per_domain: Optional[int] = typer.Option(None, "--per-domain", help="A seeded sample of N prompts per "
                                                 "domain (a domain-balanced subset)."),
        shuffle: bool = typer.Option(False, "--shuffle", help="Answer the prompts in a seeded random order, so "
                                     "that a run stopped early (time limit) has a mix of all domains."),
        balanced: bool = typer.Option(False, "--balanced", help="Answer the prompts in a domain-balanced order "
                                      "(the domains take turns, each in a seeded random order), so that any prefix "
                                      "of the output has every domain about equally."),
        shard: Optional[str] = typer.Option(None, "--shard", help="I/N: answer every N-th selected prompt from "
                                            "the I-th (0-based) on, so that N processes or machines share one run, "
                                            "each with its own --out (answers as in the whole run)."),
        seed: int = typer.Option(0, "--seed", help="Seed of sampling, --per-domain, --shuffle and --balanced."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N, mps or auto (default: "
                                             "auto, cuda if available)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 (default) or bf16."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (e.g. 1 each for "
                                              "as many --shard processes as cores)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        import torch

        from maskspec.train.distill import DistillConfig, distill, parse_shard

        if threads:
            torch.set_num_threads(threads)

        stats = distill(DistillConfig(prompts=str(prompts), out=str(out), model=model, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, batch_size=batch_size, limit=limit,
                                      per_domain=per_domain, shuffle=shuffle, balanced=balanced,
                                      shard=None if shard is None else parse_shard(shard), seed=seed,
                                      device=device, dtype=dtype, progress=progress))
        note = " (repaired a partial last line)" if stats.repaired_partial_line else ""
        if stats.too_long:
            note += f"; {stats.too_long} longer than the model's context skipped"
        typer.echo(f"{out}: {stats.written} records written, {stats.already_done} already there, "
                   f"{stats.selected} selected{note}")

    @app.command("train", help=TRAIN_HELP)
    def train_cmd(
        data: str = typer.Option(..., "--data", help="Chat-record JSONL (from `maskspec distill`), data "
                                 "file/folder (parquet, csv, json), or a Hugging Face dataset name."),
        out: Path = typer.Option(..., "--out", help="Output adapter folder."),
        model: str = typer.Option("default", "--model", help="HF id, local folder, or 'default'."),
        data_split: str = typer.Option("train", "--data-split", help="Split of a Hugging Face dataset."),
        data_config: Optional[str] = typer.Option(None, "--data-config", help="Config of a Hugging Face dataset."),
        k: int = typer.Option(8, "--k", help="Mask tokens (drafts) per block."),
        rank: int = typer.Option(16, "--rank", help="LoRA rank."),
        alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha (scale = alpha / rank)."),
        dropout: float = typer.Option(0.0, "--dropout", help="LoRA dropout."),
        lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate (AdamW)."),
        weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
        steps: int = typer.Option(1000, "--steps", help="Optimizer steps."),
        batch_size: int = typer.Option(4, "--batch-size", help="Sequences per process per micro-batch."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
        max_length: int = typer.Option(1024, "--max-length", help="Truncate conversations to N tokens."),
        warmup: int = typer.Option(50, "--warmup", help="Linear warm-up steps."),
        schedule: str = typer.Option("cosine", "--schedule", help="constant or cosine (to 0.1 x lr)."),
        grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max gradient norm (0: off)."),
        bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast (weights and optimizer stay fp32)."),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                    help="Recompute activations in backward (less memory)."),
        attention: str = typer.Option("sdpa", "--attention", help="sdpa (dense mask) or flex (FlexAttention, "
                                      "block-sparse: skips the empty tiles of the layout; compiled, for GPUs)."),
        block_fraction: float = typer.Option(1.0, "--block-fraction", help="Random fraction of mask blocks per "
                                             "sequence (seeded), to cut cost."),
        max_blocks: Optional[int] = typer.Option(None, "--max-blocks", help="At most N random mask blocks per "
                                                 "sequence."),
        ce_weight: float = typer.Option(1.0, "--ce-weight", help="Weight of the base-head cross-entropy."),
        sampler_weight: float = typer.Option(1.0, "--sampler-weight", help="Weight of the sampler cross-entropy."),
        lcm_weight: float = typer.Option(1.0, "--lcm-weight", help="Weight of the latent-consistency loss."),
        kl_weight: float = typer.Option(0.0, "--kl-weight", help="Weight of the soft-target KL to the normal "
                                        "row's distribution (0: off)."),
        sampler_prev: str = typer.Option("true", "--sampler-prev", help="The sampler's previous token at masks "
                                         "after the first: true (teacher forcing) or own (its own prediction at the "
                                         "mask before, as in decoding)."),
        chunk_rows: int = typer.Option(1024, "--chunk-rows", help="Labelled mask rows per output-head call in the "
                                       "losses; a batch with more recomputes each chunk's logits in backward "
                                       "(less memory). Larger on a big GPU: fewer, larger calls."),
        save_every: int = typer.Option(500, "--save-every", help="Checkpoint every N steps (and at the end)."),
        keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Newest checkpoints kept (0: all)."),
        eval_every: int = typer.Option(0, "--eval-every", help="Held-out accuracy every N steps (and at the end)."),
        eval_size: int = typer.Option(32, "--eval-size", help="Held-out examples (at most a tenth of the data)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the adapter, checkpoints and metrics "
                                       "that --out holds (earlier `maskspec train` output only)."),
        init_adapter: Optional[Path] = typer.Option(None, "--init-adapter", help="Start from this adapter's "
                                                    "weights (same --k, --rank, --alpha), e.g. to train it longer."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Stop after N seconds of training; "
                                                   "the lr schedule is shortened to the steps that fit (at most "
                                                   "--steps)."),
        seed: int = typer.Option(0, "--seed", help="Seed of init, data order and block subsets."),
        cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is available."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        draft_vocab: int = typer.Option(8192, "--draft-vocab", help="Draft vocabulary saved with the adapter: the N "
                                        "most frequent answer tokens of the data (0: drafts use the full "
                                        "vocabulary)."),
    ) -> None:
        from maskspec.train.config import TrainConfig
        from maskspec.train.trainer import train

        cfg = TrainConfig(out=str(out), model=model, data=data, data_split=data_split, data_config=data_config, k=k,
                          rank=rank, alpha=alpha, dropout=dropout, lr=lr, weight_decay=weight_decay, steps=steps,
                          batch_size=batch_size, grad_accum=grad_accum, warmup=warmup, schedule=schedule,
                          grad_clip=grad_clip, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
                          attention=attention,
                          max_length=max_length, block_fraction=block_fraction, max_blocks=max_blocks,
                          ce_weight=ce_weight, sampler_weight=sampler_weight, lcm_weight=lcm_weight,
                          kl_weight=kl_weight, sampler_prev=sampler_prev, chunk_rows=chunk_rows,
                          save_every=save_every,
                          keep_checkpoints=keep_checkpoints,
                          eval_every=eval_every, eval_size=eval_size, resume=resume, overwrite=overwrite,
                          init_adapter=str(init_adapter) if init_adapter is not None else None,
                          time_limit=time_limit, draft_vocab=draft_vocab, seed=seed, progress=progress, cpu=cpu)
        result = train(cfg)
        last = result.history[-1] if result.history else {}
        from accelerate import PartialState

        if PartialState().is_main_process:
            summary = f"adapter written to {out}"
            if last:
                summary += f" (step {last['step']}, loss {last['loss']:.4f})"
            if result.evals:
                ev = result.evals[-1]
                summary += f"; held-out mask accuracy base {ev['acc_base_mean']:.3f}, " \
                           f"sampler {ev['acc_sampler_mean']:.3f}"
            typer.echo(summary)

    @app.command("curve", help=CURVE_HELP)
    def curve_cmd(
        runs: list[Path] = typer.Argument(..., help="`maskspec train` --out folders (or their metrics.jsonl)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Folder for curve.png, curve.md and curve.json (a "
                                           "new folder or an earlier `maskspec curve` output)."),
        label: Optional[list[str]] = typer.Option(None, "--label", help="A name for each run, in order: one "
                                                  "--label per run (default: the folder names)."),
        offsets: str = typer.Option("1,2,4,8", "--offsets", help="Offsets of the sampler accuracy to show."),
    ) -> None:
        from maskspec.bench.cli import check_out_folder, parse_ints
        from maskspec.errors import UsageError
        from maskspec.train.curve import CURVE_JSON, read_curve, table, write_curves

        wanted = parse_ints("--offsets", offsets, example="1,2,4,8")
        labels = list(label or [])
        if labels and len(labels) != len(runs):
            raise UsageError(f"--label names {len(labels)} run(s) but {len(runs)} were given")
        if out is not None:
            check_out_folder(out, CURVE_JSON, "curve")
        curves = [read_curve(run, labels[i] if labels else None) for i, run in enumerate(runs)]
        typer.echo(table(curves, wanted), nl=False)
        if out is not None:
            written = write_curves(out, curves, wanted)
            typer.echo(f"written: {', '.join(str(p) for p in written)}")
            if not any(p.suffix == ".png" for p in written):
                typer.echo("note: matplotlib is not installed; no plot (pip install maskspec[bench])")

"""What `maskspec train` is asked to do: TrainConfig, its validation, and TrainError."""

from __future__ import annotations

import math

from dataclasses import dataclass

from maskspec.errors import MaskspecError
from maskspec.train.losses import SAMPLER_PREVS, LossWeights

# --attention values and the transformers attention implementation each selects
ATTENTIONS = {"sdpa": "sdpa", "flex": "flex_attention"}


class TrainError(MaskspecError):
    """A training setup the user can fix (output folder, resume, options)."""


@dataclass
class TrainConfig:
    out: str
    model: str = "default"
    data: str | None = None
    data_split: str = "train"
    data_config: str | None = None
    # adapter shape
    k: int = 8
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 0.0
    steps: int = 1000
    batch_size: int = 4  # sequences per process per micro-batch
    grad_accum: int = 1
    warmup: int = 50
    schedule: str = "cosine"  # or "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    # attention kernel of the training passes: "sdpa" (a dense mask) or "flex" (FlexAttention with a block-sparse
    # mask: the same rule, empty 128 x 128 tiles skipped; compiled, so it pays on a GPU)
    attention: str = "sdpa"
    # data / layout
    max_length: int = 1024
    block_fraction: float = 1.0
    max_blocks: int | None = None
    # losses
    ce_weight: float = 1.0
    sampler_weight: float = 1.0
    lcm_weight: float = 1.0
    kl_weight: float = 0.0
    sampler_prev: str = "true"  # the sampler's previous token in training: "true" or "own" (losses.LossWeights)
    chunk_rows: int = 1024  # labelled mask rows per output-head call; above it the logits are recomputed in backward
    # draft vocabulary saved with the adapter: the N most frequent answer tokens of the data (0: full vocabulary)
    draft_vocab: int = 8192
    # bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end
    eval_size: int = 32
    resume: bool = False
    # replace the adapter, checkpoints and metrics of an earlier training run in `out`
    overwrite: bool = False
    # start from the weights of an existing adapter folder (same k, rank, alpha and target modules)
    init_adapter: str | None = None
    # stop after this many seconds of training steps; the lr schedule is shortened to the steps that fit
    time_limit: float | None = None
    seed: int = 0
    progress: bool = True
    cpu: bool = False

    def validate(self) -> None:
        numbers = {"--lr": self.lr, "--alpha": self.alpha, "--dropout": self.dropout,
                   "--weight-decay": self.weight_decay, "--grad-clip": self.grad_clip,
                   "--block-fraction": self.block_fraction, "--ce-weight": self.ce_weight,
                   "--sampler-weight": self.sampler_weight, "--lcm-weight": self.lcm_weight,
                   "--kl-weight": self.kl_weight, "--time-limit": self.time_limit}
        for name, value in numbers.items():
            if value is not None and not math.isfinite(value):
                raise TrainError(f"{name} must be a finite number, got {value}")
        checks = [
            (self.k >= 1, "--k must be >= 1"), (self.rank >= 1, "--rank must be >= 1"),
            (self.steps >= 1, "--steps must be >= 1"), (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"), (self.lr > 0, "--lr must be > 0"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"), (self.alpha > 0, "--alpha must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"), (self.grad_clip >= 0, "--grad-clip must be >= 0"),
            (self.max_length >= 4, "--max-length must be >= 4"), (self.warmup >= 0, "--warmup must be >= 0"),
            (0 < self.block_fraction <= 1, "--block-fraction must be in (0, 1]"),
            (self.max_blocks is None or self.max_blocks >= 1, "--max-blocks must be >= 1"),
            (self.schedule in ("constant", "cosine"), "--schedule must be 'constant' or 'cosine'"),
            (self.sampler_prev in SAMPLER_PREVS, "--sampler-prev must be 'true' or 'own'"),
            (self.attention in ATTENTIONS, "--attention must be 'sdpa' or 'flex'"),
            (self.save_every >= 1, "--save-every must be >= 1"), (self.eval_every >= 0, "--eval-every must be >= 0"),
            (self.draft_vocab >= 0, "--draft-vocab must be >= 0"), (self.chunk_rows >= 1, "--chunk-rows must be >= 1"),
            (self.eval_size >= 0, "--eval-size must be >= 0 (0: no held-out records)"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0 (0: keep every checkpoint)"),
            (self.time_limit is None or self.time_limit > 0, "--time-limit must be > 0 seconds"),
            (min(self.ce_weight, self.sampler_weight, self.lcm_weight, self.kl_weight) >= 0,
             "loss weights must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.ce_weight, self.sampler_weight, self.lcm_weight, self.kl_weight, self.sampler_prev)

    def global_batch(self, processes: int) -> int:
        """Sequences per optimizer step over all processes."""
        return self.batch_size * self.grad_accum * processes

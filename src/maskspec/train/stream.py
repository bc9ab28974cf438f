"""The order of the training data. Position p of the stream -> example: epoch p // N is a seeded permutation of
the N examples, and optimizer step s consumes positions [s * G, (s + 1) * G), G = the global batch (batch_size *
grad_accum * processes). The order is a pure function of (seed, position), so a checkpoint only needs the step
number to continue with the same data."""

from __future__ import annotations

from typing import Sequence

import torch

from maskspec.train.config import TrainConfig
from maskspec.train.data import Example, TrainBatch, make_batch


class DataStream:
    """Position p of the stream -> example: epoch p // N is a permutation of the N examples seeded by the seed
    and the epoch. Also gives each position a seed for its random block subset and each step its batches."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        self.examples = list(examples)
        self.seed = seed
        self._perm: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.examples))
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(len(self.examples), generator=gen).tolist()}
        return self._perm[epoch][offset]

    def block_seed(self, position: int) -> int:
        return (self.seed * 2_654_435_761 + position * 40_503 + 17) % (2**62)

    def micro_batches(self, step: int, cfg: TrainConfig, rank: int, world: int, pad_token_id: int,
                      device: torch.device | str = "cpu") -> list[TrainBatch]:
        """This process's `cfg.grad_accum` micro-batches of optimizer step `step`, built on `device`: micro-batch
        a of process r takes the `cfg.batch_size` positions from step * G + (a * world + r) * batch_size on."""
        micro = []
        for a in range(cfg.grad_accum):
            first = step * cfg.global_batch(world) + (a * world + rank) * cfg.batch_size
            positions = range(first, first + cfg.batch_size)
            micro.append(make_batch([self.examples[self.index(p)] for p in positions], cfg.k,
                                    block_fraction=cfg.block_fraction, max_blocks=cfg.max_blocks,
                                    seeds=[self.block_seed(p) for p in positions], pad_token_id=pad_token_id,
                                    normals_first=cfg.attention == "flex", device=device))
        return micro

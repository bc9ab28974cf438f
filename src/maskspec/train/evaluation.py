"""Held-out examples and the evaluation of mask predictions on them."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from maskspec.train.data import Example, make_batch
from maskspec.train.distributed import all_reduce_sum_
from maskspec.train.losses import mask_accuracy


def split_eval(examples: list[Example], eval_size: int) -> tuple[list[Example], list[Example]]:
    """Hold out up to `eval_size` examples (never more than a tenth of the data) for evaluation: those whose ids
    hash lowest. The choice depends on the ids alone, not on their order or the seed. A run on more of the same
    data (an adapter going on training on more answers, `eval_size` examples held out both times) never holds out
    an example the earlier run trained on: that one hashed above the earlier cut, and the cut only comes down."""
    size = min(eval_size, len(examples) // 10)
    if size <= 0:
        return examples, []
    rank = sorted(range(len(examples)), key=lambda i: (_id_hash(examples[i].id), i))
    held = set(rank[:size])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _id_hash(example_id: str) -> bytes:
    return hashlib.blake2b(example_id.encode("utf-8"), digest_size=8).digest()


@torch.no_grad()
def evaluate(mtp, examples: Sequence[Example], batch_size: int, *, bf16: bool = False,
             device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
             normals_first: bool = False) -> dict[str, Any]:
    """Per-offset top-1 accuracy of mask predictions on `examples` (every block), for the base head and the
    sampler (fed the true previous token). Shards the examples over processes and sums the counts."""
    k = mtp.k
    was_training = mtp.training
    mtp.eval()
    counts = torch.zeros(3, k, dtype=torch.float64)
    mine = list(examples)[rank::world]
    device = torch.device(device)
    for s in range(0, len(mine), batch_size):
        batch = make_batch(mine[s:s + batch_size], k, normals_first=normals_first, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                                      batch.key_positions).hidden
            acc = mask_accuracy(mtp, hidden, batch, k)
        counts += torch.stack([acc["total"], acc["base"], acc["sampler"]]).double()
    counts = all_reduce_sum_(counts.to(device)).cpu()
    mtp.train(was_training)
    total = counts[0].clamp(min=1)
    return {"acc_base": (counts[1] / total).tolist(), "acc_sampler": (counts[2] / total).tolist(),
            "acc_base_mean": float(counts[1].sum() / total.sum()) if counts[0].sum() else 0.0,
            "acc_sampler_mean": float(counts[2].sum() / total.sum()) if counts[0].sum() else 0.0,
            "targets": int(counts[0].sum())}

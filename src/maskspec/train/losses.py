"""The training losses of method.md §3, computed from one forward pass over a padded TrainBatch.

Every loss is a *sum* over rows divided by a normalizer the caller passes in: the number of such rows in the
whole optimizer step (all micro-batches, all processes). Summing the gradients of the pieces then gives exactly
the gradient of the mean over the global batch, however it is split across processes and accumulation steps.

Logits are computed only for labelled mask rows (the vocabulary projection dominates the cost), in chunks that
are recomputed during backward, so a long sequence never holds (rows x vocab) logits for backward at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from maskspec.train.data import TrainBatch

LOSS_NAMES = ("ce", "sampler", "lcm", "kl")


@dataclass
class LossWeights:
    ce: float = 1.0
    sampler: float = 1.0
    lcm: float = 1.0
    kl: float = 0.0  # soft-target KL to the partner normal row's distribution (off by default)
    # The sampler's previous token at mask j > 0: "true" (teacher forcing: the true token before the target) or
    # "own" (the sampler's own argmax at mask j - 1 of the block, as in decoding, where prev is the last draft).
    sampler_prev: str = "true"


SAMPLER_PREVS = ("true", "own")


@dataclass
class RowCounts:
    """Rows each loss averages over. Add them up over micro-batches (and processes) to get normalizers."""

    target: int = 0  # labelled mask rows: base-head CE and sampler CE
    anchor: int = 0  # mask rows with a consistency partner: LCM
    kl: int = 0  # labelled mask rows with a partner: KL

    def __add__(self, other: "RowCounts") -> "RowCounts":
        return RowCounts(self.target + other.target, self.anchor + other.anchor, self.kl + other.kl)


def row_counts(batch: TrainBatch) -> RowCounts:
    from maskspec.model.layout import IGNORE_INDEX

    target = batch.is_mask & (batch.labels != IGNORE_INDEX)
    anchor = batch.anchors >= 0
    return RowCounts(int(target.sum()), int(anchor.sum()), int((target & anchor).sum()))


def _head_terms(mtp, z: torch.Tensor, prev: torch.Tensor, labels: torch.Tensor, anchor_z: torch.Tensor,
                has_anchor: torch.Tensor, want_sampler: bool, want_kl: bool) -> torch.Tensor:
    """Summed (ce, sampler CE, KL) over a chunk of labelled mask rows, as a 3-vector."""
    logits = mtp.head_logits(z).float()
    ce = F.cross_entropy(logits, labels, reduction="sum")
    sampler = F.cross_entropy(mtp.sampler_logits(prev, z).float(), labels, reduction="sum") if want_sampler \
        else ce.new_zeros(())
    kl = ce.new_zeros(())
    if want_kl and bool(has_anchor.any()):
        with torch.no_grad():
            target_logp = F.log_softmax(mtp.head_logits(anchor_z[has_anchor]).float(), dim=-1)
        logp = F.log_softmax(logits[has_anchor], dim=-1)
        kl = (target_logp.exp() * (target_logp - logp)).sum()
    return torch.stack([ce, sampler, kl])


def compute_losses(mtp, hidden: torch.Tensor, batch: TrainBatch, weights: LossWeights, norm: RowCounts,
                   chunk_rows: int = 1024) -> dict[str, torch.Tensor]:
    """Weighted losses of one micro-batch: {"loss", "ce", "sampler", "lcm", "kl"} (unweighted pieces, each
    already divided by its global normalizer in `norm`). `hidden` is (B, R, d) from MTPModel.forward_rows."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    zero = flat.new_zeros((), dtype=torch.float32)
    out = {name: zero for name in LOSS_NAMES}

    rows = batch.target_rows()
    if rows.numel() and (weights.ce or weights.sampler or weights.kl):
        z = flat.index_select(0, rows)
        labels = batch.labels.reshape(-1)[rows]
        prev = batch.prev_ids.reshape(-1)[rows]
        if weights.sampler and weights.sampler_prev == "own":
            prev = own_prev_ids(mtp, flat, batch, rows, prev, chunk_rows)
        anchor = batch.anchors.reshape(-1)[rows]
        has_anchor = anchor >= 0
        anchor_z = flat.index_select(0, anchor.clamp(min=0)).detach()
        want_sampler, want_kl = bool(weights.sampler), bool(weights.kl)
        sums = []
        for s in range(0, rows.numel(), chunk_rows):
            args = (z[s:s + chunk_rows], prev[s:s + chunk_rows], labels[s:s + chunk_rows],
                    anchor_z[s:s + chunk_rows], has_anchor[s:s + chunk_rows])
            if rows.numel() > chunk_rows and torch.is_grad_enabled():
                # Recompute this chunk's logits in backward instead of keeping them.
                sums.append(checkpoint(_head_terms, mtp, *args, want_sampler, want_kl, use_reentrant=False))
            else:
                sums.append(_head_terms(mtp, *args, want_sampler, want_kl))
        ce, sampler, kl = torch.stack(sums).sum(0)
        out["ce"] = ce / max(norm.target, 1)
        out["sampler"] = sampler / max(norm.target, 1)
        out["kl"] = kl / max(norm.kl, 1)

    anchor_rows = batch.anchor_rows()
    if anchor_rows.numel() and weights.lcm:
        z = flat.index_select(0, anchor_rows).float()
        partner = flat.index_select(0, batch.anchors.reshape(-1)[anchor_rows]).float().detach()
        # [choice] mean over the hidden dimension of the squared distance, summed over rows here.
        out["lcm"] = (z - partner).pow(2).mean(-1).sum() / max(norm.anchor, 1)

    out["loss"] = (weights.ce * out["ce"] + weights.sampler * out["sampler"] + weights.lcm * out["lcm"]
                   + weights.kl * out["kl"])
    return out


@torch.no_grad()
def own_prev_ids(mtp, flat: torch.Tensor, batch: TrainBatch, rows: torch.Tensor, true_prev: torch.Tensor,
                 chunk_rows: int = 1024) -> torch.Tensor:
    """The sampler's previous tokens when it is fed its own predictions: for labelled mask row i at slot j > 0,
    the sampler's argmax at slot j - 1 of the same block (the row just before it), which itself was fed its own
    prediction, and so on back to slot 0, whose previous token is the true one (in decoding: the verified token).
    Rows whose previous slot has no label keep the true token. No gradient flows through the choice."""
    slot = batch.mask_slot.reshape(-1)[rows]
    position = torch.full((flat.shape[0],), -1, dtype=torch.long, device=rows.device)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    before = position[(rows - 1).clamp(min=0)]
    chained = (slot > 0) & (before >= 0)
    chained &= batch.mask_slot.reshape(-1)[(rows - 1).clamp(min=0)] == slot - 1  # the same block's previous mask
    prev = true_prev.clone()
    predicted = torch.zeros_like(true_prev)
    for j in range(int(slot.max()) + 1 if slot.numel() else 0):
        at = torch.nonzero(slot == j).flatten()
        feed = at[chained[at]]
        prev[feed] = predicted[before[feed]]
        for s in range(0, at.numel(), chunk_rows):
            part = at[s:s + chunk_rows]
            predicted[part] = mtp.sampler_logits(prev[part], flat.index_select(0, rows[part])).argmax(-1)
    return prev


@torch.no_grad()
def mask_accuracy(mtp, hidden: torch.Tensor, batch: TrainBatch, k: int) -> dict[str, torch.Tensor]:
    """Per-offset counts for top-1 accuracy of mask predictions: {"total", "base", "sampler"}, each (k,), where
    offset j (index j-1) is mask j, predicting j+1 tokens ahead of its block's head. The sampler is fed the
    true previous token (teacher forcing)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = batch.target_rows()
    slot = batch.mask_slot.reshape(-1)[rows]
    labels = batch.labels.reshape(-1)[rows]
    prev = batch.prev_ids.reshape(-1)[rows]
    total = torch.zeros(k, dtype=torch.long)
    base = torch.zeros(k, dtype=torch.long)
    samp = torch.zeros(k, dtype=torch.long)
    for s in range(0, rows.numel(), 1024):
        z = flat.index_select(0, rows[s:s + 1024])
        sl, lab = slot[s:s + 1024].cpu(), labels[s:s + 1024]
        total += torch.bincount(sl, minlength=k)
        base += torch.bincount(sl, weights=(mtp.head_logits(z).argmax(-1) == lab).cpu().double(), minlength=k).long()
        hit = (mtp.sampler_logits(prev[s:s + 1024], z).argmax(-1) == lab).cpu().double()
        samp += torch.bincount(sl, weights=hit, minlength=k).long()
    return {"total": total, "base": base, "sampler": samp}

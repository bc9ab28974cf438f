"""Where mask tokens go, which position ids they get, and who may attend to whom.

This module is the single home of the attention rule of the method (method.md §3-4). Training and decoding
both describe their input as a chain of *normal* tokens plus *mask blocks* hanging off some of them, and get
back the per-row tensors and the boolean attention matrix from here.

The rule, for a block of k masks after normal token x_h (position p):
- mask j (1..k) has position p + j and, in training, the label x_{h+1+j};
- a normal token sees earlier-or-same normal tokens only, never a mask;
- a mask sees the normal tokens up to and including its block's head x_h, plus the masks of its own block up
  to itself; never another block's masks;
- every row sees the cached past (tokens decoded in earlier steps);
- with sliding-window attention a key is visible only when query_pos - key_pos < window.

The normal tokens can also form a tree (`parents`: a draft tree after y0): a node sits at its depth's position
and sees its ancestors and itself; a mask block after node h sees h's path and, causally, its own block. A chain
is the tree where every node's parent is the one before it.

Rows can be ordered in two ways. `interleaved` puts each block right after its head (the training layout of
method.md §3); `normals_first` puts every normal token first and all blocks after them (decoding: the verified
tokens are then a contiguous prefix of the step, so the KV cache is cropped, never gathered). Physical order
does not change the result: attention follows the matrix, not the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Layout:
    """Rows of one forward pass over normal tokens and mask blocks (all tensors 1-D of length `rows`,
    except `attention`, which is (rows, past_length + rows))."""

    normal_index: torch.Tensor  # index into the normal tokens for normal rows, -1 for mask rows
    mask_slot: torch.Tensor  # 0-based mask number j-1 for mask rows, -1 for normal rows
    head: torch.Tensor  # normal index the row hangs off: itself for normal rows, the block head for masks
    position_ids: torch.Tensor
    gate: torch.Tensor  # bool, True on mask rows (LoRA active)
    attention: torch.Tensor  # bool, True where the query row may attend to the key column
    past_length: int
    k: int

    @property
    def rows(self) -> int:
        return int(self.gate.numel())

    @property
    def key_positions(self) -> torch.Tensor:
        past = torch.arange(self.past_length, device=self.position_ids.device)
        return torch.cat([past, self.position_ids])

    def mask_rows(self) -> torch.Tensor:
        return torch.nonzero(self.gate, as_tuple=False).squeeze(-1)

    def normal_rows(self) -> torch.Tensor:
        return torch.nonzero(~self.gate, as_tuple=False).squeeze(-1)

    def block_rows(self, head: int) -> torch.Tensor:
        """Rows of the mask block hanging off normal token `head`, ordered by mask number."""
        rows = torch.nonzero(self.gate & (self.head == head), as_tuple=False).squeeze(-1)
        return rows[torch.argsort(self.mask_slot[rows])]


def build_layout(
    num_normal: int,
    block_heads: Sequence[int],
    k: int,
    *,
    past_length: int = 0,
    start_position: int | None = None,
    normals_first: bool = False,
    parents: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> Layout:
    """Layout for `num_normal` chained normal tokens (positions start_position, start_position+1, ...) with a
    block of `k` masks after each normal index in `block_heads`, following a cache of `past_length` tokens.
    `start_position` defaults to `past_length`. With `parents` (parents[i] < i; -1 for the root(s)) the normal
    tokens form a tree instead of a chain: node i sits at start_position + its depth."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    heads = sorted(set(int(h) for h in block_heads))
    if heads and (heads[0] < 0 or heads[-1] >= num_normal):
        raise ValueError(f"block heads must lie in [0, {num_normal}), got {heads[0]}..{heads[-1]}")
    start = past_length if start_position is None else start_position

    normal_index, mask_slot, head = [], [], []

    def add_block(h: int) -> None:
        normal_index.extend([-1] * k)
        mask_slot.extend(range(k))
        head.extend([h] * k)

    block_set = set(heads)
    for i in range(num_normal):
        normal_index.append(i)
        mask_slot.append(-1)
        head.append(i)
        if not normals_first and i in block_set:
            add_block(i)
    if normals_first:
        for h in heads:
            add_block(h)

    normal_index_t = torch.tensor(normal_index, dtype=torch.long, device=device)
    mask_slot_t = torch.tensor(mask_slot, dtype=torch.long, device=device)
    head_t = torch.tensor(head, dtype=torch.long, device=device)
    gate = mask_slot_t >= 0
    depth, ancestor = _tree(num_normal, parents, device)
    # A normal row sits at start + depth(i) (= i in a chain); mask j (slot j-1) of head h at start + depth(h) + j.
    position_ids = start + depth[head_t] + torch.where(gate, mask_slot_t + 1, torch.zeros_like(mask_slot_t))
    attention = _attention(head_t, mask_slot_t, gate, past_length, ancestor)
    return Layout(normal_index_t, mask_slot_t, head_t, position_ids, gate, attention, past_length, k)


def _tree(num_normal: int, parents: Sequence[int] | None, device: torch.device | str
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(depth of every normal token, ancestor[i, j] = j is i or an ancestor of i); None for a chain, whose
    ancestor relation is j <= i."""
    if parents is None:
        return torch.arange(num_normal, device=device), None
    if len(parents) != num_normal:
        raise ValueError(f"parents needs one entry per normal token ({num_normal}), got {len(parents)}")
    depth = [0] * num_normal
    ancestor = torch.eye(num_normal, dtype=torch.bool)
    for i, p in enumerate(int(p) for p in parents):
        if not -1 <= p < i:
            raise ValueError(f"parents[{i}] must be -1 or an earlier node, got {p}")
        if p >= 0:
            depth[i] = depth[p] + 1
            ancestor[i] |= ancestor[p]
    return torch.tensor(depth, dtype=torch.long, device=device), ancestor.to(device)


def _attention(head: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor, past_length: int,
               ancestor: torch.Tensor | None = None) -> torch.Tensor:
    q_head, k_head = head[:, None], head[None, :]
    q_mask, k_mask = gate[:, None], gate[None, :]
    # Normal keys: visible to any row whose head is the key or descends from it (normal rows: their path; masks:
    # their head's path). In a chain that is k_head <= q_head.
    on_path = (k_head <= q_head) if ancestor is None else ancestor[q_head, k_head]
    sees_normal = ~k_mask & on_path
    # Mask keys: visible only to masks of the same block, up to and including themselves.
    sees_mask = k_mask & q_mask & (k_head == q_head) & (slot[None, :] <= slot[:, None])
    current = sees_normal | sees_mask
    past = torch.ones(head.numel(), past_length, dtype=torch.bool, device=head.device)
    return torch.cat([past, current], dim=1)


def pad_rows_attention(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Attention among `count` rows that pad a layout to a batch's width: each sees only itself, so no row of the
    matrix is all False (which would give NaN in the softmax); pad rows see nothing else and nothing sees them,
    and their outputs are ignored (training batches and decoding steps alike)."""
    return torch.eye(count, dtype=torch.bool, device=device)


def apply_sliding_window(attention: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
                         window: int) -> torch.Tensor:
    """Restrict `attention` to keys with query_pos - key_pos < window (the rule the HF models implement)."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]
    return attention & (distance < window)


def default_block_heads(labelled: torch.Tensor) -> list[int]:
    """Training blocks: after every normal token h whose first mask has a label, i.e. x_{h+1} is a target and
    x_{h+2} exists and is a target. Blocks whose labels would all lie past the end are left out."""
    n = labelled.numel()
    lab = labelled.tolist()
    return [h for h in range(n - 2) if lab[h + 1] and lab[h + 2]]


def training_labels(layout: Layout, input_ids: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Per-row targets: a normal row x_i predicts x_{i+1}; mask j of head h predicts x_{h+1+j}. Rows whose
    target is past the end or not a labelled (assistant) token get IGNORE_INDEX."""
    n = input_ids.numel()
    target_index = torch.where(layout.gate, layout.head + layout.mask_slot + 2, layout.head + 1)
    valid = target_index < n
    safe = target_index.clamp(max=n - 1)
    valid &= labelled[safe]
    return torch.where(valid, input_ids[safe], torch.full_like(safe, IGNORE_INDEX))


def consistency_anchor_rows(layout: Layout) -> torch.Tensor:
    """For every row, the normal row with the same position id and the same target (mask j of head h pairs
    with normal token h+j); -1 for rows without one (normal rows, or masks past the last normal token)."""
    num_normal = int((~layout.gate).sum())
    normal_row_of = torch.full((num_normal,), -1, dtype=torch.long, device=layout.gate.device)
    normal_rows = layout.normal_rows()
    normal_row_of[layout.normal_index[normal_rows]] = normal_rows
    partner = layout.head + layout.mask_slot + 1
    valid = layout.gate & (partner < num_normal)
    return torch.where(valid, normal_row_of[partner.clamp(max=num_normal - 1)], torch.full_like(partner, -1))

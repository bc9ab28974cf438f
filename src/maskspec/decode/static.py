"""The static decoding step: fixed shapes, state on the device, one host read per step; a CUDA graph on a GPU.

The decoder's usual step (`decoder.Decoder`) builds each step's layout on the host, verifies with Python lists
and grows the KV cache by concatenation: right for any batch, tree and sampling rule, but on a GPU a step of a
small model is then bound by the host (kernel launches, `.tolist()` syncs). `StaticStep` is the same step for
greedy sequences in a fixed number of slots (modes "ar" and "quadratic", chains and draft trees), written so
that nothing in it depends on values read back:

- the rows are fixed per shape: y0 and every draft node with a block of k masks after each (`model.layout`,
  normals first): (k + 1)^2 rows for a chain; a tree has `tree_shape` nodes per depth plus k slots for the
  prompt-lookup branch, and only its parents (so its attention) change from step to step; mode "ar" is one row;
- the KV storage is preallocated (`StepCache`, `capacity` positions per slot); a step writes each slot's rows at
  [length, length + rows); a chain's verified tokens are the step's first rows, so keeping them is only
  `length += accepted + 1`, a tree's path is moved there first; the rest is overwritten by the next step;
- the attention mask and the positions are built on the device from `length`, one device entry per slot;
- verification (the base head's argmax over the normal rows, walked down the tree's children) and the next
  drafts (the sampler from the block after the last accepted token; for a tree, the best continuations by path
  probability and the prompt-lookup branch, searched in a context buffer on the device) run on the device too;
- the step ends by writing each slot's [accepted, emitted tokens] into one small buffer: its `.tolist()` is the
  step's only host sync. The stop rules (EOS, budget, stop strings) then run on the host as for every step;
- sequences fill the first slots; a step runs over the smallest bucket of slots (1, 2, 4, ... `slots`) that
  holds them, and when some finish, the others move down (`keep`), so a half-empty engine runs a small step.

On CUDA the step is captured as a CUDA graph once per bucket and replayed (a failed capture falls back to running it
eagerly, with a warning); elsewhere it runs eagerly, the same code, which is what the CPU tests check against
the usual step. Greedy output is the base model's, like every mode, and the drafts are the usual step's, except
with a draft vocabulary: the static step then drafts over the vocabulary alone, not over each sequence's context
tokens too (a dynamic shape), which can only lower tau.

Costs and limits: attention always spans `capacity` keys (masked past `length`), which a GPU does not notice
for a small model but a CPU does; `capacity` is the prompt plus the budget plus one step, rounded up to
`CAPACITY_STEP`, and an engine is reused by later sequences that fit (`engine_for`).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from maskspec.errors import UsageError
from maskspec.model.gated_lora import contiguous_span
from maskspec.model.layout import Layout, build_layout, pad_rows_attention

if TYPE_CHECKING:
    from maskspec.model.mtp import MTPModel

STATIC_MODES = ("ar", "quadratic")
CAPACITY_STEP = 256  # engines are sized in multiples of this many positions, so later prompts reuse them
GRAPH_WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS/SDPA workspaces, lazy inits)


def check_static(mode: str, greedy: bool = True) -> None:
    """UsageError unless the static step can run this decoding: greedy, modes ar and quadratic."""
    if not greedy:
        raise UsageError("the static step decodes greedily: use temperature 0, or leave the static step off")
    if mode not in STATIC_MODES:
        raise UsageError(f"the static step runs modes {' and '.join(STATIC_MODES)}, got mode {mode!r}")


class _StepLayer(CacheLayerMixin):
    """One layer's preallocated keys and values, (slots, heads, capacity, d). A pass over the slots the owner's
    `batch` names writes its rows at the owner's `write_positions` (one row of positions per slot) and reads those
    slots' whole storage."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "StepCache") -> None:
        super().__init__()
        self._owner = weakref.proxy(owner)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self._owner.slots, key_states.shape[1], self._owner.capacity)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys[self._owner.batch], self.values[self._owner.batch]
        positions = self._owner.write_positions[:, None, :, None]
        keys.scatter_(2, positions.expand(-1, keys.shape[1], -1, keys.shape[-1]), key_states)
        values.scatter_(2, positions.expand(-1, values.shape[1], -1, values.shape[-1]), value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.capacity, 0

    def get_seq_length(self) -> int:
        return self._owner.capacity

    def get_max_length(self) -> int:
        return self._owner.capacity


class StepCache(Cache):
    """KV storage of `slots` sequences of `capacity` positions per layer, allocated at the first pass. Each pass
    runs over the slots `batch` (a slice) names and writes its rows at `write_positions` (slots, rows), set by
    the caller before the pass; every layer returns those slots' whole storage, and the attention mask says which
    positions hold valid keys."""

    def __init__(self, num_layers: int, capacity: int, slots: int = 1) -> None:
        self.capacity, self.slots = capacity, slots
        self.batch = slice(0, slots)
        self.write_positions: torch.Tensor | None = None
        super().__init__(layers=[_StepLayer(self) for _ in range(num_layers)])


@dataclass(frozen=True)
class _Rows:
    """A pass's fixed rows, on the device: which step token each row reads (normal_index), mask_slot, the normal
    token each row hangs off (head), positions relative to the first row's, the attention among the rows
    (rows, rows; for a tree step only its mask-to-mask part, the rest follows the tree's parents) and the gate's
    rows and span (of one sequence: `gate_of` gives them for several)."""

    normal_index: torch.Tensor
    mask_slot: torch.Tensor
    head: torch.Tensor
    offsets: torch.Tensor
    attention: torch.Tensor
    gate_rows: torch.Tensor
    gate_span: tuple[int, int] | None

    @property
    def count(self) -> int:
        return int(self.mask_slot.numel())

    def gate_of(self, sequences: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """The flat mask rows of a pass over `sequences` of these rows each, and their span if contiguous."""
        if sequences == 1:
            return self.gate_rows, self.gate_span
        offsets = torch.arange(sequences, device=self.gate_rows.device)[:, None] * self.count
        rows = (offsets + self.gate_rows[None, :]).reshape(-1)
        return rows, contiguous_span(rows)

    @classmethod
    def of_layout(cls, layout: Layout) -> "_Rows":
        gate_rows = layout.mask_rows()
        span = contiguous_span(gate_rows)
        return cls(layout.normal_index.clamp(min=0), layout.mask_slot, layout.head,
                   layout.position_ids - layout.past_length, layout.attention[:, layout.past_length:], gate_rows,
                   span)

    @classmethod
    def causal(cls, count: int, device: torch.device) -> "_Rows":
        """`count` normal tokens in a chain, no masks (mode ar)."""
        index = torch.arange(count, device=device)
        return cls(index, torch.full((count,), -1, dtype=torch.long, device=device), index, index,
                   torch.ones(count, count, dtype=torch.bool, device=device).tril(), index.new_empty(0), None)


def tree_shape(k: int, tree: int, width: int) -> list[int]:
    """Nodes per depth (1..) of the fixed-shape draft tree: a chain of k (tree 0), else what `grow_trees` grows
    for a node budget `tree` and `width` (at most `width` nodes per depth, `tree` in all, k depths at most)."""
    if not tree:
        return [1] * k
    counts: list[int] = []
    while len(counts) < k and sum(counts) < tree:
        counts.append(min(width, tree - sum(counts)))
    return counts


def slot_buckets(slots: int) -> list[int]:
    """The numbers of slots a step runs over: powers of two below `slots`, then `slots` (one CUDA graph each)."""
    buckets = [1 << i for i in range(slots.bit_length()) if 1 << i < slots]
    return buckets + [slots]


class StaticStep:
    """The static step of up to `slots` greedy sequences with k drafts each (0: mode ar), in KV storage of
    `capacity` positions per sequence: a chain, or with `tree` > 0 a draft tree of that many nodes, `width` per
    depth (`tree_shape`), grown as `drafters.grow_trees` grows one (the chain's continuation first, then by path
    probability), plus with `lookup` the prompt-lookup branch merged in as `TreeDrafter` merges it (k more node
    slots; a slot whose token an existing node already holds, or past the branch's end, is left out).

    Sequences occupy the first `occupied` slots. `prefill_many(prompts)` starts some in the next free slots (one
    eager pass; returns their first tokens); each `step()` runs every occupied slot and returns, per slot, (drafts accepted, the
    tokens it adds: those drafts and the token after them); `keep(slots)` lets the others go, moving the kept
    ones down so that they stay first. A step runs over the smallest bucket (`slot_buckets`) that holds the
    occupied slots; the slots past `occupied` in it compute on without effect."""

    def __init__(self, mtp: "MTPModel", k: int, capacity: int, tree: int = 0, width: int = 2,
                 lookup: bool = True, slots: int = 1) -> None:
        if not 0 <= k <= mtp.k:
            raise UsageError(f"k must be in 0..{mtp.k} (the adapter's k), got {k}")
        if tree < 0 or width < 1 or (tree and not k):
            raise UsageError(f"a static draft tree needs k >= 1, tree >= 0 and width >= 1; got k={k}, tree={tree}, "
                             f"width={width}")
        if slots < 1:
            raise UsageError(f"the static step needs at least 1 slot, got {slots}")
        self.mtp, self.k, self.capacity, self.tree, self.slots = mtp, k, capacity, tree, slots
        self.width = width if tree else 1
        self.lookup = bool(lookup and tree)
        device = mtp.device
        self.counts = tree_shape(k, tree, width)
        self.starts = [1 + sum(self.counts[:d]) for d in range(len(self.counts))]  # first node of each depth
        self.lookup_start = 1 + sum(self.counts)  # the lookup branch's slots: one per depth 1..k
        self.nodes = self.lookup_start + (k if self.lookup else 0)  # y0, the sampler's nodes, the lookup slots
        self.depths = k if self.lookup else len(self.counts)
        depth_of = [0] + [d + 1 for d, c in enumerate(self.counts) for _ in range(c)]
        # Each node's parent (y0: itself); the first node of each depth is the chain's; lookup slots in a chain.
        parents = [0] + [self.starts[d - 2] if d > 1 else 0 for d in depth_of[1:]]
        if self.lookup:
            parents += [0] + [self.lookup_start + j for j in range(k - 1)]
        self.cache = StepCache(mtp.model.config.get_text_config().num_hidden_layers, capacity, slots)
        # The state, one row per slot.
        self.length = torch.zeros(slots, dtype=torch.long, device=device)  # valid KV entries
        self.live = torch.zeros(slots, dtype=torch.long, device=device)  # 1 where a sequence is: it advances
        self.tokens = torch.zeros(slots, self.nodes, dtype=torch.long, device=device)  # [y0, the drafts by depth]
        self.parents = torch.tensor(parents, dtype=torch.long, device=device).repeat(slots, 1)
        # The context (prompt and output, y0 last: length + 1 tokens) that prompt lookup searches.
        self.context = torch.zeros(slots, capacity + self.depths + 2, dtype=torch.long, device=device)
        self.out = torch.zeros(slots, self.depths + 2, dtype=torch.long, device=device)  # [accepted, tokens...]
        self.occupied = 0
        self._lengths = [0] * slots  # `length` as the host knows it (from each step's result)
        self._columns = torch.arange(capacity, device=device)
        self._context_columns = torch.arange(self.context.shape[1], device=device)
        self._slots = torch.arange(self.depths + 1, device=device)
        self._eye = torch.eye(self.nodes, dtype=torch.bool, device=device)
        self._node_ids = torch.arange(self.nodes, device=device)
        self._depth_nodes = [torch.arange(s, s + c, device=device) for s, c in zip(self.starts, self.counts)]
        # verification's candidates per depth: the sampler's nodes there and the lookup slot
        self._candidates = []
        for d in range(self.depths):
            ids = list(range(self.starts[d], self.starts[d] + self.counts[d])) if d < len(self.counts) else []
            self._candidates.append(torch.tensor(ids + ([self.lookup_start + d] if self.lookup else []),
                                                 dtype=torch.long, device=device))
        if k:
            layout = build_layout(self.nodes, range(self.nodes), k, normals_first=True,
                                  parents=[-1] + parents[1:], device=device)
            self._rows = _Rows.of_layout(layout)
            # (nodes, k): the rows of the block after each node
            self._blocks = torch.stack([layout.block_rows(h) for h in range(self.nodes)])
            # the mask-to-mask part of the attention, which no tree changes, and which keys are masks
            self._key_is_mask = layout.gate[None, :]
            self._mask_attention = self._rows.attention & self._key_is_mask
        else:
            self._rows = _Rows.causal(1, device)
        self.rows = self._rows.count
        self.buckets = slot_buckets(slots)
        self._gates = {n: self._rows.gate_of(n) for n in self.buckets}  # per bucket, made once
        self._graphs: dict[int, Any] = {}
        self._graph_pool: Any = None
        self.use_graph = device.type == "cuda"
        self.graph_error: str | None = None  # why capture failed (then the step runs eagerly)
        self.fingerprint = model_fingerprint(mtp)
        self._user: weakref.ref | None = None

    @property
    def shape(self) -> tuple[int, int, int, bool]:
        return (self.k, self.tree, self.width, self.lookup)

    @property
    def in_use(self) -> bool:
        """Whether a live decoder holds this engine (its `_engine` is this one): its state is that decoder's."""
        user = self._user() if self._user is not None else None
        return user is not None and getattr(user, "_engine", None) is self

    def lend(self, user: Any) -> None:
        self._user = weakref.ref(user)

    @property
    def captured(self) -> list[int]:
        """The buckets whose step runs as a CUDA graph."""
        return sorted(self._graphs)

    # ------------------------------------------------------------------ public
    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a slot holds this prompt and budget (`needed_capacity`; a budget of 0: its prefill and first
        step)."""
        return needed_capacity(self.k, prompt_tokens, max_new_tokens, self.tree, self.width,
                               self.lookup) <= self.capacity

    @property
    def free(self) -> int:
        return self.slots - self.occupied

    def prefill(self, prompt_ids: Sequence[int]) -> int:
        """Start one sequence in the next free slot (`prefill_many` of one); returns its first new token."""
        return self.prefill_many([prompt_ids])[0]

    @torch.inference_mode()
    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """Start sequences in the next free slots, in order: one eager pass over their prompts (each with a mask
        block after its last token; rows right-padded to the longest, a pad row sees only itself); returns their
        first new tokens. Each slot's state (y0, drafts, length) is then set for `step`."""
        if len(prompts) > self.free:
            raise UsageError(f"cannot start {len(prompts)} more sequence(s): {self.free} of this engine's "
                             f"{self.slots} slots are free")
        for prompt in prompts:
            if not prompt or not self.fits(len(prompt), 0):
                raise UsageError(f"a prompt of {len(prompt)} tokens does not fit this engine's {self.capacity} "
                                 "positions")
        if not prompts:
            return []
        device, m = self.mtp.device, len(prompts)
        part = slice(self.occupied, self.occupied + m)
        if self.k:
            layouts = [build_layout(len(p), [len(p) - 1], self.k, normals_first=True, device=device) for p in prompts]
            each = [_Rows.of_layout(layout) for layout in layouts]
        else:
            each = [_Rows.causal(len(p), device) for p in prompts]
        width = max(rows.count for rows in each)
        token_ids = torch.zeros(m, width, dtype=torch.long, device=device)
        mask_slot = torch.full((m, width), -1, dtype=torch.long, device=device)
        offsets = torch.zeros(m, width, dtype=torch.long, device=device)
        current = torch.zeros(m, width, width, dtype=torch.bool, device=device)
        gate_rows = []
        for b, (prompt, rows) in enumerate(zip(prompts, each)):
            count = rows.count
            token_ids[b, :count] = torch.tensor(list(prompt), dtype=torch.long, device=device)[rows.normal_index]
            mask_slot[b, :count] = rows.mask_slot
            offsets[b, :count] = rows.offsets
            offsets[b, count:] = len(prompt)
            current[b, :count, :count] = rows.attention
            current[b, count:, count:] = pad_rows_attention(width - count, device)
            gate_rows.append(rows.gate_rows + b * width)
        rows_of_masks = torch.cat(gate_rows)
        length = self.length[part]
        length.zero_()
        hidden = self._pass(token_ids, mask_slot, offsets, current, part,
                            (rows_of_masks, contiguous_span(rows_of_masks)))
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        batch = torch.arange(m, device=device)
        first = self.mtp.head_logits(hidden[batch, lengths - 1]).argmax(dim=-1)  # (m,)
        for b, prompt in enumerate(prompts):
            self.context[part.start + b, :len(prompt)] = token_ids[b, :len(prompt)]  # normals first: the prompt
        self.context[part].scatter_(1, lengths[:, None], first[:, None])
        length.copy_(lengths)
        if self.k:
            blocks = torch.stack([layout.block_rows(len(p) - 1) for layout, p in zip(layouts, prompts)])  # (m, k)
            latents = hidden.gather(1, blocks[:, :, None].expand(-1, -1, hidden.shape[-1]))
            tokens, parents = self._grow(latents, first[:, None], length, part)
            self.tokens[part] = tokens
            self.parents[part] = parents
        else:
            self.tokens[part] = first[:, None]
        self.live[part] = 1
        for b, prompt in enumerate(prompts):
            self._lengths[part.start + b] = len(prompt)
        self.occupied += m
        return first.tolist()

    @torch.inference_mode()
    def step(self) -> list[tuple[int, list[int]]]:
        """One decoding step of every occupied slot: per slot, (drafts accepted, [those drafts..., the token after
        them])."""
        if not self.occupied:
            return []
        bucket = next(b for b in self.buckets if b >= self.occupied)
        graph = self._graphs.get(bucket)
        if graph is None and self.use_graph and self._capture(bucket):
            graph = self._graphs[bucket]
        if graph is not None:
            graph.replay()
        else:
            self._compute(bucket)
        values = self.out[:self.occupied].tolist()  # the step's one host sync
        results = []
        for slot, (accepted, *tokens) in enumerate(values):
            self._lengths[slot] += accepted + 1
            results.append((accepted, tokens[:accepted + 1]))
        return results

    @torch.inference_mode()
    def keep(self, slots: Sequence[int]) -> None:
        """Keep the sequences in these occupied slots (increasing), moved down to slots 0.. in that order; the
        others' slots become free."""
        slots = list(slots)
        if sorted(set(slots)) != slots or (slots and not 0 <= slots[0] <= slots[-1] < self.occupied):
            raise ValueError(f"keep needs increasing occupied slots (0..{self.occupied - 1}), got {slots}")
        for target, source in enumerate(slots):
            if target != source:
                self._move(source, target)
        self.occupied = len(slots)
        self.live[:self.occupied] = 1
        self.live[self.occupied:] = 0
        self.length[self.occupied:] = 0  # a free slot computes from position 0 and stays there
        for slot in range(self.occupied, self.slots):
            self._lengths[slot] = 0

    def _move(self, source: int, target: int) -> None:
        used = self._lengths[source] + 1
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys[target, :, :used] = layer.keys[source, :, :used]
                layer.values[target, :, :used] = layer.values[source, :, :used]
        for state in (self.length, self.tokens, self.parents, self.context):
            state[target] = state[source]
        self._lengths[target] = self._lengths[source]

    # ------------------------------------------------------------------ the step, on the device
    def _compute(self, n: int) -> None:
        """Everything a step of the first `n` slots does, without reading a value back: forward, verification,
        next drafts, state."""
        rows, nodes = self._rows, self.nodes
        part = slice(0, n)
        length, tokens, parents = self.length[part], self.tokens[part], self.parents[part]
        hidden = self._pass(tokens[:, rows.normal_index], rows.mask_slot[None].expand(n, -1),
                            rows.offsets[None].expand(n, -1), self._step_attention(parents), part, self._gates[n])
        argmax = self.mtp.head_logits(hidden[:, :nodes]).argmax(dim=-1)  # (n, nodes): greedy token after each
        out, live = self.out[part], self.live[part]
        if not self.k:
            out[:, 1:].copy_(argmax)
            tokens.copy_(argmax)
            length.add_(live)
            return
        # Verification: from y0, depth by depth, to the child holding the greedy token (`verify.greedy_tree_path`).
        at = torch.zeros(n, 1, dtype=torch.long, device=argmax.device)
        alive = torch.ones(n, 1, dtype=torch.bool, device=argmax.device)
        accepted = torch.zeros(n, 1, dtype=torch.long, device=argmax.device)
        path = [at]
        for candidates in self._candidates:
            match = (parents[:, candidates] == at) & (tokens[:, candidates] == argmax.gather(1, at))
            hit = match.any(dim=1, keepdim=True) & alive
            at = torch.where(hit, candidates[match.long().argmax(dim=1, keepdim=True)], at)
            alive = hit
            accepted = accepted + hit.long()
            path.append(at)
        path_nodes = torch.cat(path, dim=1)  # (n, depths + 1): y0, the accepted nodes, then the last one repeated
        bonus = argmax.gather(1, at)  # (n, 1)
        if self.width > 1 or self.lookup:  # the path is not a prefix of the step: move its keys and values
            self._keep_path(path_nodes, length, part)
        block = self._blocks[at[:, 0]]  # (n, k): the rows of the block after the last accepted node
        latents = hidden.gather(1, block[:, :, None].expand(-1, -1, hidden.shape[-1]))
        path_tokens = tokens.gather(1, path_nodes[:, 1:])
        emitted = torch.where(self._slots[None, :] < accepted, torch.cat([path_tokens, bonus], dim=1), bonus)
        out[:, :1].copy_(accepted)
        out[:, 1:].copy_(emitted)
        self.context[part].scatter_(1, length[:, None] + 1 + self._slots[None, :], emitted)  # y0 was at length
        length.add_((accepted[:, 0] + 1) * live)
        new_tokens, new_parents = self._grow(latents, bonus, length, part)
        tokens.copy_(new_tokens)
        parents.copy_(new_parents)

    def _step_attention(self, parents: torch.Tensor) -> torch.Tensor:
        """The attention among a step's rows, per slot (n, rows, rows): fixed for a chain; for a tree, rows see
        the keys on their head's path (the ancestors from `parents`, built on the device) and their own block's
        masks up to themselves."""
        n = parents.shape[0]
        if self.width == 1 and not self.lookup:
            return self._rows.attention[None].expand(n, -1, -1)
        eye = self._eye[None].expand(n, -1, -1)
        ancestor = eye
        index = parents[:, :, None].expand(-1, -1, self.nodes)
        for _ in range(self.depths):  # depth d needs d rounds
            ancestor = eye | ancestor.gather(1, index)
        head = self._rows.head
        on_path = ancestor[:, head][:, :, head]
        return (on_path & ~self._key_is_mask) | self._mask_attention

    def _keep_path(self, path_nodes: torch.Tensor, length: torch.Tensor, part: slice) -> None:
        """KV entries of each slot's accepted path (normals first: row = node) moved to [length, length + depth]."""
        source = (length[:, None] + path_nodes)[:, None, :, None]
        target = (length[:, None] + self._slots[None, :])[:, None, :, None]
        for layer in self.cache.layers:
            for storage in (layer.keys[part], layer.values[part]):
                shape = (-1, storage.shape[1], -1, storage.shape[-1])
                storage.scatter_(2, target.expand(*shape), storage.gather(2, source.expand(*shape)))

    def _pass(self, token_ids: torch.Tensor, mask_slot: torch.Tensor, offsets: torch.Tensor, current: torch.Tensor,
              part: slice, gate: tuple[torch.Tensor, tuple[int, int] | None]) -> torch.Tensor:
        """One forward pass in each slot of `part` of its rows (token_ids, mask_slot and positions relative to
        `length`: (n, rows); attention among them: `current`, (n, rows, rows); the gate's flat rows and span),
        written at [length, length + rows) of each slot: hidden states (n, rows, d)."""
        count = token_ids.shape[1]
        length = self.length[part][:, None]
        columns = self._columns[None, :]
        past = columns < length  # (n, capacity)
        relative = columns - length
        in_step = (relative >= 0) & (relative < count)
        index = relative.clamp(0, count - 1)
        step_keys = current.gather(2, index[:, None, :].expand(-1, count, -1))
        attention = past[:, None, :] | (step_keys & in_step[:, None, :])  # (n, rows, capacity)
        positions = length + offsets
        key_positions = torch.where(past, columns, length + offsets.gather(1, index))
        self.cache.batch = part
        self.cache.write_positions = length + self._columns[None, :count]
        out = self.mtp.forward_rows(token_ids, mask_slot, positions, attention, key_positions,
                                    past_key_values=self.cache, use_cache=True, mask_rows=gate)
        return out.hidden

    def _grow(self, latents: torch.Tensor, prev: torch.Tensor, length: torch.Tensor,
              part: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot's next nodes from one block's latents (n, k, d) after its new y0 `prev` (n, 1): (tokens,
        parents), (n, nodes), y0 first. A chain takes the sampler's argmax at each mask; a tree, at each depth,
        the `width` best continuations of every node of the depth before, of which the chain's own and then the
        highest path log-probabilities (as `grow_trees`) fill the depth's places. `length` (n,) and `part`: for
        the lookup branch, the slots' lengths and which slots' context."""
        n = prev.shape[0]
        tokens = [prev]
        parents = [torch.zeros(n, 1, dtype=torch.long, device=prev.device)]
        frontier, frontier_nodes = prev, self._node_ids[:1]
        score = torch.zeros(n, 1, device=prev.device)
        for depth, count in enumerate(self.counts):
            size = frontier.shape[1]
            z = latents[:, depth:depth + 1].expand(-1, size, -1).reshape(n * size, -1)
            logits, ids = self.mtp.draft_logits(frontier.reshape(-1), z)
            logits = logits.reshape(n, size, -1)
            if self.width == 1:
                column = logits[:, 0].argmax(dim=-1, keepdim=True)  # (n, 1)
                chosen_parent = frontier_nodes.expand(n, -1)
            else:
                logp = torch.log_softmax(logits.float(), dim=-1)
                top = logp.topk(min(self.width, logp.shape[-1]), dim=-1)  # (n, size, width)
                path_score = (score[:, :, None] + top.values).reshape(n, -1)
                rank = path_score.clone()
                rank[:, 0] = float("inf")  # the chain's continuation (the first node's best child) comes first
                pick = rank.topk(count, dim=1).indices  # (n, count)
                column = top.indices.reshape(n, -1).gather(1, pick)
                chosen_parent = frontier_nodes[pick // top.indices.shape[-1]]
                score = path_score.gather(1, pick)
            frontier = column if ids is None else ids[column]
            frontier_nodes = self._depth_nodes[depth]
            tokens.append(frontier)
            parents.append(chosen_parent)
        tokens_t, parents_t = torch.cat(tokens, dim=1), torch.cat(parents, dim=1)
        if not self.lookup:
            return tokens_t, parents_t
        return self._merge_lookup(tokens_t, parents_t, *self._lookup_branch(self.context[part], length))

    def _lookup_branch(self, context: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`drafters.prompt_lookup` of each slot's context (n, size; `length` (n,) + 1 tokens) on the device: the
        k tokens that followed the latest earlier occurrence of its last 3 (else 2, else 1) tokens, and which of
        them exist, (n, k) each."""
        n, size = context.shape
        count = length[:, None] + 1
        columns = self._context_columns[None, :]
        found = torch.zeros(n, 1, dtype=torch.bool, device=context.device)
        follow_at = torch.zeros(n, 1, dtype=torch.long, device=context.device)
        for width in (3, 2, 1):
            match = (columns <= count - width - 1) & (count - 1 >= width)  # starts of an earlier occurrence
            for i in range(width):
                tail = context.gather(1, (count - width + i).clamp(min=0))
                shifted = context[:, (self._context_columns + i).clamp(max=size - 1)]
                match = match & (shifted == tail)
            latest = torch.where(match, columns, -1).amax(dim=1, keepdim=True)
            new = ~found & (latest >= 0)
            follow_at = torch.where(new, latest + width, follow_at)
            found = found | new
        index = follow_at + self._slots[None, :self.k]
        valid = found & (index < count)
        return context.gather(1, index.clamp(max=size - 1)), valid

    def _merge_lookup(self, tokens: torch.Tensor, parents: torch.Tensor, branch: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot's lookup branch (n, k) merged into its sampler tree (n, lookup_start) as
        `drafters.merge_branch` merges it: along the nodes it shares with the tree, then in its own slots; a slot
        it does not use hangs off itself (a node no path reaches) with y0's token."""
        at = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
        slot_tokens, slot_parents = [], []
        for j in range(self.k):
            token, exists = branch[:, j:j + 1], valid[:, j:j + 1]
            own = self._node_ids[self.lookup_start + j:self.lookup_start + j + 1]
            if j < len(self.counts):  # a sampler node at this depth holding the token after `at`
                nodes = self._depth_nodes[j]
                shared = (parents[:, nodes] == at) & (tokens[:, nodes] == token)
                reuse = shared.any(dim=1, keepdim=True)
                node = nodes[shared.long().argmax(dim=1, keepdim=True)]
            else:
                reuse, node = torch.zeros_like(exists), at
            used = exists & ~reuse
            slot_tokens.append(torch.where(used, token, tokens[:, :1]))
            slot_parents.append(torch.where(used, at, own))
            at = torch.where(reuse, node, own)
        return torch.cat([tokens] + slot_tokens, dim=1), torch.cat([parents] + slot_parents, dim=1)

    # ------------------------------------------------------------------ CUDA graph
    def _capture(self, n: int) -> bool:
        """Capture `_compute(n)` as a CUDA graph (after warm-up runs on a side stream); the state is restored
        after each run, so the real step is still to come. The buckets' graphs share one memory pool (they never
        run at once). False, with a warning, if capture fails: every bucket then runs eagerly."""
        saved = [state.clone() for state in (self.length, self.tokens, self.parents)]

        def restore() -> None:
            for state, copy in zip((self.length, self.tokens, self.parents), saved):
                state.copy_(copy)

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_RUNS):
                    self._compute(n)
                    restore()
            torch.cuda.current_stream().wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._compute(n)
            restore()
            self._graphs[n] = graph
            return True
        except Exception as exc:  # the step still runs, eagerly
            torch.cuda.synchronize()
            restore()
            self.use_graph = False
            self.graph_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"the static step could not be captured as a CUDA graph ({self.graph_error}); it runs "
                          "eagerly", RuntimeWarning, stacklevel=3)
            return False


def step_rows(k: int, tree: int = 0, width: int = 2, lookup: bool = True) -> int:
    """Rows of one static step: y0 and every draft node (a tree's lookup slots too), each with a block of k masks
    (1 in mode ar)."""
    nodes = 1 + sum(tree_shape(k, tree, width)) + (k if lookup and tree else 0)
    return nodes * (k + 1) if k else 1


def needed_capacity(k: int, prompt_tokens: int, max_new_tokens: int, tree: int = 0, width: int = 2,
                    lookup: bool = True) -> int:
    """KV positions a sequence needs: its prompt and budget, plus one step's rows (or the prefill's mask block),
    rounded up to a multiple of CAPACITY_STEP."""
    need = prompt_tokens + max_new_tokens + max(step_rows(k, tree, width, lookup), k + 1)
    return -(-need // CAPACITY_STEP) * CAPACITY_STEP


def model_fingerprint(mtp: "MTPModel") -> tuple:
    """Changes when any parameter or buffer of the model is replaced (a new adapter, `.to()`): a captured graph
    holds their addresses. In-place updates keep it, and a graph replayed after them reads the new values."""
    return (mtp.device, mtp.dtype, tuple(t.data_ptr() for t in itertools.chain(mtp.parameters(), mtp.buffers())))


_ENGINES: "weakref.WeakKeyDictionary[Any, list[StaticStep]]" = weakref.WeakKeyDictionary()


def engine_for(mtp: "MTPModel", k: int, capacity: int, user: Any, tree: int = 0, width: int = 2,
               lookup: bool = True, slots: int = 1) -> StaticStep:
    """A static engine of the model for (k, tree, width) with `slots` slots of at least `capacity` positions each
    (`needed_capacity` of the sequences it is for), lent to `user` (a decoder) until its `_engine` no longer names
    it: an idle one kept from earlier sequences (its graphs already captured) when one fits and the model is
    unchanged, else a new one. Engines that idle and no longer match are dropped."""
    fingerprint = model_fingerprint(mtp)
    kept = [e for e in _ENGINES.setdefault(mtp, []) if e.in_use or e.fingerprint == fingerprint]
    shape = (k, tree, width if tree else 1, bool(lookup and tree), slots)
    engine = next((e for e in kept if (*e.shape, e.slots) == shape and not e.in_use and e.capacity >= capacity), None)
    if engine is None:
        # an idle one too small: its memory back
        kept = [e for e in kept if e.in_use or (*e.shape, e.slots) != shape]
        engine = StaticStep(mtp, k, capacity, tree, width, lookup, slots)
        kept.append(engine)
    _ENGINES[mtp] = kept
    engine.lend(user)
    return engine


def engine_report(mtp: "MTPModel") -> list[dict[str, Any]]:
    """The model's static engines now: k, tree, slots, capacity, which slot buckets run as CUDA graphs and why
    not."""
    return [{"k": e.k, "tree": e.tree, "lookup": e.lookup, "slots": e.slots, "capacity": e.capacity, "rows": e.rows,
             "cuda_graph": bool(e.captured), "graph_buckets": e.captured,
             "graph_error": e.graph_error} for e in _ENGINES.get(mtp, [])]

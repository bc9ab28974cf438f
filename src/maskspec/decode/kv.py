"""KV-cache operations of the decoder, on one `GrowingCache` for a batch of sequences.

Layout: (B, heads, P, d) per layer. Sequence b's valid entries are [0, len_b): its prompt and every output token
but the newest; columns [len_b, P) are padding that every row of b masks out through the attention matrix. A step
appends its rows at [P, P + R); `keep_verified` then moves each sequence's verified rows (y0 and its accepted
drafts: a prefix of the step for a chain, a root-to-leaf path for a draft tree) to follow its valid entries and
cuts the width to the longest. Rows already in place (a batch of one keeping a prefix, the longest sequence of a
chain step) are not copied, and the old entries never are.

A step's rows are written into room the layer's storage keeps after its columns (`GrowingLayer`), not
concatenated onto a copy of the cache, so a step's KV work grows with its rows, not with the context. Padding
columns always hold finite values (zeros, or rows a move left behind): a masked-out NaN would still poison the
attention's weighted sum.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Columns of room a growing layer's storage gets beyond what it holds when it is (re)allocated.
GROWTH = 256


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the first rows and columns of a storage with room for more: a pass
    writes its rows into the room instead of concatenating them onto a copy of the whole cache. The storage is
    copied only when the room runs out (GROWTH more columns each time) or when the tensors were replaced. Dropping
    batch rows (`select`) moves the kept ones down inside it, and newcomers (`merge`) take the freed rows."""

    @classmethod
    def holding(cls, key_store: torch.Tensor, value_store: torch.Tensor, width: int) -> "GrowingLayer":
        """A layer whose keys and values are the first `width` columns of these storages."""
        layer = cls()
        layer.lazy_initialization(key_store, value_store)
        layer._key_store, layer._value_store = key_store, value_store
        layer.keys, layer.values = key_store[:, :, :width], value_store[:, :, :width]
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self._key_store = self._value_store = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._in_store(held + new):
            self._key_store = _with_room([self.keys], held, held + new + GROWTH)
            self._value_store = _with_room([self.values], held, held + new + GROWTH)
        batch = self.keys.shape[0]
        self._key_store[:batch, :, held:held + new] = key_states
        self._value_store[:batch, :, held:held + new] = value_states
        self.keys = self._key_store[:batch, :, :held + new]
        self.values = self._value_store[:batch, :, :held + new]
        return self.keys, self.values

    def _in_store(self, columns: int, batch: int | None = None) -> bool:
        """Whether the keys and values are the first rows and columns of their storages, and the storages have at
        least `columns` columns (and `batch` rows)."""
        return (_is_front_of(self.keys, self._key_store, columns, batch)
                and _is_front_of(self.values, self._value_store, columns, batch))

    def keep_rows(self, rows: Sequence[int], width: int) -> bool:
        """Only the batch rows `rows` (in that order), cut to `width` columns, moved down in the storage itself:
        only rows that change place are copied, and the rows freed at the end take a later `add_rows`. False
        (nothing changed) when the keys and values are not the front of their storage."""
        if not self._in_store(width):
            return False
        moves = [(dst, src) for dst, src in enumerate(rows) if dst != src]
        if moves:
            dst, src = (_index(column, self.keys.device) for column in zip(*moves))
            with _writable(self._key_store):  # a sequence cancelled between steps drops outside inference mode
                for store in (self._key_store, self._value_store):
                    store[dst, :, :width] = store[src, :, :width]  # the sources are read before any is written
        self.keys = self._key_store[:len(rows), :, :width]
        self.values = self._value_store[:len(rows), :, :width]
        return True

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> bool:
        """Another batch's entries after this one's in the storage's free rows, both zero-padded to `width`; False
        (nothing changed) when the storage lacks the rows or columns."""
        held, batch, more = self.keys.shape[2], self.keys.shape[0], keys.shape[0]
        if not self._in_store(width, batch + more):
            return False
        with _writable(self._key_store):
            for store, theirs in ((self._key_store, keys), (self._value_store, values)):
                store[:batch, :, held:width] = 0
                store[batch:batch + more, :, :theirs.shape[2]] = theirs
                store[batch:batch + more, :, theirs.shape[2]:width] = 0
        self.keys = self._key_store[:batch + more, :, :width]
        self.values = self._value_store[:batch + more, :, :width]
        return True

    def reset(self) -> None:
        self._key_store = self._value_store = None
        super().reset()


def _is_front_of(view: torch.Tensor, store: torch.Tensor | None, columns: int, batch: int | None = None) -> bool:
    """Whether `view` is the first rows and columns of `store` and `store` has at least `columns` columns (and
    `batch` rows)."""
    return (store is not None and view.data_ptr() == store.data_ptr() and view.shape[1] == store.shape[1]
            and view.shape[0] <= store.shape[0] and view.stride() == store.stride() and store.shape[2] >= columns
            and (batch is None or store.shape[0] >= batch))


def _writable(store: torch.Tensor) -> torch.inference_mode:
    """Inference mode when the storage was made in it (only there may it be written in place)."""
    return torch.inference_mode(store.is_inference())


def _index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)


def _with_room(parts: Sequence[torch.Tensor], width: int, columns: int) -> torch.Tensor:
    """A new storage of `columns` columns holding the parts one after another by batch row, each zero-padded to
    `width` (the room beyond is left unwritten: no view reaches it before a pass writes it)."""
    first = parts[0]
    store = first.new_empty(sum(p.shape[0] for p in parts), first.shape[1], columns, first.shape[3])
    row = 0
    for part in parts:
        store[row:row + part.shape[0], :, :part.shape[2]] = part
        store[row:row + part.shape[0], :, part.shape[2]:width] = 0
        row += part.shape[0]
    return store


class GrowingCache(Cache):
    """The decoder's KV cache: one `GrowingLayer` per decoder layer (full attention everywhere; a sliding window
    comes from the decoder's own attention mask)."""

    def __init__(self, layers: Sequence[GrowingLayer] | None = None) -> None:
        if layers is None:
            super().__init__(layer_class_to_replicate=GrowingLayer)
        else:
            super().__init__(layers=list(layers))


def crop(cache: Cache, length: int) -> None:
    """Keep the first `length` positions of every layer."""
    excess = cache.get_seq_length() - length
    if excess < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} entries to {length}")
    if excess:
        cache.crop(-excess)


def keep_verified(cache: Cache, old_lens: Sequence[int], physical: int,
                  keep: Sequence[Sequence[int]]) -> Cache:
    """Keep, for sequence b, its old entries [0, old_lens[b]) and the step's rows keep[b] (offsets from `physical`,
    increasing), moved to be contiguous; the rest of each row is padding. Worked example, B = 2, physical 5, a step
    of 4 rows: old_lens [5, 3], keep [[0, 1], [0, 2]] -> b0 keeps columns 0-4 and 5-6; b1 keeps 0-2 and 5, 7,
    moved to 3-4; width 7.

    Only the kept rows that are not already in place are copied (in place, one indexed copy per tensor), then
    every layer is cut to the new width: the old entries never move, so a step costs what it keeps, not the whole
    cache. A column left behind by a move is padding, masked out like any other."""
    width = max(o + len(rows) for o, rows in zip(old_lens, keep))
    moves = [(b, old + j, physical + r) for b, (old, rows) in enumerate(zip(old_lens, keep))
             for j, r in enumerate(rows) if old + j != physical + r]
    if moves:
        device = cache.layers[0].keys.device
        batch, dst, src = (torch.tensor(column, dtype=torch.long, device=device) for column in zip(*moves))
        for layer in cache.layers:
            # dst <= src for every move, and the source rows are read out before any is written
            layer.keys[batch, :, dst] = layer.keys[batch, :, src]
            layer.values[batch, :, dst] = layer.values[batch, :, src]
    crop(cache, width)
    return cache


def merge(first: Cache | None, second: Cache) -> Cache:
    """The two batches one after the other (batch dimension), the shorter padded to the longer's width: written
    into the rows `select` freed in the first's storage when they and its columns suffice (the first's entries stay
    where they are), else once into a new storage with room to grow."""
    if first is None:
        return second
    width = max(first.get_seq_length(), second.get_seq_length())
    layers = []
    for a, b in zip(first.layers, second.layers):
        if isinstance(a, GrowingLayer) and a.add_rows(b.keys, b.values, width):
            layers.append(a)
        else:
            layers.append(GrowingLayer.holding(_with_room([a.keys, b.keys], width, width + GROWTH),
                                               _with_room([a.values, b.values], width, width + GROWTH), width))
    return GrowingCache(layers)


def select(cache: Cache, rows: Sequence[int], width: int) -> Cache:
    """Only the batch rows `rows` (in that order), cut to `width` columns (the longest valid length left). A growing
    layer moves them down within its storage (`GrowingLayer.keep_rows`); other layers, or one not at the front of
    its storage, are copied."""
    for layer in cache.layers:
        if not (isinstance(layer, GrowingLayer) and layer.keep_rows(rows, width)):
            index = _index(rows, layer.keys.device)
            layer.keys = layer.keys.index_select(0, index)[:, :, :width]
            layer.values = layer.values.index_select(0, index)[:, :, :width]
    return cache

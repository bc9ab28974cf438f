"""The linear layer used by decoding on CPU.

On CPU, `torch.nn.functional.linear` in float32 goes to MKL, whose kernels are slow for the few rows a
decoding step has (1 to ~25). oneDNN's matmul (the one behind `torch.ops.mkldnn._linear_pointwise`) is faster
and grows less with rows: over 90 float32 matrices of SmolLM2-135M's MLP shape (1536 x 576), 2 threads,
17.9 ms vs 30.7 ms at 1 row, 19.9 vs 36.6 ms at 4, 35.8 vs 49.4 ms at 25. `scripts/linear_kernels.py`
measures it over the embedded model's own projections. Results differ from MKL's only in rounding
(summation order, ~1e-6 relative), the same kind of difference a different row count already makes.

Packed matrices (`PackCache`): oneDNN can keep a weight in its own blocked layout, so a call does not re-read
the plain layout in a cache-unfriendly order. For 2+ rows that is a third faster again (the MLP matrices above:
22.9 -> 15.1 ms at 4 rows, 22.8 -> 14.8 at 9, on this machine) and, measured over the model's shapes, gives
bit-identical results to the plain-layout call with the same rows. One row is left to the plain layout:
there oneDNN picks a vector kernel that the blocked layout would not use (different rounding, no faster).
A packed weight is a second copy of the matrix: it costs memory equal to the weights packed.

The choice is one value, `Kernels`: "packed" (oneDNN, with packed matrices for calls of 2+ rows), "onednn"
(oneDNN, plain layout) or "stock" (`F.linear`). It applies only to inference-time float32 on CPU and only
where the caller asks for it (decoding inside `MTPModel`, whose `kernels` attribute holds it), so the wrapped
model, called directly, is still exactly the stock model. bfloat16 is left to the stock path: there oneDNN is
already what PyTorch uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F


class Kernels(str, Enum):
    """Which float32 CPU kernel a decoding linear call uses (see the module docstring)."""

    PACKED = "packed"
    ONEDNN = "onednn"
    STOCK = "stock"


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_AVAILABLE = _onednn_available()
PACKING_AVAILABLE = ONEDNN_AVAILABLE and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# The row count oneDNN is told to expect when packing. Any count >= 2 then gives the plain layout's result;
# 16 (vs 4) was as fast or faster at 4, 9 and 25 rows on every shape of the embedded model.
PACKING_ROWS_HINT = 16

# What a pack is made from: matrices stacked by rows (same input size) and the first matrix's bias (or None).
PackSource = tuple[Sequence[torch.Tensor], torch.Tensor | None]


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` with a oneDNN kernel ("packed" or "onednn") takes the oneDNN path for these tensors."""
    return (ONEDNN_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not (torch.is_grad_enabled() and
                                                       (x.requires_grad or weight.requires_grad)))


def packable(matrices: Sequence[torch.Tensor]) -> bool:
    """Whether these matrices can be packed together: CPU float32 2-D with one input size, and a PyTorch with
    the packing op."""
    return (PACKING_AVAILABLE and len(matrices) > 0
            and all(m.device.type == "cpu" and m.dtype == torch.float32 and m.dim() == 2 for m in matrices)
            and len({m.shape[1] for m in matrices}) == 1)


def pack_stacked(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """One packed copy of the matrices stacked by rows (same input size): `linear_packed(x, it)` is then
    `[x W1^T, x W2^T, ...]` side by side, from one call. The first block's columns are bit-identical to a
    plain call with that block alone (each output column is its own dot product; checked by the tests)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]).contiguous(),
                                                       PACKING_ROWS_HINT)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's matmul with a packed weight (`pack_stacked`): x (..., in) -> (..., rows of the packed matrix)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_rows(x: torch.Tensor) -> bool:
    """Whether a call with input `x` takes a packed matrix: 2+ rows (one row keeps the plain layout, see above)."""
    return x.numel() > x.shape[-1]


def tensor_state(weight: torch.Tensor) -> tuple[int, int]:
    """Changes whenever the tensor's values may have: in-place updates bump _version, new data moves data_ptr."""
    return weight._version, weight.data_ptr()


@dataclass(frozen=True, eq=False)
class Pack:
    """A packed matrix, its bias over all its rows (the source's bias, zeros for the rows past the first
    matrix; None without one), and what it was packed from: weak references to the source tensors and their
    `tensor_state` at the time."""

    matrix: torch.Tensor
    bias: torch.Tensor | None
    sources: tuple[weakref.ref | None, ...]
    states: tuple[tuple[int, int] | None, ...]

    def built_from(self, matrices: Sequence[torch.Tensor], bias: torch.Tensor | None) -> bool:
        """Whether this pack was made from exactly these tensors, unchanged since."""
        tensors = (*matrices, bias)
        # Identity as well as state: a freed tensor's successor can reuse its address with the same _version.
        return (len(tensors) == len(self.sources)
                and all((ref is None and t is None) or (ref is not None and ref() is t)
                        for ref, t in zip(self.sources, tensors))
                and self.states == _states(tensors))


def _states(tensors: Sequence[torch.Tensor | None]) -> tuple[tuple[int, int] | None, ...]:
    return tuple(None if t is None else tensor_state(t) for t in tensors)


def _make_pack(matrices: Sequence[torch.Tensor], bias: torch.Tensor | None) -> Pack:
    rows = sum(m.shape[0] for m in matrices)
    stacked_bias = None
    if bias is not None:
        with torch.no_grad():
            stacked_bias = torch.cat([bias.detach(), bias.new_zeros(rows - bias.shape[0])])
    tensors = (*matrices, bias)
    return Pack(pack_stacked(matrices), stacked_bias,
                tuple(None if t is None else weakref.ref(t) for t in tensors), _states(tensors))


class PackCache:
    """The packed matrices of one model, by key. `refresh` brings it up to date with the model's current
    matrices (run when a decoding session is entered: only missing or changed entries are packed, keys no
    longer named are dropped); `get` only reads, so the calls inside a session pay nothing for it. The cache
    holds no strong reference to the tensors it packed. A packed copy costs memory equal to its matrices."""

    def __init__(self) -> None:
        self._packs: dict[Hashable, Pack] = {}

    def refresh(self, sources: Mapping[Hashable, PackSource]) -> None:
        """Make the cache hold a pack for every packable source (`packable`) and nothing else."""
        packs: dict[Hashable, Pack] = {}
        for key, (matrices, bias) in sources.items():
            pack = self._packs.get(key)
            if pack is None or not pack.built_from(matrices, bias):
                pack = _make_pack(matrices, bias) if packable(matrices) else None
            if pack is not None:
                packs[key] = pack
        self._packs = packs

    def get(self, key: Hashable) -> Pack | None:
        """The pack stored under `key` at the last `refresh` (not checked against the tensors again)."""
        return self._packs.get(key)

    def is_fresh(self, key: Hashable, source: PackSource) -> bool:
        """Whether `key` holds a pack of exactly `source`'s tensors in their current state."""
        pack = self._packs.get(key)
        return pack is not None and pack.built_from(*source)

    def drop(self, key: Hashable) -> None:
        self._packs.pop(key, None)

    def clear(self) -> None:
        self._packs = {}

    def __len__(self) -> int:
        return len(self._packs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._packs

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._packs))

    def __reduce__(self) -> tuple:
        # Packed matrices are opaque oneDNN tensors that cannot be copied or pickled; a copy packs its own.
        return (type(self), ())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           kernel: Kernels = Kernels.STOCK, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` ("stock"), or oneDNN's float32 matmul ("onednn", "packed") where the tensors allow it (CPU,
    float32, no grad, `uses_onednn`). With "packed", calls of 2+ rows multiply by `packed`, the weight's
    packed copy (`Pack.matrix`), when one is given."""
    if kernel != Kernels.STOCK and uses_onednn(x, weight):
        if kernel == Kernels.PACKED and packed is not None and packed_rows(x):
            return linear_packed(x, packed, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)

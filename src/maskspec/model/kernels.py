"""The linear layer used by decoding on CPU.

On CPU, `torch.nn.functional.linear` in float32 goes to MKL, whose kernels are slow for the few rows a
decoding step has (1 to ~25). oneDNN's matmul (the one behind `torch.ops.mkldnn._linear_pointwise`) is faster
and grows less with rows: over 90 float32 matrices of SmolLM2-135M's MLP shape (1536 x 576), 2 threads,
17.9 ms vs 30.7 ms at 1 row, 19.9 vs 36.6 ms at 4, 35.8 vs 49.4 ms at 25. `scripts/linear_kernels.py`
measures it over the embedded model's own projections. Results differ from MKL's only in rounding
(summation order, ~1e-6 relative), the same kind of difference a different row count already makes.

Prepacked weights (`prepack`): oneDNN can keep a weight in its own blocked layout, so a call does not re-read
the plain layout in a cache-unfriendly order. For 2+ rows that is a third faster again (the MLP matrices above:
22.9 -> 15.1 ms at 4 rows, 22.8 -> 14.8 at 9, on this machine) and, measured over the model's shapes, gives
bit-identical results to the plain-layout call with the same rows. One row is left to the plain layout:
there oneDNN picks a vector kernel that the blocked layout would not use (different rounding, no faster).
A packed weight is a second copy of the matrix: it costs memory equal to the weights packed.

It is used only for inference-time float32 on CPU and only where the caller asks for it (decoding inside
`MTPModel`), so the wrapped model, called directly, is still exactly the stock model. bfloat16 is left to
the stock path: there oneDNN is already what PyTorch uses.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
import torch.nn.functional as F


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_AVAILABLE = _onednn_available()
PACKING_AVAILABLE = ONEDNN_AVAILABLE and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# The row count oneDNN is told to expect when packing. Any count >= 2 then gives the plain layout's result;
# 16 (vs 4) was as fast or faster at 4, 9 and 25 rows on every shape of the embedded model.
PACKING_ROWS_HINT = 16

# id(weight) -> (a weak reference to the weight, its (_version, data_ptr) when packed, the packed copy). A
# packed copy lives as long as its weight; an in-place change (a training step) bumps _version and new data
# (`module.to(...)` swaps `.data`) moves data_ptr: either retires the copy. (Tensors compare elementwise, so
# they cannot be the keys of a WeakKeyDictionary.)
_packed: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def _packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    entry = _packed.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != tensor_state(weight):
        return None
    return entry[2]


def _forget(ref: weakref.ref, key: int) -> None:
    entry = _packed.get(key)
    if entry is not None and entry[0] is ref:
        del _packed[key]


def uses_fast_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(..., fast=True)` takes the oneDNN path for these tensors."""
    return (ONEDNN_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not (torch.is_grad_enabled() and
                                                       (x.requires_grad or weight.requires_grad)))


def prepack(weight: torch.Tensor) -> bool:
    """Keep a oneDNN-packed copy of `weight` for `linear(..., fast=True)` calls with 2+ rows. Returns whether a
    packed copy is (now) in place: not for tensors the fast path would not take (not CPU float32, or a
    PyTorch without the packing op). Packing again an unchanged weight is free."""
    if not PACKING_AVAILABLE or weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    if _packed_copy(weight) is not None:
        return True
    packed = pack_stacked([weight])
    key = id(weight)
    _packed[key] = (weakref.ref(weight, lambda ref: _forget(ref, key)), tensor_state(weight), packed)
    return True


def is_prepacked(weight: torch.Tensor) -> bool:
    """Whether `weight` has an up-to-date packed copy."""
    return _packed_copy(weight) is not None


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, fast: bool = False,
           packed: bool = False) -> torch.Tensor:
    """`F.linear`, or oneDNN's float32 matmul when `fast` and the tensors allow it (CPU, float32, no grad); with
    `packed` too, by the weight's packed copy (`prepack`) where it has an up-to-date one and there are 2+ rows."""
    if fast and uses_fast_linear(x, weight):
        if packed and packed_rows(x):
            packed_copy = _packed_copy(weight)
            if packed_copy is not None:
                return linear_packed(x, packed_copy, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)

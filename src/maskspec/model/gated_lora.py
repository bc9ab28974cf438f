"""Gated LoRA: y = W x + g(t) * B(A(x)) * scale, with g(t) = 1 on mask rows and 0 on normal rows.

The gate is not a learned quantity and not a global: the wrapper owns one `GateState`, sets the rows of the
current forward pass inside a `with gate_state.active(rows):` block and the state is cleared when the block
ends. Outside such a block the layers are exactly the base linear layers, so the wrapped model can still be
used (and compared) as the plain base model. The LoRA branch is computed for the mask rows only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from maskspec.model import kernels
from maskspec.model.kernels import Kernels, PackCache, PackSource, linear

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


FIND_SPAN = object()  # `GateState.active`: find the span of the rows from the rows themselves


class GateState:
    """Flat (batch * sequence) indices of the rows where LoRA is on, for the duration of one call.
    `span` is (start, stop) when those rows are contiguous (a decoding step puts every mask row last), so
    the layers can slice instead of gather and scatter, which is several times faster on CPU.
    `kernel` is the linear kernel of `maskspec.model.kernels` the layers use during the call; with
    `Kernels.PACKED` they multiply by their packs in `packs` (the model's cache, keyed by `id(layer)`), which
    the caller has brought up to date for it."""

    def __init__(self, packs: PackCache | None = None) -> None:
        self.rows: torch.Tensor | None = None
        self.span: tuple[int, int] | None = None
        self.kernel = Kernels.STOCK
        self.packs = packs

    @contextmanager
    def active(self, rows: torch.Tensor | None, kernel: Kernels = Kernels.STOCK,
               span: tuple[int, int] | None | object = FIND_SPAN) -> Iterator[None]:
        """LoRA on `rows` inside the block. `span`: the rows' (start, stop) when the caller knows it (None: not
        contiguous); by default it is found from `rows`, which reads them on the host (a sync on a GPU)."""
        previous = (self.rows, self.span, self.kernel)
        self.rows, self.kernel = rows, kernel
        self.span = contiguous_span(rows) if span is FIND_SPAN else span
        try:
            yield
        finally:
            self.rows, self.span, self.kernel = previous


def contiguous_span(rows: torch.Tensor | None) -> tuple[int, int] | None:
    """(first, last + 1) of increasing row indices when they are contiguous, else None (also for no rows)."""
    if rows is None or rows.numel() == 0:
        return None
    first, last = int(rows[0]), int(rows[-1])
    return (first, last + 1) if last - first + 1 == rows.numel() else None


class GatedLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a low-rank update applied only to the rows the gate names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, gate: GateState) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype,
                                device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype,
                                device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # A plain attribute, not a submodule: the gate is shared by every layer and holds no parameters.
        object.__setattr__(self, "_gate", gate)

    @property
    def weight(self) -> torch.Tensor:  # some modeling code reads `proj.weight.dtype`
        return self.base.weight

    def pack_source(self) -> PackSource | None:
        """What decoding packs for this layer: the base matrix and LoRA's A stacked, [W; A], with W's bias. One
        call then gives the base output (bit-identical to W alone) and the low-rank input of the mask rows.
        None where the base keeps its own forward (a subclass of nn.Linear, quantised say)."""
        if type(self.base) is not nn.Linear:
            return None
        return [self.base.weight, self.lora_A.weight], self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._gate
        if (gate.kernel == Kernels.PACKED and gate.packs is not None and x.dtype == torch.float32
                and kernels.packed_rows(x)):
            pack = gate.packs.get(id(self))
            if pack is not None:
                return self._stacked_forward(x, pack.matrix, pack.bias)
        if type(self.base) is nn.Linear:
            out = linear(x, self.base.weight, self.base.bias, kernel=gate.kernel)
        else:  # a subclass (quantised, say) keeps its own forward
            out = self.base(x)
        rows, span = gate.rows, gate.span
        if rows is None or rows.numel() == 0:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])  # a view: the updates below land in `out`
        # `out` is this call's fresh base output, which its backward does not need, so in-place is safe.
        if span is not None and not torch.is_grad_enabled():
            # Decoding: one fused multiply-add into the mask rows, no temporaries for the scaled delta.
            start, stop = span
            low_rank = self.lora_A(self.dropout(flat_x[start:stop])).to(out.dtype)  # autocast may change dtypes
            flat_out[start:stop].addmm_(low_rank, self.lora_B.weight.t().to(out.dtype), alpha=self.scale)
        elif span is not None:
            start, stop = span
            flat_out[start:stop] += self._delta(flat_x[start:stop]).to(out.dtype)
        else:
            flat_out.index_add_(0, rows, self._delta(flat_x.index_select(0, rows)).to(out.dtype))
        return out

    def _stacked_forward(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Decoding with the packed [W; A]: the base output and every row's low-rank input from one matmul,
        then B into the mask rows."""
        out_features = self.base.out_features
        both = kernels.linear_packed(x.reshape(-1, x.shape[-1]), packed, bias)  # (rows, out + rank)
        out = both[:, :out_features].contiguous()
        rows, span = self._gate.rows, self._gate.span
        if span is not None:
            start, stop = span
            out[start:stop].addmm_(both[start:stop, out_features:], self.lora_B.weight.t(), alpha=self.scale)
        elif rows is not None and rows.numel():
            low = both.index_select(0, rows)[:, out_features:]
            out.index_add_(0, rows, torch.mm(low, self.lora_B.weight.t()), alpha=self.scale)
        return out.view(*x.shape[:-1], out_features)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale


def inject_gated_lora(model: nn.Module, target_modules: Sequence[str], rank: int, alpha: float, dropout: float,
                      gate: GateState, exclude: Sequence[nn.Module] = ()) -> list[str]:
    """Replace every `nn.Linear` whose attribute name is in `target_modules` by a GatedLoRALinear.
    Returns the qualified names replaced (sorted); raises if nothing matched."""
    excluded = {id(m) for m in exclude}
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in target_modules and isinstance(child, nn.Linear) and id(child) not in excluded:
                setattr(parent, child_name, GatedLoRALinear(child, rank, alpha, dropout, gate))
                replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not replaced:
        raise ValueError(f"no linear layer named any of {list(target_modules)} in {type(model).__name__}")
    return sorted(replaced)

"""The linear layer used by decoding on CPU.

On CPU, `torch.nn.functional.linear` in float32 goes to MKL, whose kernels are slow for the few rows a
decoding step has (1 to ~25). oneDNN's matmul (the one behind `torch.ops.mkldnn._linear_pointwise`) is faster
and grows less with rows: over 90 float32 matrices of SmolLM2-135M's MLP shape (1536 x 576), 2 threads,
17.9 ms vs 30.7 ms at 1 row, 19.9 vs 36.6 ms at 4, 35.8 vs 49.4 ms at 25. `scripts/linear_kernels.py`
measures it over the embedded model's own projections. Results differ from MKL's only in rounding
(summation order, ~1e-6 relative), the same kind of difference a different row count already makes.

It is used only for inference-time float32 on CPU and only where the caller asks for it (decoding inside
`MTPModel`), so the wrapped model, called directly, is still exactly the stock model. bfloat16 is left to
the stock path: there oneDNN is already what PyTorch uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN_AVAILABLE = _onednn_available()


def uses_fast_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(..., fast=True)` takes the oneDNN path for these tensors."""
    return (ONEDNN_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not (torch.is_grad_enabled() and
                                                       (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, fast: bool = False
           ) -> torch.Tensor:
    """`F.linear`, or oneDNN's float32 matmul when `fast` and the tensors allow it (CPU, float32, no grad)."""
    if fast and uses_fast_linear(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)

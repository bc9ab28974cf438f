"""Loading a model to decode with: the base model, its adapter, and the rule that the shipped adapter goes with
the embedded default model (`adapter.shipped_adapter_for`). Options are checked before anything heavy loads:
the device, the dtype and `k` against the adapter's config."""

from __future__ import annotations

from typing import Callable

from maskspec.adapter import read_adapter_config, resolve_adapter, shipped_adapter_for
from maskspec.decode.steps import resolve_k
from maskspec.errors import UsageError
from maskspec.hub import parse_dtype, resolve_device
from maskspec.model.mtp import MTPModel


def load_for_decoding(model: str, adapter: str | None = None, *, mode: str = "quadratic", k: int | None = None,
                      dtype: str = "fp32", device: str = "cpu",
                      notice: Callable[[str], None] | None = None) -> tuple[MTPModel, str]:
    """The model with the adapter asked for, or the shipped one where it goes with the model. Without any adapter
    the drafting modes fall back to `ar` (plain decoding), said through `notice` once the model has loaded.
    Returns (model, the mode to decode with)."""
    device = resolve_device(device)
    parse_dtype(dtype)
    if k is not None and k < 1:
        raise UsageError(f"--k must be at least 1, got {k}")
    adapter = adapter if adapter is not None else shipped_adapter_for(model)
    if adapter is not None and k is not None and mode != "ar":
        adapter_k = read_adapter_config(resolve_adapter(adapter, model)).k
        if k > adapter_k:
            raise UsageError(f"--k must be in 1..{adapter_k} (the adapter's k), got {k}")
    mtp = MTPModel.from_pretrained(model, adapter=adapter, dtype=dtype, device=device)
    if adapter is None and mode != "ar":
        mode = "ar"
        if notice is not None:
            notice(f"no adapter given and none ships for model {model!r}; decoding with --mode ar (plain, one "
                   "token per pass). Train one with `maskspec train`.")
    resolve_k(mtp, mode, k)
    return mtp, mode

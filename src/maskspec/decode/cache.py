"""KV-cache housekeeping: after a step only the verified tokens' entries stay."""

from __future__ import annotations

from transformers import DynamicCache


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer (the step's verified tokens are a prefix of it)."""
    excess = cache.get_seq_length() - length
    if excess < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} entries to {length}")
    if excess:
        cache.crop(-excess)

"""The step rules: decoding modes, the k a decoder runs with, which normal rows of a step get a mask block, and
how many drafts a step may verify.

State between steps: the KV cache holds every verified token of a sequence except the newest one, y0; the
sequence's drafts are guesses for the tokens after y0. One step feeds [y0, d1..dm] plus mask blocks
(`model.layout`, normals first):
- mode "ar": no blocks, no drafts (the reference loop, on the same code path);
- mode "linear": one block after the last draft; it yields new drafts only if every draft is accepted;
- mode "quadratic": a block after y0 and after every draft, so the block after the last accepted token always
  yields k new drafts.
The prefill feeds the prompt with one block after its last token (none in mode ar).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from maskspec.errors import UsageError

if TYPE_CHECKING:
    from maskspec.model.mtp import MTPModel

MODES = ("ar", "linear", "quadratic")
DRAFT_MODES = ("quadratic", "linear")


def resolve_k(mtp: "MTPModel", mode: str, k: int | None) -> int:
    """The k a decoder runs with: `mtp.default_k` when none is given, 0 for the reference loop. UsageError for
    an unknown mode or a k outside 1..the adapter's k."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    k = mtp.default_k if k is None else k
    if mode != "ar" and not (isinstance(k, int) and 1 <= k <= mtp.k):
        raise UsageError(f"k must be in 1..{mtp.k} (the adapter's k), got {k}")
    return k if mode != "ar" else 0


def block_heads(mode: str, k: int, num_normal: int, prefill: bool) -> list[int]:
    """Which normal rows of a step get a mask block: none for the reference loop; after the last row for the
    prefill and for linear decoding; after every row (y0 and each draft) for quadratic decoding."""
    if k == 0:
        return []
    if prefill or mode == "linear":
        return [num_normal - 1]
    return list(range(num_normal))


def drafts_within_budget(drafts: Sequence[int], tokens_left: int) -> int:
    """How many of the drafts a step verifies when `tokens_left` tokens may still be produced: a step yields the
    accepted drafts plus one token, so never more than tokens_left - 1 drafts (more would only cost compute)."""
    return max(0, min(len(drafts), tokens_left - 1))

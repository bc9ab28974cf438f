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

from maskspec.decode.drafters import DraftProposal
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


def resolve_tree(mtp: "MTPModel", mode: str, k: int | None, tree: int | None) -> int:
    """The draft-tree size a decoder runs with (0: a chain). None: the size the adapter's config recommends for
    this device (`mtp.default_tree`), used only when no k was given either (a k chosen by hand gets a chain) and
    only in mode quadratic. UsageError for a negative size, or a tree outside mode quadratic."""
    if tree is None:
        return mtp.default_tree if k is None and mode == "quadratic" else 0
    if not isinstance(tree, int) or tree < 0:
        raise UsageError(f"tree must be an integer >= 0 (0: a chain), got {tree!r}")
    if tree and mode != "quadratic":
        raise UsageError("draft trees need mode quadratic (a mask block after every node)")
    return tree


def resolve_static(mtp: "MTPModel", mode: str, k: int | None, tree: int | None, static: bool | None,
                   greedy: bool) -> bool:
    """Whether a generation uses the static step (`decode.static`). None: what the adapter's config recommends for
    this device (`mtp.default_static`), taken, like the recommended tree, only when neither k nor a tree was
    given, in mode quadratic, and only for greedy decoding (the static step does not sample)."""
    if static is None:
        return mtp.default_static and k is None and tree is None and mode == "quadratic" and greedy
    return bool(static)


def block_heads(mode: str, k: int, num_normal: int, prefill: bool) -> list[int]:
    """Which normal rows of a step get a mask block: none for the reference loop; after the last row for the
    prefill and for linear decoding; after every row (y0 and each draft) for quadratic decoding."""
    if k == 0:
        return []
    if prefill or mode == "linear":
        return [num_normal - 1]
    return list(range(num_normal))


def drafts_within_budget(proposal: DraftProposal, tokens_left: int) -> DraftProposal:
    """The drafts a step verifies when `tokens_left` tokens may still be produced: a step yields the accepted drafts
    plus one token, so no path longer than tokens_left - 1 drafts (more would only cost compute). A chain keeps
    its first tokens_left - 1 drafts; a tree the nodes no deeper than that."""
    limit = max(0, tokens_left - 1)
    if proposal.parents is None:
        return DraftProposal(proposal.tokens[:limit], proposal.probs[:limit])
    depth: list[int] = []
    kept: dict[int, int] = {-1: -1}  # old index -> new index
    tokens, parents, probs = [], [], []
    for i, (token, parent) in enumerate(zip(proposal.tokens, proposal.parents)):
        depth.append(1 + (depth[parent] if parent >= 0 else 0))
        if depth[i] <= limit and parent in kept:
            kept[i] = len(tokens)
            tokens.append(token)
            parents.append(kept[parent])
            if proposal.probs:
                probs.append(proposal.probs[i])
    return DraftProposal(tokens, probs, parents=parents)


def layout_parents(proposal: DraftProposal) -> list[int] | None:
    """The parents of a step's normal tokens [y0, d1..dm] for the layout: None for a chain; for a tree, y0 is the
    root and draft i hangs off its parent's row."""
    if proposal.parents is None:
        return None
    return [-1] + [p + 1 for p in proposal.parents]

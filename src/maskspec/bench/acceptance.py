"""Acceptance profile: tokens per pass for every k (quadratic and linear) from one teacher-forced pass per prompt.

Greedy quadratic decoding is fully determined by two things: the greedy continuation (which the output
equals) and, for every verified token, the drafts proposed by the mask block placed after it. A block's
latents depend only on the tokens up to its head (the attention rule), so the drafts after token i are the
same whichever step computes them, up to floating-point rounding. And a step accepts the longest run of drafts
that equals the continuation, so along that run the sampler's previous draft *is* the true token: feeding the
true previous token (teacher forcing) gives the same run length.

With a draft vocabulary (`MTPModel.set_draft_vocab`), the drafts of the block after token i range over the
vocabulary plus the context decoding has at that point (the prompt and the continuation up to the token after
i, the chain's first previous token); the drafter "sampler" does the same here, "sampler-full" scores the full
vocabulary.

So one forward over prompt + continuation with a block after every position gives, per position, the number
of leading drafts that would be accepted (`matches`). Walking those with the decoder's rules (`simulate`)
gives the passes and tokens per pass for any k up to the adapter's, in seconds instead of one full decoding
run per k. `maskspec acceptance` prints this table; `maskspec bench` measures real runs (and wall clock), and
the README compares the two on the same prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from maskspec.decode.drafters import add_lookup_branch, grow_trees
from maskspec.decode.steps import DRAFT_MODES
from maskspec.decode.verify import greedy_tree_path
from maskspec.model.layout import build_layout
from maskspec.model.mtp import MTPModel

# The sampler chain as decoding runs it (draft vocabulary + context, if the adapter has one), the sampler over the
# full vocabulary, or the base head's argmax at each mask.
DRAFTERS = ("sampler", "sampler-full", "head")
_LOGIT_CHUNK = 256  # rows per vocabulary projection: bounds memory at chunk x vocab floats


@dataclass
class PromptProfile:
    prompt_id: str
    domain: str
    prompt_tokens: int
    new_tokens: int
    # drafter -> per head (the last prompt token, then each generated token but the last): drafts in a row
    # that equal the continuation, at most the adapter's k
    matches: dict[str, list[int]] = field(default_factory=dict)
    # drafter -> per mask offset j (1..k): teacher-forced top-1 hits and the number of scored rows
    offset_hits: dict[str, list[int]] = field(default_factory=dict)
    offset_total: list[int] = field(default_factory=list)
    # TreeShape.key -> per head: the depth of the tree path that equals the continuation, and the tree's nodes
    tree_matches: dict[str, list[int]] = field(default_factory=dict)
    tree_nodes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TreeShape:
    """A draft-tree setting of the decoder: k masks per block, `budget` sampler nodes, `width` children per node
    and per depth, and whether the prompt-lookup branch is added (`decode.drafters.TreeDrafter`)."""

    k: int
    budget: int
    width: int = 2
    lookup: bool = True

    @property
    def key(self) -> str:
        return f"k{self.k}-tree{self.budget}-w{self.width}" + ("" if self.lookup else "-nolookup")


@dataclass
class BlockPass:
    """One teacher-forced pass over prompt + continuation with a mask block after every head."""

    sequence: list[int]
    heads: list[int]
    hidden: torch.Tensor | None
    layout: Any


@torch.inference_mode()
def block_pass(mtp: MTPModel, prompt_ids: Sequence[int], continuation: Sequence[int]) -> BlockPass:
    """The heads are the last prompt token, then each continuation token but the last."""
    sequence = list(prompt_ids) + list(continuation)
    heads = list(range(len(prompt_ids) - 1, len(sequence) - 1))
    if not heads:
        return BlockPass(sequence, heads, None, None)
    layout = build_layout(len(sequence), heads, mtp.k, device=mtp.device)
    ids = torch.tensor([sequence], device=mtp.device)
    with mtp.decoding_session():
        hidden = mtp.forward_layout(ids, layout).hidden[0]
    return BlockPass(sequence, heads, hidden, layout)


@torch.inference_mode()
def draft_matches(mtp: MTPModel, prompt_ids: Sequence[int], continuation: Sequence[int],
                  drafters: Sequence[str] = DRAFTERS, passed: BlockPass | None = None
                  ) -> tuple[dict[str, list[int]], dict[str, list[int]], list[int]]:
    """For each head h (the last prompt token, then each continuation token but the last) the number of
    leading drafts of the block after h that equal the continuation. Also per-offset hit counts.
    Returns (matches, offset_hits, offset_total). `passed`: the `block_pass` of these tokens, if already run."""
    for name in drafters:
        if name not in DRAFTERS:
            raise ValueError(f"drafter must be one of {DRAFTERS}, got {name!r}")
    k = mtp.k
    passed = passed or block_pass(mtp, prompt_ids, continuation)
    sequence, heads, hidden, layout = passed.sequence, passed.heads, passed.hidden, passed.layout
    empty = {name: [] for name in drafters}
    if not heads:
        return empty, {name: [0] * k for name in drafters}, [0] * k

    # Mask j (0-based) of the block after head h predicts sequence[h + 2 + j], with the token before it
    # (sequence[h + 1 + j]) as the sampler's previous token. Rows past the end of the sequence are not scored.
    rows, targets, prevs, block_of, slot_of = [], [], [], [], []
    for b, h in enumerate(heads):
        block = layout.block_rows(h).tolist()
        for j in range(k):
            if h + 2 + j >= len(sequence):
                break
            rows.append(block[j])
            targets.append(sequence[h + 2 + j])
            prevs.append(sequence[h + 1 + j])
            block_of.append(b)
            slot_of.append(j)
    hits = {name: torch.zeros(len(heads), k, dtype=torch.bool) for name in drafters}
    row_t = torch.tensor(rows, dtype=torch.long, device=mtp.device)
    target_t = torch.tensor(targets, device=mtp.device)
    prev_t = torch.tensor(prevs, device=mtp.device)
    block_t, slot_t = torch.tensor(block_of), torch.tensor(slot_of)
    # Draft vocabulary: every context token it lacks gets a column; the block after head h may use those that
    # occur in sequence[:h + 2] (what decoding has seen when it drafts from that block).
    seq_t = torch.tensor(sequence, device=mtp.device)
    extra = mtp.draft_extra_ids(seq_t) if mtp.draft_vocab_set else None
    if extra is not None:
        first_seen = torch.full((mtp.vocab_size,), len(sequence), dtype=torch.long, device=mtp.device)
        first_seen.scatter_reduce_(0, seq_t, torch.arange(len(sequence), device=mtp.device), "amin")
        extra_seen = first_seen[extra]
        head_t = torch.tensor(heads, device=mtp.device)[torch.tensor(block_of, device=mtp.device)]
    for start in range(0, len(rows), _LOGIT_CHUNK):
        part = slice(start, start + _LOGIT_CHUNK)
        latents = hidden.index_select(0, row_t[part])
        for name in drafters:
            if name == "head":
                tokens = mtp.head_logits(latents).argmax(-1)
            elif name == "sampler-full" or extra is None:
                tokens = mtp.sampler_logits(prev_t[part], latents).argmax(-1)
            else:
                logits, ids = mtp.draft_logits(prev_t[part], latents, extra)
                unseen = extra_seen[None, :] > head_t[part, None] + 1
                logits[:, mtp.draft_vocab.numel():].masked_fill_(unseen, float("-inf"))
                tokens = ids[logits.argmax(-1)]
            hits[name][block_t[part], slot_t[part]] = (tokens == target_t[part]).cpu()

    total = torch.bincount(slot_t, minlength=k).tolist()
    matches, offset_hits = {}, {}
    for name in drafters:
        # leading run of hits per block: cumulative product along the offsets
        matches[name] = hits[name].int().cumprod(dim=1).sum(dim=1).tolist()
        offset_hits[name] = hits[name].sum(dim=0).tolist()
    return matches, offset_hits, total


def simulate(matches: Sequence[int], k: int, new_tokens: int, mode: str = "quadratic",
             drafting_heads: list[int] | None = None) -> int:
    """Forward passes that greedy decoding with k drafts needs for `new_tokens` tokens, given `matches` from
    `draft_matches`. The prefill gives the first token; each step accepts up to k drafts (never drafting past
    the token budget) plus one token from the normal head. Quadratic mode always has the block after the last
    accepted token; linear mode has only the block after the last draft, so after a rejection its next step
    runs without drafts (one token, and a block after it). `drafting_heads`, if given, gets the head of every
    step that verifies drafts (whose drafts came from the block after that head)."""
    if mode not in DRAFT_MODES:
        raise ValueError(f"mode must be one of {DRAFT_MODES}, got {mode!r}")
    if new_tokens <= 0:
        return 0
    passes, produced, head, have_drafts = 1, 1, 0, True
    while produced < new_tokens:
        passes += 1
        if not have_drafts:
            produced, head, have_drafts = produced + 1, head + 1, True
            continue
        allowed = min(k, new_tokens - produced - 1)
        accepted = min(matches[head], allowed)
        if drafting_heads is not None and allowed > 0:
            drafting_heads.append(head)
        produced += accepted + 1
        head += accepted + 1
        have_drafts = mode == "quadratic" or accepted == allowed
    return passes


@torch.inference_mode()
def tree_matches(mtp: MTPModel, prompt_ids: Sequence[int], continuation: Sequence[int],
                 shapes: Sequence[TreeShape], passed: BlockPass | None = None
                 ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Greedy decoding with draft trees, simulated exactly: for each head h and tree shape, the tree the decoder
    would draft from the block after h and how deep its path along the continuation goes (what greedy tree
    verification accepts there; `simulate` walks these as it walks a chain's matches).

    A block's latents depend only on the tokens up to its head (not on the branch a step takes), and its first
    mask's prev is the token after h, which that step verifies; the tree is then grown by the decoder's own
    `grow_trees` from those latents (its first k masks), over the draft vocabulary and the context tokens decoding
    has seen by then (sequence[:h + 2]), plus the prompt-lookup branch of that context.
    Returns (shape key -> matches per head, shape key -> the tree's node count per head)."""
    passed = passed or block_pass(mtp, prompt_ids, continuation)
    sequence, heads = passed.sequence, passed.heads
    matches = {shape.key: [] for shape in shapes}
    nodes = {shape.key: [] for shape in shapes}
    if not heads:
        return matches, nodes
    device = mtp.device
    blocks = torch.stack([passed.hidden[passed.layout.block_rows(h)] for h in heads])  # (H, adapter k, d)
    prev = [sequence[h + 1] for h in heads]
    extra, allowed = None, None
    if mtp.draft_vocab_set:  # context columns: a head's block may draft the tokens seen up to h + 1
        seq_t = torch.tensor(sequence, device=device)
        extra = mtp.draft_extra_ids(seq_t)
        first_seen = torch.full((mtp.vocab_size,), len(sequence), dtype=torch.long, device=device)
        first_seen.scatter_reduce_(0, seq_t, torch.arange(len(sequence), device=device), "amin")
        seen = first_seen[extra][None, :] <= torch.tensor(heads, device=device)[:, None] + 1
        vocab = torch.ones(len(heads), mtp.draft_vocab.numel(), dtype=torch.bool, device=device)
        allowed = torch.cat([vocab, seen], dim=1)
    for shape in shapes:
        if not 1 <= shape.k <= mtp.k:
            raise ValueError(f"tree k must be in 1..{mtp.k}, got {shape.k}")
        trees = grow_trees(mtp, blocks[:, :shape.k], prev, budget=shape.budget, width=shape.width,
                           extra_ids=extra, allowed=allowed)
        for h, tree in zip(heads, trees):
            if shape.lookup:
                add_lookup_branch(tree, sequence[:h + 2], shape.k)
            truth = sequence[h + 2:h + 2 + shape.k]  # greedy verification follows the continuation
            path = greedy_tree_path(tree.tokens, tree.parents,
                                    lambda node, depth: truth[depth] if depth < len(truth) else None)
            matches[shape.key].append(len(path))
            nodes[shape.key].append(len(tree.tokens))
    return matches, nodes

"""Drafters: what proposes the tokens a step verifies.

A drafter has one method, `propose(requests) -> proposals`, called once per step with one `DraftRequest` per
sequence that needs new drafts: the latents of the mask block after its last verified token and that token. It
returns one `DraftProposal` per request (tokens, and when sampling the distribution each draft was drawn from,
which the acceptance rule needs). The sampler chain below is the drafter decoding uses; the tests' oracle is
another; draft trees and prompt-lookup candidates are further implementations of the same interface.

With a draft vocabulary (`MTPModel.set_draft_vocab`) the sampler's drafts range over it and over the sequence's
context tokens only (`DraftContext`); verification always uses the full head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from maskspec.decode.verify import SamplingConfig, sample, warped_probs

if TYPE_CHECKING:
    from maskspec.model.mtp import MTPModel


@dataclass
class DraftProposal:
    tokens: list[int] = field(default_factory=list)
    # Per draft, when sampling: the distribution it was drawn from (full vocabulary); in a tree, siblings drawn
    # from one distribution share the tensor, and None marks a point mass (a prompt-lookup draft).
    probs: list[torch.Tensor | None] = field(default_factory=list)
    error: BaseException | None = None  # drafting failed for this sequence alone
    # A draft tree: parents[i] is the draft that draft i continues (-1: the newest verified token), parents[i] < i.
    # None: a chain (draft i continues draft i - 1).
    parents: list[int] | None = None


@dataclass
class DraftRequest:
    """One sequence's need for drafts: `latents` (k, d) of the mask block after its newest verified token
    `prev_token`; `sequence` is the decoder's sequence (its output so far, sampling rule, generator, context)."""

    sequence: Any
    latents: torch.Tensor
    prev_token: int


class Drafter(Protocol):
    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        """One proposal per request, in order."""


class DraftContext:
    """A sequence's context tokens (prompt + verified output) that the draft vocabulary lacks: drafts may be these
    too (`MTPModel.draft_ids`). Kept incrementally: each step looks only at tokens not seen before."""

    def __init__(self, mtp: "MTPModel", tokens: Sequence[int] = ()) -> None:
        self.mtp = mtp
        self.seen: set[int] = set()
        # None without a draft vocabulary (drafts range over every id); else the extra ids, unordered.
        self.extra_ids: torch.Tensor | None = None
        if mtp.draft_vocab_set:
            self.extra_ids = torch.empty(0, dtype=torch.long, device=mtp.device)
            self.add(tokens)

    def add(self, tokens: Sequence[int]) -> None:
        if self.extra_ids is None:
            return
        new = [t for t in dict.fromkeys(tokens) if t not in self.seen]
        if new:
            self.seen.update(new)
            extra = self.mtp.draft_extra_ids(torch.tensor(new, dtype=torch.long, device=self.extra_ids.device))
            if extra.numel():
                self.extra_ids = torch.cat([self.extra_ids, extra])


class SamplerChain:
    """The sampler head as a drafter: draft j of a block from the sampler at mask j with prev = the token before
    it (the verified token for j = 1, then the previous draft), batched over the requests at each depth: the tree
    of width 1 (`grow_trees`). A failure in one sequence's own part (its sampling) fails that proposal alone
    (`DraftProposal.error`)."""

    def __init__(self, mtp: "MTPModel") -> None:
        self.mtp = mtp

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        trees = grow_requested(self.mtp, requests, budget=None, width=1)
        return [DraftProposal(t.tokens, t.probs, t.error) for t in trees]  # parents None: a chain


class TreeDrafter:
    """Draft trees from the sampler head (a dynamic tree, as EAGLE-2 builds one; `grow_trees`), plus the longest
    prompt-lookup continuation as one more branch (`lookup`), merged where it shares a prefix with the sampler's
    nodes. Greedy sequences get the best continuations by path probability; sampling ones get children drawn
    without replacement from the sampler's distribution, which `verify.accept_sampling_tree` verifies exactly."""

    def __init__(self, mtp: "MTPModel", budget: int, width: int = 2, lookup: bool = True) -> None:
        if budget < 1 or width < 1:
            raise ValueError(f"a draft tree needs budget >= 1 and width >= 1, got {budget} and {width}")
        self.mtp, self.budget, self.width, self.lookup = mtp, budget, width, lookup

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        trees = grow_requested(self.mtp, requests, budget=self.budget, width=self.width)
        if self.lookup:
            for request, tree in zip(requests, trees):
                if tree.error is None:
                    seq = request.sequence
                    add_lookup_branch(tree, list(seq.prompt_ids) + list(seq.output), request.latents.shape[0],
                                      sampled=not seq.sampling.greedy)
        return trees


def grow_requested(mtp: "MTPModel", requests: Sequence[DraftRequest], budget: int | None,
                   width: int) -> list[DraftProposal]:
    """`grow_trees` for the decoder's requests: their latents, newest tokens, context columns and sampling."""
    if not requests:
        return []
    extra, allowed = _draft_columns(mtp, [r.sequence for r in requests])
    return grow_trees(mtp, torch.stack([r.latents for r in requests]), [r.prev_token for r in requests],
                      budget=budget, width=width, extra_ids=extra, allowed=allowed,
                      samplings=[r.sequence.sampling for r in requests],
                      generators=[r.sequence.generator for r in requests])


def grow_trees(mtp: "MTPModel", latents: torch.Tensor, prev_tokens: Sequence[int], *, budget: int | None,
               width: int, extra_ids: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
               samplings: Sequence[SamplingConfig] | None = None,
               generators: Sequence[torch.Generator | None] | None = None) -> list[DraftProposal]:
    """Draft trees for R blocks at once, depth by depth, one batched sampler call per depth over every frontier
    node (a block's latents are the same for every branch; only the sampler's prev differs).

    latents: (R, m, d), the masks of each block; prev_tokens[r]: the verified token before block r's first mask.
    At depth j each frontier node proposes up to `width` children from the sampler at mask j with prev = its own
    token: the `width` most likely (greedy rows) or `width` draws without replacement (sampling rows, in draw
    order, `probs[i]` = the distribution node i was drawn from, shared by its siblings). Of all candidates of a
    block the chain's own continuation comes first, then the highest path probabilities (a node's later draws
    never ahead of its earlier ones, so each node keeps a prefix of its draws), at most `width` per depth and
    `budget` nodes in all (None: m, a chain when width is 1). So the greedy chain is always a branch.

    extra_ids: context columns beyond the draft vocabulary (`MTPModel.draft_logits`); allowed: (R, columns) bool,
    which columns each block may draft (None: all). A failure in one block's sampling fails that tree alone."""
    count, depth = latents.shape[0], latents.shape[1]
    budget = depth if budget is None else budget
    samplings = samplings or [SamplingConfig()] * count
    generators = generators or [None] * count
    trees = [DraftProposal(parents=[]) for _ in range(count)]
    # frontier: (block, node index or -1, token, path log-probability, on the chain)
    frontier = [(r, -1, int(prev_tokens[r]), 0.0, True) for r in range(count)]
    for j in range(depth):
        frontier = [f for f in frontier if trees[f[0]].error is None and len(trees[f[0]].tokens) < budget]
        if not frontier:
            break
        blocks = torch.tensor([f[0] for f in frontier], device=latents.device)
        prev = torch.tensor([f[2] for f in frontier], device=latents.device)
        logits, ids = mtp.draft_logits(prev, latents[blocks, j], extra_ids)
        if allowed is not None:
            logits = logits.masked_fill(~allowed[blocks], float("-inf"))
        greedy_rows = [i for i, f in enumerate(frontier) if samplings[f[0]].greedy]
        best = _best_children(logits[greedy_rows], width) if greedy_rows else ([], [])
        best_of = {i: (best[0][n], best[1][n]) for n, i in enumerate(greedy_rows)}
        candidates: dict[int, list[tuple]] = {}
        for i, (r, node, _, path_logp, on_chain) in enumerate(frontier):
            if i in best_of:
                values, columns = best_of[i]
                # a column this sequence may not draft (another sequence's context token) scores -inf: not a child
                children = [(lp, c if ids is None else int(ids[c]), None) for lp, c in zip(values, columns)
                            if lp != float("-inf")]
            else:
                try:
                    children = _drawn_children(logits[i], ids, samplings[r], generators[r], width, mtp.vocab_size)
                except Exception as exc:
                    trees[r].error = exc
                    continue
            score = path_logp
            for rank, (logp, token, probs) in enumerate(children):
                score = min(score, path_logp + logp)  # a later draw never scores above an earlier one
                candidates.setdefault(r, []).append((not (on_chain and rank == 0), -score, node, token, probs))
        next_frontier = []
        for r, cands in candidates.items():
            tree = trees[r]
            if tree.error is not None:
                continue
            cands.sort(key=lambda c: (c[0], c[1]))  # stable: draw order on ties
            for off_chain, neg_score, parent, token, probs in cands[:min(width, budget - len(tree.tokens))]:
                tree.tokens.append(token)
                tree.parents.append(parent)
                if probs is not None:
                    tree.probs.append(probs)
                next_frontier.append((r, len(tree.tokens) - 1, token, -neg_score, not off_chain))
        frontier = next_frontier
    return trees


def _best_children(logits: torch.Tensor, width: int) -> tuple[list[list[float]], list[list[int]]]:
    """Per row, the `width` best columns and their log-probabilities (width 1: the argmax, as the chain drafts)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if width == 1:
        columns = logp.argmax(dim=-1, keepdim=True)
        return logp.gather(1, columns).tolist(), columns.tolist()
    top = logp.topk(min(width, logp.shape[-1]), dim=-1)
    return top.values.tolist(), top.indices.tolist()


def _drawn_children(logits: torch.Tensor, ids: torch.Tensor | None, cfg: SamplingConfig,
                    generator: torch.Generator | None, width: int, vocab_size: int
                    ) -> list[tuple[float, int, torch.Tensor]]:
    """Up to `width` tokens drawn one after another without replacement from the warped sampler distribution q
    (fewer if q has fewer tokens), as (log q(token), token, q over the full vocabulary)."""
    probs = warped_probs(logits, cfg)
    if ids is not None:
        probs = probs.new_zeros(vocab_size).index_copy_(0, ids, probs)
    left, children = probs.clone(), []
    for _ in range(width):
        if not bool((left > 0).any()):
            break
        token = sample(left, generator)
        children.append((math.log(max(float(probs[token]), 1e-45)), token, probs))
        left[token] = 0
    return children


def _draft_columns(mtp: "MTPModel", seqs: Sequence[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The extra ids of one batched draft projection (every sequence's context tokens that the draft vocabulary
    lacks) and, per sequence, which columns of it are its own ((sequences, columns) bool; None: all). Each
    sequence then drafts over exactly the ids it would draft over alone."""
    if not mtp.draft_vocab_set:
        return None, None
    if len(seqs) == 1:
        return seqs[0].context.extra_ids, None
    own = [mtp.draft_extra_ids(s.context.extra_ids) for s in seqs]
    extra = torch.unique(torch.cat(own))
    if all(ids.numel() == extra.numel() for ids in own):
        return extra, None
    vocab = torch.ones(mtp.draft_vocab.numel(), dtype=torch.bool, device=extra.device)
    return extra, torch.stack([torch.cat([vocab, torch.isin(extra, ids)]) for ids in own])


def add_lookup_branch(tree: DraftProposal, context: Sequence[int], depth: int, sampled: bool = False) -> None:
    """Add the prompt-lookup continuation of `context` (at most `depth` tokens) to a tree in place. In a sampled
    tree its new nodes are point masses (probs None), verified after the sampler's siblings."""
    added = merge_branch(tree.tokens, tree.parents, prompt_lookup(context, depth))
    if sampled:
        tree.probs.extend([None] * added)


def prompt_lookup(context: Sequence[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n tokens
    (n = max_ngram down to 1, the longest match first), at most `max_tokens` of them; [] without a match. Strong
    where the answer repeats its input: code identifiers, summaries, quotes, translations of names."""
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), 0, -1):
        tail = list(context[n_ctx - n:])
        for start in range(n_ctx - n - 1, -1, -1):  # the latest earlier occurrence
            if list(context[start:start + n]) == tail:
                follow = list(context[start + n:start + n + max_tokens])
                if follow:
                    return follow
    return []


def merge_branch(tokens: list[int], parents: list[int], branch: Sequence[int]) -> int:
    """Add `branch` (a chain after the newest verified token) to the tree in place, sharing the prefix it has in
    common with existing nodes. Returns how many nodes were added."""
    at, before = -1, len(tokens)
    for token in branch:
        nxt = next((i for i, (t, p) in enumerate(zip(tokens, parents)) if p == at and t == token), None)
        if nxt is None:
            tokens.append(token)
            parents.append(at)
            nxt = len(tokens) - 1
        at = nxt
    return len(tokens) - before

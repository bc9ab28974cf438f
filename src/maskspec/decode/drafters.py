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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from maskspec.decode.verify import SamplingConfig, sample, warped_probs

if TYPE_CHECKING:
    from maskspec.model.mtp import MTPModel


@dataclass
class DraftProposal:
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # per draft, when sampling (full vocabulary)
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


def pick_draft(logits: torch.Tensor, ids: torch.Tensor | None, cfg: SamplingConfig,
               generator: torch.Generator | None, vocab_size: int) -> tuple[int, torch.Tensor | None]:
    """One draft from sampler logits over `ids` (None: the whole vocabulary): the argmax, or a sample from the
    warped distribution over those ids. That distribution is returned as a full-vocabulary vector, zero outside
    `ids`: the q that the acceptance rule compares with the base model's p."""
    if cfg.greedy:
        best = int(logits.argmax())
        return (best if ids is None else int(ids[best])), None
    probs = warped_probs(logits, cfg)
    if ids is not None:
        probs = probs.new_zeros(vocab_size).index_copy_(0, ids, probs)
    return sample(probs, generator), probs


class SamplerChain:
    """The sampler head as a drafter: draft j of a block from the sampler at mask j with prev = the token before
    it (the verified token for j = 1, then the previous draft), batched over the requests at each depth.
    A failure in one sequence's own part (its sampling) fails that proposal alone (`DraftProposal.error`)."""

    def __init__(self, mtp: "MTPModel") -> None:
        self.mtp = mtp

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals = [DraftProposal() for _ in requests]
        if not requests:
            return proposals
        latents = torch.stack([r.latents for r in requests])  # (S, k, d)
        prev = torch.tensor([r.prev_token for r in requests], device=latents.device)
        extra, allowed = self._draft_columns([r.sequence for r in requests])
        vocab_size = self.mtp.vocab_size
        for j in range(latents.shape[1]):
            logits, ids = self.mtp.draft_logits(prev, latents[:, j], extra)
            tokens = []
            for i, (request, proposal) in enumerate(zip(requests, proposals)):
                seq = request.sequence
                if proposal.error is not None:  # failed at an earlier depth: a placeholder keeps the shape
                    tokens.append(int(prev[i]))
                    continue
                row, row_ids = logits[i], ids
                if allowed[i] is not None:
                    row, row_ids = row[allowed[i]], ids[allowed[i]]
                try:
                    token, probs = pick_draft(row, row_ids, seq.sampling, seq.generator, vocab_size)
                except Exception as exc:
                    proposal.error = exc
                    tokens.append(int(prev[i]))
                    continue
                if probs is not None:
                    proposal.probs.append(probs)
                proposal.tokens.append(token)
                tokens.append(token)
            prev = torch.tensor(tokens, device=latents.device)
        return proposals

    def _draft_columns(self, seqs: Sequence[Any]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """The extra ids of one batched draft projection (every sequence's context tokens that the draft vocabulary
        lacks) and, per sequence, which columns of it are its own (None: all). Each sequence then drafts over
        exactly the ids it would draft over alone."""
        if not self.mtp.draft_vocab_set:
            return None, [None] * len(seqs)
        if len(seqs) == 1:
            return seqs[0].context.extra_ids, [None]
        own = [self.mtp.draft_extra_ids(s.context.extra_ids) for s in seqs]
        extra = torch.unique(torch.cat(own))
        allowed: list[torch.Tensor | None] = []
        vocab = torch.ones(self.mtp.draft_vocab.numel(), dtype=torch.bool, device=extra.device)
        for ids in own:
            allowed.append(None if ids.numel() == extra.numel() else torch.cat([vocab, torch.isin(extra, ids)]))
        return extra, allowed


class TreeDrafter:
    """Draft trees from the sampler head (a dynamic tree, as EAGLE-2 builds one): at depth j every node of the
    frontier is continued by the sampler at mask j with prev = its own token (the block's latents are the same for
    every branch; only prev differs), batched over the frontier; of the `width` best continuations of each node,
    those with the highest path probability form the next frontier, up to `width` per depth and `budget` nodes
    in all. The greedy chain is always a branch of the tree, so a tree never accepts less than the chain.
    Sequences that sample (temperature > 0) get the chain: acceptance over trees is greedy only here."""

    def __init__(self, mtp: "MTPModel", budget: int, width: int = 2, lookup: bool = True) -> None:
        if budget < 1 or width < 1:
            raise ValueError(f"a draft tree needs budget >= 1 and width >= 1, got {budget} and {width}")
        self.mtp, self.budget, self.width, self.lookup = mtp, budget, width, lookup
        self.chain = SamplerChain(mtp)

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals: list[DraftProposal | None] = [None] * len(requests)
        sampled = [i for i, r in enumerate(requests) if not r.sequence.sampling.greedy]
        for i, proposal in zip(sampled, self.chain.propose([requests[i] for i in sampled])):
            proposals[i] = proposal
        for i, request in enumerate(requests):
            if proposals[i] is None:
                try:
                    proposals[i] = self._tree(request)
                except Exception as exc:
                    proposals[i] = DraftProposal(error=exc)
        return proposals

    def _tree(self, request: DraftRequest) -> DraftProposal:
        seq, latents = request.sequence, request.latents
        extra = seq.context.extra_ids if seq.context is not None else None
        tokens: list[int] = []
        parents: list[int] = []
        # (node index, its token, its path log-probability, whether it is on the greedy chain)
        frontier = [(-1, request.prev_token, 0.0, True)]
        for j in range(latents.shape[0]):
            room = min(self.width, self.budget - len(tokens))
            if room <= 0 or not frontier:
                break
            prev = torch.tensor([f[1] for f in frontier], device=latents.device)
            logits, ids = self.mtp.draft_logits(prev, latents[j:j + 1].expand(len(frontier), -1), extra)
            top = torch.log_softmax(logits.float(), dim=-1).topk(min(self.width, logits.shape[-1]), dim=-1)
            candidates = []
            for f, (node, _, path_logp, on_chain) in enumerate(frontier):
                for rank, (logp, column) in enumerate(zip(top.values[f].tolist(), top.indices[f].tolist())):
                    token = column if ids is None else int(ids[column])
                    chain = on_chain and rank == 0
                    # The chain's continuation first, then by path probability (stable on ties).
                    candidates.append((not chain, -(path_logp + logp), node, token, chain))
            candidates.sort(key=lambda c: (c[0], c[1]))
            frontier = []
            for _, neg_logp, parent, token, chain in candidates[:room]:
                tokens.append(token)
                parents.append(parent)
                frontier.append((len(tokens) - 1, token, -neg_logp, chain))
        if self.lookup:
            context = list(seq.prompt_ids) + list(seq.output)
            merge_branch(tokens, parents, prompt_lookup(context, latents.shape[0]))
        return DraftProposal(tokens, parents=parents)


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


def merge_branch(tokens: list[int], parents: list[int], branch: Sequence[int]) -> None:
    """Add `branch` (a chain after the newest verified token) to the tree in place, sharing the prefix it has in
    common with existing nodes."""
    at = -1
    for token in branch:
        nxt = next((i for i, (t, p) in enumerate(zip(tokens, parents)) if p == at and t == token), None)
        if nxt is None:
            tokens.append(token)
            parents.append(at)
            nxt = len(tokens) - 1
        at = nxt

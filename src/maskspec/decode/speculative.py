"""Self-speculative decoding (linear and quadratic) and the reference autoregressive loop, on one code path.

State between steps: the KV cache holds every verified token except the newest one, y0; `drafts` are the
guesses for the tokens after y0. One step feeds [y0, d1..dm] plus mask blocks (layout.normals_first):
- mode "ar": no blocks, no drafts (the reference loop);
- mode "linear": one block after the last draft; it yields new drafts only if every draft is accepted;
- mode "quadratic": a block after y0 and after every draft, so the block after the last accepted token always
  yields k new drafts.
The normal rows verify the drafts (verify.py), the cache is cropped to y0 + accepted drafts (their K/V are the
base model's, since normal rows never see masks and LoRA is off on them), and the next drafts are drawn from
the sampler head, chained from the token just emitted. With a draft vocabulary (`MTPModel.set_draft_vocab`) the
drafts range over it and the sequence's context tokens only; verification still uses the full head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from maskspec.decode.cache import crop_cache
from maskspec.decode.types import GenerationStats
from maskspec.decode.verify import (SamplingConfig, accept_greedy, accept_sampling, new_generator, sample,
                                    warped_probs)
from maskspec.errors import UsageError
from maskspec.model.layout import Layout, build_layout
from maskspec.model.mtp import MTPModel

MODES = ("ar", "linear", "quadratic")


@dataclass
class DraftProposal:
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # per draft, when sampling (full vocabulary)


class DraftContext:
    """A sequence's context tokens (prompt + verified output) that the draft vocabulary lacks: drafts may be these
    too (`MTPModel.draft_ids`). Kept incrementally: each step looks only at tokens not seen before."""

    def __init__(self, mtp: MTPModel, tokens: Sequence[int] = ()) -> None:
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


def propose_drafts(mtp: MTPModel, latents: torch.Tensor, prev_token: int, cfg: SamplingConfig,
                   generator: torch.Generator | None, extra_ids: torch.Tensor | None = None) -> DraftProposal:
    """Sampler chain over one mask block: draft j from the sampler at mask j with prev = the token before it.
    Drafts range over `mtp.draft_ids(extra_ids)` (the draft vocabulary and the context tokens it lacks)."""
    proposal = DraftProposal()
    prev = prev_token
    vocab_size = mtp.vocab_size
    for j in range(latents.shape[0]):
        logits, ids = mtp.draft_logits(torch.tensor([prev], device=latents.device), latents[j:j + 1], extra_ids)
        token, probs = pick_draft(logits[0], ids, cfg, generator, vocab_size)
        if probs is not None:
            proposal.probs.append(probs)
        proposal.tokens.append(token)
        prev = token
    return proposal


def drafts_per_step(mtp: MTPModel, mode: str, k: int | None) -> int:
    """The k a decoder runs with: `mtp.default_k` when none is given, 0 for the reference loop."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    k = mtp.default_k if k is None else k
    if mode != "ar" and not (isinstance(k, int) and 1 <= k <= mtp.k):
        raise UsageError(f"k must be in 1..{mtp.k} (the adapter's k), got {k}")
    return k if mode != "ar" else 0


def step_block_heads(mode: str, k: int, num_normal: int, prefill: bool) -> list[int]:
    """Which normal rows of a step get a mask block: none for the reference loop; after the last row for the
    prefill and for linear decoding; after every row (y0 and each draft) for quadratic decoding."""
    if k == 0:
        return []
    if prefill or mode == "linear":
        return [num_normal - 1]
    return list(range(num_normal))


class SpeculativeDecoder:
    """Generates token chunks from a prompt; every chunk is verified output. Single sequence."""

    def __init__(self, mtp: MTPModel, mode: str = "quadratic", k: int | None = None,
                 sampling: SamplingConfig | None = None, seed: int | None = None) -> None:
        self.mtp = mtp
        self.mode = mode
        self.k = drafts_per_step(mtp, mode, k)
        self.sampling = sampling or SamplingConfig()
        self.generator = new_generator(self.sampling, seed, mtp.device)
        # Replaceable in tests (an oracle drafter exercises long accepted runs).
        self.propose: Callable[[MTPModel, torch.Tensor, int, SamplingConfig, torch.Generator | None],
                               DraftProposal] = self._sampler_drafts
        self.cache: DynamicCache | None = None
        self.generated: list[int] = []  # verified output so far (the drafters' context)
        self.context = DraftContext(mtp)

    def _sampler_drafts(self, mtp: MTPModel, latents: torch.Tensor, prev_token: int, cfg: SamplingConfig,
                        generator: torch.Generator | None) -> DraftProposal:
        return propose_drafts(mtp, latents, prev_token, cfg, generator, self.context.extra_ids)

    def _block_heads(self, num_normal: int, prefill: bool) -> list[int]:
        return step_block_heads(self.mode, self.k, num_normal, prefill)

    def _forward(self, tokens: list[int], heads: list[int], past_length: int) -> tuple[torch.Tensor, Layout]:
        layout = build_layout(len(tokens), heads, max(self.k, 1), past_length=past_length, normals_first=True,
                              device=self.mtp.device)
        ids = torch.tensor([tokens], device=self.mtp.device)
        out = self.mtp.forward_layout(ids, layout, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.hidden[0], layout

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], max_new_tokens: int, stats: GenerationStats) -> Iterator[list[int]]:
        """Yield lists of newly verified tokens until `max_new_tokens` (the caller stops earlier on EOS or stop
        strings by closing the iterator)."""
        with self.mtp.packed_weights():  # the weights stay fixed for the whole generation
            yield from self._run(prompt_ids, max_new_tokens, stats)

    def _run(self, prompt_ids: list[int], max_new_tokens: int, stats: GenerationStats) -> Iterator[list[int]]:
        stats.prompt_tokens = len(prompt_ids)
        stats.accepted_histogram = [0] * (self.k + 1)
        if max_new_tokens <= 0:
            return
        self.cache = None
        self.generated = []
        self.context = DraftContext(self.mtp, prompt_ids if self.k else ())
        start = time.perf_counter()
        # Prefill: the prompt, plus one mask block after its last token for the first drafts.
        hidden, layout = self._forward(prompt_ids, self._block_heads(len(prompt_ids), prefill=True), 0)
        y0 = self._first_token(hidden, layout)
        self._record([y0])
        proposal = self._next_drafts(hidden, layout, head=len(prompt_ids) - 1, bonus=y0)
        crop_cache(self.cache, len(prompt_ids))
        stats.forward_passes = 1
        stats.prefill_seconds = time.perf_counter() - start
        stats.new_tokens = 1
        yield [y0]
        produced = 1
        decode_start = time.perf_counter()
        try:
            while produced < max_new_tokens:
                # Never draft past the token budget: extra drafts would only cost compute.
                budget = max_new_tokens - produced
                drafts = DraftProposal(proposal.tokens[:budget - 1], proposal.probs[:budget - 1])
                past = self.cache.get_seq_length()
                tokens = [y0] + drafts.tokens
                hidden, layout = self._forward(tokens, self._block_heads(len(tokens), prefill=False), past)
                accepted, bonus = self._verify(hidden, layout, drafts)
                new_tokens = drafts.tokens[:accepted] + [bonus]
                self._record(new_tokens)
                proposal = self._next_drafts(hidden, layout, head=accepted, bonus=bonus)
                crop_cache(self.cache, past + 1 + accepted)
                y0 = new_tokens[-1]
                stats.forward_passes += 1
                stats.accepted_histogram[accepted] += 1
                stats.new_tokens += len(new_tokens)
                produced += len(new_tokens)
                yield new_tokens
        finally:
            stats.decode_seconds = time.perf_counter() - decode_start

    def _record(self, tokens: list[int]) -> None:
        self.generated.extend(tokens)
        if self.k:
            self.context.add(tokens)

    def _verify(self, hidden: torch.Tensor, layout: Layout, drafts: DraftProposal) -> tuple[int, int]:
        """(drafts accepted, the token after them). Logits only for the normal rows."""
        logits = self.mtp.head_logits(hidden[layout.normal_rows()])
        if self.sampling.greedy:
            accepted, bonus = accept_greedy(drafts.tokens, logits.argmax(dim=-1).tolist())
        else:
            accepted, bonus = accept_sampling(drafts.tokens, drafts.probs, warped_probs(logits, self.sampling),
                                              self.generator)
        return accepted, bonus

    def _first_token(self, hidden: torch.Tensor, layout: Layout) -> int:
        """Prefill: the first token comes from the normal head at the last prompt row."""
        last_row = layout.normal_rows()[-1:]
        logits = self.mtp.head_logits(hidden[last_row])[0]
        if self.sampling.greedy:
            return int(logits.argmax())
        return sample(warped_probs(logits, self.sampling), self.generator)

    def _next_drafts(self, hidden: torch.Tensor, layout: Layout, head: int, bonus: int) -> DraftProposal:
        rows = layout.block_rows(head) if self.k else torch.empty(0, dtype=torch.long)
        if rows.numel() == 0:  # ar mode, or linear mode after a rejection
            return DraftProposal()
        return self.propose(self.mtp, hidden[rows], bonus, self.sampling, self.generator)

"""Batched self-speculative decoding with ragged acceptance and continuous batching.

Several sequences share one forward pass per step. Each sequence keeps the single-sequence state of
`speculative.py` (y0, its drafts, its own sampling rule and generator) and builds its own layout with the same
`build_layout` rule; the layouts are then stacked:

- rows: each sequence's rows come first, padded to the longest; a pad row attends only to itself (so no row of
  the attention matrix is all False) and its output is ignored;
- KV cache: one `DynamicCache` of shape (B, heads, P, d). Sequence b's valid entries are compacted to
  [0, len_b) after every step (its past, y0 and its accepted drafts); columns [len_b, P) are padding that every
  row of b masks out through the attention matrix. The step's rows are appended at [P, P + R) by the model and
  gathered back to [len_b, len_b + kept) afterwards;
- sequences join between steps: newcomers are prefilled in a pass of their own (right-padded prompts), then
  their cache is merged with the running one by padding; finished sequences leave the batch.

Greedy output equals single-sequence decoding (and so plain greedy decoding) token for token. Sampling uses a
generator per sequence in the same order as the single-sequence decoder, so a seeded request gives the same
tokens either way (up to floating-point summation order).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import DynamicCache

from maskspec.decode.speculative import DraftContext, DraftProposal, drafts_per_step, pick_draft, step_block_heads
from maskspec.decode.types import GenerationStats
from maskspec.decode.verify import (SamplingConfig, accept_greedy, accept_sampling, new_generator, sample,
                                    warped_probs)
from maskspec.model.layout import Layout, build_layout
from maskspec.model.mtp import MTPModel


@dataclass(eq=False)
class BatchSequence:
    """One sequence of a batch: its request, its decoding state and its stats."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    eos_token_ids: frozenset[int]
    tag: Any = None  # the caller's handle (a request object, an index)
    output: list[int] = field(default_factory=list)  # verified tokens so far (EOS included, like HF generate)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finished: bool = False
    y0: int = -1
    proposal: DraftProposal = field(default_factory=DraftProposal)
    cache_len: int = 0  # valid KV entries: the prompt and every output token but y0
    started: float = 0.0
    context: DraftContext | None = None  # what the drafts may be besides the draft vocabulary
    error: str | None = None  # why this sequence failed (finish_reason "error"); the others go on

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


@dataclass
class StepEvent:
    """New verified tokens of one sequence after a step; `finished` says whether it has left the batch."""

    sequence: BatchSequence
    tokens: list[int]
    finished: bool


class BatchedDecoder:
    """Decodes many sequences together; `add` queues a sequence, `step` runs one forward pass for the running
    sequences (plus one prefill pass for the newcomers) and reports the new tokens."""

    def __init__(self, mtp: MTPModel, mode: str = "quadratic", k: int | None = None) -> None:
        self.mtp = mtp
        self.mode = mode
        self.k = drafts_per_step(mtp, mode, k)
        self.running: list[BatchSequence] = []
        self.pending: list[BatchSequence] = []
        self.cache: DynamicCache | None = None  # batch order = self.running
        self._ids = itertools.count()
        # Test hook: replaces the sampler chain for one sequence (oracle drafts exercise long accepted runs).
        self.propose: Callable[[BatchSequence, torch.Tensor, int], DraftProposal] | None = None

    # ------------------------------------------------------------------ public
    def add(self, prompt_ids: Sequence[int], max_new_tokens: int, *, sampling: SamplingConfig | None = None,
            seed: int | None = None, eos_token_ids: Iterable[int] | None = None, tag: Any = None) -> BatchSequence:
        """Queue a sequence; it is prefilled at the next `step`. The caller keeps prompt + max_new_tokens within
        the model's context length."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        sampling = sampling or SamplingConfig()
        generator = new_generator(sampling, seed, self.mtp.device)
        eos = frozenset(self.mtp.eos_token_ids if eos_token_ids is None else eos_token_ids)
        seq = BatchSequence(next(self._ids), prompt_ids, int(max_new_tokens), sampling, generator, eos, tag)
        seq.stats.prompt_tokens = len(prompt_ids)
        seq.stats.accepted_histogram = [0] * (self.k + 1)
        seq.started = time.perf_counter()
        seq.context = DraftContext(self.mtp, prompt_ids if self.k else ())
        if seq.max_new_tokens <= 0:
            seq.finished = True
            seq.stats.finish_reason = "length"
        else:
            self.pending.append(seq)
        return seq

    def cancel(self, seq: BatchSequence, reason: str = "cancelled") -> None:
        """Stop a sequence (client gone, stop string found); it leaves the batch before the next pass."""
        if not seq.finished:
            seq.finished = True
            seq.stats.finish_reason = reason
            self._close_stats(seq)
        if seq in self.pending:
            self.pending.remove(seq)
        self._drop_finished()  # frees its cache rows now (call between steps)

    @property
    def active(self) -> int:
        return len(self.running) + len(self.pending)

    def has_work(self) -> bool:
        return any(not s.finished for s in self.running) or bool(self.pending)

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One decoding pass over the running sequences and one prefill pass over the newcomers."""
        events: list[StepEvent] = []
        self._drop_finished()
        with self.mtp.packed_weights():
            if self.running:
                events += self._decode_step()
                self._drop_finished()
            if self.pending:
                newcomers, self.pending = self.pending, []
                events += self._prefill(newcomers)
                self._drop_finished()
        return events

    def generate(self, requests: Sequence[dict], join_schedule: Sequence[int] | None = None) -> list[BatchSequence]:
        """Convenience for tests and scripts: decode every request (dicts of `add`'s arguments) to the end.
        `join_schedule[i]` is the step before which request i joins (default: all at once)."""
        seqs: list[BatchSequence | None] = [None] * len(requests)
        schedule = list(join_schedule) if join_schedule is not None else [0] * len(requests)
        step = 0
        while True:
            for i, req in enumerate(requests):
                if seqs[i] is None and schedule[i] <= step:
                    seqs[i] = self.add(**req)
            if not self.has_work() and all(s is not None for s in seqs):
                break
            self.step()
            step += 1
        return [s for s in seqs if s is not None]

    # ------------------------------------------------------------------ steps
    def _block_heads(self, num_normal: int, prefill: bool) -> list[int]:
        return step_block_heads(self.mode, self.k, num_normal, prefill)

    def _prefill(self, seqs: list[BatchSequence]) -> list[StepEvent]:
        start = time.perf_counter()
        specs = [(s.prompt_ids, self._block_heads(len(s.prompt_ids), prefill=True)) for s in seqs]
        hidden, layouts, cache = self._forward(seqs, None, specs)
        last = torch.stack([hidden[b, len(s.prompt_ids) - 1] for b, s in enumerate(seqs)])
        logits = self.mtp.head_logits(last)
        firsts = [self._isolated(s, self._first_token, logits[b], s) for b, s in enumerate(seqs)]
        events = []
        draft_for = []
        for b, s in enumerate(seqs):
            s.stats.forward_passes = 1
            chunk = self._emit(s, [firsts[b]]) if firsts[b] is not None else []
            events.append(StepEvent(s, chunk, s.finished))
            if not s.finished:
                draft_for.append((b, len(s.prompt_ids) - 1, firsts[b]))
        self._propose(seqs, hidden, layouts, draft_for)
        cache = self._compact(cache, [0] * len(seqs), 0, [len(s.prompt_ids) for s in seqs])
        for s in seqs:
            s.cache_len = len(s.prompt_ids)
        elapsed = time.perf_counter() - start
        for s in seqs:
            s.stats.prefill_seconds = elapsed
            if s.finished:
                self._close_stats(s)
        self._merge(seqs, cache)
        return events

    def _decode_step(self) -> list[StepEvent]:
        seqs = self.running
        drafts_of = []
        specs = []
        for s in seqs:
            budget = s.max_new_tokens - len(s.output)
            drafts = DraftProposal(s.proposal.tokens[:budget - 1], s.proposal.probs[:budget - 1])
            drafts_of.append(drafts)
            tokens = [s.y0] + drafts.tokens
            specs.append((tokens, self._block_heads(len(tokens), prefill=False)))
        old_lens = [s.cache_len for s in seqs]
        physical = self.cache.get_seq_length() if self.cache is not None else 0
        hidden, layouts, cache = self._forward(seqs, self.cache, specs)
        # Verification: the base head over every sequence's normal rows, in one projection.
        counts = [len(spec[0]) for spec in specs]
        logits = self.mtp.head_logits(torch.cat([hidden[b, :n] for b, n in enumerate(counts)]))
        per_seq = torch.split(logits, counts)
        events, draft_for, keep = [], [], []
        for b, s in enumerate(seqs):
            drafts = drafts_of[b]
            verdict = self._isolated(s, self._verify, per_seq[b], drafts, s)
            if verdict is None:  # this sequence failed: it leaves the batch, the others go on
                keep.append(1)
                events.append(StepEvent(s, [], True))
                continue
            accepted, bonus = verdict
            keep.append(1 + accepted)
            s.stats.forward_passes += 1
            s.stats.accepted_histogram[accepted] += 1
            chunk = self._emit(s, drafts.tokens[:accepted] + [bonus])
            events.append(StepEvent(s, chunk, s.finished))
            if not s.finished:
                draft_for.append((b, accepted, bonus))
        self._propose(seqs, hidden, layouts, draft_for)
        self.cache = self._compact(cache, old_lens, physical, keep)
        for b, s in enumerate(seqs):
            s.cache_len = old_lens[b] + keep[b]
            if s.finished:
                self._close_stats(s)
        return events

    @staticmethod
    def _first_token(logits: torch.Tensor, s: BatchSequence) -> int:
        if s.sampling.greedy:
            return int(logits.argmax())
        return sample(warped_probs(logits, s.sampling), s.generator)

    @staticmethod
    def _verify(logits: torch.Tensor, drafts: DraftProposal, s: BatchSequence) -> tuple[int, int]:
        if s.sampling.greedy:
            return accept_greedy(drafts.tokens, logits.argmax(dim=-1).tolist())
        return accept_sampling(drafts.tokens, drafts.probs, warped_probs(logits, s.sampling), s.generator)

    def _isolated(self, s: BatchSequence, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) for one sequence's own work (its sampling rule, its drafts). If it raises, that sequence alone
        fails (finish_reason "error", `s.error` says why) and None is returned; the batch goes on."""
        try:
            return fn(*args)
        except Exception as exc:
            self._fail(s, exc)
            return None

    def _fail(self, s: BatchSequence, exc: BaseException) -> None:
        if not s.finished:
            s.finished = True
            s.stats.finish_reason = "error"
            s.error = f"{type(exc).__name__}: {exc}"
            self._close_stats(s)

    def _emit(self, s: BatchSequence, tokens: list[int]) -> list[int]:
        """Record verified tokens; stop at EOS (kept, like HF generate) or at the token budget."""
        hit = next((i for i, t in enumerate(tokens) if t in s.eos_token_ids), None)
        if hit is not None:
            tokens = tokens[:hit + 1]
        tokens = tokens[:s.max_new_tokens - len(s.output)]
        s.output.extend(tokens)
        if self.k:
            s.context.add(tokens)
        s.stats.new_tokens = len(s.output)
        s.y0 = tokens[-1] if tokens else s.y0
        if hit is not None:
            s.finished, s.stats.finish_reason = True, "eos"
        elif len(s.output) >= s.max_new_tokens:
            s.finished, s.stats.finish_reason = True, "length"
        return tokens

    def _close_stats(self, s: BatchSequence) -> None:
        s.stats.decode_seconds = max(0.0, time.perf_counter() - s.started - s.stats.prefill_seconds)

    # ------------------------------------------------------------------ drafts
    def _propose(self, seqs: list[BatchSequence], hidden: torch.Tensor, layouts: list[Layout],
                 draft_for: list[tuple[int, int, int]]) -> None:
        """New drafts for each (batch index, block head, bonus token): the sampler chain over the block after the
        last verified token, batched over sequences. Sequences without such a block get no drafts."""
        chains = []
        for b, head, bonus in draft_for:
            s = seqs[b]
            rows = layouts[b].block_rows(head) if self.k else torch.empty(0, dtype=torch.long)
            if rows.numel() == 0:  # ar mode, or linear mode after a rejection
                s.proposal = DraftProposal()
                continue
            if self.propose is not None:
                s.proposal = self._isolated(s, self.propose, s, hidden[b, rows], bonus) or DraftProposal()
                continue
            s.proposal = DraftProposal()
            chains.append((s, hidden[b, rows], bonus))
        if not chains:
            return
        latents = torch.stack([c[1] for c in chains])  # (S, k, d)
        prev = torch.tensor([c[2] for c in chains], device=latents.device)
        extra, allowed = self._draft_columns([c[0] for c in chains])
        vocab_size = self.mtp.vocab_size
        for j in range(latents.shape[1]):
            logits, ids = self.mtp.draft_logits(prev, latents[:, j], extra)
            tokens = []
            for i, (s, _, _) in enumerate(chains):
                if s.finished:  # failed at an earlier draft: a placeholder keeps the batch's shape
                    tokens.append(int(prev[i]))
                    continue
                row, row_ids = logits[i], ids
                if allowed[i] is not None:
                    row, row_ids = row[allowed[i]], ids[allowed[i]]
                picked = self._isolated(s, pick_draft, row, row_ids, s.sampling, s.generator, vocab_size)
                if picked is None:
                    s.proposal = DraftProposal()
                    tokens.append(int(prev[i]))
                    continue
                token, probs = picked
                if probs is not None:
                    s.proposal.probs.append(probs)
                s.proposal.tokens.append(token)
                tokens.append(token)
            prev = torch.tensor(tokens, device=latents.device)

    def _draft_columns(self, seqs: list[BatchSequence]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """The extra ids of one batched draft projection (every sequence's context tokens that the draft vocabulary
        lacks) and, per sequence, which columns of it are its own (None: all). Each sequence then drafts over
        exactly the ids single-sequence decoding would give it."""
        if not self.mtp.draft_vocab_set:
            return None, [None] * len(seqs)
        own = [self.mtp.draft_extra_ids(s.context.extra_ids) for s in seqs]
        extra = torch.unique(torch.cat(own))
        allowed: list[torch.Tensor | None] = []
        vocab = torch.ones(self.mtp.draft_vocab.numel(), dtype=torch.bool, device=extra.device)
        for ids in own:
            allowed.append(None if ids.numel() == extra.numel() else torch.cat([vocab, torch.isin(extra, ids)]))
        return extra, allowed

    # ------------------------------------------------------------------ batched forward and cache
    def _forward(self, seqs: list[BatchSequence], cache: DynamicCache | None,
                 specs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, list[Layout], DynamicCache]:
        """One pass over every sequence's layout (same rule as single decoding), rows padded to the longest."""
        device = self.mtp.device
        physical = cache.get_seq_length() if cache is not None else 0
        layouts = [build_layout(len(tokens), heads, max(self.k, 1), past_length=s.cache_len, normals_first=True,
                                device=device) for s, (tokens, heads) in zip(seqs, specs)]
        batch, rows = len(seqs), max(layout.rows for layout in layouts)
        token_ids = torch.zeros(batch, rows, dtype=torch.long, device=device)
        mask_slot = torch.full((batch, rows), -1, dtype=torch.long, device=device)
        position_ids = torch.zeros(batch, rows, dtype=torch.long, device=device)
        attention = torch.zeros(batch, rows, physical + rows, dtype=torch.bool, device=device)
        key_positions = torch.zeros(batch, physical + rows, dtype=torch.long, device=device)
        pad_eye = torch.eye(rows, dtype=torch.bool, device=device)
        for b, (s, layout, (tokens, _)) in enumerate(zip(seqs, layouts, specs)):
            r, past = layout.rows, s.cache_len
            ids = torch.tensor(tokens, dtype=torch.long, device=device)
            token_ids[b, :r] = ids[layout.normal_index.clamp(min=0)]
            mask_slot[b, :r] = layout.mask_slot
            position_ids[b, :r] = layout.position_ids
            position_ids[b, r:] = past  # pad rows: any position; they see only themselves
            attention[b, :r, :past] = layout.attention[:, :past]
            attention[b, :r, physical:physical + r] = layout.attention[:, past:]
            attention[b, r:, physical + r:] = pad_eye[r:, r:]
            key_positions[b, :past] = torch.arange(past, device=device)
            key_positions[b, physical:] = position_ids[b]
        out = self.mtp.forward_rows(token_ids, mask_slot, position_ids, attention, key_positions,
                                    past_key_values=cache, use_cache=True)
        return out.hidden, layouts, out.past_key_values

    @staticmethod
    def _compact(cache: DynamicCache, old_lens: list[int], physical: int, keep: list[int]) -> DynamicCache:
        """Keep, for sequence b, its old entries [0, old_lens[b]) and the step's first keep[b] rows (at
        physical..), moved to be contiguous; the rest of each row is padding."""
        new_lens = [o + n for o, n in zip(old_lens, keep)]
        width = max(new_lens)
        layer0 = cache.layers[0].keys
        index = torch.zeros(len(keep), width, dtype=torch.long, device=layer0.device)
        for b, (old, n) in enumerate(zip(old_lens, keep)):
            index[b, :old] = torch.arange(old, device=layer0.device)
            index[b, old:old + n] = torch.arange(physical, physical + n, device=layer0.device)
        for layer in cache.layers:
            idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, idx)
            idx = index[:, None, :, None].expand(-1, layer.values.shape[1], -1, layer.values.shape[3])
            layer.values = layer.values.gather(2, idx)
        return cache

    def _merge(self, newcomers: list[BatchSequence], cache: DynamicCache) -> None:
        """Append the newcomers (and their cache rows) to the running batch, padding the shorter cache."""
        if self.cache is None or not self.running:
            self.running, self.cache = list(newcomers), cache
            return
        width = max(self.cache.get_seq_length(), cache.get_seq_length())
        layers = []
        for a, b in zip(self.cache.layers, cache.layers):
            layers.append((torch.cat([_pad_to(a.keys, width), _pad_to(b.keys, width)]),
                           torch.cat([_pad_to(a.values, width), _pad_to(b.values, width)])))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.running = self.running + list(newcomers)

    def _drop_finished(self) -> None:
        keep = [b for b, s in enumerate(self.running) if not s.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[b] for b in keep]
        if not keep:
            self.cache = None
            return
        width = max(s.cache_len for s in self.running)
        index = torch.tensor(keep, dtype=torch.long, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, :width]
            layer.values = layer.values.index_select(0, index)[:, :, :width]


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - t.shape[2]
    if extra <= 0:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])], dim=2)

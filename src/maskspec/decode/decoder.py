"""The decoder: self-speculative decoding of one or many sequences, one forward pass per step.

A single sequence is a batch of one; `generate`/`stream` (decode/api.py), the server's scheduler, the bench and
the acceptance checks all drive this class. Each step:

1. builds each running sequence's rows with the one layout rule (`model.layout.build_layout`, normals first;
   which rows get a mask block: `steps.block_heads`), stacks them padded to the longest (a pad row attends only
   to itself) and runs one pass;
2. verifies every sequence's drafts with the base head over its normal rows (`verify.py`: greedy or rejection
   sampling), so its output is the base model's;
3. applies the stop rules (`stopping.Stopping`: EOS, budget, context, stop strings);
4. asks the drafter for the next drafts from the mask block after each sequence's last verified token;
5. keeps y0 and the accepted drafts in the KV cache (`kv.keep_verified`) and drops the rest.

Newcomers are prefilled in a pass of their own (right-padded prompts), then their cache is merged with the running
one (`kv.merge`); finished sequences leave the batch (`kv.select`). A failure in one sequence's own work (its
sampling, its drafts) fails that sequence alone (finish reason "error"); the others go on.

Worked padding example, k = 2, quadratic: sequence A has 3 valid cache entries and 1 draft, B has 5 and 0. A's
step has 2 normal rows and 2 blocks (6 rows), B's has 1 normal row and 1 block (3 rows), so the pass is (2, 6)
rows over 5 + 6 keys: A's rows see keys 0-2 (its past, 3-4 are B-length padding) and its own step keys; B's 3
rows see keys 0-4 and its own; B's rows 3-5 are pads that see only themselves.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from transformers import Cache

from maskspec.decode import kv
from maskspec.decode.drafters import DraftContext, Drafter, DraftProposal, DraftRequest, SamplerChain, TreeDrafter
from maskspec.decode.static import StaticStep, check_static, engine_for, needed_capacity
from maskspec.decode.steps import block_heads, drafts_within_budget, layout_parents, resolve_k, resolve_tree
from maskspec.decode.stopping import FinishReason, Stopping, context_length, plan_budget
from maskspec.decode.types import GenerationStats
from maskspec.decode.verify import (SamplingConfig, accept_greedy, accept_greedy_tree, accept_sampling,
                                    accept_sampling_tree, new_generator, sample, warped_probs)
from maskspec.errors import UsageError
from maskspec.model.layout import Layout, build_layout, pad_rows_attention

if TYPE_CHECKING:
    from maskspec.model.mtp import MTPModel


@dataclass(eq=False)
class DecodingSequence:
    """One sequence: its request, its decoding state and its stats."""

    id: int
    prompt_ids: list[int]
    sampling: SamplingConfig
    generator: torch.Generator | None
    stopping: Stopping
    tag: Any = None  # the caller's handle (a request object, an index)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finished: bool = False
    y0: int = -1
    proposal: DraftProposal = field(default_factory=DraftProposal)
    cache_len: int = 0  # valid KV entries: the prompt and every output token but y0
    started: float = 0.0
    context: DraftContext | None = None  # what the drafts may be besides the draft vocabulary
    error: str | None = None  # why this sequence failed (finish reason "error")

    @property
    def output(self) -> list[int]:
        """Verified tokens so far (EOS included, like HF generate)."""
        return self.stopping.output

    @property
    def max_new_tokens(self) -> int:
        return self.stopping.budget.tokens

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


@dataclass
class StepEvent:
    """A sequence's new verified tokens after a step, the text they add (stop strings cut), and whether it has
    finished (then `sequence.finish_reason` says why)."""

    sequence: DecodingSequence
    tokens: list[int]
    text: str
    finished: bool


class Decoder:
    """Decodes one or many sequences together: `add` queues a sequence, `step` runs one pass over the running
    sequences (plus one prefill pass over newcomers) and reports what each gained. `drafter` proposes the drafts
    (default: the sampler chain; with `tree` > 0, draft trees of up to that many nodes, `TreeDrafter`). tree None:
    the size the adapter's config recommends for this device, if k is not given either (`steps.resolve_tree`).

    `static`: decode greedy sequences with the static step (`decode.static`: fixed shapes, one host sync per step,
    a CUDA graph on a GPU), in modes ar and quadratic (chains and trees, drafting what the usual step drafts). Its
    engine has `static_slots` slots: that many greedy sequences decode together, the others wait in the queue, in
    order (and so does one that needs more KV positions than the engine holds, until the running ones have
    finished). Sampled sequences still take the usual step, in a pass of their own (`running`; the static ones
    are `static_running`)."""

    def __init__(self, mtp: "MTPModel", mode: str = "quadratic", k: int | None = None,
                 drafter: Drafter | None = None, tree: int | None = None, tree_width: int = 2,
                 static: bool = False, static_slots: int = 1) -> None:
        self.mtp = mtp
        self.mode = mode
        self.k = resolve_k(mtp, mode, k)
        self.static = static
        if static:  # greedy sequences in fixed slots, fixed shapes (`decode.static`)
            check_static(mode)
            if drafter is not None:
                raise UsageError("the static step drafts with the sampler itself: pass no drafter")
            if static_slots < 1:
                raise UsageError(f"the static step needs at least 1 slot, got {static_slots}")
        self.static_slots = static_slots
        self.tree = resolve_tree(mtp, mode, k, tree)
        self.tree_width = tree_width
        self._engine: StaticStep | None = None
        if drafter is None:
            drafter = TreeDrafter(mtp, self.tree, tree_width) if self.tree else SamplerChain(mtp)
        self.drafter: Drafter = drafter
        self.running: list[DecodingSequence] = []  # the usual step's, in the cache's batch order
        self.static_running: list[DecodingSequence] = []  # the static engine's, in slot order
        self.pending: list[DecodingSequence] = []
        self.last_passes = 0  # forward passes the last `step` ran
        self.cache: Cache | None = None  # batch order = self.running
        self._ids = itertools.count()
        self._sessions = 0
        self.context_length = context_length(mtp)

    # ------------------------------------------------------------------ public
    def add(self, prompt_ids: Sequence[int], max_new_tokens: int, *, sampling: SamplingConfig | None = None,
            seed: int | None = None, eos_token_ids: Iterable[int] | None = None, stop: Sequence[str] = (),
            detokenize: bool = True, tag: Any = None) -> DecodingSequence:
        """Queue a sequence; it is prefilled at the next `step`. The budget is cut to the context window (finish
        reason "context"); a prompt that does not fit raises PromptTooLongError. Without `detokenize` the events
        carry no text (cheaper when only tokens are wanted; stop strings need the text)."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        if stop and not detokenize:
            raise UsageError("stop strings need the text: leave detokenize on")
        sampling = sampling or SamplingConfig()
        generator = new_generator(sampling, seed, self.mtp.device)
        eos = frozenset(self.mtp.eos_token_ids if eos_token_ids is None else eos_token_ids)
        budget = plan_budget(len(prompt_ids), int(max_new_tokens), self.context_length)
        stopping = Stopping(eos, budget, list(stop), self.mtp.tokenizer if detokenize else None)
        seq = DecodingSequence(next(self._ids), prompt_ids, sampling, generator, stopping, tag)
        seq.stats.prompt_tokens = len(prompt_ids)
        seq.stats.accepted_histogram = [0] * (self.k + 1)
        seq.started = time.perf_counter()
        seq.context = DraftContext(self.mtp, prompt_ids if self.k else ())
        if budget.tokens <= 0:
            seq.finished = True
            seq.stats.finish_reason = "length"
        else:
            self.pending.append(seq)
        return seq

    def cancel(self, seq: DecodingSequence, reason: FinishReason = "cancelled") -> None:
        """Stop a sequence (client gone, say); it leaves the batch before the next pass."""
        if not seq.finished:
            seq.finished = True
            seq.stats.finish_reason = reason
            self._close_stats(seq)
        if seq in self.pending:
            self.pending.remove(seq)
        self._drop_finished()  # frees its cache rows now (call between steps)

    @property
    def decoding(self) -> int:
        """Sequences past their prefill, in either step."""
        return len(self.running) + len(self.static_running)

    @property
    def active(self) -> int:
        return self.decoding + len(self.pending)

    def has_work(self) -> bool:
        return any(not s.finished for s in self.running + self.static_running) or bool(self.pending)

    @contextmanager
    def session(self) -> Iterator["Decoder"]:
        """Steps inside this block share one decoding session of the model (packed CPU matrices checked once on
        entry, not per step). The weights must not change inside it."""
        with self.mtp.decoding_session():
            self._sessions += 1
            try:
                yield self
            finally:
                self._sessions -= 1

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """One decoding pass over the running sequences and one prefill pass over the newcomers (with `static`:
        a pass of each step that has sequences)."""
        if not self._sessions:
            with self.session():
                return self.step()
        events: list[StepEvent] = []
        self.last_passes = 0
        self._drop_finished()
        if self.running:
            events += self._decode_step()
            self.last_passes += 1
            self._drop_finished()
        if self.static_running:
            events += self._static_step()
            self.last_passes += 1
            self._drop_finished()
        newcomers = [s for s in self.pending if not self._takes_static(s)]
        if newcomers:
            self.pending = [s for s in self.pending if self._takes_static(s)]
            events += self._prefill(newcomers)
            self.last_passes += 1
            self._drop_finished()
        if self.pending:
            started = self._static_admit()
            self.last_passes += bool(started)
            events += started
            self._drop_finished()
        return events

    def _takes_static(self, s: DecodingSequence) -> bool:
        return self.static and s.sampling.greedy

    def generate(self, requests: Sequence[dict], join_schedule: Sequence[int] | None = None
                 ) -> list[DecodingSequence]:
        """Decode every request (dicts of `add`'s arguments) to the end. `join_schedule[i]` is the step before
        which request i joins (default: all at once)."""
        seqs: list[DecodingSequence | None] = [None] * len(requests)
        schedule = list(join_schedule) if join_schedule is not None else [0] * len(requests)
        step = 0
        with self.session():
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
    def _prefill(self, seqs: list[DecodingSequence]) -> list[StepEvent]:
        start = time.perf_counter()
        specs = [(s.prompt_ids, block_heads(self.mode, self.k, len(s.prompt_ids), prefill=True)) for s in seqs]
        hidden, layouts, cache = self._forward(seqs, None, specs)
        last = torch.stack([hidden[b, len(s.prompt_ids) - 1] for b, s in enumerate(seqs)])
        logits = self.mtp.head_logits(last)
        events, wanting = [], []
        for b, s in enumerate(seqs):
            s.stats.forward_passes = 1
            first = self._isolated(s, _first_token, logits[b], s)
            tokens, text = self._emit(s, [first]) if first is not None else ([], "")
            events.append(StepEvent(s, tokens, text, s.finished))
            if not s.finished:
                wanting.append((b, len(s.prompt_ids) - 1, first))
        self._propose(seqs, hidden, layouts, wanting)
        _settle(events)
        cache = kv.keep_verified(cache, [0] * len(seqs), 0, [range(len(s.prompt_ids)) for s in seqs])
        elapsed = time.perf_counter() - start
        for s in seqs:
            s.cache_len = len(s.prompt_ids)
            s.stats.prefill_seconds = elapsed
            if s.finished:
                self._close_stats(s)
        if self.cache is None or not self.running:
            self.running, self.cache = list(seqs), cache
        else:
            self.running, self.cache = self.running + list(seqs), kv.merge(self.cache, cache)
        return events

    def _decode_step(self) -> list[StepEvent]:
        seqs = self.running
        drafts_of, specs = [], []
        for s in seqs:
            drafts = drafts_within_budget(s.proposal, s.max_new_tokens - len(s.output))
            drafts_of.append(drafts)
            tokens = [s.y0] + drafts.tokens
            specs.append((tokens, block_heads(self.mode, self.k, len(tokens), prefill=False), layout_parents(drafts)))
        old_lens = [s.cache_len for s in seqs]
        physical = self.cache.get_seq_length() if self.cache is not None else 0
        hidden, layouts, cache = self._forward(seqs, self.cache, specs)
        # Verification: the base head over every sequence's normal rows, in one projection.
        counts = [len(spec[0]) for spec in specs]
        logits = self.mtp.head_logits(torch.cat([hidden[b, :n] for b, n in enumerate(counts)]))
        per_seq = torch.split(logits, counts)
        events, wanting, keep = [], [], []
        for b, s in enumerate(seqs):
            verdict = self._isolated(s, _verify, per_seq[b], drafts_of[b], s)
            if verdict is None:  # this sequence failed: it leaves the batch, the others go on
                keep.append([0])
                events.append(StepEvent(s, [], "", True))
                continue
            path, bonus = verdict  # the accepted drafts (indices), then the token after them
            keep.append([0] + [1 + i for i in path])  # rows of y0 and of the accepted drafts
            s.stats.forward_passes += 1
            s.stats.accepted_histogram[len(path)] += 1
            tokens, text = self._emit(s, [drafts_of[b].tokens[i] for i in path] + [bonus])
            events.append(StepEvent(s, tokens, text, s.finished))
            if not s.finished:  # the next drafts come from the block after the last accepted token
                wanting.append((b, 1 + path[-1] if path else 0, bonus))
        self._propose(seqs, hidden, layouts, wanting)
        _settle(events)
        self.cache = kv.keep_verified(cache, old_lens, physical, keep)
        for b, s in enumerate(seqs):
            s.cache_len = old_lens[b] + len(keep[b])
            if s.finished:
                self._close_stats(s)
        return events

    def _static_step(self) -> list[StepEvent]:
        """A static step of the sequences in the engine's slots (in slot order)."""
        events: list[StepEvent] = []
        try:
            results = self._engine.step()
        except Exception as exc:  # the shared pass failed: every sequence in it
            for s in self.static_running:
                self._fail(s, exc)
                events.append(StepEvent(s, [], "", True))
            return events
        for s, (accepted, tokens) in zip(self.static_running, results):
            s.stats.forward_passes += 1
            s.stats.accepted_histogram[accepted] += 1
            kept, text = self._emit(s, tokens)
            events.append(StepEvent(s, kept, text, s.finished))
            if s.finished:
                self._close_stats(s)
        return events

    def _static_admit(self) -> list[StepEvent]:
        """Prefill waiting (greedy) sequences into the engine's free slots, in order, in one pass. With no engine
        (nothing in its slots), one is taken that holds the longest of those that can start now."""
        if not self.pending:
            return []
        if self._engine is None:
            starting = self.pending[:self.static_slots]
            capacity = max(needed_capacity(self.k, len(p.prompt_ids), p.max_new_tokens, self.tree, self.tree_width)
                           for p in starting)
            self._engine = engine_for(self.mtp, self.k, capacity, self, self.tree, self.tree_width,
                                      slots=self.static_slots)
        engine, starting = self._engine, []
        for s in self.pending:  # in order: one that does not fit waits for the running ones to end (a larger engine)
            if len(starting) == engine.free or not engine.fits(len(s.prompt_ids), s.max_new_tokens):
                break
            starting.append(s)
        del self.pending[:len(starting)]
        events = []
        if starting:
            start = time.perf_counter()
            try:
                firsts: list[int | None] = engine.prefill_many([s.prompt_ids for s in starting])
            except Exception as exc:  # the shared pass failed: every sequence in it
                for s in starting:
                    self._fail(s, exc)
                firsts = [None] * len(starting)
            elapsed = time.perf_counter() - start
            for s, first in zip(starting, firsts):
                kept, text = self._emit(s, [first]) if first is not None else ([], "")
                s.stats.forward_passes = 1
                s.stats.prefill_seconds = elapsed
                s.cache_len = len(s.prompt_ids)
                if first is not None:
                    self.static_running.append(s)  # its slot: the engine fills them in order
                if s.finished:
                    self._close_stats(s)
                events.append(StepEvent(s, kept, text, s.finished))
        if not self.static_running:
            engine.keep([])
            self._engine = None
        return events

    def _emit(self, s: DecodingSequence, tokens: list[int]) -> tuple[list[int], str]:
        """Record verified tokens under the stop rules; the tokens kept and the text they add."""
        kept, text, reason = s.stopping.accept(tokens)
        if self.k:
            s.context.add(kept)
        s.stats.new_tokens = len(s.output)
        s.y0 = kept[-1] if kept else s.y0
        if reason is not None:
            s.finished, s.stats.finish_reason = True, reason
        return kept, text

    def _isolated(self, s: DecodingSequence, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) for one sequence's own work. If it raises, that sequence alone fails (finish reason
        "error", `s.error` says why) and None is returned."""
        try:
            return fn(*args)
        except Exception as exc:
            self._fail(s, exc)
            return None

    def _fail(self, s: DecodingSequence, exc: BaseException) -> None:
        if not s.finished:
            s.finished = True
            s.stats.finish_reason = "error"
            s.error = f"{type(exc).__name__}: {exc}"
            self._close_stats(s)

    def _close_stats(self, s: DecodingSequence) -> None:
        s.stats.decode_seconds = max(0.0, time.perf_counter() - s.started - s.stats.prefill_seconds)

    # ------------------------------------------------------------------ drafts
    def _propose(self, seqs: list[DecodingSequence], hidden: torch.Tensor, layouts: list[Layout],
                 wanting: list[tuple[int, int, int]]) -> None:
        """New drafts for each (batch index, block head, newest token): from the mask block after the last
        verified token. Sequences without such a block (mode ar; linear after a rejection) get none."""
        requests = []
        for b, head, newest in wanting:
            s = seqs[b]
            rows = layouts[b].block_rows(head) if self.k else None
            if rows is None or rows.numel() == 0:
                s.proposal = DraftProposal()
                continue
            requests.append(DraftRequest(s, hidden[b, rows], newest))
        if not requests:
            return
        try:
            proposals = self.drafter.propose(requests)
        except Exception as exc:  # the drafter as a whole failed: every sequence it drafted for
            proposals = [DraftProposal(error=exc) for _ in requests]
        for request, proposal in zip(requests, proposals):
            if proposal.error is not None:
                self._fail(request.sequence, proposal.error)
            request.sequence.proposal = proposal

    # ------------------------------------------------------------------ the batched pass
    def _forward(self, seqs: list[DecodingSequence], cache: Cache | None,
                 specs: list[tuple]) -> tuple[torch.Tensor, list[Layout], Cache]:
        """One pass over every sequence's layout (specs: normal tokens, block heads and, for a draft tree, the
        layout parents), rows padded to the longest."""
        device = self.mtp.device
        physical = cache.get_seq_length() if cache is not None else 0
        layouts = [build_layout(len(spec[0]), spec[1], max(self.k, 1), past_length=s.cache_len, normals_first=True,
                                parents=spec[2] if len(spec) > 2 else None, device=device)
                   for s, spec in zip(seqs, specs)]
        batch, rows = len(seqs), max(layout.rows for layout in layouts)
        token_ids = torch.zeros(batch, rows, dtype=torch.long, device=device)
        mask_slot = torch.full((batch, rows), -1, dtype=torch.long, device=device)
        position_ids = torch.zeros(batch, rows, dtype=torch.long, device=device)
        attention = torch.zeros(batch, rows, physical + rows, dtype=torch.bool, device=device)
        key_positions = torch.zeros(batch, physical + rows, dtype=torch.long, device=device)
        for b, (s, layout, (tokens, *_)) in enumerate(zip(seqs, layouts, specs)):
            r, past = layout.rows, s.cache_len
            ids = torch.tensor(tokens, dtype=torch.long, device=device)
            token_ids[b, :r] = ids[layout.normal_index.clamp(min=0)]
            mask_slot[b, :r] = layout.mask_slot
            position_ids[b, :r] = layout.position_ids
            attention[b, :r, :past] = layout.attention[:, :past]
            attention[b, :r, physical:physical + r] = layout.attention[:, past:]
            key_positions[b, :past] = torch.arange(past, device=device)
            key_positions[b, physical:] = position_ids[b]
            if r < rows:
                position_ids[b, r:] = past
                attention[b, r:, physical + r:] = pad_rows_attention(rows - r, device)
                key_positions[b, physical + r:] = past
        out = self.mtp.forward_rows(token_ids, mask_slot, position_ids, attention, key_positions,
                                    past_key_values=cache if cache is not None else kv.GrowingCache(), use_cache=True)
        return out.hidden, layouts, out.past_key_values

    def _drop_finished(self) -> None:
        slots = [b for b, s in enumerate(self.static_running) if not s.finished]
        if len(slots) < len(self.static_running):  # the engine's slots follow `static_running`
            self.static_running = [self.static_running[b] for b in slots]
            self._engine.keep(slots)
            if not slots:
                self._engine = None  # back to the pool
        keep = [b for b, s in enumerate(self.running) if not s.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[b] for b in keep]
        if not keep:
            self.cache = None
            return
        self.cache = kv.select(self.cache, keep, max(s.cache_len for s in self.running))


def _settle(events: list[StepEvent]) -> None:
    """Drafting comes after the events are made and can fail a sequence: their `finished` follows it."""
    for event in events:
        event.finished = event.sequence.finished


def _first_token(logits: torch.Tensor, s: DecodingSequence) -> int:
    """Prefill: the first token from the base head at the last prompt row."""
    if s.sampling.greedy:
        return int(logits.argmax())
    return sample(warped_probs(logits, s.sampling), s.generator)


def _verify(logits: torch.Tensor, drafts: DraftProposal, s: DecodingSequence) -> tuple[list[int], int]:
    """(the accepted drafts as indices, the token after them) from the base head's logits at the step's normal
    rows: a prefix of a chain, a root-to-leaf path of a tree."""
    if drafts.parents is not None:
        if s.sampling.greedy:
            return accept_greedy_tree(drafts.tokens, drafts.parents, logits.argmax(dim=-1).tolist())
        return accept_sampling_tree(drafts.tokens, drafts.parents, drafts.probs, warped_probs(logits, s.sampling),
                                    s.generator)
    if s.sampling.greedy:
        accepted, bonus = accept_greedy(drafts.tokens, logits.argmax(dim=-1).tolist())
    else:
        accepted, bonus = accept_sampling(drafts.tokens, drafts.probs, warped_probs(logits, s.sampling), s.generator)
    return list(range(accepted)), bonus

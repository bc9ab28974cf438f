"""The scheduler: one thread runs the batched decoder over the active requests (continuous batching).

Requests wait in a bounded queue; between decoding passes the scheduler admits waiting requests up to
`max_batch`, drops cancelled ones (clients that went away) and hands each step's text deltas to the handlers
(the decoder applies the stop rules: EOS, budget, stop strings). Results go back to the asyncio handlers
through `loop.call_soon_threadsafe`.

Nothing a request carries can stop the thread: a failure while admitting a request, or in a sequence's own part
of a step (its sampling, its drafts, its text), fails that request alone; a failure of the shared forward pass
fails the requests of that batch and the scheduler goes on with a fresh decoder. If the thread ends anyway,
`alive` turns False (the server's /health answers 503), new requests are refused and every waiting one is failed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field


from maskspec.decode.decoder import Decoder, DecodingSequence, StepEvent
from maskspec.decode.stopping import openai_finish_reason
from maskspec.decode.verify import SamplingConfig
from maskspec.model.mtp import MTPModel
from maskspec.serve.metrics import ServerMetrics

log = logging.getLogger("maskspec.serve")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class SchedulerStopped(Exception):
    """The scheduler thread is not running: nothing would answer the request."""


@dataclass
class Delta:
    text: str
    token_ids: list[int]


@dataclass
class Final:
    finish_reason: str  # "stop" | "length" (OpenAI's words)
    prompt_tokens: int
    completion_tokens: int
    forward_passes: int
    tokens_per_pass: float
    accepted_histogram: list[int]
    seconds: float


@dataclass
class Failure:
    message: str
    status: int = 500  # 400: the request itself was refused (e.g. when admitted)


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    sequence: DecodingSequence | None = None
    first_token_at: float | None = None
    checked_client: float = field(default_factory=time.monotonic)  # when the handler last asked about its client

    def deliver(self, item: Delta | Final | Failure) -> None:
        if self.loop is None or self.queue is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass


class Scheduler:
    def __init__(self, mtp: MTPModel, mode: str = "quadratic", k: int | None = None, max_batch: int = 8,
                 max_queue: int = 64, metrics: ServerMetrics | None = None, tree: int | None = None,
                 static: bool = False) -> None:
        """`static`: decode greedy requests with the static step (`decode.static`, `max_batch` slots); sampled
        ones take the usual step."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.mtp = mtp
        self.mode = mode
        self.k = k
        self.tree = tree
        self.static = static
        self.max_batch = max_batch
        self.decoder = self._new_decoder()
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self.metrics.queue_depth.read = lambda: len(self.waiting)
        self.metrics.active.read = lambda: len(self.active)
        self.waiting: collections.deque[GenerationRequest] = collections.deque()
        self.active: list[GenerationRequest] = []
        self.cond = threading.Condition()
        self._stop = False
        self._paused = False
        self._running = False
        self._session = contextlib.ExitStack()  # the decoder's session while there is work
        self._in_session = False
        self.thread = threading.Thread(target=self._run, name="maskspec-scheduler", daemon=True)

    # ------------------------------------------------------------------ control
    def start(self) -> "Scheduler":
        self._running = True
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running and will answer requests."""
        return self._running and self.thread.is_alive()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def pause(self) -> None:
        """Admit nothing new (running requests go on); tests use it to fill the queue deterministically."""
        with self.cond:
            self._paused = True

    def resume(self) -> None:
        with self.cond:
            self._paused = False
            self.cond.notify_all()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise QueueFull at once."""
        with self.cond:
            if not self.alive:
                raise SchedulerStopped("the server's scheduler is not running; restart the server")
            free_slots = 0 if self._paused else max(0, self.max_batch - len(self.active))
            if len(self.waiting) >= self.max_queue + free_slots:
                self.metrics.rejected.inc()
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.cond.notify_all()

    def cancel(self, request: GenerationRequest) -> None:
        """The client went away: free its slot before the next pass."""
        with self.cond:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
            self.cond.notify_all()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException:
            log.exception("the scheduler stopped")
            raise
        finally:
            self._session.close()
            with self.cond:
                self._running = False
                orphans = list(self.waiting) + self.active
                self.waiting.clear()
                self.active = []
            for req in orphans:
                req.deliver(Failure("the server's scheduler stopped; restart the server", 503))

    def _iterate(self) -> bool:
        """One round: admit, drop cancelled requests, one decoding step. False once stopped."""
        try:
            with self.cond:
                if not self._has_work():
                    self._session.close()  # idle: the next request opens a new session
                while not self._stop and not self._has_work():
                    self.cond.wait()
                if self._stop:
                    return False
                self._admit()
                for req in [r for r in self.active if r.cancelled]:
                    if not req.sequence.finished:
                        self.decoder.cancel(req.sequence)
                    self.metrics.finished.inc(1, "cancelled")
                    self.active.remove(req)
            if self.decoder.has_work():
                if not self._in_session:  # held across steps while there is work: packs checked once
                    self._session.enter_context(self.decoder.session())
                    self._session.callback(setattr, self, "_in_session", False)
                    self._in_session = True
                self._step()
        except Exception as exc:  # keep serving: fail the requests of this batch, start a fresh decoder
            log.exception("decoding step failed")
            self._session.close()
            with self.cond:
                failed, self.active = self.active, []
                self.decoder = self._new_decoder()
            for req in failed:
                self.metrics.finished.inc(1, "error")
                req.deliver(Failure(f"decoding failed: {type(exc).__name__}: {exc}"))
        return True

    def _new_decoder(self) -> Decoder:
        return Decoder(self.mtp, mode=self.mode, k=self.k, tree=self.tree, static=self.static,
                       static_slots=self.max_batch)

    def _has_work(self) -> bool:
        return bool(self.active) or (bool(self.waiting) and not self._paused)

    def _admit(self) -> None:
        while self.waiting and not self._paused and len(self.active) < self.max_batch:
            req = self.waiting.popleft()
            if req.cancelled:
                continue
            try:
                req.sequence = self.decoder.add(req.prompt_ids, req.max_new_tokens, sampling=req.sampling,
                                                seed=req.seed, stop=req.stop, tag=req)
            except Exception as exc:  # this request alone cannot start
                log.warning("request refused when admitted: %s: %s", type(exc).__name__, exc)
                self.metrics.finished.inc(1, "error")
                req.deliver(Failure(f"the request cannot be decoded: {exc}", 400))
                continue
            self.active.append(req)

    def _step(self) -> None:
        running = self.decoder.decoding
        events = self.decoder.step()
        self.metrics.forward_passes.inc(self.decoder.last_passes)
        if running:
            self.metrics.batch_size.observe(running)
        now = time.perf_counter()
        done, finals = [], []
        for ev in events:
            req: GenerationRequest = ev.sequence.tag
            try:
                final = self._handle(ev, req, now)
            except Exception as exc:  # this request's own text handling failed: it alone ends
                log.exception("request failed")
                if not ev.sequence.finished:
                    self.decoder.cancel(ev.sequence, "error")
                self.metrics.finished.inc(1, "error")
                final = Failure(f"decoding failed: {type(exc).__name__}: {exc}")
            if ev.sequence.finished:  # (a request cancelled meanwhile is dropped by the next round)
                done.append(req)
                if final is not None:
                    finals.append((req, final))
        if done:
            with self.cond:
                self.active = [r for r in self.active if r not in done]
        for req, final in finals:  # after the slot is free, so a client that got its answer sees it free
            req.deliver(final)

    def _handle(self, ev: StepEvent, req: GenerationRequest, now: float) -> Final | Failure | None:
        """Deliver one sequence's new text; its Final (or Failure) once it has finished, else None."""
        seq = ev.sequence
        if req.cancelled:  # the client left during this step
            if not seq.finished:
                self.decoder.cancel(seq)
            self.metrics.finished.inc(1, "cancelled")
            return None
        if seq.error is not None:
            self.metrics.finished.inc(1, "error")
            return Failure(f"decoding failed: {seq.error}")
        if ev.tokens and req.first_token_at is None:
            req.first_token_at = now
            self.metrics.first_token.observe(now - req.arrived)
        if ev.text or ev.tokens:
            req.deliver(Delta(ev.text, list(ev.tokens)))
        return self._finish(req, now) if seq.finished else None

    def _finish(self, req: GenerationRequest, now: float) -> Final:
        s = req.sequence.stats
        reason = openai_finish_reason(s.finish_reason)
        completion = len(req.sequence.output)
        m = self.metrics
        m.prompt_tokens.inc(len(req.prompt_ids))
        m.generated_tokens.inc(completion)
        m.sequence_passes.inc(s.forward_passes)
        m.finished.inc(1, s.finish_reason)
        tau = completion / s.forward_passes if s.forward_passes else 0.0
        m.tokens_per_pass.observe(tau)
        m.latency.observe(now - req.arrived)
        return Final(reason, len(req.prompt_ids), completion, s.forward_passes, tau, list(s.accepted_histogram),
                     now - req.arrived)

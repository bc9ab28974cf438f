"""When a sequence stops, and why: end-of-sequence tokens, the token budget, the context window and stop strings.

This module is the one owner of these rules. The decoder applies them to every sequence after every step
(`Stopping.accept`); the server, the bench and distillation use the same functions for their own checks.

- EOS: the first end-of-sequence token ends the output and is kept in it, as Hugging Face `generate` keeps it.
- Budget: at most `max_new_tokens`, cut to what fits in the model's context window (finish reason "context"
  when the window, not the budget, ended it). A prompt that leaves no room is an error.
- Stop strings: the text is cut before the first stop string; the tokens that completed it stay in the output.
- Finish reasons: "eos", "length", "stop", "context", "cancelled" (the caller stopped it), "error" (this
  sequence failed; the others go on). `openai_finish_reason` gives the OpenAI API's word for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

from maskspec.errors import PromptTooLongError

if TYPE_CHECKING:
    from maskspec.model.mtp import MTPModel

FinishReason = Literal["eos", "length", "stop", "context", "cancelled", "error"]
FINISH_REASONS: tuple[FinishReason, ...] = ("eos", "length", "stop", "context", "cancelled", "error")


def openai_finish_reason(reason: str) -> str:
    """The OpenAI API's finish_reason: "stop" for an EOS or a stop string, "length" for a budget or the context."""
    return "length" if reason in ("length", "context") else "stop"


class ContextLengthError(PromptTooLongError):
    """Prompt plus requested completion do not fit in the model's context window."""


def context_length(mtp: "MTPModel") -> int:
    """The model's context window in tokens (`max_position_embeddings`; unlimited when the config has none)."""
    cfg = mtp.model.config.get_text_config()
    return int(getattr(cfg, "max_position_embeddings", None) or 1 << 30)


@dataclass(frozen=True)
class Budget:
    """How many new tokens a sequence may have, and the finish reason when it has them all."""

    tokens: int
    at_end: FinishReason


def plan_budget(prompt_tokens: int, max_new_tokens: int, limit: int, *, fit: bool = True) -> Budget:
    """The token budget of a prompt of `prompt_tokens` in a context of `limit`. A prompt that leaves no room
    raises PromptTooLongError. A budget past the window is cut to what fits ("context" at the end) when `fit`,
    else it raises ContextLengthError (the server's rule for an explicit max_tokens)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_tokens >= limit:
        raise PromptTooLongError(f"the prompt has {prompt_tokens} tokens; the model's context length is {limit} "
                                 "tokens; shorten the prompt")
    room = limit - prompt_tokens
    if max_new_tokens <= room:
        return Budget(max_new_tokens, "length")
    if fit:
        return Budget(room, "context")
    raise ContextLengthError(f"the model's context length is {limit} tokens, but {prompt_tokens + max_new_tokens} "
                             f"were requested ({prompt_tokens} in the prompt, {max_new_tokens} for the completion); "
                             "shorten the prompt or lower max_tokens")


def cut_at_eos(tokens: Sequence[int], eos_ids: Iterable[int]) -> tuple[list[int], bool]:
    """The tokens up to and including the first end-of-sequence token (kept, as HF generate keeps it), and
    whether there was one."""
    eos = eos_ids if isinstance(eos_ids, (set, frozenset)) else set(eos_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return list(tokens[:i + 1]), True
    return list(tokens), False


class TextTracker:
    """Incremental detokenisation: text deltas that never split a multi-byte character, and stop strings cut
    before they appear (the tokens that completed a stop string stay in `token_ids`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.emitted = ""

    def add(self, tokens: list[int], stops: Sequence[str]) -> tuple[str, bool]:
        self.token_ids.extend(tokens)
        if self.tokenizer is None:
            return "", False
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        # Look for a stop string in the new text, including any that straddles the previous chunk's end.
        cut = min((i for i in (full.find(s, max(0, len(self.emitted) - len(s) + 1)) for s in stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            delta = full[len(self.emitted):cut] if cut > len(self.emitted) else ""
            self.emitted += delta
            return delta, True
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return "", False
        # Hold back a tail that could be the beginning of a stop string.
        hold = max((len(s) - 1 for s in stops), default=0)
        safe = len(full) - hold if hold else len(full)
        if safe <= len(self.emitted):
            return "", False
        delta = full[len(self.emitted):safe]
        self.emitted += delta
        return delta, False

    def flush(self) -> str:
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        delta = full[len(self.emitted):]
        self.emitted = full
        return delta


@dataclass
class Stopping:
    """The stop rules of one sequence, applied to each step's verified tokens by `accept`."""

    eos_ids: frozenset[int]
    budget: Budget
    stops: list[str] = field(default_factory=list)
    tokenizer: Any = None
    text: TextTracker = field(init=False)

    def __post_init__(self) -> None:
        self.stops = [s for s in self.stops if s]
        self.text = TextTracker(self.tokenizer)

    @property
    def output(self) -> list[int]:
        """The sequence's output so far (EOS included)."""
        return self.text.token_ids

    def accept(self, tokens: Sequence[int]) -> tuple[list[int], str, FinishReason | None]:
        """Record a step's verified tokens: (the tokens kept, the text they add, the finish reason or None)."""
        kept, hit_eos = cut_at_eos(list(tokens)[:self.budget.tokens - len(self.output)], self.eos_ids)
        delta, hit_stop = self.text.add(kept, self.stops)
        if hit_stop:
            return kept, delta, "stop"
        reason: FinishReason | None = None
        if hit_eos:
            reason = "eos"
        elif len(self.output) >= self.budget.tokens:
            reason = self.budget.at_end
        if reason is not None:
            delta += self.text.flush()
        return kept, delta, reason

"""The public generation API: prompt handling, stop conditions, streaming and stats around the decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from maskspec.decode.speculative import SpeculativeDecoder
from maskspec.decode.types import GenerationOutput, GenerationStats
from maskspec.decode.verify import SamplingConfig
from maskspec.errors import MaskspecError, PromptTooLongError
from maskspec.model.mtp import MTPModel

Prompt = str | Sequence[dict] | Sequence[int] | torch.Tensor


@dataclass
class StreamChunk:
    """What a stream yields after each step: the verified tokens and the text they add."""

    token_ids: list[int]
    text: str
    stats: GenerationStats


def prepare_input_ids(mtp: MTPModel, prompt: Prompt, chat_template: bool = True) -> torch.Tensor:
    """(1, n) token ids from ids, a string (one user message, chat-templated) or a list of chat messages."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(1, -1) if prompt.dim() == 1 else prompt
        if ids.shape[0] != 1:
            raise MaskspecError(f"generate takes one prompt at a time, got a batch of {ids.shape[0]}")
        return ids.to(mtp.device, torch.long)
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
        tok = mtp.tokenizer
        if tok is None:
            raise MaskspecError("this model has no tokenizer: pass token ids instead of text")
        if isinstance(prompt, str) and not (chat_template and tok.chat_template):
            ids = tok(check_text(prompt, "the prompt"), return_tensors="pt").input_ids
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            _check_messages(messages)
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
        return ids.to(mtp.device)
    if prompt is None or len(prompt) == 0:
        raise MaskspecError("the prompt is empty")
    return torch.tensor([list(prompt)], dtype=torch.long, device=mtp.device)


def check_text(text: str, what: str) -> str:
    """`text` if it is Unicode text a tokenizer can encode; lone UTF-16 surrogates (from JSON escapes, or bytes
    that were not UTF-8 read with surrogateescape) are not. MaskspecError naming `what` otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MaskspecError(f"{what} is not valid Unicode text: a lone surrogate or a byte that is not UTF-8 at "
                            f"character {exc.start}") from None
    return text


def _check_messages(messages: list[Any]) -> None:
    if not messages:
        raise MaskspecError("messages is empty: give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MaskspecError(f"message {i} must be an object with 'role' and 'content'")
        if isinstance(m["content"], str):
            check_text(m["content"], f"message {i}")


def context_length(mtp: MTPModel) -> int:
    cfg = mtp.model.config.get_text_config()
    return int(getattr(cfg, "max_position_embeddings", None) or 1 << 30)


def stream(mtp: MTPModel, prompt: Prompt, *, max_new_tokens: int = 256, mode: str = "quadratic",
           k: int | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           stop: Sequence[str] | None = None, seed: int | None = None,
           eos_token_ids: Sequence[int] | None = None, chat_template: bool = True) -> Iterator[StreamChunk]:
    """Yield verified tokens (and their text) as they are produced. The last chunk's stats are final."""
    if max_new_tokens < 0:
        raise MaskspecError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = prepare_input_ids(mtp, prompt, chat_template)
    prompt_ids = ids[0].tolist()
    limit = context_length(mtp)
    if len(prompt_ids) >= limit:
        raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens; the model's context length is {limit}")
    budget = min(max_new_tokens, limit - len(prompt_ids))
    eos = set(mtp.eos_token_ids if eos_token_ids is None else eos_token_ids)
    stops = [s for s in (stop or []) if s]
    decoder = SpeculativeDecoder(mtp, mode=mode, k=k,
                                 sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p),
                                 seed=seed)
    stats = GenerationStats()
    text = TextTracker(mtp.tokenizer)
    finish = "length" if budget == max_new_tokens else "context"
    steps = decoder.run(prompt_ids, budget, stats)
    try:
        for chunk in steps:
            chunk = chunk[:budget - len(text.token_ids)]
            hit_eos = next((i for i, t in enumerate(chunk) if t in eos), None)
            if hit_eos is not None:
                chunk = chunk[:hit_eos + 1]  # keep the EOS token, like HF generate
            delta, stop_hit = text.add(chunk, stops)
            stats.new_tokens = len(text.token_ids)
            if stop_hit or hit_eos is not None:
                stats.finish_reason = "stop" if stop_hit else "eos"
                if not stop_hit:
                    delta += text.flush()
                yield StreamChunk(chunk, delta, stats)
                return
            yield StreamChunk(chunk, delta, stats)
        stats.finish_reason = finish
        tail = text.flush()
        if tail:
            yield StreamChunk([], tail, stats)
    finally:
        steps.close()
        stats.new_tokens = len(text.token_ids)
        stats.finish_reason = stats.finish_reason or finish


def generate(mtp: MTPModel, prompt: Prompt = None, *, streamer: Callable[[StreamChunk], None] | None = None,
             **kwargs: Any) -> GenerationOutput:
    """Generate from token ids, a string or chat messages. Greedy (temperature 0) output is identical to plain
    greedy decoding of the base model; sampling has the base model's distribution.

    kwargs: max_new_tokens, mode ("quadratic" | "linear" | "ar"), k, temperature, top_p, top_k, stop, seed,
    eos_token_ids, chat_template."""
    ids = prepare_input_ids(mtp, prompt, kwargs.get("chat_template", True))
    tokens: list[int] = []
    text_parts: list[str] = []
    stats = GenerationStats()
    for chunk in stream(mtp, ids, **kwargs):
        tokens.extend(chunk.token_ids)
        text_parts.append(chunk.text)
        stats = chunk.stats
        if streamer is not None:
            streamer(chunk)
    sequences = torch.cat([ids, torch.tensor([tokens], dtype=torch.long, device=ids.device)], dim=1)
    text = "".join(text_parts) if mtp.tokenizer is not None else None
    return GenerationOutput(sequences=sequences, new_token_ids=tokens, text=text, stats=stats)


class TextTracker:
    """Incremental detokenisation: text deltas that never split a multi-byte character, and stop strings cut
    before they appear (the tokens that completed a stop string stay in `token_ids`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.emitted = ""

    def add(self, tokens: list[int], stops: list[str]) -> tuple[str, bool]:
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

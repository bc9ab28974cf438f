"""The public generation API: prompt handling, stop conditions, streaming and stats around the decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from maskspec.decode.decoder import Decoder, DecodingSequence
from maskspec.decode.static import check_static
from maskspec.decode.steps import resolve_static
from maskspec.decode.types import GenerationOutput, GenerationStats
from maskspec.decode.verify import SamplingConfig
from maskspec.errors import MaskspecError
from maskspec.messages import check_text, validate_messages

if TYPE_CHECKING:
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
            validate_messages(messages, where="messages", strict_roles=False)  # the template gets them as given
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
        return ids.to(mtp.device)
    if prompt is None or len(prompt) == 0:
        raise MaskspecError("the prompt is empty")
    return torch.tensor([list(prompt)], dtype=torch.long, device=mtp.device)


def start(mtp: MTPModel, prompt: Prompt, *, max_new_tokens: int = 256, mode: str = "quadratic",
          k: int | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
          stop: Sequence[str] | None = None, seed: int | None = None, eos_token_ids: Sequence[int] | None = None,
          chat_template: bool = True, tree: int | None = None,
          static: bool | None = None) -> tuple[torch.Tensor, Decoder, DecodingSequence]:
    """A decoder holding one sequence for `prompt`, ready to step: (the prompt's ids, the decoder, the sequence).
    `tree` > 0 drafts trees of up to that many nodes (mode quadratic), 0 a chain; None (the default) takes what the
    adapter's config recommends for this device when k is not given either (see `Decoder`). `static`: the static
    step (greedy; a CUDA graph on a GPU, `decode.static`); None takes the adapter's recommendation for this device
    under the same rule as the tree (`steps.resolve_static`)."""
    if max_new_tokens < 0:
        raise MaskspecError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ids = prepare_input_ids(mtp, prompt, chat_template)
    static = resolve_static(mtp, mode, k, tree, static, sampling.greedy)
    if static:
        check_static(mode, sampling.greedy)  # asked for by name: it does not sample
    decoder = Decoder(mtp, mode=mode, k=k, tree=tree, static=static)
    seq = decoder.add(ids[0].tolist(), max_new_tokens, sampling=sampling, seed=seed, eos_token_ids=eos_token_ids,
                      stop=list(stop or []))
    return ids, decoder, seq


def chunks(decoder: Decoder, seq: DecodingSequence) -> Iterator[StreamChunk]:
    """Step `decoder` until `seq` finishes, yielding what each step adds. Closing the iterator early cancels the
    sequence (finish reason "cancelled")."""
    try:
        with decoder.session():  # the weights stay fixed for the whole generation
            while decoder.has_work():
                for event in decoder.step():
                    if event.tokens or event.text:
                        yield StreamChunk(event.tokens, event.text, seq.stats)
    finally:
        if not seq.finished:
            decoder.cancel(seq)
    if seq.error is not None:
        raise MaskspecError(f"decoding failed: {seq.error}")


def stream(mtp: MTPModel, prompt: Prompt, **kwargs: Any) -> Iterator[StreamChunk]:
    """Yield verified tokens (and their text) as they are produced; the last chunk's stats are final.

    kwargs: max_new_tokens, mode ("quadratic" | "linear" | "ar"), k, temperature, top_p, top_k, stop, seed,
    eos_token_ids, chat_template, tree, static (see `start`)."""
    _, decoder, seq = start(mtp, prompt, **kwargs)
    yield from chunks(decoder, seq)


def generate(mtp: MTPModel, prompt: Prompt = None, *, streamer: Callable[[StreamChunk], None] | None = None,
             **kwargs: Any) -> GenerationOutput:
    """Generate from token ids, a string or chat messages. Greedy (temperature 0) output is identical to plain
    greedy decoding of the base model; sampling has the base model's distribution. kwargs as for `stream`."""
    ids, decoder, seq = start(mtp, prompt, **kwargs)
    tokens: list[int] = []
    text_parts: list[str] = []
    for chunk in chunks(decoder, seq):
        tokens.extend(chunk.token_ids)
        text_parts.append(chunk.text)
        if streamer is not None:
            streamer(chunk)
    sequences = torch.cat([ids, torch.tensor([tokens], dtype=torch.long, device=ids.device)], dim=1)
    text = "".join(text_parts) if mtp.tokenizer is not None else None
    return GenerationOutput(sequences=sequences, new_token_ids=tokens, text=text, stats=seq.stats)

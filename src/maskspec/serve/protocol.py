"""The server's OpenAI wire format, as plain functions: request bodies parsed and checked into plain values
(`ApiError`, an OpenAI-style error with its HTTP status, for anything invalid), and response bodies and
server-sent events shaped from the scheduler's results.

Request fields follow the OpenAI API (messages / prompt, max_tokens or max_completion_tokens, temperature, top_p,
stop, stream, stream_options.include_usage, seed, n = 1; `top_k` as an extension); unknown fields are ignored.
Responses carry `usage` plus a `maskspec` object (tokens per pass, forward passes, accepted histogram, mode, k,
seconds).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from maskspec.decode.api import prepare_input_ids
from maskspec.decode.stopping import ContextLengthError, plan_budget
from maskspec.decode.verify import SamplingConfig, check_seed
from maskspec.errors import MaskspecError, PromptTooLongError, UsageError
from maskspec.messages import MessagesError, check_text, validate_messages

if TYPE_CHECKING:
    from maskspec.serve.scheduler import Failure, Final

MAX_STOPS = 16
DONE_EVENT = "data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered as an OpenAI-style error body with HTTP status `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code, self.type)


def error_body(message: str, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class Params:
    """The generation options of a request (the prompt or messages are parsed separately)."""

    max_tokens: int | None
    sampling: SamplingConfig
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------- requests
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(v)[:40]}", name, "invalid_type")
    return v


def _opt_number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a finite number, got {json.dumps(v)[:40]}", name, "invalid_type")
    if v > hi or v < lo or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise ApiError(400, f"'{name}' must be in {bracket}{lo}, {hi}], got {v}", name, "invalid_value")
    return float(v)


def parse_params(body: dict) -> Params:
    """The generation options of a chat or text completion request body."""
    max_tokens = _opt_int(body, "max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _opt_int(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{name}' must be at least 1, got {max_tokens}", name, "invalid_value")
    temperature = _opt_number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _opt_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _opt_int(body, "top_k") or 0
    if top_k < 0:
        raise ApiError(400, f"'top_k' must be >= 0, got {top_k}", "top_k", "invalid_value")
    seed = _opt_int(body, "seed")
    try:
        check_seed(seed)
    except UsageError as exc:
        raise ApiError(400, str(exc), "seed", "invalid_value") from None
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"only n=1 is supported, got n={n}", "n", "invalid_value")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}", "stop", "invalid_value")
    for text in stops:
        _check_text(text, "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    try:
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
    except UsageError as exc:
        raise ApiError(400, str(exc), str(exc).split()[0], "invalid_value") from None
    return Params(max_tokens, sampling, seed, [s for s in stops if s], stream, include_usage)


def _check_text(text: str, param: str) -> str:
    """Text the tokenizer can encode: JSON may carry lone UTF-16 surrogates ("\\ud800"), which are not text."""
    try:
        return check_text(text, f"'{param}'")
    except MaskspecError as exc:
        raise ApiError(400, str(exc), param, "invalid_value") from None


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The `messages` of a chat request: OpenAI text parts are joined and a null content is ""."""
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    try:
        return validate_messages(body["messages"], where="the request", allow_text_parts=True,
                                 allow_null_content=True)
    except MessagesError as exc:
        param = "messages" if exc.index is None else f"messages[{exc.index}]"
        if exc.index is not None and exc.field is not None:
            param += f".{exc.field}"
        raise ApiError(400, str(exc), param, "invalid_type" if exc.kind == "type" else "invalid_value") from None


def parse_prompt(body: dict, vocab_size: int) -> str | list[int]:
    """The `prompt` of a text completion request: one string or one list of token ids below `vocab_size`."""
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _check_text(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", "prompt",
                           "invalid_value")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "only one prompt per request is supported", "prompt", "invalid_value")
    raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt", "invalid_type")


def parse_chat(body: dict, mtp: Any) -> tuple[list[int], Params]:
    """A chat completion request body -> (prompt token ids from the model's chat template, options)."""
    messages = parse_messages(body)
    params = parse_params(body)
    try:
        ids = prepare_input_ids(mtp, messages)[0].tolist()
    except MaskspecError as exc:
        raise ApiError(400, str(exc), "messages", "invalid_value") from None
    except Exception as exc:  # the chat template refused the conversation
        raise ApiError(400, f"the chat template cannot format these messages: {exc}", "messages",
                       "invalid_value") from None
    return ids, params


def parse_completion(body: dict, tokenizer: Any, vocab_size: int) -> tuple[list[int], Params]:
    """A text completion request body -> (prompt token ids, options). A text prompt needs `tokenizer`."""
    prompt = parse_prompt(body, vocab_size)
    params = parse_params(body)
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported", "echo", "invalid_value")
    if not isinstance(prompt, str):
        return list(prompt), params
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: send token ids", "prompt", "invalid_value")
    try:
        return list(tokenizer(prompt).input_ids), params
    except Exception as exc:
        raise ApiError(400, f"the tokenizer cannot encode this prompt: {exc}", "prompt", "invalid_value") from None


def completion_budget(prompt_tokens: int, max_tokens: int | None, *, context: int, limit: int,
                      default: int) -> int:
    """The number of new tokens to generate for a prompt of `prompt_tokens` tokens: `max_tokens`, or without it
    `default` capped by the server's `limit` and what is left of the model's `context`. ApiError when the
    prompt is empty, `max_tokens` is above `limit`, or prompt plus completion do not fit in `context`."""
    n = prompt_tokens
    if not n:
        raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
    if max_tokens is not None and max_tokens > limit:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limit}", "max_tokens",
                       "invalid_value")
    requested = min(default, limit) if max_tokens is None else max_tokens
    try:  # the decoder's own rule; without max_tokens the default is cut to what fits
        return plan_budget(n, requested, context, fit=max_tokens is None).tokens
    except ContextLengthError as exc:
        raise ApiError(400, str(exc), "max_tokens", "context_length_exceeded") from None
    except PromptTooLongError as exc:
        raise ApiError(400, str(exc), "messages", "context_length_exceeded") from None


# ---------------------------------------------------------------------- responses
def failure_error(failure: Failure) -> ApiError:
    """The error answer of a request the scheduler failed (status < 500: the request itself was refused)."""
    if failure.status < 500:
        return ApiError(failure.status, failure.message, None, "invalid_value")
    return ApiError(failure.status, failure.message, None, None, "server_error")


def usage(final: Final) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


@dataclass(frozen=True)
class Completion:
    """The identity of one chat or text completion (id, creation time, model, decoder mode and k) and the
    bodies and stream events that answer it."""

    chat: bool
    model: str
    mode: str
    k: int
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str, mode: str, k: int) -> Completion:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        return cls(chat, model, mode, k, rid, int(time.time()))

    def extra(self, final: Final) -> dict:
        """The `maskspec` object: how the speculative decoder did on this request."""
        return {"tokens_per_pass": round(final.tokens_per_pass, 4), "forward_passes": final.forward_passes,
                "accepted_histogram": final.accepted_histogram, "mode": self.mode, "k": self.k,
                "seconds": round(final.seconds, 4)}

    def body(self, text: str, final: Final) -> dict:
        """The non-streaming response body."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": final.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": usage(final),
                "maskspec": self.extra(final)}

    def _event(self, choices: list[dict], **more: Any) -> str:
        return sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "created": self.created, "model": self.model, "choices": choices, **more})

    def _chunk(self, text: str | None, finish: str | None, role: bool = False, **more: Any) -> str:
        if self.chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._event([choice], **more)

    def opening_events(self) -> list[str]:
        """Events sent before any text: a chat stream opens with the assistant role."""
        return [self._chunk("", None, role=True)] if self.chat else []

    def text_event(self, text: str) -> str:
        return self._chunk(text, None)

    def final_events(self, final: Final, include_usage: bool) -> list[str]:
        """The finish reason with the `maskspec` object, then (if asked for) a chunk with no choices and the
        usage, then the end of the stream."""
        events = [self._chunk(None if self.chat else "", final.finish_reason, maskspec=self.extra(final))]
        if include_usage:
            events.append(self._event([], usage=usage(final)))
        return events + [DONE_EVENT]

    @staticmethod
    def failure_events(failure: Failure) -> list[str]:
        """A failed generation's error (OpenAI's in-stream error object), then the end of the stream."""
        kind = "invalid_request_error" if failure.status < 500 else "server_error"
        return [sse(error_body(failure.message, None, None, kind)), DONE_EVENT]

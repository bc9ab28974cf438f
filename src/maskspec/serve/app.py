"""An OpenAI-compatible HTTP API over the batched speculative decoder.

POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus text).
Request fields follow the OpenAI API (messages / prompt, max_tokens, temperature, top_p, stop, stream, seed,
n = 1; `top_k` as an extension); unknown fields are ignored and invalid ones answer 400 with an OpenAI-style
error body. Responses carry `usage` plus a `maskspec` object (tokens per pass, forward passes).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from maskspec.decode.api import check_text, context_length, prepare_input_ids
from maskspec.decode.verify import SamplingConfig, check_seed
from maskspec.errors import MaskspecError, UsageError
from maskspec.serve.scheduler import (Delta, Failure, Final, GenerationRequest, QueueFull, Scheduler,
                                      SchedulerStopped)

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOPS = 16
MAX_BODY_BYTES = 8 << 20
# How often a waiting non-streaming handler asks whether its client is still connected (seconds).
DISCONNECT_POLL = 0.25


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_new_tokens_limit: int = 1024
    default_max_tokens: int = 256


@dataclass
class Params:
    max_tokens: int | None
    sampling: SamplingConfig
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------- validation
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


def _messages(body: dict) -> list[dict]:
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be a list of message objects", "messages", "invalid_type")
    if not messages:
        raise ApiError(400, "'messages' must contain at least one message", "messages", "invalid_value")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{param} must be an object with 'role' and 'content'", param, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{param}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                           f"{param}.role", "invalid_value")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text parts are supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{param}.content: only text parts are supported", f"{param}.content",
                                   "invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ApiError(400, f"{param}.content must be a string or a list of text parts", f"{param}.content",
                           "invalid_type")
        out.append({"role": role, "content": _check_text(content, f"{param}.content")})
    return out


def _prompt(body: dict, vocab_size: int) -> str | list[int]:
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


# ---------------------------------------------------------------------- the app
def create_app(scheduler: Scheduler, config: ServerConfig) -> FastAPI:
    mtp = scheduler.mtp
    metrics = scheduler.metrics
    ctx = context_length(mtp)
    vocab = int(mtp.model.config.get_text_config().vocab_size)
    app = FastAPI(title="maskspec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.config = config

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), None, code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, None, "server_error")

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    async def json_body(request: Request) -> dict:
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB", None,
                               "request_too_large")
        try:
            body = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def make_request(prompt_ids: list[int], params: Params) -> GenerationRequest:
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        n = len(prompt_ids)
        if params.max_tokens is not None and params.max_tokens > config.max_new_tokens_limit:
            raise ApiError(400, f"max_tokens {params.max_tokens} is above this server's limit of "
                                f"{config.max_new_tokens_limit}", "max_tokens", "invalid_value")
        if n >= ctx:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens, but the prompt has {n} "
                                "tokens; shorten the prompt", "messages", "context_length_exceeded")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = min(config.default_max_tokens, config.max_new_tokens_limit, ctx - n)
        elif n + max_tokens > ctx:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens, but you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the completion); "
                                "shorten the prompt or lower max_tokens", "max_tokens", "context_length_exceeded")
        return GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_tokens, sampling=params.sampling,
                                 seed=params.seed, stop=params.stop)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.alive
        return JSONResponse({"status": "ok" if alive else "unhealthy", "scheduler": alive,
                             "model": config.model_name, "mode": scheduler.mode, "k": scheduler.decoder.k,
                             "active": len(scheduler.active), "waiting": len(scheduler.waiting)},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "maskspec"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        check_key(request)
        body = await json_body(request)
        messages = _messages(body)
        params = parse_params(body)
        try:
            ids = prepare_input_ids(mtp, messages)[0].tolist()
        except MaskspecError as exc:
            raise ApiError(400, str(exc), "messages", "invalid_value") from None
        except Exception as exc:  # the chat template refused the conversation
            raise ApiError(400, f"the chat template cannot format these messages: {exc}", "messages",
                           "invalid_value") from None
        return await respond(request, make_request(ids, params), params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        body = await json_body(request)
        prompt = _prompt(body, vocab)
        params = parse_params(body)
        if body.get("echo"):
            raise ApiError(400, "'echo' is not supported", "echo", "invalid_value")
        if isinstance(prompt, str):
            if mtp.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send token ids", "prompt", "invalid_value")
            try:
                ids = mtp.tokenizer(prompt).input_ids
            except Exception as exc:
                raise ApiError(400, f"the tokenizer cannot encode this prompt: {exc}", "prompt",
                               "invalid_value") from None
        else:
            ids = list(prompt)
        return await respond(request, make_request(ids, params), params, chat=False)

    async def respond(request: Request, gen: GenerationRequest, params: Params, chat: bool) -> Any:
        gen.loop = asyncio.get_running_loop()
        gen.queue = asyncio.Queue()
        try:
            scheduler.submit(gen)
        except QueueFull as exc:
            raise ApiError(429, f"{exc}; retry later", None, "rate_limit_exceeded", "rate_limit_error") from None
        except SchedulerStopped as exc:
            raise ApiError(503, str(exc), None, "service_unavailable", "server_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if params.stream:
            return StreamingResponse(stream_events(request, gen, params, chat, rid, created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts: list[str] = []
        final: Final | None = None
        try:
            while final is None:
                item = await next_item(request, gen)
                if item is None:
                    return error_response(499, "client disconnected")
                if isinstance(item, Delta):
                    texts.append(item.text)
                elif isinstance(item, Failure):
                    return failure_response(item)
                else:
                    final = item
        finally:
            if final is None:  # disconnected, failed or torn down: free the slot
                scheduler.cancel(gen)
        text = "".join(texts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": final.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": config.model_name, "choices": [choice], "usage": usage(final),
                "maskspec": extra(final)}

    async def next_item(request: Request, gen: GenerationRequest) -> Delta | Final | Failure | None:
        """The scheduler's next item for this request, or None once its client has gone. The client is asked
        about every DISCONNECT_POLL seconds, also while items keep coming (a running generation yields them
        faster than any timeout) and while the request waits in the queue."""
        while True:
            if time.monotonic() - gen.checked_client >= DISCONNECT_POLL:
                if await request.is_disconnected():
                    return None
                gen.checked_client = time.monotonic()
            try:
                return await asyncio.wait_for(gen.queue.get(), timeout=DISCONNECT_POLL)
            except asyncio.TimeoutError:
                continue

    def failure_response(failure: Failure) -> JSONResponse:
        if failure.status < 500:
            return error_response(failure.status, failure.message, None, "invalid_value")
        return error_response(failure.status, failure.message, None, None, "server_error")

    def usage(final: Final) -> dict:
        return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
                "total_tokens": final.prompt_tokens + final.completion_tokens}

    def extra(final: Final) -> dict:
        return {"tokens_per_pass": round(final.tokens_per_pass, 4), "forward_passes": final.forward_passes,
                "accepted_histogram": final.accepted_histogram, "mode": scheduler.mode,
                "k": scheduler.decoder.k, "seconds": round(final.seconds, 4)}

    async def stream_events(request: Request, gen: GenerationRequest, params: Params, chat: bool, rid: str,
                            created: int) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, finish: str | None, role: bool = False, **more: Any) -> str:
            if chat:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": obj, "created": created, "model": config.model_name,
                       "choices": [choice], **more}
            return f"data: {json.dumps(payload)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                item = await next_item(request, gen)
                if item is None:  # the client has gone: nothing more to send (finally frees the slot)
                    return
                if isinstance(item, Delta):
                    if item.text:
                        yield chunk(item.text, None)
                elif isinstance(item, Failure):
                    finished = True
                    kind = "invalid_request_error" if item.status < 500 else "server_error"
                    err = {"error": {"message": item.message, "type": kind, "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                else:
                    finished = True
                    yield chunk(None if chat else "", item.finish_reason, maskspec=extra(item))
                    if params.include_usage:
                        payload = {"id": rid, "object": obj, "created": created, "model": config.model_name,
                                   "choices": [], "usage": usage(item)}
                        yield f"data: {json.dumps(payload)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the response was torn down): free the slot
                scheduler.cancel(gen)

    return _RequestCounter(app, metrics)


class _RequestCounter:
    """ASGI wrapper counting responses by endpoint and status (a plain wrapper keeps disconnects working)."""

    ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app: FastAPI, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.state = app.state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.ENDPOINTS else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(1, endpoint, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def build_server(mtp: Any, *, mode: str = "quadratic", k: int | None = None, max_batch: int = 8,
                 max_queue: int = 64, max_new_tokens_limit: int = 1024, api_key: str | None = None,
                 model_name: str | None = None) -> tuple[Any, Scheduler]:
    """The ASGI app and its (started) scheduler for a loaded MTPModel."""
    scheduler = Scheduler(mtp, mode=mode, k=k, max_batch=max_batch, max_queue=max_queue).start()
    config = ServerConfig(model_name=model_name or mtp.model_name, api_key=api_key,
                          max_new_tokens_limit=max_new_tokens_limit,
                          default_max_tokens=min(256, max_new_tokens_limit))
    return create_app(scheduler, config), scheduler


class BackgroundServer:
    """uvicorn in a thread (tests, the load test): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

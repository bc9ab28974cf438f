"""An OpenAI-compatible HTTP API over the batched speculative decoder.

POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus text).
This module routes requests, checks the API key, reads bodies (at most MAX_BODY_BYTES of JSON) and waits on the
scheduler; the wire format (request fields, validation, response bodies and stream events) is in
`maskspec.serve.protocol`. Invalid requests answer 4xx with an OpenAI-style error body; responses carry `usage`
plus a `maskspec` object (tokens per pass, forward passes).
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from maskspec.decode.stopping import context_length
from maskspec.errors import MaskspecError
from maskspec.serve.protocol import (ApiError, Completion, Params, completion_budget, failure_error,
                                     parse_chat, parse_completion)
from maskspec.serve.scheduler import (Delta, Failure, Final, GenerationRequest, QueueFull, Scheduler,
                                      SchedulerStopped)

MAX_BODY_BYTES = 8 << 20
# How often a waiting non-streaming handler asks whether its client is still connected (seconds).
DISCONNECT_POLL = 0.25


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_new_tokens_limit: int = 1024
    default_max_tokens: int = 256


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


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
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), None, code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, None,
                                       "server_error"))

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
        budget = completion_budget(len(prompt_ids), params.max_tokens, context=ctx,
                                   limit=config.max_new_tokens_limit, default=config.default_max_tokens)
        return GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=budget, sampling=params.sampling,
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
        ids, params = parse_chat(await json_body(request), mtp)
        return await respond(request, make_request(ids, params), params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        ids, params = parse_completion(await json_body(request), mtp.tokenizer, vocab)
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
        reply = Completion.new(chat, config.model_name, scheduler.mode, scheduler.decoder.k)
        if params.stream:
            return StreamingResponse(stream_events(request, gen, params, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts: list[str] = []
        final: Final | None = None
        try:
            while final is None:
                item = await next_item(request, gen)
                if item is None:
                    return error_response(ApiError(499, "client disconnected"))
                if isinstance(item, Delta):
                    texts.append(item.text)
                elif isinstance(item, Failure):
                    return error_response(failure_error(item))
                else:
                    final = item
        finally:
            if final is None:  # disconnected, failed or torn down: free the slot
                scheduler.cancel(gen)
        return reply.body("".join(texts), final)

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

    async def stream_events(request: Request, gen: GenerationRequest, params: Params,
                            reply: Completion) -> AsyncIterator[str]:
        finished = False
        try:
            for event in reply.opening_events():
                yield event
            while not finished:
                item = await next_item(request, gen)
                if item is None:  # the client has gone: nothing more to send (finally frees the slot)
                    return
                if isinstance(item, Delta):
                    if item.text:
                        yield reply.text_event(item.text)
                    continue
                finished = True
                events = (reply.failure_events(item) if isinstance(item, Failure)
                          else reply.final_events(item, params.include_usage))
                for event in events:
                    yield event
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
                 model_name: str | None = None, tree: int | None = None,
                 static: bool = False) -> tuple[Any, Scheduler]:
    """The ASGI app and its (started) scheduler for a loaded MTPModel (`tree` > 0: draft trees of up to that many
    nodes; None: the adapter's recommendation, see `Decoder`; `static`: the static step for greedy requests)."""
    scheduler = Scheduler(mtp, mode=mode, k=k, max_batch=max_batch, max_queue=max_queue, tree=tree,
                          static=static).start()
    config = ServerConfig(model_name=model_name or mtp.model_name, api_key=api_key,
                          max_new_tokens_limit=max_new_tokens_limit,
                          default_max_tokens=min(256, max_new_tokens_limit))
    return create_app(scheduler, config), scheduler


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port or a bad address is a one-line error at
    once, and nothing can take the port between this check and serving."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MaskspecError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise MaskspecError(f"port {port} on {host} is already in use; stop what serves there or pass "
                                "another --port") from None
        raise MaskspecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """uvicorn in a thread (tests, the load test): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import threading

        import uvicorn

        self.sock = bind_socket(host, port)
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

"""The server under hostile input: a real uvicorn server on a tiny random llama (float64) with the embedded
model's tokenizer. Every bad body gets a 4xx OpenAI-style error and a normal request after it is still answered;
a bad sampling value never costs its batch neighbours their answers; clients that leave are cancelled within about
a second; a scheduler that is not running shows on /health and refuses work instead of hanging."""

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from maskspec.decode.api import generate, prepare_input_ids
from maskspec.decode.verify import SamplingConfig
from maskspec.model.mtp import MTPModel
from maskspec.serve.app import MAX_BODY_BYTES, BackgroundServer, build_server
from maskspec.serve.scheduler import Failure, Final, GenerationRequest

pytestmark = pytest.mark.slow  # the embedded model's tokenizer

LIMIT = 200


@pytest.fixture(scope="module")
def server(served_files):
    mtp = MTPModel.from_pretrained(str(served_files / "model"), adapter=str(served_files / "adapter"), dtype="fp64")
    app, scheduler = build_server(mtp, mode="quadratic", max_batch=4, max_queue=64, max_new_tokens_limit=LIMIT,
                                  model_name="tiny")
    with BackgroundServer(app) as url:
        yield url, scheduler, mtp
    scheduler.stop()


def _wait_for(condition, what, timeout=30.0, state=None):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {state()}" if state else ""))
        time.sleep(0.01)


def _messages(text="Say something"):
    return [{"role": "user", "content": text}]


def _chat(content: str) -> str:
    return '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, ' + content + "}"


NESTED_10K = "[" * 10_000 + "]" * 10_000
NESTED_100K = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"

# (endpoint, raw body, expected status). Raw text, so that NaN / Infinity literals and lone surrogates go as a
# client could send them.
HOSTILE = [
    # seeds torch cannot take: once these stopped the scheduler thread
    ("chat", _chat('"seed": 18446744073709551616, "temperature": 1'), 400),
    ("chat", _chat('"seed": 10000000000000000000000000000000000000000, "temperature": 1'), 400),
    ("chat", _chat('"seed": -9223372036854775809, "temperature": 1'), 400),
    ("chat", _chat('"seed": "7"'), 400),
    ("chat", _chat('"seed": true'), 400),
    ("completions", '{"prompt": "hi", "max_tokens": 3, "seed": 18446744073709551616, "temperature": 1}', 400),
    # temperatures
    ("chat", _chat('"temperature": NaN'), 400),
    ("chat", _chat('"temperature": Infinity'), 400),
    ("chat", _chat('"temperature": -Infinity'), 400),
    ("chat", _chat('"temperature": -1'), 400),
    ("chat", _chat('"temperature": 2.5'), 400),
    ("chat", _chat('"temperature": "hot"'), 400),
    ("chat", _chat('"temperature": [1]'), 400),
    ("completions", '{"prompt": "hi", "max_tokens": 3, "temperature": NaN}', 400),
    # top_p, top_k
    ("chat", _chat('"top_p": NaN'), 400),
    ("chat", _chat('"top_p": Infinity'), 400),
    ("chat", _chat('"top_p": 0'), 400),
    ("chat", _chat('"top_p": -0.5'), 400),
    ("chat", _chat('"top_p": 5'), 400),
    ("chat", _chat('"top_k": -1'), 400),
    ("chat", _chat('"top_k": 1.5'), 400),
    ("chat", _chat('"top_k": "3"'), 400),
    # lengths and counts
    ("chat", _chat('"max_tokens": 0'), 400),
    ("chat", _chat('"max_tokens": 100000000000000000000000000000'), 400),
    ("chat", _chat('"max_tokens": 1.5'), 400),
    ("chat", _chat('"max_completion_tokens": -1'), 400),
    ("chat", _chat('"n": 2'), 400),
    ("chat", _chat('"n": "1"'), 400),
    # stop, stream, options, model
    ("chat", _chat('"stop": 5'), 400),
    ("chat", _chat('"stop": [null]'), 400),
    ("chat", _chat('"stop": ' + json.dumps(["a"] * 17)), 400),
    ("chat", _chat('"stop": "\\ud800"'), 400),
    ("chat", _chat('"stream": "yes"'), 400),
    ("chat", _chat('"stream": 1'), 400),
    ("chat", _chat('"stream_options": []'), 400),
    ("chat", _chat('"stream": true, "stream_options": {"include_usage": "yes"}'), 400),
    ("chat", _chat('"model": 5'), 400),
    # messages
    ("chat", '{"max_tokens": 3}', 400),
    ("chat", '{"messages": {}}', 400),
    ("chat", '{"messages": []}', 400),
    ("chat", '{"messages": [1]}', 400),
    ("chat", '{"messages": [null]}', 400),
    ("chat", '{"messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("chat", '{"messages": [{"role": ["user"], "content": "x"}]}', 400),
    ("chat", '{"messages": [{"role": "user", "content": 5}]}', 400),
    ("chat", '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}', 400),
    ("chat", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}', 400),
    ("chat", '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("chat", '{"messages": [{"role": "user", "content": "ok \\udfff then"}]}', 400),
    ("chat", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}', 400),
    ("chat", json.dumps({"messages": _messages("word " * 2000), "max_tokens": 3}), 400),
    # prompts of text completions
    ("completions", '{"max_tokens": 3}', 400),
    ("completions", '{"prompt": 5}', 400),
    ("completions", '{"prompt": []}', 400),
    ("completions", '{"prompt": ""}', 400),
    ("completions", '{"prompt": [-1]}', 400),
    ("completions", '{"prompt": [1000000000]}', 400),
    ("completions", '{"prompt": [1.5, 2]}', 400),
    ("completions", '{"prompt": [true]}', 400),
    ("completions", '{"prompt": ["a", "b"]}', 400),
    ("completions", '{"prompt": [[1, 2], [3]]}', 400),
    ("completions", '{"prompt": {"text": "hi"}}', 400),
    ("completions", '{"prompt": "\\ud800"}', 400),
    ("completions", '{"prompt": "abc \\udc00"}', 400),
    ("completions", '{"prompt": ["\\ud800"]}', 400),
    ("completions", '{"prompt": "hi", "echo": true}', 400),
    ("completions", json.dumps({"prompt": list(range(100, 700)), "max_tokens": 1}), 400),
    # bodies that are not a request
    ("chat", "", 400),
    ("chat", "{not json", 400),
    ("chat", "[1, 2]", 400),
    ("chat", '"a string"', 400),
    ("chat", "null", 400),
    ("chat", "42", 400),
    ("chat", NESTED_10K, 400),
    ("chat", NESTED_100K, 400),
    ("completions", '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + "}", 400),
    ("chat", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("chat", b"\x00\x01\x02", 400),
    ("chat", '{"messages": [{"role": "user", "content": "' + "x" * (MAX_BODY_BYTES + 10) + '"}]}', 413),
]

URLS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def test_hostile_bodies_get_4xx_and_the_next_request_is_answered(server):
    url, scheduler, mtp = server
    ref = generate(mtp, _messages(), max_new_tokens=4).text
    with httpx.Client(base_url=url, timeout=60) as client:
        for endpoint, body, status in HOSTILE:
            content = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
            r = client.post(URLS[endpoint], content=content, headers={"Content-Type": "application/json"})
            shown = content[:80]
            assert r.status_code == status, (shown, r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and isinstance(error["message"], str), (shown, error)
            assert "internal error" not in error["message"], (shown, error)
            # The scheduler still runs: a normal request right after is answered, greedy and exact.
            ok = client.post("/v1/chat/completions", json={"messages": _messages(), "max_tokens": 4,
                                                           "temperature": 0})
            assert ok.status_code == 200, (shown, ok.text)
            assert ok.json()["choices"][0]["message"]["content"] == ref, shown
    assert scheduler.alive and scheduler.active == [] and not scheduler.waiting
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_tiny_temperatures_are_answered_as_greedy(server):
    """1e-300 and 5e-324 are valid temperatures (they passed validation and then broke the batch): the limit of
    sampling as T -> 0 is the argmax, so the answer equals the greedy one."""
    url, scheduler, mtp = server
    greedy = generate(mtp, _messages("Tell me a story"), max_new_tokens=12).text
    for t in (1e-300, 5e-324, 1e-40, 1e-8):
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": _messages("Tell me a story"), "max_tokens": 12, "temperature": t,
                             "seed": 3})
        assert r.status_code == 200, (t, r.text)
        assert r.json()["choices"][0]["message"]["content"] == greedy, t


@pytest.mark.parametrize("temperature", ["NaN", "1e-300", "5e-324", "Infinity"])
def test_a_bad_sampling_value_does_not_fail_its_neighbours(server, temperature):
    """Three users decoded in one batch; one sends a hostile temperature. The other two get their exact greedy
    answers, the third a 400 (NaN, Infinity) or a greedy-equal answer (tiny temperatures)."""
    url, scheduler, mtp = server
    prompts = [f"Question {i}: what next?" for i in range(3)]
    refs = [generate(mtp, _messages(p), max_new_tokens=16).text for p in prompts]
    bodies = [json.dumps({"messages": _messages(p), "max_tokens": 16, "temperature": 0}) for p in prompts]
    bodies[1] = bodies[1].replace('"temperature": 0', f'"temperature": {temperature}')
    scheduler.pause()  # admit all three together, into one batch
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/chat/completions", content=b, timeout=120,
                                   headers={"Content-Type": "application/json"}) for b in bodies]
            valid = temperature not in ("NaN", "Infinity")
            _wait_for(lambda: len(scheduler.waiting) == (3 if valid else 2) or futures[1].done(), "queued requests")
            scheduler.resume()
            answers = [f.result() for f in futures]
    finally:
        scheduler.resume()
    for i in (0, 2):
        assert answers[i].status_code == 200, answers[i].text
        assert answers[i].json()["choices"][0]["message"]["content"] == refs[i]
    if temperature in ("NaN", "Infinity"):
        assert answers[1].status_code == 400 and answers[1].json()["error"]["param"] == "temperature"
    else:
        assert answers[1].status_code == 200 and answers[1].json()["choices"][0]["message"]["content"] == refs[1]


def _submit_direct(scheduler, mtp, requests):
    """Submit GenerationRequests straight to the scheduler (past the HTTP checks, as a bug there would) and
    collect what each gets back: the text and its Final, or its Failure."""

    async def run():
        loop = asyncio.get_running_loop()
        for req in requests:
            req.loop, req.queue = loop, asyncio.Queue()
        scheduler.pause()
        try:
            for req in requests:
                scheduler.submit(req)
        finally:
            scheduler.resume()
        results = []
        for req in requests:
            text = ""
            while True:
                item = await asyncio.wait_for(req.queue.get(), timeout=60)
                if isinstance(item, (Final, Failure)):
                    results.append((text, item))
                    break
                text += item.text
        return results

    return asyncio.run(run())


def test_failures_inside_the_scheduler_fail_one_request_alone(server):
    """Defence in depth: values the HTTP layer refuses are forced into the scheduler. A seed torch cannot take
    fails while admitting, a NaN temperature while decoding; the neighbours' answers stay exact and the
    scheduler lives on."""
    url, scheduler, mtp = server
    ids = [prepare_input_ids(mtp, _messages(f"Item {i}"))[0].tolist() for i in range(4)]
    refs = [generate(mtp, x, max_new_tokens=10).text for x in ids]
    nan_sampling = SamplingConfig(temperature=1.0)
    object.__setattr__(nan_sampling, "temperature", float("nan"))  # past the one check, as a bug could
    requests = [GenerationRequest(ids[0], 10), GenerationRequest(ids[1], 10, SamplingConfig(temperature=1.0), 2**64),
                GenerationRequest(ids[2], 10, nan_sampling, 1), GenerationRequest(ids[3], 10)]
    results = _submit_direct(scheduler, mtp, requests)
    assert isinstance(results[0][1], Final) and results[0][0] == refs[0]
    assert isinstance(results[3][1], Final) and results[3][0] == refs[3]
    assert isinstance(results[1][1], Failure) and results[1][1].status == 400 and "seed" in results[1][1].message
    assert isinstance(results[2][1], Failure) and results[2][1].status == 500
    assert scheduler.alive
    r = httpx.post(url + "/v1/chat/completions", json={"messages": _messages(), "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    assert httpx.get(url + "/health").status_code == 200


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Each decoding step takes 30 ms longer, so that a long request is still running when its client leaves."""
    _, scheduler, _ = server
    decoder = scheduler.decoder
    real_step = decoder.step

    def slow_step():
        time.sleep(0.03)
        return real_step()

    monkeypatch.setattr(decoder, "step", slow_step)
    return decoder


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a plain socket (the test decides when the client goes away)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_is_cancelled_within_a_second(server, slow_steps, stream):
    url, scheduler, mtp = server
    cancelled = scheduler.metrics.finished.get("cancelled")
    body = {"messages": _messages("Write a long essay"), "max_tokens": LIMIT, "temperature": 0, "stream": stream}
    sock = _raw_post(url, "/v1/chat/completions", body)
    _wait_for(lambda: scheduler.active and scheduler.active[0].sequence is not None
              and len(scheduler.active[0].sequence.output) >= 3, "decoding to start")
    sequence = scheduler.active[0].sequence
    sock.close()
    left = time.monotonic()
    _wait_for(lambda: not scheduler.active and not slow_steps.running, "the request to be cancelled", timeout=10,
              state=lambda: (scheduler.active, slow_steps.running, sequence.finish_reason, len(sequence.output)))
    assert time.monotonic() - left < 1.5
    assert scheduler.metrics.finished.get("cancelled") == cancelled + 1
    assert sequence.finish_reason == "cancelled" and len(sequence.output) < LIMIT
    r = httpx.post(url + "/v1/chat/completions", json={"messages": _messages(), "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200


def test_a_queued_client_that_leaves_is_dropped(server):
    url, scheduler, _ = server
    scheduler.pause()
    try:
        sock = _raw_post(url, "/v1/chat/completions", {"messages": _messages(), "max_tokens": 5, "temperature": 0})
        _wait_for(lambda: len(scheduler.waiting) == 1, "the request to queue")
        sock.close()
        left = time.monotonic()
        _wait_for(lambda: not scheduler.waiting, "the queued request to be dropped", timeout=10)
        assert time.monotonic() - left < 1.5
    finally:
        scheduler.resume()


def test_health_and_requests_when_the_scheduler_is_not_running(served_files):
    mtp = MTPModel.from_pretrained(str(served_files / "model"), adapter=str(served_files / "adapter"), dtype="fp64")
    app, scheduler = build_server(mtp, mode="quadratic", max_batch=2, max_queue=8, model_name="tiny")
    body = {"messages": _messages(), "max_tokens": 5, "temperature": 0}
    with BackgroundServer(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        scheduler.pause()
        waiting = []
        thread = threading.Thread(target=lambda: waiting.append(
            httpx.post(url + "/v1/chat/completions", json=body, timeout=30)))
        thread.start()
        _wait_for(lambda: len(scheduler.waiting) == 1, "a queued request")
        scheduler.stop()
        thread.join(timeout=10)
        # The queued request is answered (503), not left hanging; new ones are refused at once.
        assert waiting and waiting[0].status_code == 503, waiting
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        started = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert time.monotonic() - started < 5

"""The HTTP server: a real uvicorn server on 127.0.0.1 (free port), a tiny random llama (float64, so batched and
single decoding agree exactly) with the embedded model's real tokenizer and a random adapter."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from maskspec.decode.api import generate
from maskspec.model.mtp import MTPModel
from maskspec.serve.app import BackgroundServer, build_server

KEY = "sk-test-key"
LIMIT = 200  # --max-new-tokens-limit
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def files(served_files):
    return served_files


@pytest.fixture(scope="module")
def server(files):
    mtp = MTPModel.from_pretrained(str(files / "model"), adapter=str(files / "adapter"), dtype="fp64")
    app, scheduler = build_server(mtp, mode="quadratic", max_batch=4, max_queue=64, max_new_tokens_limit=LIMIT,
                                  api_key=KEY, model_name="tiny")
    with BackgroundServer(app) as url:
        yield url, scheduler, mtp
    scheduler.stop()


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _wait_for(condition, what, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _messages(i):
    return [{"role": "user", "content": f"Question {i}: " + "tell me more " * (i % 5)}]


def test_openai_client(server):
    url, scheduler, mtp = server
    client = _client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ref = generate(mtp, messages, max_new_tokens=24, eos_token_ids=[])
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == ref.text
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 24 and chat.usage.prompt_tokens == ref.sequences.shape[1] - 24
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 24
    extra = chat.model_extra["maskspec"]
    assert extra["forward_passes"] >= 1 and extra["tokens_per_pass"] == pytest.approx(24 / extra["forward_passes"],
                                                                                       abs=1e-3)
    # Streaming gives the same text, in the OpenAI chunk format, with usage at the end on request.
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24
    # Text completions (no chat template), plain and streamed.
    ids = mtp.tokenizer("Once upon a time").input_ids
    ref = generate(mtp, ids, max_new_tokens=16, eos_token_ids=[])
    done = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    assert done.choices[0].text == ref.text and done.usage.prompt_tokens == len(ids)
    streamed = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    # Token-id prompts, and a stop string cut out of the greedy text.
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == ref.text
    stop = ref.text[len(ref.text) // 2:len(ref.text) // 2 + 3]
    stopped = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].text == ref.text[:ref.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # Seeded sampling is reproducible.
    sampled = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.9,
                                              seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_concurrent_clients_equal_single_answers(server):
    url, scheduler, mtp = server
    n = 16
    budgets = [8 + 3 * (i % 6) for i in range(n)]
    # References from the single-sequence decoder while the server is idle (it shares the model).
    refs = [generate(mtp, _messages(i), max_new_tokens=budgets[i]).text for i in range(n)]
    before = scheduler.metrics.finished.get("length") + scheduler.metrics.finished.get("eos")

    def ask(i):
        r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=300,
                       json={"model": "tiny", "messages": _messages(i), "max_tokens": budgets[i], "temperature": 0})
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(ask, range(n)))
    assert [status for status, _ in results] == [200] * n
    assert [body["choices"][0]["message"]["content"] for _, body in results] == refs
    after = scheduler.metrics.finished.get("length") + scheduler.metrics.finished.get("eos")
    assert after - before == n
    metrics = httpx.get(url + "/metrics").text
    assert "maskspec_tokens_per_pass_bucket" in metrics and "maskspec_queue_depth 0" in metrics
    assert 'maskspec_batch_size_bucket{le="4"}' in metrics
    assert scheduler.active == [] and not scheduler.waiting


def test_static_server_answers_greedy_clients_exactly_and_samples_with_the_usual_step(files):
    """A server on the static step (4 slots): 8 concurrent greedy clients get the usual decoder's answers, a
    request with temperature > 0 gets the usual step's seeded sample, and the server goes on serving."""
    mtp = MTPModel.from_pretrained(str(files / "model"), adapter=str(files / "adapter"), dtype="fp64")
    n = 8
    budgets = [6 + 3 * (i % 4) for i in range(n)]
    refs = [generate(mtp, _messages(i), max_new_tokens=budgets[i]).text for i in range(n)]
    app, scheduler = build_server(mtp, mode="quadratic", max_batch=4, max_queue=64, max_new_tokens_limit=LIMIT,
                                  model_name="tiny", static=True)
    try:
        with BackgroundServer(app) as url:
            def ask(i, temperature=0):
                r = httpx.post(url + "/v1/chat/completions", timeout=300,
                               json={"model": "tiny", "messages": _messages(i), "max_tokens": budgets[i],
                                     "temperature": temperature, "seed": 3})
                return r.status_code, r.json()

            with ThreadPoolExecutor(max_workers=n) as pool:
                results = list(pool.map(ask, range(n)))
            assert [status for status, _ in results] == [200] * n
            assert [body["choices"][0]["message"]["content"] for _, body in results] == refs
            status, body = ask(1, temperature=0.8)  # sampled: the usual step, the same seeded answer
            assert status == 200
            assert body["choices"][0]["message"]["content"] == generate(mtp, _messages(1), max_new_tokens=budgets[1],
                                                                        temperature=0.8, seed=3).text
            again = ask(2)
            assert again[0] == 200 and again[1]["choices"][0]["message"]["content"] == refs[2]
            sizes = scheduler.metrics.batch_size
            assert sizes.sum > sizes.count  # steps decoded several requests together
            assert scheduler.decoder.static_slots == 4
    finally:
        scheduler.stop()
    assert scheduler.decoder._engine is None and scheduler.active == []


def test_full_queue_answers_429(server):
    url, scheduler, _ = server
    old = scheduler.max_queue
    scheduler.max_queue = 2
    scheduler.pause()
    body = {"messages": _messages(1), "max_tokens": 5, "temperature": 0}
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            waiting = [pool.submit(httpx.post, url + "/v1/chat/completions", headers=AUTH, json=body, timeout=300)
                       for _ in range(2)]
            _wait_for(lambda: len(scheduler.waiting) == 2, "two queued requests")
            refused = [httpx.post(url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60)
                       for _ in range(3)]
            assert [r.status_code for r in refused] == [429] * 3
            assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
            assert "maskspec_queue_depth 2" in httpx.get(url + "/metrics").text
            scheduler.resume()
            assert [f.result().status_code for f in waiting] == [200, 200]
    finally:
        scheduler.max_queue = old
        scheduler.resume()


BAD = [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    ({"messages": "hi"}, "invalid_type", "messages"),
    ({"messages": []}, "invalid_value", "messages"),
    ({}, "missing_required_parameter", "messages"),
    ({"messages": [{"role": "user"}], "max_tokens": "ten"}, "invalid_type", "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "invalid_value", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}, "invalid_value", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "invalid_type", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "invalid_type", "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "invalid_value", "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "invalid_value", "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}, "invalid_type", "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "invalid_value", "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "invalid_type", "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "invalid_type", "seed"),
]


def test_bad_inputs_answer_4xx_and_the_server_keeps_serving(server):
    url, scheduler, mtp = server
    chat = url + "/v1/chat/completions"
    for body, code, param in BAD:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(chat, headers={**AUTH, "Content-Type": "application/json"}, **kwargs)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == code and error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error" and error["message"]
    completions = url + "/v1/completions"
    for body, code in [({"prompt": 3}, "invalid_type"), ({"prompt": [10**9]}, "invalid_value"),
                       ({"prompt": ["a", "b"]}, "invalid_value"), ({"prompt": ""}, "invalid_value")]:
        r = httpx.post(completions, headers=AUTH, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (body, r.text)
    # Context length: prompt + max_tokens beyond 512 tokens, or a prompt that alone does not fit.
    long_prompt = list(range(100, 450))
    r = httpx.post(completions, headers=AUTH, json={"prompt": long_prompt, "max_tokens": LIMIT})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "512" in r.json()["error"]["message"] and "550" in r.json()["error"]["message"]
    r = httpx.post(completions, headers=AUTH, json={"prompt": list(range(100, 700)), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # Without max_tokens the budget is cut to what fits.
    r = httpx.post(completions, headers=AUTH, json={"prompt": list(range(5, 510)), "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 7
    # Authentication.
    r = httpx.post(chat, json={"messages": _messages(0)})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(chat, json={"messages": _messages(0)}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/v1/nothing", headers=AUTH).status_code == 404
    assert httpx.get(chat, headers=AUTH).status_code == 405
    # Unknown fields are ignored; the server still answers.
    r = httpx.post(chat, headers=AUTH, json={"messages": _messages(0), "max_tokens": 4, "temperature": 0,
                                             "logit_bias": {}, "user": "me", "frequency_penalty": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert scheduler.active == [] and not scheduler.waiting


def test_client_disconnect_frees_the_slot(server, monkeypatch):
    url, scheduler, _ = server
    decoder = scheduler.decoder
    real_step = decoder.step

    def slow_step():  # long enough that the request cannot finish before the client leaves
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(decoder, "step", slow_step)
    cancelled = scheduler.metrics.finished.get("cancelled")
    body = {"messages": _messages(2), "max_tokens": LIMIT, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url + "/v1/chat/completions", headers=AUTH, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: ") and '"content": "' in line
                         and '"content": ""' not in line)
            assert json.loads(first[6:])["object"] == "chat.completion.chunk"
    _wait_for(lambda: not scheduler.active and not decoder.running, "the slot to be freed")
    assert scheduler.metrics.finished.get("cancelled") == cancelled + 1
    # Non-streaming requests still work afterwards.
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**body, "stream": False, "max_tokens": 3})
    assert r.status_code == 200


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(files):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "maskspec.cli", "serve", "--model", str(files / "model"), "--adapter",
           str(files / "adapter"), "--port", str(port), "--api-key", KEY, "--dtype", "fp64", "--max-batch", "2",
           "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, "".join(output)
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_for(up, "maskspec serve to start", timeout=180)
        assert httpx.get(url + "/v1/models").status_code == 401
        chat = _client(url).chat.completions.create(model="model", messages=_messages(3), max_tokens=6,
                                                    temperature=0)
        assert chat.usage.completion_tokens == 6 and chat.model == "model"
        assert "maskspec_generated_tokens_total 6" in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "mode quadratic, k 3" in "".join(output)


def test_loadtest_percentiles_interpolate_between_ranks():
    from maskspec.serve.loadtest import percentile

    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0


def test_loadtest_runs_every_cell_and_counts_texts_that_agree(files, tmp_path, capsys):
    """The loadtest end to end on a real server (the tiny float64 model, where every step's greedy text is the
    same): every cell's texts agree with the ar cell of its level; a changed text is counted as a disagreement."""
    from maskspec.serve import loadtest

    out = tmp_path / "loadtest.json"
    loadtest.main(["--model", str(files / "model"), "--adapter", str(files / "adapter"), "--dtype", "fp64",
                   "--clients", "1,3", "--modes", "quadratic,ar", "--static", "--max-tokens", "8",
                   "--max-batch", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["clients"], r["mode"], r["static"]) for r in rows] == [
        (c, m, s) for c in (1, 3) for m in ("quadratic", "ar") for s in (False, True)]
    for r in rows:
        assert r["same_text_as"] == "ar usual" and r["same_text"] == r["requests"] == r["clients"], r
        assert r["tokens"] > 0 and "texts" not in r
    assert "| quadratic | static | 3 | 3 |" in capsys.readouterr().out

    level = [{"mode": "quadratic", "static": False, "texts": ["a", "b", "c"]}]
    loadtest.mark_agreement(level, ("ar", False))
    assert level[0]["same_text"] is None  # the reference has not run yet
    level.append({"mode": "ar", "static": False, "texts": ["a", "B", "c"]})
    loadtest.mark_agreement(level, ("ar", False))
    assert [r["same_text"] for r in level] == [2, 3]

"""The one chat-message check (`maskspec.messages.validate_messages`): every rule on its own, and the same rule
answered by its callers, the HTTP server (a 400 with `param` and `code` from the error), training and
distillation data (DataError) and bench suites. Each caller's message must be the validator's own message, so a
caller with a check of its own fails here."""

import json

import httpx
import pytest

from maskspec.bench.suites import load_suite
from maskspec.errors import MaskspecError
from maskspec.messages import ROLES, MessagesError, check_text, validate_messages
from maskspec.model.mtp import MTPModel
from maskspec.serve.app import BackgroundServer, build_server
from maskspec.train.data import DataError, load_chat_records
from maskspec.train.distill import read_prompts

USER = {"role": "user", "content": "hi"}
REPLY = {"role": "assistant", "content": "hello"}
SERVER = {"where": "the request", "allow_text_parts": True, "allow_null_content": True}

# (messages, kind, index, field, a fragment of the message): refused by every caller.
REFUSED = [
    ("hi", "type", None, None, "'messages' must be a list"),
    ({"role": "user"}, "type", None, None, "'messages' must be a list"),
    ([], "value", None, None, "'messages' is empty"),
    ([1], "type", 0, None, "message 0 must be an object with 'role' and 'content', got a number"),
    ([None], "type", 0, None, "message 0 must be an object"),
    ([USER, "x"], "type", 1, None, "message 1 must be an object"),
    ([{"content": "x"}], "value", 0, "role", "message 0 must be an object with 'role' and 'content' (it has no"),
    ([{"role": "wizard", "content": "x"}], "value", 0, "role", "message 0 has unknown role 'wizard'"),
    ([USER, {"role": ["user"], "content": "x"}], "value", 1, "role", "message 1 has unknown role ['user']"),
    ([{"role": "User", "content": "x"}], "value", 0, "role", "expected one of system, user, assistant"),
    ([{"role": "user", "content": 5}], "type", 0, "content", "message 0 content must be a string"),
    ([{"role": "user", "content": {"text": "x"}}], "type", 0, "content", "got an object"),
    ([{"role": "user", "content": "\ud800"}], "value", 0, "content", "message 0 content is not valid Unicode"),
    ([USER, {"role": "user", "content": "ok \udfff then"}], "value", 1, "content", "at character 3"),
]


def _param(index, field):
    return "messages" if index is None else f"messages[{index}]" + (f".{field}" if field else "")


def _jsonl(path, record):
    # ensure_ascii keeps lone surrogates as \\ud800 escapes, as a JSON file written elsewhere would hold them
    path.write_text(json.dumps(record, ensure_ascii=True) + "\n")
    return path


# ---------------------------------------------------------------------- the validator
@pytest.mark.parametrize("messages, kind, index, field, fragment", REFUSED)
def test_each_rule_raises_one_error_naming_where_message_and_field(messages, kind, index, field, fragment):
    for flags in ({}, {"allow_text_parts": True, "allow_null_content": True}, {"need_assistant": True}):
        with pytest.raises(MessagesError) as exc:
            validate_messages(messages, where="data.jsonl:7", **flags)
        assert str(exc.value).startswith("data.jsonl:7: ") and fragment in str(exc.value), (flags, exc.value)
        assert (exc.value.kind, exc.value.index, exc.value.field) == (kind, index, field)
        assert isinstance(exc.value, MaskspecError) and isinstance(exc.value, ValueError)
        assert "\n" not in str(exc.value)


def test_valid_conversations_come_back_as_role_and_content():
    messages = [{"role": role, "content": f"text {role}", "name": "x"} for role in ROLES]
    assert validate_messages(messages, where="w") == [{"role": r, "content": f"text {r}"} for r in ROLES]
    assert ROLES == ("system", "user", "assistant", "tool", "developer")


def test_null_content_only_where_allowed():
    for messages in ([{"role": "user"}], [{"role": "user", "content": None}]):
        assert validate_messages(messages, where="w", allow_null_content=True) == [{"role": "user", "content": ""}]
        with pytest.raises(MessagesError, match="message 0") as exc:
            validate_messages(messages, where="w")
        assert (exc.value.kind, exc.value.field) == ("type", "content")


def test_text_parts_only_where_allowed():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert validate_messages(parts, where="w", allow_text_parts=True) == [{"role": "user", "content": "ab"}]
    with pytest.raises(MessagesError, match="content must be a string, got a list") as exc:
        validate_messages(parts, where="w")
    assert exc.value.kind == "type"
    for bad in ([{"type": "image_url", "image_url": "x"}], [{"type": "text", "text": 3}], ["text"]):
        with pytest.raises(MessagesError, match="only text parts") as exc:
            validate_messages([{"role": "user", "content": bad}], where="w", allow_text_parts=True)
        assert (exc.value.kind, exc.value.index, exc.value.field) == ("value", 0, "content")
    with pytest.raises(MessagesError, match="not valid Unicode") as exc:
        validate_messages([{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}], where="w",
                          allow_text_parts=True)
    assert exc.value.kind == "value"


def test_need_assistant():
    assert validate_messages([USER, REPLY], where="w", need_assistant=True) == [USER, REPLY]
    assert validate_messages([USER], where="w") == [USER]
    with pytest.raises(MessagesError, match="^w: no assistant message") as exc:
        validate_messages([USER], where="w", need_assistant=True)
    assert (exc.value.kind, exc.value.index) == ("value", None)


def test_any_string_role_for_the_python_api():
    flags = {"where": "messages", "strict_roles": False, "allow_text_parts": True, "allow_null_content": True}
    assert validate_messages([{"role": "ipython", "content": "x"}], **flags) == [{"role": "ipython", "content": "x"}]
    with pytest.raises(MessagesError, match="^messages: message 0 role must be a string, got a list") as exc:
        validate_messages([{"role": ["user"], "content": "x"}], **flags)
    assert (exc.value.kind, exc.value.field) == ("type", "role")
    with pytest.raises(MessagesError, match="it has no 'role'"):
        validate_messages([{"content": "x"}], **flags)


def test_check_text():
    assert check_text("héllo 😀", "the prompt") == "héllo 😀"
    with pytest.raises(MaskspecError, match="^the prompt is not valid Unicode text: .* at character 2$"):
        check_text("ab\udc80", "the prompt")


# ---------------------------------------------------------------------- training and distillation data
@pytest.mark.parametrize("messages, kind, index, field, fragment", REFUSED)
def test_training_and_distill_records_raise_the_validators_error_as_data_error(tmp_path, messages, kind, index,
                                                                              field, fragment):
    path = _jsonl(tmp_path / "d.jsonl", {"id": "1", "messages": messages})
    with pytest.raises(MessagesError) as expected:
        validate_messages(messages, where=f"{path}:1")
    for load in (load_chat_records, read_prompts):
        with pytest.raises(DataError) as exc:
            load(path)
        assert str(exc.value) == str(expected.value), load


def test_training_needs_an_assistant_reply_distill_does_not(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", {"id": "1", "messages": [USER]})
    with pytest.raises(DataError, match="d.jsonl:1: no assistant message"):
        load_chat_records(path)
    assert read_prompts(path)[0]["messages"] == [USER]
    for messages in ([{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": []}]):
        path = _jsonl(tmp_path / "d.jsonl", {"id": "1", "messages": messages + [REPLY]})
        with pytest.raises(DataError, match="message 0"):
            load_chat_records(path)


# ---------------------------------------------------------------------- bench suites
@pytest.mark.parametrize("messages, kind, index, field, fragment", REFUSED)
def test_bench_suites_raise_the_validators_error(tmp_path, messages, kind, index, field, fragment):
    path = _jsonl(tmp_path / "suite.jsonl", {"id": "a", "domain": "chat", "messages": messages})
    with pytest.raises(MessagesError) as expected:
        validate_messages(messages, where=f"{path}:1")
    with pytest.raises(MessagesError) as exc:
        load_suite(path)
    assert str(exc.value) == str(expected.value)


# ---------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(served_files):
    mtp = MTPModel.from_pretrained(str(served_files / "model"), adapter=str(served_files / "adapter"), dtype="fp64")
    app, scheduler = build_server(mtp, mode="quadratic", max_batch=2, max_queue=8, max_new_tokens_limit=16,
                                  model_name="tiny")
    with BackgroundServer(app) as url:
        yield url
    scheduler.stop()


def _post(url, messages):
    body = json.dumps({"messages": messages, "max_tokens": 1, "temperature": 0}, ensure_ascii=True)
    return httpx.post(url + "/v1/chat/completions", content=body, timeout=60,
                      headers={"Content-Type": "application/json"})


SERVER_ONLY = [  # text parts: only the server accepts them, so only it can refuse a bad one
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "value", 0, "content"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "value", 0, "content"),
    ([{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}], "value", 0, "content"),
]


@pytest.mark.slow
def test_the_server_answers_the_validators_error_as_a_400(server):
    cases = [(m, kind, index, field) for m, kind, index, field, _ in REFUSED] + SERVER_ONLY
    for messages, kind, index, field in cases:
        r = _post(server, messages)
        assert r.status_code == 400, (messages, r.text)
        with pytest.raises(MessagesError) as expected:
            validate_messages(messages, **SERVER)
        assert r.json()["error"] == {"message": str(expected.value), "type": "invalid_request_error",
                                     "param": _param(index, field),
                                     "code": "invalid_type" if kind == "type" else "invalid_value"}, messages
    r = httpx.post(server + "/v1/chat/completions", json={"max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"


@pytest.mark.slow
def test_the_server_accepts_null_content_text_parts_and_every_role(server):
    ok = [[{"role": "system"}, USER],
          [{"role": "system", "content": None}, USER],
          [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
          [{"role": "developer", "content": "Be brief."}, USER, REPLY, USER]]
    for messages in ok:
        r = _post(server, messages)
        assert r.status_code == 200, (messages, r.text)

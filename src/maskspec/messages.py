"""Chat messages: the one check of a conversation, for the Python API, the server, training data and bench suites.

A conversation is a non-empty list of objects, each with a `role` (one of ROLES) and a `content` string of valid
Unicode text. Callers differ only in what else they accept (null content, OpenAI text parts, any role string,
the need for an assistant reply); `validate_messages` takes those as flags and raises `MessagesError`, which
names where the conversation came from and the offending message and field.
"""

from __future__ import annotations

from typing import Any, Literal

from maskspec.errors import MaskspecError

ROLES = ("system", "user", "assistant", "tool", "developer")

_MISSING = object()


class MessagesError(MaskspecError, ValueError):
    """A conversation that is not a valid list of chat messages.

    `index` is the offending message (None: the list as a whole), `field` the offending key ("role", "content",
    or None: the message itself) and `kind` "type" (the JSON type is wrong: not a list, not an object, content
    not a string) or "value" (the type is right, the value is not allowed: an empty list, a role outside ROLES,
    a part that is not text, text that is not valid Unicode)."""

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None,
                 kind: Literal["type", "value"] = "value") -> None:
        super().__init__(message)
        self.index, self.field, self.kind = index, field, kind


def check_text(text: str, what: str) -> str:
    """`text` if it is Unicode text a tokenizer can encode; lone UTF-16 surrogates (from JSON escapes, or bytes
    that were not UTF-8 read with surrogateescape) are not. MaskspecError naming `what` otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MaskspecError(f"{what} is not valid Unicode text: a lone surrogate or a byte that is not UTF-8 at "
                            f"character {exc.start}") from None
    return text


def validate_messages(messages: Any, *, where: str, need_assistant: bool = False, allow_text_parts: bool = False,
                      allow_null_content: bool = False, strict_roles: bool = True) -> list[dict[str, str]]:
    """Check a conversation and return it as [{"role", "content"}] dicts (other keys dropped).

    `where` starts every error message ("data.jsonl:3", "the request"). `need_assistant`: at least one
    assistant message (training data). `allow_text_parts`: content may be a list of OpenAI text parts
    ({"type": "text", "text": ...}), joined into one string. `allow_null_content`: a missing or null content
    is "". `strict_roles=False` accepts any string role (chat templates with roles of their own)."""
    if not isinstance(messages, list):
        raise MessagesError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects, got "
                            f"{_type_name(messages)}", kind="type")
    if not messages:
        raise MessagesError(f"{where}: 'messages' is empty: give at least one message", kind="value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MessagesError(f"{where}: message {i} must be an object with 'role' and 'content', got "
                                f"{_type_name(m)}", index=i, kind="type")
        out.append({"role": _role(m, where, i, strict_roles),
                    "content": _content(m, where, i, allow_text_parts, allow_null_content)})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise MessagesError(f"{where}: no assistant message to train on (run `maskspec distill` to add responses)",
                            kind="value")
    return out


def _role(m: dict, where: str, i: int, strict: bool) -> str:
    role = m.get("role", _MISSING)
    if role is _MISSING:
        raise MessagesError(f"{where}: message {i} must be an object with 'role' and 'content' (it has no 'role')",
                            index=i, field="role", kind="value")
    # Strict roles are an enumeration: anything outside it, of whatever type, is a wrong value.
    if strict and (not isinstance(role, str) or role not in ROLES):
        raise MessagesError(f"{where}: message {i} has unknown role {_show(role)} (expected one of "
                            f"{', '.join(ROLES)})", index=i, field="role", kind="value")
    if not isinstance(role, str):
        raise MessagesError(f"{where}: message {i} role must be a string, got {_type_name(role)}", index=i,
                            field="role", kind="type")
    return role


def _content(m: dict, where: str, i: int, allow_text_parts: bool, allow_null: bool) -> str:
    content = m.get("content", _MISSING)
    if allow_null and (content is _MISSING or content is None):
        return ""
    if content is _MISSING:
        raise MessagesError(f"{where}: message {i} must be an object with 'role' and 'content' (it has no "
                            "'content')", index=i, field="content", kind="type")
    if allow_text_parts and isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MessagesError(f"{where}: message {i} content part {j}: only text parts "
                                    "({\"type\": \"text\", \"text\": ...}) are supported", index=i,
                                    field="content", kind="value")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        what = "a string or a list of text parts" if allow_text_parts else "a string"
        raise MessagesError(f"{where}: message {i} content must be {what}, got {_type_name(content)}", index=i,
                            field="content", kind="type")
    try:
        return check_text(content, f"{where}: message {i} content")
    except MaskspecError as exc:
        raise MessagesError(str(exc), index=i, field="content", kind="value") from None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    names = {str: "a string", list: "a list", dict: "an object"}
    return next((name for t, name in names.items() if isinstance(value, t)), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

"""Benchmark suites: prompt files read into `BenchPrompt`s.

Two line formats are accepted (JSON Lines, one object per line, blank lines skipped):

- the project's prompt schema (see the data README): `domain`, `messages` (a chat), optional `id` and
  `reference` (the gold answer, e.g. GSM8K's final number);
- Spec-Bench's `question.jsonl`: `category` (used as the domain), `turns` (a list of user messages; only the
  first turn is used), optional `question_id`.

Without a suite file the small built-in suite (`suite.jsonl` next to this module: knowledge, math, code, chat and
safety, three prompts each, math with references) is used, so the benchmark works offline.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from maskspec.errors import MaskspecError
from maskspec.messages import validate_messages

BUILTIN_SUITE = Path(__file__).with_name("suite.jsonl")

T = TypeVar("T")


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    domain: str
    messages: list[dict[str, str]]
    reference: str | None = None


def _fail(path: Path, line_no: int, why: str) -> MaskspecError:
    return MaskspecError(f"{path}:{line_no}: {why}")


def parse_suite_line(record: Any, path: Path, line_no: int) -> BenchPrompt:
    """One decoded JSON line of either supported format -> BenchPrompt (MaskspecError naming file:line)."""
    if not isinstance(record, dict):
        raise _fail(path, line_no, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        domain = record.get("domain")
        if not isinstance(domain, str) or not domain:
            raise _fail(path, line_no, "missing or empty 'domain' (a string such as \"math\")")
        messages = validate_messages(record["messages"], where=f"{path}:{line_no}")
        prompt_id = record.get("id", f"{path.stem}-{line_no}")
    elif "turns" in record:  # Spec-Bench question.jsonl
        domain = record.get("category")
        if not isinstance(domain, str) or not domain:
            raise _fail(path, line_no, "missing or empty 'category' in a Spec-Bench line")
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise _fail(path, line_no, "'turns' must be a non-empty list of strings")
        messages = [{"role": "user", "content": turns[0]}]
        prompt_id = record.get("question_id", record.get("id", f"{path.stem}-{line_no}"))
    else:
        raise _fail(path, line_no, "a suite line needs 'domain' + 'messages' (maskspec prompt schema) or "
                                   "'category' + 'turns' (Spec-Bench question.jsonl)")
    reference = record.get("reference")
    if reference is not None and not isinstance(reference, (str, int, float)):
        reference = None  # e.g. Spec-Bench's per-turn reference lists: not a single gold answer
    return BenchPrompt(id=str(prompt_id), domain=domain, messages=messages,
                       reference=None if reference is None else str(reference))


def load_suite(path: str | Path | None = None) -> list[BenchPrompt]:
    """Read a suite file (default: the built-in suite). Raises MaskspecError naming the file and line."""
    path = Path(path) if path is not None else BUILTIN_SUITE
    if not path.is_file():
        raise MaskspecError(f"suite file {path} does not exist; pass a JSON Lines prompt file to --suite")
    prompts: list[BenchPrompt] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MaskspecError(f"suite file {path} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise MaskspecError(f"cannot read suite file {path}: {exc.strerror or exc}") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(path, line_no, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        prompts.append(parse_suite_line(record, path, line_no))
    if not prompts:
        raise MaskspecError(f"suite file {path} holds no prompts")
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise MaskspecError(f"suite file {path}: prompt id {p.id!r} occurs more than once; ids must be unique")
        seen.add(p.id)
    return prompts


def select_prompts(prompts: list[BenchPrompt], domains: list[str] | None = None,
                   n_per_domain: int | None = None) -> list[BenchPrompt]:
    """Keep the given domains (in the order given; default: every domain in file order) and the first
    `n_per_domain` prompts of each. The result is grouped by domain."""
    by_domain: "OrderedDict[str, list[BenchPrompt]]" = OrderedDict()
    for p in prompts:
        by_domain.setdefault(p.domain, []).append(p)
    if domains:
        unknown = [d for d in domains if d not in by_domain]
        if unknown:
            raise MaskspecError(f"domain(s) {', '.join(unknown)} not in the suite; it has: "
                                f"{', '.join(by_domain)}")
        order = list(dict.fromkeys(domains))
    else:
        order = list(by_domain)
    if n_per_domain is not None and n_per_domain < 1:
        raise MaskspecError(f"--n must be at least 1, got {n_per_domain}")
    selected: list[BenchPrompt] = []
    for domain in order:
        selected.extend(by_domain[domain][:n_per_domain] if n_per_domain else by_domain[domain])
    return selected


def take_turns(queues: Sequence[Sequence[T]]) -> list[T]:
    """The queues' items with the queues taking turns (the first of each, then the second of each, ...), each
    queue's own order kept; a queue that runs out drops out."""
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def in_domain_turns(prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """The prompts with the domains taking turns in the order they first appear (`take_turns`): a run stopped
    early (`bench --time-limit`) has covered every domain alike."""
    by_domain: "OrderedDict[str, list[BenchPrompt]]" = OrderedDict()
    for p in prompts:
        by_domain.setdefault(p.domain, []).append(p)
    return take_turns(list(by_domain.values()))

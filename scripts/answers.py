"""Distilled answers stored compactly, keyed by prompt id (the prompts themselves stay in ../shared/data).

    python scripts/answers.py pack DISTILL_OUT.jsonl ANSWERS.jsonl.gz     # add a distill run's answers
    python scripts/answers.py unpack PROMPTS.jsonl ANSWERS.jsonl.gz OUT.jsonl [--limit N]
    python scripts/answers.py info ANSWERS.jsonl.gz

An answers file is gzip-compressed JSON Lines: a header {"format": "maskspec-answers", "version": 1,
"distill": {model, temperature, top_p, max_new_tokens, seed}} and then one {"id", "answer", "finish_reason",
"new_tokens"} per prompt. `pack` merges a `maskspec distill` output into it (answers already there are kept; the
distill settings must match the header's). `unpack` rebuilds the chat records `maskspec distill` would have
written, in the file order of PROMPTS.jsonl, for the ids it has: `maskspec train --data OUT.jsonl` trains on
them and `maskspec distill --out OUT.jsonl` goes on answering the rest (it skips the ids already there).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

from maskspec.errors import MaskspecError
from maskspec.files import atomic_write_bytes
from maskspec.train.distill import distill_record, load_done_ids, read_prompts

FORMAT = {"format": "maskspec-answers", "version": 1}
SETTINGS = ("model", "temperature", "top_p", "max_new_tokens", "seed")


def read_answers(path: Path) -> tuple[dict, dict[str, dict]]:
    """(the header's distill settings, id -> answer entry); empty for a file that does not exist."""
    if not path.exists():
        return {}, {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or {k: lines[0].get(k) for k in FORMAT} != FORMAT:
        raise SystemExit(f"error: {path} is not a maskspec answers file")
    return lines[0]["distill"], {entry["id"]: entry for entry in lines[1:]}


def write_answers(path: Path, settings: dict, answers: dict[str, dict]) -> None:
    lines = [json.dumps({**FORMAT, "distill": settings})]
    lines += [json.dumps(answers[i], ensure_ascii=False) for i in sorted(answers)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0))


def pack(distill_out: Path, path: Path) -> None:
    load_done_ids(distill_out)  # refuses a file that is not distill output (and repairs a torn last line)
    settings, answers = read_answers(path)
    added = 0
    with open(distill_out, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            meta = record["distill"]
            run = {k: meta[k] for k in SETTINGS}
            if settings and run != settings:
                raise SystemExit(f"error: {distill_out} was made with {run}, {path} holds answers made with "
                                 f"{settings}; pack it into another file")
            settings = run
            if record["id"] not in answers:
                answers[record["id"]] = {"id": record["id"], "answer": record["messages"][-1]["content"],
                                         "finish_reason": meta["finish_reason"], "new_tokens": meta["new_tokens"]}
                added += 1
    write_answers(path, settings, answers)
    print(f"{path}: {added} answers added, {len(answers)} in all")


def unpack(prompts: Path, path: Path, out: Path, limit: int | None) -> None:
    settings, answers = read_answers(path)
    if out.exists():
        raise SystemExit(f"error: {out} exists; unpack into a new file")
    lines = []
    for prompt in read_prompts(prompts):
        entry = answers.get(prompt["id"])
        if entry is None:
            continue
        record = distill_record(prompt, entry["answer"], settings, entry["finish_reason"], entry["new_tokens"])
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if limit is not None and len(lines) >= limit:
            break
    atomic_write_bytes(out, "".join(lines).encode("utf-8"))
    print(f"{out}: {len(lines)} records from {len(answers)} stored answers")


def info(path: Path) -> None:
    settings, answers = read_answers(path)
    domains = collections.Counter(i.rsplit("-", 1)[0] for i in answers)
    tokens = sum(a["new_tokens"] for a in answers.values())
    print(f"{path}: {len(answers)} answers, {tokens} answer tokens, made with {settings}")
    for source, n in domains.most_common():
        print(f"  {source}: {n}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("distill_out", type=Path)
    a.add_argument("answers", type=Path)
    b = sub.add_parser("unpack")
    b.add_argument("prompts", type=Path)
    b.add_argument("answers", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--limit", type=int, default=None)
    c = sub.add_parser("info")
    c.add_argument("answers", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            pack(args.distill_out, args.answers)
        elif args.command == "unpack":
            unpack(args.prompts, args.answers, args.out, args.limit)
        else:
            info(args.answers)
    except MaskspecError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())

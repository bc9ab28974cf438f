"""Self-distillation: the base model answers training prompts, giving chat records to train the adapter on.

Training on the model's own answers matches what it will be asked to predict when decoding (method.md §3).

Answers come from maskspec's own decoder in mode `ar` (plain decoding, token-identical to greedy `generate` in
float64; in float32 its kernels round differently in the last bits, see the README): up to `batch_size` sequences
decode together and a finished one leaves the batch at once, its place taken by the next prompt (continuous
batching), so no pass is spent on answers that have ended. Prompts are admitted by length within windows of the
selected order (less padding in a prefill; the messages' length in characters stands in for their tokens), and
records are written in the selected order. `shard` splits one run over several processes or machines: shard I of N
answers every N-th selected prompt from the I-th on, into its own output, with the answers the whole run would give
(`scripts/answers.py pack` merges the outputs).

Resumable and deterministic: each prompt is sampled with its own generator, seeded from (seed, prompt id), so its
answer does not depend on which prompts share its batch, and a run that was interrupted and resumed writes the
same records as an uninterrupted one. Each record is one `write` of a whole line followed by a flush; on resume,
ids already in the output are skipped and a trailing partial line (a killed writer) is cut off. A file that is
not distill output is refused before anything is written to it.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from maskspec.bench.suites import take_turns
from maskspec.decode.stopping import cut_at_eos, openai_finish_reason
from maskspec.errors import PromptTooLongError, UsageError
from maskspec.files import unwritable_reason
from maskspec.train.data import DataError, _render, check_messages, iter_jsonl


@dataclass
class DistillConfig:
    prompts: str
    out: str
    model: str = "default"
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy, the answers greedy decoding will reproduce
    top_p: float = 1.0
    batch_size: int = 16
    limit: int | None = None
    per_domain: int | None = None
    shuffle: bool = False
    balanced: bool = False
    shard: tuple[int, int] | None = None  # (I, N): every N-th selected prompt from the I-th on
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    progress: bool = True


@dataclass
class DistillStats:
    selected: int = 0
    already_done: int = 0
    written: int = 0
    too_long: int = 0  # prompts longer than the model's context: skipped (no record)
    repaired_partial_line: bool = False


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` as (I, N) (distill checks 0 <= I < N); anything else is a UsageError."""
    index, sep, count = text.partition("/")
    if sep and index.strip().isdigit() and count.strip().isdigit():
        return int(index), int(count)
    raise UsageError(f"--shard must be I/N, e.g. 0/2 and 1/2 for two processes, got {text!r}")


def select_prompts(records: Sequence[dict[str, Any]], *, per_domain: int | None = None, limit: int | None = None,
                   shuffle: bool = False, balanced: bool = False, seed: int = 0,
                   shard: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Optionally a seeded sample of `per_domain` prompts from each domain (file order kept), optionally put in a
    seeded random order (`shuffle`: a run stopped early has answered a mix of all domains) or in a domain-balanced
    one (`balanced`: the domains take turns, each in its own seeded random order, so any prefix holds about as
    many prompts of every domain that has any left), then the first `limit`, then of those the `shard` (I, N): every
    N-th from the I-th on."""
    chosen = list(records)
    if per_domain is not None:
        by_domain: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(chosen):
            by_domain[str(r.get("domain", ""))].append(i)
        keep: set[int] = set()
        gen = torch.Generator().manual_seed(seed)
        for domain in sorted(by_domain):
            idx = by_domain[domain]
            order = torch.randperm(len(idx), generator=gen).tolist()[:per_domain]
            keep.update(idx[j] for j in order)
        chosen = [r for i, r in enumerate(chosen) if i in keep]
    if shuffle:
        order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed + 7)).tolist()
        chosen = [chosen[i] for i in order]
    if balanced:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in chosen:
            groups[str(r.get("domain", ""))].append(r)
        gen = torch.Generator().manual_seed(seed + 11)
        queues = [[g[i] for i in torch.randperm(len(g), generator=gen).tolist()] for _, g in sorted(groups.items())]
        chosen = take_turns(queues)
    if limit is not None:
        chosen = chosen[:limit]
    if shard is not None:
        chosen = chosen[shard[0]::shard[1]]
    return chosen


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt records (data/README.md schema): each needs a unique `id` and `messages`. A trailing assistant
    message is dropped, so an existing chat set can be re-answered by the model."""
    records, seen = [], set()
    for number, obj in iter_jsonl(path):
        where = f"{path}:{number}"
        if "id" not in obj:
            raise DataError(f"{where}: record has no 'id'")
        rid = str(obj["id"])
        if rid in seen:
            raise DataError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        messages = check_messages(obj.get("messages"), where, need_assistant=False)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise DataError(f"{where}: no prompt messages before the assistant reply")
        records.append({**obj, "id": rid, "messages": messages})
    if not records:
        raise DataError(f"{path} holds no prompts")
    return records


# Every record distill() writes is `json.dumps` of a dict whose first key is "id": a line starts with this.
RECORD_PREFIX = b'{"id": '


def _is_record(obj: Any) -> bool:
    return (isinstance(obj, dict) and "id" in obj and isinstance(obj.get("messages"), list)
            and isinstance(obj.get("distill"), dict))


def _not_distill_output(out: Path, why: str) -> DataError:
    return DataError(f"{why}: --out {out} is not `maskspec distill` output (left untouched); choose another --out")


def load_done_ids(out: str | Path) -> tuple[set[str], bool]:
    """Ids already written to `out`, repairing a trailing partial line left by a killed run. Returns
    (ids, whether a partial line was cut off). The whole file is checked first: every complete line must be a
    distill record and a partial last line must look like the start of one; otherwise DataError, and the file
    is not changed."""
    out = Path(out)
    if not out.exists():
        return set(), False
    if not out.is_file():
        raise DataError(f"--out {out} is not a file; distill writes a JSONL file: choose a file path for --out")
    try:
        data = out.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read --out {out}: {exc.strerror or exc}") from None
    keep = data.rfind(b"\n") + 1
    lines = data[:keep].split(b"\n")[:-1]
    tail = data[keep:]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append((number, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError:
            raise _not_distill_output(out, f"{out}:{number}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise _not_distill_output(out, f"{out}:{number}: not valid JSON ({exc.msg})") from None
    done = set()
    for number, obj in records:
        if not _is_record(obj):
            raise _not_distill_output(out, f"{out}:{number}: not a distill record (an object with 'id', "
                                           "'messages' and 'distill')")
        done.add(str(obj["id"]))
    if not tail:
        return done, False
    # Bytes after the last newline: a record whose write was interrupted, if it starts as our records do.
    if not tail.startswith(RECORD_PREFIX):
        raise _not_distill_output(out, f"{out}:{len(lines) + 1}: an unfinished last line that is not a distill "
                                       "record")
    try:
        whole = json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        whole = None  # cut in the middle of a record, as a killed writer leaves it
    if whole is not None and not _is_record(whole):
        raise _not_distill_output(out, f"{out}:{len(lines) + 1}: not a distill record")
    # Cut it off; that record is generated again.
    with open(out, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return done, True


def _check_out_path(out: Path, prompts: Path) -> None:
    """--out must be a file path (missing or a file) that is not the prompt file."""
    if out.exists() and not out.is_file():
        raise DataError(f"--out {out} is not a file; distill writes a JSONL file: choose a file path for --out")
    reason = unwritable_reason(out)
    if reason is not None:
        raise DataError(f"--out {out}: {reason}")
    same = out.resolve() == prompts.resolve()
    if not same and out.exists() and prompts.exists():
        same = os.path.samefile(out, prompts)
    if same:
        raise DataError(f"--out {out} is the --prompts file; distill appends answers to --out: choose another file")


def distill_record(prompt: dict[str, Any], answer: str, settings: dict[str, Any], finish_reason: str,
                   new_tokens: int) -> dict[str, Any]:
    """The chat record distillation writes for `prompt` (read_prompts' form) answered with `answer`: the prompt's
    fields, its messages plus the assistant answer, and a `distill` object (the `settings` it was made with: model,
    temperature, top_p, max_new_tokens, seed; and its finish reason and new token count, EOS included)."""
    return {"id": prompt["id"], **{k: v for k, v in prompt.items() if k not in ("id", "messages")},
            "messages": prompt["messages"] + [{"role": "assistant", "content": answer}],
            "distill": {**settings, "finish_reason": finish_reason, "new_tokens": new_tokens}}


def _prompt_seed(seed: int, prompt_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(prompt_id.encode("utf-8"))) % (2**62)


# Prompts are admitted shortest first within windows of this many batches of the selected order. A batch's cache
# is as wide as its longest sequence, so batch-mates of similar length waste less attention on padding: 16 answered
# 256 balanced prompts 1.18x faster than 2, with the same answers (results/cpu-2026-12-04/distill-window.txt).
# Records are written in order, so about one window is what a killed run loses at most.
ADMISSION_WINDOW = 16


def admission_order(lengths: Sequence[int], batch_size: int) -> list[int]:
    """Indices of the prompts in the order they join the decoder: the selected order cut into windows of
    ADMISSION_WINDOW * batch_size prompts, each window sorted by prompt length (stable), so that prompts decoded
    together have similar lengths while a partial run still covers the selected order's start."""
    window = ADMISSION_WINDOW * batch_size
    order: list[int] = []
    for start in range(0, len(lengths), window):
        order += sorted(range(start, min(start + window, len(lengths))), key=lambda i: lengths[i])
    return order


class _InOrderWriter:
    """Writes finished records in the selected order: one that finishes early waits for those before it. Counts
    what it writes (`written`) and advances the progress bar, whichever call released the records."""

    def __init__(self, f: Any, positions: Sequence[int], bar: Any) -> None:
        self.f, self.bar, self.waiting, self.order, self.next, self.written = f, bar, {}, list(positions), 0, 0

    def add(self, position: int, line: str | None) -> None:
        """Queue the record at `position` (None: that prompt has none) and write what is now in order."""
        self.waiting[position] = line
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            line = self.waiting.pop(self.order[self.next])
            if line is not None:
                self.f.write(line)  # one write per whole record
                self.f.flush()
                self.written += 1
                self.bar.update(1)
            self.next += 1


def distill(cfg: DistillConfig, *, model=None, tokenizer=None) -> DistillStats:
    """Answer the selected prompts with the base model and append chat records to `cfg.out` (see module doc)."""
    from tqdm.auto import tqdm

    from maskspec.decode.decoder import Decoder
    from maskspec.decode.verify import SamplingConfig, check_sampling
    from maskspec.hub import load_model_and_tokenizer, parse_dtype, resolve_device
    from maskspec.model.mtp import MTPConfig, MTPModel, _eos_ids

    # Every option and the output path are checked before anything is read, written or loaded.
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be >= 1")
    if cfg.limit is not None and cfg.limit < 0:
        raise UsageError(f"--limit must be >= 0, got {cfg.limit}")
    if cfg.per_domain is not None and cfg.per_domain < 1:
        raise UsageError(f"--per-domain must be >= 1, got {cfg.per_domain}")
    if cfg.shard is not None and not 0 <= cfg.shard[0] < cfg.shard[1]:
        raise UsageError(f"--shard I/N needs 0 <= I < N, got {cfg.shard[0]}/{cfg.shard[1]}")
    check_sampling(cfg.temperature, cfg.top_p, seed=cfg.seed)
    device = resolve_device(cfg.device)
    parse_dtype(cfg.dtype)
    _check_out_path(Path(cfg.out), Path(cfg.prompts))
    selected = select_prompts(read_prompts(cfg.prompts), per_domain=cfg.per_domain, limit=cfg.limit,
                              shuffle=cfg.shuffle, balanced=cfg.balanced, seed=cfg.seed, shard=cfg.shard)
    done, repaired = load_done_ids(cfg.out)
    stats = DistillStats(selected=len(selected), already_done=sum(r["id"] in done for r in selected),
                         repaired_partial_line=repaired)
    if stats.already_done == len(selected):
        return stats
    if model is None:
        model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, device=device)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"model {cfg.model!r} has no tokenizer with a chat template; distill needs a chat model")
    eos = _eos_ids(model, tokenizer)
    model_name = getattr(model.config, "name_or_path", "") or cfg.model
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)

    settings = {"model": model_name, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    todo = [i for i, r in enumerate(selected) if r["id"] not in done]
    # Admission by length: the characters of the messages stand in for tokens (rendering 70k prompts up front
    # would take minutes); each prompt is rendered when it joins.
    lengths = [sum(len(m["content"]) for m in selected[i]["messages"]) for i in todo]
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p)
    mtp = MTPModel(model, tokenizer, MTPConfig(k=1, rank=1))  # mode ar: the adapter is never used
    decoder = Decoder(mtp, mode="ar")
    queue = [todo[i] for i in admission_order(lengths, cfg.batch_size)]
    queue.reverse()  # popped from the end
    bar = tqdm(total=len(selected), initial=stats.already_done, disable=not cfg.progress, desc="distill",
               dynamic_ncols=True)
    try:
        with open(cfg.out, "a", encoding="utf-8") as f, decoder.session():
            writer = _InOrderWriter(f, todo, bar)
            while queue or decoder.has_work():
                while queue and decoder.active < cfg.batch_size:
                    i = queue.pop()
                    ids = _render(tokenizer, selected[i]["messages"], add_generation_prompt=True)
                    try:
                        decoder.add(ids, cfg.max_new_tokens, sampling=sampling, eos_token_ids=eos,
                                    seed=_prompt_seed(cfg.seed, selected[i]["id"]), detokenize=False, tag=i)
                    except PromptTooLongError:  # longer than the model's context: no answer, the run goes on
                        stats.too_long += 1
                        writer.add(i, None)  # records after it that had finished go out now
                for event in decoder.step():
                    if not event.finished:
                        continue
                    seq, record = event.sequence, selected[event.sequence.tag]
                    if seq.error is not None:
                        raise DataError(f"decoding prompt {record['id']} failed: {seq.error}")
                    tokens, hit_eos = cut_at_eos(seq.output, eos)
                    text = tokenizer.decode(tokens[:-1] if hit_eos else tokens, skip_special_tokens=True)
                    out = distill_record(record, text, settings, openai_finish_reason(seq.finish_reason), len(tokens))
                    writer.add(seq.tag, json.dumps(out, ensure_ascii=False) + "\n")
            os.fsync(f.fileno())
            stats.written = writer.written
    finally:
        bar.close()
    return stats

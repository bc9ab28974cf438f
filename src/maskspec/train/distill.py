"""Self-distillation: the base model answers training prompts, giving chat records to train the adapter on.

Training on the model's own answers matches what it will be asked to predict when decoding (method.md §3).

Resumable and deterministic: prompts are cut into fixed batches (by position in the selected prompt list) and
batch i is generated with a seed derived from (seed, i), so a run that was interrupted and resumed writes the
same records as an uninterrupted one. Each record is one `write` of a whole line followed by a flush; on resume,
ids already in the output are skipped and a trailing partial line (a killed writer) is cut off. A file that is
not distill output is refused before anything is written to it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from maskspec.errors import UsageError
from maskspec.train.data import DataError, _render, check_messages, iter_jsonl


@dataclass
class DistillConfig:
    prompts: str
    out: str
    model: str = "default"
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy, the answers greedy decoding will reproduce
    top_p: float = 1.0
    batch_size: int = 8
    limit: int | None = None
    per_domain: int | None = None
    shuffle: bool = False
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    progress: bool = True


@dataclass
class DistillStats:
    selected: int = 0
    already_done: int = 0
    written: int = 0
    repaired_partial_line: bool = False


def select_prompts(records: Sequence[dict[str, Any]], *, per_domain: int | None = None, limit: int | None = None,
                   shuffle: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """Optionally a seeded sample of `per_domain` prompts from each domain (file order kept), optionally put in a
    seeded random order (so that a run stopped early has answered a mix of all domains), then the first
    `limit`."""
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
    if limit is not None:
        chosen = chosen[:limit]
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
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"--out {out}: {parent} is not a folder; choose another --out")
            break
    same = out.resolve() == prompts.resolve()
    if not same and out.exists() and prompts.exists():
        same = os.path.samefile(out, prompts)
    if same:
        raise DataError(f"--out {out} is the --prompts file; distill appends answers to --out: choose another file")


def _batch_seed(seed: int, batch_index: int) -> int:
    return (seed * 1_000_003 + batch_index * 7919 + 1) % (2**62)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[list[dict[str, str]]], *, max_new_tokens: int,
                   temperature: float, top_p: float, eos_token_ids: Sequence[int], pad_token_id: int,
                   seed: int) -> list[tuple[str, str, int]]:
    """Answer a batch of chats (left-padded, one `generate` call): (text, finish_reason, new token count) each."""
    from transformers import GenerationConfig

    ids = [_render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    width = max(len(x) for x in ids)
    device = next(model.parameters()).device
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        attention[i, width - len(x):] = 1
    sample = temperature > 0
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                               temperature=temperature if sample else None, top_p=top_p if sample else None,
                               top_k=None, eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         generation_config=gen_cfg)
    eos = set(eos_token_ids)
    results = []
    for row in out[:, width:].tolist():
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        tokens = row if stop is None else row[:stop]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        results.append((text, "length" if stop is None else "stop", len(tokens) + (stop is not None)))
    return results


def distill(cfg: DistillConfig, *, model=None, tokenizer=None) -> DistillStats:
    """Answer the selected prompts with the base model and append chat records to `cfg.out` (see module doc)."""
    from tqdm.auto import tqdm

    from maskspec.decode.verify import SamplingConfig
    from maskspec.hub import load_model_and_tokenizer, parse_dtype, resolve_device
    from maskspec.model.mtp import _eos_ids

    # Every option and the output path are checked before anything is read, written or loaded.
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be >= 1")
    if cfg.limit is not None and cfg.limit < 0:
        raise UsageError(f"--limit must be >= 0, got {cfg.limit}")
    if cfg.per_domain is not None and cfg.per_domain < 1:
        raise UsageError(f"--per-domain must be >= 1, got {cfg.per_domain}")
    SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p)
    device = resolve_device(cfg.device)
    parse_dtype(cfg.dtype)
    _check_out_path(Path(cfg.out), Path(cfg.prompts))
    selected = select_prompts(read_prompts(cfg.prompts), per_domain=cfg.per_domain, limit=cfg.limit,
                              shuffle=cfg.shuffle, seed=cfg.seed)
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    model_name = getattr(model.config, "name_or_path", "") or cfg.model
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=len(selected), initial=stats.already_done, disable=not cfg.progress, desc="distill",
               dynamic_ncols=True)
    try:
        with open(cfg.out, "a", encoding="utf-8") as f:
            for b in range(0, len(selected), cfg.batch_size):
                batch = selected[b:b + cfg.batch_size]
                if all(r["id"] in done for r in batch):
                    continue
                # The whole fixed batch is generated again (same seed, same padding) so that the missing records
                # come out exactly as in an uninterrupted run; only the missing ones are written.
                answers = generate_batch(model, tokenizer, [r["messages"] for r in batch],
                                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, eos_token_ids=eos, pad_token_id=pad,
                                         seed=_batch_seed(cfg.seed, b // cfg.batch_size))
                for record, (text, finish, n_new) in zip(batch, answers):
                    if record["id"] in done:
                        continue
                    out = {"id": record["id"], **{k: v for k, v in record.items() if k not in ("id", "messages")},
                           "messages": record["messages"] + [{"role": "assistant", "content": text}],
                           "distill": {"model": model_name, "temperature": cfg.temperature, "top_p": cfg.top_p,
                                       "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                                       "finish_reason": finish, "new_tokens": n_new}}
                    f.write(json.dumps(out, ensure_ascii=False) + "\n")  # one write per whole record
                    f.flush()
                    done.add(record["id"])
                    stats.written += 1
                    bar.update(1)
                os.fsync(f.fileno())
    finally:
        bar.close()
    return stats

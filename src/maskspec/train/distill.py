"""Self-distillation: the base model answers training prompts, giving chat records to train the adapter on.

Training on the model's own answers matches what it will be asked to predict when decoding (method.md §3).

Resumable and deterministic: prompts are cut into fixed batches (by position in the selected prompt list) and
batch i is generated with a seed derived from (seed, i), so a run that was interrupted and resumed writes the
same records as an uninterrupted one. Each record is one `write` of a whole line followed by a flush; on resume,
ids already in the output are skipped and a trailing partial line (a killed writer) is cut off.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

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


def load_done_ids(out: str | Path) -> tuple[set[str], bool]:
    """Ids already written to `out`, repairing a trailing partial line left by a killed run. Returns
    (ids, whether a partial line was cut off)."""
    out = Path(out)
    if not out.exists():
        return set(), False
    data = out.read_bytes()
    repaired = False
    if data and not data.endswith(b"\n"):
        # Every record is written as one line ending in a newline: bytes after the last newline are a record
        # whose write was interrupted. Cut them off; that record is generated again.
        keep = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        repaired = True
    done = set()
    for number, obj in iter_jsonl(out):
        if "id" not in obj:
            raise DataError(f"{out}:{number}: record has no 'id'; is this a `maskspec distill` output?")
        done.add(str(obj["id"]))
    return done, repaired


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

    from maskspec.hub import load_model_and_tokenizer
    from maskspec.model.mtp import _eos_ids

    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise DataError("--batch-size and --max-new-tokens must be >= 1")
    selected = select_prompts(read_prompts(cfg.prompts), per_domain=cfg.per_domain, limit=cfg.limit,
                              shuffle=cfg.shuffle, seed=cfg.seed)
    done, repaired = load_done_ids(cfg.out)
    stats = DistillStats(selected=len(selected), already_done=sum(r["id"] in done for r in selected),
                         repaired_partial_line=repaired)
    if stats.already_done == len(selected):
        return stats
    if model is None:
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
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

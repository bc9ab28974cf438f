"""Training data: chat records in, token ids plus "is this an assistant token" flags out.

Sources: a JSON Lines file of chat records (`{"messages": [...]}`, the format `maskspec distill` writes), other
local data files (parquet, csv, json) read through `datasets`, or a Hugging Face dataset name. Records are rendered
with the model's own chat template; only assistant tokens are targets. Assistant spans are found by rendering the
conversation up to each assistant turn (with and without that turn) and comparing token prefixes, so no template
has to be parsed.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from maskspec.errors import MaskspecError
from maskspec.messages import MessagesError, validate_messages

LOCAL_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


class DataError(MaskspecError):
    """A data file or record that cannot be used for training or distillation."""


@dataclass
class Example:
    """One tokenized conversation: `labelled[i]` says whether token i is a training target (assistant text)."""

    input_ids: torch.Tensor  # (n,) long
    labelled: torch.Tensor  # (n,) bool
    id: str = ""

    @property
    def num_targets(self) -> int:
        return int(self.labelled.sum())


@dataclass
class TokenizeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    examples: list[Example] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------- reading records
def iter_jsonl(path: str | Path, *, allow_partial_last: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line; a malformed line raises DataError naming file and line.
    With `allow_partial_last`, an unparsable last line without a newline (a killed writer) is skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if allow_partial_last and number == len(lines):  # no newline after it: the writer was interrupted
                return
            raise DataError(f"{path}:{number}: not valid JSON ({exc}); fix or remove this line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def check_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict[str, str]]:
    """`maskspec.messages.validate_messages` for a training or distillation record; DataError naming `where`."""
    try:
        return validate_messages(messages, where=where, need_assistant=need_assistant)
    except MessagesError as exc:
        raise DataError(str(exc)) from None


def load_chat_records(source: str | Path, *, split: str = "train", config_name: str | None = None,
                      messages_field: str = "messages") -> list[tuple[str, dict[str, Any]]]:
    """(where, record) pairs from a JSONL file, other local data files, or a Hugging Face dataset name.
    `where` ("file:line" or "dataset[row]") is used in error messages."""
    path = Path(source)
    records: list[tuple[str, dict[str, Any]]] = []
    if path.is_file() and path.suffix == ".jsonl":
        for number, obj in iter_jsonl(path):
            records.append((f"{path}:{number}", obj))
    else:
        for i, obj in enumerate(_load_with_datasets(source, split, config_name)):
            records.append((f"{source}[{i}]", dict(obj)))
    if not records:
        raise DataError(f"{source} holds no records")
    for where, obj in records:
        if messages_field not in obj:
            raise DataError(f"{where}: record has no {messages_field!r} field (keys: {sorted(obj)[:8]})")
        obj["messages"] = check_messages(obj[messages_field], where)
    return records


def _load_with_datasets(source: str | Path, split: str, config_name: str | None) -> Iterable[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs the `datasets` package: pip install 'maskspec[train]'") from None
    path = Path(source)
    try:
        if path.exists():
            files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
            if not files:
                raise DataError(f"{path} has no data files ({', '.join(sorted(LOCAL_BUILDERS))})")
            builder = LOCAL_BUILDERS.get(files[0].suffix)
            if builder is None:
                raise DataError(f"{path}: unknown data file type {files[0].suffix!r}; use one of "
                                f"{', '.join(sorted(LOCAL_BUILDERS))}")
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        return datasets.load_dataset(str(source), config_name, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataError(f"cannot load dataset {source!r}: {str(exc).splitlines()[0] if str(exc) else exc!r} "
                        "(pass a .jsonl file, a data file/folder, or a dataset name available offline)") from None


# ---------------------------------------------------------------------------------------------- tokenizing
def _render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    return _encode(tokenizer, [_render_text(tokenizer, messages, add_generation_prompt)])[0]


def _render_text(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered chats, in one call (a fast tokenizer encodes a batch on all cores). The template
    already holds any special tokens (BOS etc.); the tokenizer must not add them again."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared at C speed
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_mask(tokenizer: Any, messages: Sequence[dict[str, str]],
                   eos_token_ids: Sequence[int] = ()) -> tuple[list[int], list[bool]]:
    """Token ids of the whole chat and, per token, whether it belongs to an assistant reply.

    For each assistant turn i the span runs from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]), both measured as common prefixes with the full rendering (robust to templates that
    rewrite earlier turns or merge tokens at a boundary). Tokens after the reply's last end-of-turn token (e.g.
    the newline after <|im_end|>) are not targets: decoding stops at that token."""
    return assistant_masks(tokenizer, [messages], eos_token_ids)[0]


def assistant_masks(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]],
                    eos_token_ids: Sequence[int] = ()) -> list[tuple[list[int], list[bool]]]:
    """`assistant_mask` of each conversation; all their renderings are tokenized in one call."""
    texts: list[str] = []
    plans: list[tuple[int, list[tuple[int, int | None]]]] = []  # per chat: its full text, per reply (start, end)
    for messages in conversations:
        full = len(texts)
        texts.append(_render_text(tokenizer, messages, add_generation_prompt=False))
        turns = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = len(texts), None
            texts.append(_render_text(tokenizer, messages[:i], add_generation_prompt=True))
            if i != len(messages) - 1:  # the last reply ends with the chat
                end = len(texts)
                texts.append(_render_text(tokenizer, messages[: i + 1], add_generation_prompt=False))
            turns.append((start, end))
        plans.append((full, turns))
    encoded = _encode(tokenizer, texts) if texts else []
    eos = set(int(e) for e in eos_token_ids)
    out = []
    for full, turns in plans:
        ids = encoded[full]
        labelled = [False] * len(ids)
        for start_text, end_text in turns:
            start = _common_prefix(encoded[start_text], ids)
            end = len(ids) if end_text is None else _common_prefix(encoded[end_text], ids)
            last_eos = max((j for j in range(start, end) if ids[j] in eos), default=None)
            if last_eos is not None:
                end = last_eos + 1
            for j in range(start, end):
                labelled[j] = True
        out.append((ids, labelled))
    return out


TOKENIZE_CHUNK = 512  # records whose renderings are tokenized in one call


def tokenize_records(tokenizer: Any, records: Sequence[tuple[str, dict[str, Any]]], max_length: int,
                     eos_token_ids: Sequence[int] = (), min_targets: int = 3) -> TokenizeStats:
    """Tokenize chat records into Examples, truncating to `max_length` tokens. Examples left with fewer than
    `min_targets` target tokens (nothing to train a mask block on) are dropped and counted."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the model's tokenizer has no chat template; train on a chat/instruct model")
    stats = TokenizeStats(records=len(records))
    masks = (mask for s in range(0, len(records), TOKENIZE_CHUNK)  # chunks: the token lists of all at once are big
             for mask in assistant_masks(tokenizer, [r["messages"] for _, r in records[s:s + TOKENIZE_CHUNK]],
                                         eos_token_ids))
    for (where, record), (ids, labelled) in zip(records, masks, strict=True):
        if len(ids) > max_length:
            stats.truncated += 1
            ids, labelled = ids[:max_length], labelled[:max_length]
        if sum(labelled) < min_targets:
            stats.dropped_no_target += 1
            continue
        stats.examples.append(Example(torch.tensor(ids, dtype=torch.long), torch.tensor(labelled, dtype=torch.bool),
                                      str(record.get("id", where))))
    stats.kept = len(stats.examples)
    if stats.truncated:
        warnings.warn(f"{stats.truncated} of {stats.records} records were longer than --max-length {max_length} "
                      "tokens and were truncated", stacklevel=2)
    if not stats.examples:
        raise DataError(f"no usable training examples in {stats.records} records (each needs at least "
                        f"{min_targets} assistant tokens within --max-length {max_length})")
    return stats


# ---------------------------------------------------------------------------------------------- batching
@dataclass
class TrainBatch:
    """Per-sequence training layouts padded to a common row count. All tensors (B, R) except `attention`
    (B, R, R). Pad rows are normal rows that attend only to themselves and carry no label."""

    token_ids: torch.Tensor
    mask_slot: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where not a target; normal rows hold their next-token target
    prev_ids: torch.Tensor  # for mask rows: the true token just before the row's target (sampler input)
    anchors: torch.Tensor  # for mask rows: flat (b * R + row) index of the consistency partner, else -1
    num_tokens: int  # real normal tokens in the batch
    num_rows: int  # real rows (normal + mask)

    @property
    def key_positions(self) -> torch.Tensor:
        return self.position_ids  # past_length is 0: keys are the rows themselves

    @property
    def is_mask(self) -> torch.Tensor:
        return self.mask_slot >= 0

    def target_rows(self) -> torch.Tensor:
        """Flat indices of labelled mask rows (the rows whose logits are computed)."""
        from maskspec.model.layout import IGNORE_INDEX

        return torch.nonzero((self.is_mask & (self.labels != IGNORE_INDEX)).reshape(-1), as_tuple=False).squeeze(-1)

    def anchor_rows(self) -> torch.Tensor:
        """Flat indices of mask rows that have a consistency partner."""
        return torch.nonzero((self.anchors >= 0).reshape(-1), as_tuple=False).squeeze(-1)

    def to(self, device: torch.device | str) -> "TrainBatch":
        moved = {name: getattr(self, name).to(device) for name in
                 ("token_ids", "mask_slot", "position_ids", "attention", "labels", "prev_ids", "anchors")}
        return TrainBatch(**moved, num_tokens=self.num_tokens, num_rows=self.num_rows)


def select_heads(heads: list[int], fraction: float = 1.0, max_blocks: int | None = None,
                 generator: torch.Generator | None = None) -> list[int]:
    """A random subset of block heads (cheaper training): keep ceil(fraction * n), at most `max_blocks`."""
    keep = len(heads)
    if fraction < 1.0:
        keep = max(1, int(-(-fraction * len(heads) // 1))) if heads else 0
    if max_blocks is not None:
        keep = min(keep, max_blocks)
    if keep >= len(heads):
        return heads
    order = torch.randperm(len(heads), generator=generator)[:keep]
    return sorted(heads[i] for i in order.tolist())


def make_batch(examples: Sequence[Example], k: int, *, block_fraction: float = 1.0, max_blocks: int | None = None,
               seeds: Sequence[int] | None = None, pad_token_id: int = 0, normals_first: bool = False,
               device: torch.device | str = "cpu") -> TrainBatch:
    """Build the one-pass training layout (method.md §3) of each example and pad them into one batch on `device`.
    `seeds[i]` seeds example i's block subset, so the choice does not depend on batch composition. Built where it
    is used: the (B, R, R) attention rule is most of the work (about 0.5 s per 24 conversations of up to 1024 tokens
    at k = 8 on one CPU core, and 150 MB to copy), a few milliseconds on a GPU.
    `normals_first` puts each example's normal rows first and its blocks after them: the same rule and the same
    losses, but mask rows no longer interleave with the normal rows, so a block-sparse kernel (`--attention flex`)
    finds most 128 x 128 tiles empty (about 82% of them for 300 tokens at k = 8, against 46% interleaved)."""
    from maskspec.model.layout import (IGNORE_INDEX, build_layout, consistency_anchor_rows, default_block_heads,
                                       pad_rows_attention, training_labels)

    parts = []
    for i, ex in enumerate(examples):
        heads = default_block_heads(ex.labelled)
        if block_fraction < 1.0 or max_blocks is not None:
            gen = torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else i)
            heads = select_heads(heads, block_fraction, max_blocks, gen)
        layout = build_layout(ex.input_ids.numel(), heads, k, normals_first=normals_first, device=device)
        input_ids = ex.input_ids.to(device)
        labels = training_labels(layout, input_ids, ex.labelled.to(device))
        n = ex.input_ids.numel()
        # Mask j of head h predicts x_{h+1+j}; the token before that target is x_{h+j} (slot = j-1).
        prev_index = (layout.head + layout.mask_slot + 1).clamp(max=n - 1)
        prev = torch.where(layout.gate, input_ids[prev_index], torch.zeros_like(prev_index))
        parts.append((input_ids, layout, labels, prev, consistency_anchor_rows(layout)))

    rows = max(p[1].rows for p in parts)
    b = len(parts)
    token_ids = torch.full((b, rows), pad_token_id, dtype=torch.long, device=device)
    mask_slot = torch.full((b, rows), -1, dtype=torch.long, device=device)
    position_ids = torch.zeros((b, rows), dtype=torch.long, device=device)
    attention = torch.zeros((b, rows, rows), dtype=torch.bool, device=device)
    labels = torch.full((b, rows), IGNORE_INDEX, dtype=torch.long, device=device)
    prev_ids = torch.zeros((b, rows), dtype=torch.long, device=device)
    anchors = torch.full((b, rows), -1, dtype=torch.long, device=device)
    num_tokens = num_rows = 0
    for i, (input_ids, layout, lab, prev, anchor) in enumerate(parts):
        r = layout.rows
        token_ids[i, :r] = input_ids[layout.normal_index.clamp(min=0)]
        mask_slot[i, :r] = layout.mask_slot
        position_ids[i, :r] = layout.position_ids
        attention[i, :r, :r] = layout.attention
        attention[i, r:, r:] = pad_rows_attention(rows - r, device)
        labels[i, :r] = lab
        prev_ids[i, :r] = prev
        anchors[i, :r] = torch.where(anchor >= 0, anchor + i * rows, anchor)
        num_tokens += input_ids.numel()
        num_rows += r
    return TrainBatch(token_ids, mask_slot, position_ids, attention, labels, prev_ids, anchors, num_tokens, num_rows)

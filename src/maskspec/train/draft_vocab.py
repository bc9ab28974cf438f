"""Draft vocabularies: the token ids drafts are restricted to (`MTPModel.set_draft_vocab`), chosen from the
tokens an adapter is trained to predict (the assistant tokens of its chat records).

Verification always uses the full output head, so a draft vocabulary only changes which drafts are proposed,
never the output. A draft is cheaper with fewer rows to project onto; a token outside the vocabulary can still
be drafted when it occurs in the sequence's context (prompt or output so far), see `MTPModel.draft_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from maskspec.errors import MaskspecError
from maskspec.train.data import Example, load_chat_records, tokenize_records


@dataclass
class DraftVocabChoice:
    ids: list[int]  # sorted
    target_tokens: int  # answer tokens counted
    covered: int  # of those, how many are in `ids`

    @property
    def coverage(self) -> float:
        return self.covered / self.target_tokens if self.target_tokens else 0.0


def count_target_tokens(examples: Sequence[Example], vocab_size: int) -> torch.Tensor:
    """How often each id occurs as a training target (an assistant token) in `examples`: (vocab_size,) int64."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ex in examples:
        targets = ex.input_ids[ex.labelled].long()
        if targets.numel() and int(targets.max()) >= vocab_size:
            raise MaskspecError(f"example {ex.id!r} holds token id {int(targets.max())}, outside the model's "
                                f"vocabulary of {vocab_size}")
        counts += torch.bincount(targets, minlength=vocab_size)
    return counts


def choose_draft_vocab(examples: Sequence[Example], size: int, vocab_size: int,
                       eos_token_ids: Sequence[int] = ()) -> DraftVocabChoice:
    """The EOS ids, then the most frequent target tokens of `examples` (ties: the lower id first), `size` ids at
    most; only tokens that occur are taken, so a `size` above their number takes them all."""
    if size < 1:
        raise MaskspecError(f"a draft vocabulary needs at least 1 id, got size {size}")
    counts = count_target_tokens(examples, vocab_size)
    eos = [int(e) for e in dict.fromkeys(eos_token_ids) if 0 <= int(e) < vocab_size]
    chosen = eos[:size]
    # A stable sort of the ids by descending count keeps equal counts in ascending id order.
    order = torch.sort(counts, descending=True, stable=True).indices
    order = order[counts[order] > 0].tolist()
    taken = set(chosen)
    for token in order:
        if len(chosen) >= size:
            break
        if token not in taken:
            chosen.append(token)
            taken.add(token)
    ids = sorted(chosen)
    covered = int(counts[torch.tensor(ids, dtype=torch.long)].sum()) if ids else 0
    return DraftVocabChoice(ids, int(counts.sum()), covered)


def draft_vocab_from_records(data: str | Path, tokenizer: object, size: int, vocab_size: int,
                             eos_token_ids: Sequence[int], max_length: int = 1024, *, split: str = "train",
                             config_name: str | None = None) -> DraftVocabChoice:
    """`choose_draft_vocab` over chat records (a JSONL file, data files or a dataset name), tokenized as
    `maskspec train` tokenizes them."""
    records = load_chat_records(data, split=split, config_name=config_name)
    examples = tokenize_records(tokenizer, records, max_length, eos_token_ids).examples
    return choose_draft_vocab(examples, size, vocab_size, eos_token_ids)


def add_draft_vocab(adapter: str | Path, data: str | Path, size: int, model: str = "default",
                    max_length: int = 1024) -> DraftVocabChoice | None:
    """Choose a draft vocabulary of `size` ids from the chat records `data` and write it into the adapter folder
    (replacing any there); `size` 0 removes it. The base model is loaded for its tokenizer and to check that the
    adapter was made for it. Returns the choice (None when removed)."""
    from maskspec.adapter import base_fingerprint, read_adapter_config, write_draft_vocab
    from maskspec.errors import AdapterError
    from maskspec.hub import load_model_and_tokenizer
    from maskspec.model.mtp import _eos_ids

    if size < 0:
        raise MaskspecError(f"--size must be >= 0 (0 removes the draft vocabulary), got {size}")
    config = read_adapter_config(adapter)
    base, tokenizer = load_model_and_tokenizer(model)
    fingerprint = base_fingerprint(base)
    if fingerprint != config.base_fingerprint:
        raise AdapterError(f"adapter {adapter} was made for base model {config.base_model!r}, not for {model!r}; "
                           "pass that model with --model")
    vocab_size = int(base.get_output_embeddings().weight.shape[0])
    if size == 0:
        write_draft_vocab(adapter, None, vocab_size)
        return None
    if tokenizer is None:
        raise MaskspecError(f"model {model!r} has no tokenizer; cannot render chat records")
    choice = draft_vocab_from_records(data, tokenizer, size, vocab_size, _eos_ids(base, tokenizer), max_length)
    write_draft_vocab(adapter, choice.ids, vocab_size)
    return choice

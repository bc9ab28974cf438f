"""Shared helpers of the training tests: tiny models, synthetic examples, a tiny model folder with a real
chat tokenizer (the embedded model's), so CLI paths run in seconds."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from maskspec.model.mtp import MTPConfig, MTPModel
from maskspec.testing import tiny_model
from maskspec.train.data import Example


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; several OpenMP threads thrash on a loaded 2-core machine
    (measured: 6 tiny steps took 35 s with 2 threads set explicitly, 0.2 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synthetic_examples(count: int = 4, length: int = 20, prompt: int = 6, vocab: int = 128,
                       seed: int = 1) -> list[Example]:
    """Random token sequences whose last `length - prompt` tokens are targets."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = length + (i % 3)  # different lengths, so batches need padding
        ids = torch.randint(3, vocab, (n,), generator=gen)
        labelled = torch.zeros(n, dtype=torch.bool)
        labelled[prompt:] = True
        out.append(Example(ids, labelled, f"ex{i}"))
    return out


def tiny_mtp(k: int = 3, rank: int = 8, alpha: float = 16.0, arch: str = "llama", seed: int = 0,
             adapter_seed: int = 0) -> MTPModel:
    """A tiny random base model (fixed by `seed`) with a fresh adapter (random init fixed by `adapter_seed`)."""
    model = tiny_model(arch, seed=seed)
    torch.manual_seed(adapter_seed)
    return MTPModel(model, None, MTPConfig(k=k, rank=rank, alpha=alpha))


def tiny_chat_model_folder(folder: Path) -> Path:
    """A tiny random Llama with the embedded model's vocabulary and chat tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer

    from maskspec.hub import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

import os

import pytest
import torch

# Tiny test models run fastest on one thread; MASKSPEC_TEST_THREADS raises it.
torch.set_num_threads(int(os.environ.get("MASKSPEC_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model (SmolLM2-135M-Instruct), fp32, loaded once per session."""
    from maskspec.hub import load_model_and_tokenizer

    return load_model_and_tokenizer("default")


@pytest.fixture(scope="session")
def served_files(tmp_path_factory):
    """A tiny random llama (float64, so batched and single decoding agree exactly, context 512) saved with the
    embedded model's real tokenizer, and a random k=3 adapter for it: `root/model`, `root/adapter`."""
    from transformers import AutoTokenizer

    from maskspec.hub import embedded_model_path
    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
    from maskspec.testing import tiny_model

    root = tmp_path_factory.mktemp("served")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    model = tiny_model("llama", dtype=torch.float64, vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    mtp = randomize_adapter_(MTPModel(model, tokenizer, MTPConfig(k=3, rank=4)), seed=1)
    mtp.save_adapter(root / "adapter")
    return root

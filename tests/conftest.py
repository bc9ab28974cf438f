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

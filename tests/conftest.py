import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model (SmolLM2-135M-Instruct), fp32, loaded once per session."""
    from maskspec.hub import load_model_and_tokenizer

    return load_model_and_tokenizer("default")

"""Shared fixtures: tiny random models with random adapters, random prompts, the HF greedy reference, the oracle
drafter and a one-sequence decoding run; the embedded model (marked `slow` where used)."""

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

from maskspec import hub
from maskspec.decode.decoder import Decoder
from maskspec.decode.drafters import DraftProposal
from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
from maskspec.testing import tiny_model

# Tiny test models run fastest on one thread; MASKSPEC_TEST_THREADS raises it.
torch.set_num_threads(int(os.environ.get("MASKSPEC_TEST_THREADS", "1")))

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/NAME.py as a module, to call its functions and main in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Fixtures that load the embedded model or its tokenizer: a test using one is `slow` whether marked or not.
EMBEDDED_FIXTURES = {"smollm", "served_files"}


def pytest_collection_modifyitems(items):
    for item in items:
        if EMBEDDED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


_EMBEDDED_MODEL_PATH = hub.embedded_model_path


def _refuse_embedded_model(*args, **kwargs):
    raise AssertionError("this test loads the embedded model or its tokenizer: mark it @pytest.mark.slow")


def pytest_runtest_setup(item):
    """`make test-fast` (-m "not slow") stays fast: a test not marked slow that reaches the embedded model or its
    tokenizer, in its body or in a fixture it sets up, fails and names the fix."""
    slow = item.get_closest_marker("slow") is not None
    hub.embedded_model_path = _EMBEDDED_MODEL_PATH if slow else _refuse_embedded_model


def pytest_runtest_teardown(item):
    hub.embedded_model_path = _EMBEDDED_MODEL_PATH


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


def make_tiny_mtp(arch: str = "llama", k: int = 4, seed: int = 0, dtype: torch.dtype = torch.float64,
                  **model_kw) -> MTPModel:
    """A tiny random model of `arch` with a random (non-zero) adapter of k masks, rank 4."""
    model = tiny_model(arch, dtype=dtype, seed=seed, **model_kw)
    return randomize_adapter_(MTPModel(model, config=MTPConfig(k=k, rank=4)), seed=seed + 1)


def make_prompts(n: int, seed: int = 0, vocab: int = 128, max_len: int = 12) -> list[list[int]]:
    """`n` random prompts of 1..max_len ids in 3..vocab-1 (0-2 are pad, BOS and EOS of the tiny models)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def hf_greedy_tokens(model, ids, max_new: int) -> list[int]:
    """Plain HF greedy decoding of `ids` (a list or a (1, n) tensor): the new tokens, EOS included."""
    ids = torch.tensor([ids]) if isinstance(ids, list) else ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


class OracleDrafter:
    """A drafter for tests: proposes each sequence's true continuation (`continuations[tag]`), each draft wrong
    with probability `error_rate` (a random generator per tag, seeded `seeds[tag]`), and 7 past its end, so
    accepted runs are long and ragged and drafts run over EOS."""

    def __init__(self, continuations: dict, error_rate: float, seeds: dict) -> None:
        self.continuations = continuations
        self.error_rate = error_rate
        self.rngs = {tag: random.Random(seed) for tag, seed in seeds.items()}

    def propose(self, requests):
        proposals = []
        for request in requests:
            seq = request.sequence
            assert seq.output[-1] == request.prev_token  # drafts continue after the newest verified token
            continuation, rng, done = self.continuations[seq.tag], self.rngs[seq.tag], len(seq.output)
            tokens = []
            for j in range(request.latents.shape[0]):
                true = continuation[done + j] if done + j < len(continuation) else 7
                tokens.append(true if rng.random() > self.error_rate else (true + 1) % 128)
            proposals.append(DraftProposal(tokens))
        return proposals


def decode_alone(mtp: MTPModel, prompt: list[int], mode: str, k: int, max_new: int, *, drafter=None, sampling=None,
                 seed=None, eos=None, tag=0, **decoder_options):
    """One sequence decoded by itself (a batch of one): (the sequence, the tokens each step added).
    `decoder_options`: more `Decoder` arguments (tree, tree_width, static)."""
    decoder = Decoder(mtp, mode=mode, k=k, drafter=drafter, **decoder_options)
    seq = decoder.add(prompt, max_new, sampling=sampling, seed=seed, eos_token_ids=eos, tag=tag)
    chunks = []
    with decoder.session():
        while decoder.has_work():
            chunks += [ev.tokens for ev in decoder.step() if ev.tokens]
    return seq, chunks

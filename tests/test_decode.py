"""Decoding: lossless greedy, KV-cache hygiene, exact sampling, stop conditions."""

import copy
import zlib

import pytest
import torch
from scipy.stats import chisquare

from conftest import OracleDrafter, decode_alone, hf_greedy_tokens, make_prompts, make_tiny_mtp
from maskspec.decode import decoder as decoder_module
from maskspec.decode.api import generate, stream
from maskspec.decode.decoder import Decoder
from maskspec.decode.verify import SamplingConfig
from maskspec.errors import PromptTooLongError
from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
from maskspec.testing import tiny_model

NUM_PROMPTS = 50
MAX_NEW = 20


def _mtp(arch, k=8, seed=0, dtype=torch.float64, **model_kw):
    return make_tiny_mtp(arch, k=k, seed=seed, dtype=dtype, **model_kw)


def _prompts(n, seed=0, vocab=128):
    return [torch.tensor([p]) for p in make_prompts(n, seed, vocab)]


def _hf_greedy(model, ids, max_new=MAX_NEW):
    return hf_greedy_tokens(model, ids, max_new)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_lossless_greedy_random_adapter(arch):
    mtp = _mtp(arch)
    prompts = _prompts(NUM_PROMPTS, seed=zlib.crc32(arch.encode()) % 1000)  # hash() varies per process
    refs = [_hf_greedy(mtp.model, ids) for ids in prompts]
    assert any(2 in r for r in refs), "some references should end at EOS"
    rejections = 0
    for mode in ("linear", "quadratic"):
        for k in (1, 2, 4, 8):
            for ids, ref in zip(prompts, refs):
                out = generate(mtp, ids, max_new_tokens=MAX_NEW, mode=mode, k=k)
                assert out.new_token_ids == ref, (mode, k, ids.tolist())
                assert out.stats.new_tokens == len(ref)
                rejections += out.stats.accepted_histogram[0]
    # A random adapter gets most drafts wrong: the point of this test is that rejections never change a token.
    assert rejections > 1000


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_lossless_greedy_oracle_drafts(arch, mode):
    mtp = _mtp(arch)
    long_runs = 0
    eos_inside_run = 0
    for i, ids in enumerate(_prompts(20, seed=7)):
        ref = _hf_greedy(mtp.model, ids, max_new=40)
        # Past the end of the reference the oracle continues with arbitrary tokens, so drafts run over EOS.
        continuation = ref + [5, 6, 7, 8] * 4
        for k in (1, 2, 4, 8):
            oracle = OracleDrafter({0: continuation}, error_rate=0.1, seeds={0: i})
            seq, chunks = decode_alone(mtp, ids[0].tolist(), mode, k, 40, drafter=oracle)
            # The decoder cuts the output at EOS (kept); an EOS in a step of several tokens came inside a run.
            if chunks and chunks[-1][-1] == 2 and len(chunks[-1]) > 1:
                eos_inside_run += 1
            assert seq.output == ref, (k, ids.tolist())
            assert [t for c in chunks for t in c] == ref
            if k >= 4:
                long_runs += seq.stats.accepted_histogram[k]
    assert long_runs > 20  # whole blocks of drafts were accepted many times
    assert eos_inside_run > 0  # EOS arrived inside an accepted run


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_kv_cache_holds_only_verified_tokens(mode):
    mtp = _mtp("llama", k=4)
    ids = _prompts(1, seed=3)[0]
    ref = _hf_greedy(mtp.model, ids, max_new=60)
    decoder = Decoder(mtp, mode=mode, k=4, drafter=OracleDrafter({0: ref + [9] * 10}, error_rate=0.3, seeds={0: 0}))
    running = decoder.add(ids[0].tolist(), 60, eos_token_ids=[], tag=0)
    while len(running.output) < 30:
        decoder.step()
    assert not running.finished and running.stats.forward_passes > 5
    tokens = running.output
    # The cache holds the prompt and every output token but the newest (y0).
    seq = torch.tensor([ids[0].tolist() + tokens[:-1]])
    assert decoder.cache.get_seq_length() == seq.shape[1]
    with torch.no_grad():
        plain = mtp.model(seq, use_cache=True).past_key_values
    for layer in range(len(plain.layers)):
        torch.testing.assert_close(decoder.cache.layers[layer].keys, plain.layers[layer].keys, atol=1e-10, rtol=0)
        torch.testing.assert_close(decoder.cache.layers[layer].values, plain.layers[layer].values, atol=1e-10,
                                   rtol=0)


# ---------------------------------------------------------------- sampling
VOCAB = 6
SAMPLES = 2000


def _exact_two_token_distribution(model, prompt, cfg):
    from maskspec.decode.verify import warped_probs

    with torch.no_grad():
        first = warped_probs(model(prompt).logits[0, -1], cfg)
        joint = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
        for a in range(VOCAB):
            seq = torch.cat([prompt, torch.tensor([[a]])], dim=1)
            joint[a] = first[a].double() * warped_probs(model(seq).logits[0, -1], cfg).double()
    return joint.reshape(-1)


def _speculative_counts(mtp, prompt, cfg, mode, k):
    counts = torch.zeros(VOCAB * VOCAB)
    for seed in range(SAMPLES):
        # Three tokens, so that the step producing the second token verifies a draft for it.
        out = generate(mtp, prompt, max_new_tokens=3, mode=mode, k=k, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, seed=seed, eos_token_ids=[])
        a, b = out.new_token_ids[:2]
        counts[a * VOCAB + b] += 1
    return counts


def _p_value(counts, expected_probs):
    keep = expected_probs > 0
    assert counts[~keep].sum() == 0, "sampled a token with zero probability"
    expected = expected_probs[keep] * counts.sum()
    return chisquare(counts[keep].numpy(), expected.numpy() * (counts[keep].sum() / expected.sum()).item()).pvalue


def _sampling_mtp():
    # Small vocabulary and a soft model, so every cell of the 2-token distribution gets samples.
    model = tiny_model("llama", dtype=torch.float64, vocab_size=VOCAB, seed=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    mtp = MTPModel(model, config=MTPConfig(k=2, rank=4))
    return randomize_adapter_(mtp, seed=11, scale=0.3)


@pytest.mark.parametrize("mode,cfg", [
    ("quadratic", SamplingConfig(temperature=1.0)),
    ("linear", SamplingConfig(temperature=0.8, top_k=4, top_p=0.9)),
])
def test_speculative_sampling_matches_plain_sampling(mode, cfg):
    mtp = _sampling_mtp()
    prompt = torch.tensor([[3, 4, 5]])
    exact = _exact_two_token_distribution(mtp.model, prompt, cfg)
    counts = _speculative_counts(mtp, prompt, cfg, mode, k=2)
    assert _p_value(counts, exact) > 1e-3
    # The drafts were really used: some steps accepted one or more drafts and some rejected.
    seeds = [generate(mtp, prompt, max_new_tokens=3, mode=mode, k=2, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, seed=s, eos_token_ids=[]).stats.accepted_histogram for s in range(200)]
    assert sum(h[0] for h in seeds) > 10 and sum(h[1] for h in seeds) > 10


def test_a_wrong_acceptance_rule_fails_the_sampling_test(monkeypatch):
    """The statistical test has power: accepting every draft (ignoring p/q) is detected."""
    mtp = _sampling_mtp()
    prompt = torch.tensor([[3, 4, 5]])
    cfg = SamplingConfig(temperature=1.0)
    exact = _exact_two_token_distribution(mtp.model, prompt, cfg)

    def accept_everything(drafts, draft_probs, target_probs, generator):
        from maskspec.decode.verify import sample

        return len(drafts), sample(target_probs[len(drafts)], generator)

    monkeypatch.setattr(decoder_module, "accept_sampling", accept_everything)
    counts = _speculative_counts(mtp, prompt, cfg, "quadratic", k=2)
    assert _p_value(counts, exact) < 1e-6


def test_seeded_sampling_is_reproducible():
    mtp = _mtp("qwen2", k=4)
    ids = _prompts(1, seed=9)[0]
    a = generate(mtp, ids, max_new_tokens=25, temperature=0.9, top_p=0.95, seed=123).new_token_ids
    b = generate(mtp, ids, max_new_tokens=25, temperature=0.9, top_p=0.95, seed=123).new_token_ids
    c = generate(mtp, ids, max_new_tokens=25, temperature=0.9, top_p=0.95, seed=124).new_token_ids
    assert a == b and a != c


# ---------------------------------------------------------------- stops
def test_max_new_tokens_and_eos():
    mtp = _mtp("llama", k=4)
    for ids in _prompts(20, seed=2):
        ref = _hf_greedy(mtp.model, ids, max_new=13)
        out = generate(mtp, ids, max_new_tokens=13, mode="quadratic", k=4)
        assert out.new_token_ids == ref
        if 2 in ref:
            assert out.stats.finish_reason == "eos" and out.new_token_ids[-1] == 2
        else:
            assert out.stats.finish_reason == "length" and len(out.new_token_ids) == 13
    assert generate(mtp, _prompts(1)[0], max_new_tokens=0).new_token_ids == []


def test_context_length_limits():
    mtp = _mtp("llama", k=4, max_position_embeddings=32)
    with pytest.raises(PromptTooLongError, match="context length is 32"):
        generate(mtp, torch.randint(3, 128, (1, 32)), max_new_tokens=5)
    out = generate(mtp, torch.full((1, 28), 9), max_new_tokens=50, eos_token_ids=[])
    assert len(out.new_token_ids) == 4 and out.stats.finish_reason == "context"


@pytest.mark.slow
def test_smollm_lossless_and_stop_strings(smollm):
    model, tok = smollm
    mtp = randomize_adapter_(MTPModel(copy.deepcopy(model), tok, MTPConfig(k=4, rank=8)), scale=0.02)
    prompts = ["What is the capital of France?", "Write a Python function that adds two numbers.",
               "Give me three tips for sleeping better."]
    for text in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        ref = _hf_greedy(model, ids, max_new=32)
        for mode in ("linear", "quadratic"):
            out = generate(mtp, text, max_new_tokens=32, mode=mode, k=4)
            assert out.new_token_ids == ref, (text, mode)
            assert out.text == tok.decode(ref, skip_special_tokens=True)
    full = generate(mtp, prompts[2], max_new_tokens=40).text
    stop_word = full.split()[5]
    cut = generate(mtp, prompts[2], max_new_tokens=40, stop=[stop_word])
    assert cut.stats.finish_reason == "stop"
    assert cut.text == full[:full.index(stop_word)]
    streamed = "".join(c.text for c in stream(mtp, prompts[2], max_new_tokens=40, stop=[stop_word]))
    assert streamed == cut.text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_weights_change_no_token(arch, monkeypatch):
    """The CPU float32 decoding path with packed matrices (the default) against the same decoder without them:
    same tokens on every prompt, and the packed path really ran."""
    from maskspec.model import kernels

    if not kernels.PACKING_AVAILABLE:
        pytest.skip("PyTorch without oneDNN weight packing")
    mtp = _mtp(arch, k=4, dtype=torch.float32)
    calls = []
    real = kernels.linear_packed
    monkeypatch.setattr(kernels, "linear_packed", lambda *a: calls.append(1) or real(*a))
    for ids in _prompts(20, seed=7):
        mtp.kernels = "onednn"
        plain = generate(mtp, ids, max_new_tokens=MAX_NEW, mode="quadratic", k=4)
        assert calls == []
        mtp.kernels = "packed"
        packed = generate(mtp, ids, max_new_tokens=MAX_NEW, mode="quadratic", k=4)
        assert calls
        calls.clear()
        assert packed.new_token_ids == plain.new_token_ids
        assert packed.stats.forward_passes == plain.stats.forward_passes

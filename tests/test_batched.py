"""Batched decoding equals single-sequence decoding: greedy token for token (float64 tiny models), with ragged
acceptance, prompts of different lengths, sequences finishing at different times and joining mid-way."""

import random

import pytest
import torch

from maskspec.decode.batched import BatchedDecoder
from maskspec.decode.speculative import DraftProposal, SpeculativeDecoder
from maskspec.decode.types import GenerationStats
from maskspec.decode.verify import SamplingConfig
from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
from maskspec.testing import tiny_model

MAX_NEW = 16


def _mtp(arch, k=4, seed=0):
    model = tiny_model(arch, dtype=torch.float64, seed=seed)
    return randomize_adapter_(MTPModel(model, config=MTPConfig(k=k, rank=4)), seed=seed + 1)


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 128) for _ in range(rng.randint(1, 14))] for _ in range(n)]


def _single(mtp, prompt, mode, k, max_new, sampling=None, seed=None, propose=None, eos=None):
    """The single-sequence decoder, stopped at EOS like the batched one."""
    decoder = SpeculativeDecoder(mtp, mode=mode, k=k, sampling=sampling, seed=seed)
    if propose is not None:
        decoder.propose = propose(decoder)
    stats = GenerationStats()
    tokens = []
    for chunk in decoder.run(prompt, max_new, stats):
        hit = next((i for i, t in enumerate(chunk) if t in (mtp.eos_token_ids if eos is None else eos)), None)
        tokens.extend(chunk if hit is None else chunk[:hit + 1])
        if hit is not None:
            break
    return tokens[:max_new], stats


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
def test_batched_greedy_equals_single(arch):
    mtp = _mtp(arch)
    prompts = _prompts(8, seed=len(arch))
    # Different budgets, so sequences finish at different times; some join after others started.
    budgets = [MAX_NEW, 5, MAX_NEW, 1, 9, MAX_NEW, 12, 3]
    joins = [0, 0, 0, 2, 2, 3, 7, 8]
    for mode in ("quadratic", "linear", "ar"):
        refs = [_single(mtp, p, mode, 4, n) for p, n in zip(prompts, budgets)]
        decoder = BatchedDecoder(mtp, mode=mode, k=4)
        seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=n) for p, n in zip(prompts, budgets)], joins)
        for seq, (tokens, stats) in zip(seqs, refs):
            assert seq.output == tokens, (arch, mode, seq.prompt_ids)
            assert seq.stats.forward_passes == stats.forward_passes
            assert seq.stats.accepted_histogram == stats.accepted_histogram
            assert seq.stats.new_tokens == len(tokens)
        assert decoder.running == [] and decoder.cache is None


class Oracle:
    """Drafts = the true greedy continuation with some errors, so acceptance is long and ragged."""

    def __init__(self, continuation, error_rate, seed):
        self.continuation = continuation
        self.error_rate = error_rate
        self.rng = random.Random(seed)

    def draft(self, done, k):
        tokens = []
        for j in range(k):
            true = self.continuation[done + j] if done + j < len(self.continuation) else 7
            tokens.append(true if self.rng.random() > self.error_rate else (true + 1) % 128)
        return DraftProposal(tokens)


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_batched_oracle_drafts_ragged_acceptance(mode):
    mtp = _mtp("llama", k=4)
    prompts = _prompts(6, seed=3)
    # Greedy references (ar decoding is plain greedy).
    refs = [_single(mtp, p, "ar", 4, 30)[0] for p in prompts]
    # The same oracle stream for single and batched decoding: the error pattern depends on the seed only.
    single = []
    for i, p in enumerate(prompts):
        def make(decoder, i=i):
            oracle = Oracle(refs[i] + [5, 6, 7, 8] * 4, 0.15, seed=i)
            return lambda m, latents, prev, cfg, gen: oracle.draft(len(decoder.generated), latents.shape[0])
        single.append(_single(mtp, p, mode, 4, 30, propose=make))
    oracles = [Oracle(refs[i] + [5, 6, 7, 8] * 4, 0.15, seed=i) for i in range(len(prompts))]
    decoder = BatchedDecoder(mtp, mode=mode, k=4)
    decoder.propose = lambda seq, latents, prev: oracles[seq.tag].draft(len(seq.output), latents.shape[0])
    seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=30, tag=i) for i, p in enumerate(prompts)],
                            [0, 0, 1, 1, 4, 6])
    accepted_counts = set()
    for seq, ref, (tokens, stats) in zip(seqs, refs, single):
        assert seq.output == ref == tokens
        assert seq.stats.accepted_histogram == stats.accepted_histogram
        accepted_counts |= {a for a, n in enumerate(seq.stats.accepted_histogram) if n}
    assert len(accepted_counts) >= 3  # really ragged: different numbers of drafts accepted
    assert sum(s.stats.accepted_histogram[4] for s in seqs) > 3  # whole blocks accepted


def test_batched_sampling_matches_single_with_seed():
    mtp = _mtp("qwen2", k=3)
    prompts = _prompts(5, seed=11)
    configs = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9),
               SamplingConfig(), SamplingConfig(temperature=1.3, top_k=20), SamplingConfig(temperature=1.0)]
    for mode in ("quadratic", "linear"):
        refs = [_single(mtp, p, mode, 3, 12, sampling=c, seed=100 + i)[0]
                for i, (p, c) in enumerate(zip(prompts, configs))]
        decoder = BatchedDecoder(mtp, mode=mode, k=3)
        seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=12, sampling=c, seed=100 + i)
                                 for i, (p, c) in enumerate(zip(prompts, configs))], [0, 1, 1, 2, 5])
        assert [s.output for s in seqs] == refs


def test_cancel_and_eos():
    mtp = _mtp("llama")
    prompts = _prompts(4, seed=5)
    decoder = BatchedDecoder(mtp, mode="quadratic")
    seqs = [decoder.add(p, 20, eos_token_ids=[]) for p in prompts]
    decoder.step()
    decoder.step()
    decoder.cancel(seqs[1])
    while decoder.has_work():
        decoder.step()
    assert seqs[1].finish_reason == "cancelled"
    assert all(len(s.output) == 20 and s.finish_reason == "length" for i, s in enumerate(seqs) if i != 1)
    for i in (0, 2, 3):
        assert seqs[i].output == _single(mtp, prompts[i], "quadratic", 4, 20, eos=[])[0]
    # An EOS among the greedy tokens ends the sequence with the EOS kept.
    eos_token = seqs[0].output[3]
    seq = decoder.add(prompts[0], 20, eos_token_ids=[eos_token])
    while decoder.has_work():
        decoder.step()
    assert seq.output == seqs[0].output[:seqs[0].output.index(eos_token) + 1]
    assert seq.finish_reason == "eos"
    # max_new_tokens 0 finishes at once without a pass.
    empty = decoder.add(prompts[0], 0)
    assert empty.finished and empty.output == [] and not decoder.has_work()

"""Many sequences in one batch equal each sequence decoded alone (a batch of one): greedy token for token
(float64 tiny models), with ragged acceptance, prompts of different lengths, sequences finishing at different
times and joining mid-way, and seeded sampling."""

import pytest
import torch

from conftest import OracleDrafter, decode_alone, make_prompts, make_tiny_mtp
from maskspec.decode.decoder import Decoder
from maskspec.decode.verify import SamplingConfig

MAX_NEW = 16


def _mtp(arch, k=4, seed=0):
    return make_tiny_mtp(arch, k=k, seed=seed)


def _prompts(n, seed):
    return make_prompts(n, seed, max_len=14)


def _single(mtp, prompt, mode, k, max_new, sampling=None, seed=None, drafter=None, eos=None, tag=0):
    """The sequence decoded alone: (its tokens, its stats)."""
    seq, _ = decode_alone(mtp, prompt, mode, k, max_new, drafter=drafter, sampling=sampling, seed=seed, eos=eos,
                          tag=tag)
    return seq.output, seq.stats


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
def test_batched_greedy_equals_single(arch):
    mtp = _mtp(arch)
    prompts = _prompts(8, seed=len(arch))
    # Different budgets, so sequences finish at different times; some join after others started.
    budgets = [MAX_NEW, 5, MAX_NEW, 1, 9, MAX_NEW, 12, 3]
    joins = [0, 0, 0, 2, 2, 3, 7, 8]
    for mode in ("quadratic", "linear", "ar"):
        refs = [_single(mtp, p, mode, 4, n) for p, n in zip(prompts, budgets)]
        decoder = Decoder(mtp, mode=mode, k=4)
        seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=n) for p, n in zip(prompts, budgets)], joins)
        for seq, (tokens, stats) in zip(seqs, refs):
            assert seq.output == tokens, (arch, mode, seq.prompt_ids)
            assert seq.stats.forward_passes == stats.forward_passes
            assert seq.stats.accepted_histogram == stats.accepted_histogram
            assert seq.stats.new_tokens == len(tokens)
        assert decoder.running == [] and decoder.cache is None


@pytest.mark.parametrize("mode", ["quadratic", "linear"])
def test_batched_oracle_drafts_ragged_acceptance(mode):
    mtp = _mtp("llama", k=4)
    prompts = _prompts(6, seed=3)
    # Greedy references (ar decoding is plain greedy).
    refs = [_single(mtp, p, "ar", 4, 30)[0] for p in prompts]
    # The same oracle stream for single and batched decoding: the error pattern depends on the seed only.
    continuations = {i: refs[i] + [5, 6, 7, 8] * 4 for i in range(len(prompts))}
    single = [_single(mtp, p, mode, 4, 30, drafter=OracleDrafter(continuations, 0.15, seeds={i: i}), tag=i)
              for i, p in enumerate(prompts)]
    decoder = Decoder(mtp, mode=mode, k=4,
                      drafter=OracleDrafter(continuations, 0.15, seeds={i: i for i in range(len(prompts))}))
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
        decoder = Decoder(mtp, mode=mode, k=3)
        seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=12, sampling=c, seed=100 + i)
                                 for i, (p, c) in enumerate(zip(prompts, configs))], [0, 1, 1, 2, 5])
        assert [s.output for s in seqs] == refs


def test_cancel_and_eos():
    mtp = _mtp("llama")
    prompts = _prompts(4, seed=5)
    decoder = Decoder(mtp, mode="quadratic")
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


@pytest.mark.parametrize("old_lens,physical,keep", [
    ([5, 3], 5, [[0, 1], [0, 2]]),  # the docstring's example: a chain's prefix, and a tree's path
    ([4, 4, 4], 4, [[0], [0, 1, 2], [0]]),  # no padding, prefixes of different lengths
    ([0, 0], 0, [range(6), range(3)]),  # a prefill of two prompts (mask blocks dropped)
    ([7, 2, 5], 7, [[0, 3, 4], [0], [0, 2]]),  # padding and tree paths
    ([6], 6, [[0, 1, 2]]),  # a batch of one keeping a prefix: nothing moves
])
def test_keep_verified_keeps_each_sequence_s_entries_and_its_kept_rows(old_lens, physical, keep):
    """Every sequence's cache is its old entries followed by its kept rows of the step, and the width is the
    longest; whatever is left beyond a sequence's length is padding."""
    from transformers import DynamicCache

    from maskspec.decode import kv
    gen = torch.Generator().manual_seed(0)
    width = physical + 6
    layers = [(torch.randn(len(old_lens), 2, width, 4, generator=gen),
               torch.randn(len(old_lens), 2, width, 4, generator=gen)) for _ in range(2)]
    before = [(k.clone(), v.clone()) for k, v in layers]
    cache = kv.keep_verified(DynamicCache(ddp_cache_data=layers), old_lens, physical, keep)
    new_lens = [o + len(list(rows)) for o, rows in zip(old_lens, keep)]
    assert cache.get_seq_length() == max(new_lens)
    for layer, (keys, values) in zip(cache.layers, before):
        for b, (old, rows) in enumerate(zip(old_lens, keep)):
            columns = list(range(old)) + [physical + r for r in rows]
            assert torch.equal(layer.keys[b, :, :new_lens[b]], keys[b, :, columns])
            assert torch.equal(layer.values[b, :, :new_lens[b]], values[b, :, columns])


def test_the_growing_cache_equals_a_concatenating_one_and_copies_only_when_full():
    """Appends, crops, kept rows moved and batch rows dropped give the same tensors as transformers' concatenating
    cache, while the storage is reallocated only when its room runs out: dropped rows free room that a merge
    fills."""
    from transformers import DynamicCache

    from maskspec.decode import kv
    gen = torch.Generator().manual_seed(1)
    grow, plain = kv.GrowingCache(), DynamicCache()
    stores, appended = set(), 0
    for step in range(60):
        rows = int(torch.randint(1, 10, (1,), generator=gen))
        keys, values = torch.randn(3, 2, rows, 4, generator=gen), torch.randn(3, 2, rows, 4, generator=gen)
        for cache in (grow, plain):
            cache.update(keys.clone(), values.clone(), 0)
        appended += rows
        stores.add(grow.layers[0].keys.data_ptr())
        physical = grow.get_seq_length() - rows
        if step % 3 == 0:  # a step keeping a prefix in one row, a path in another, one row only in the third
            keep = [range(rows), [0, rows - 1] if rows > 1 else [0], [0]]
            for cache in (grow, plain):
                kv.keep_verified(cache, [physical] * 3, physical, keep)
        elif step % 3 == 1:
            for cache in (grow, plain):
                kv.crop(cache, physical + 1)
        assert torch.equal(grow.layers[0].keys, plain.layers[0].keys)
        assert torch.equal(grow.layers[0].values, plain.layers[0].values)
    assert len(stores) <= appended // kv.GROWTH + 1
    width = grow.get_seq_length()
    store = grow.layers[0].keys.data_ptr()
    for cache in (grow, plain):  # dropping a row (and reordering the rest) moves them within the storage
        kv.select(cache, [2, 0], width - 1)
        cache.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 0)
    assert torch.equal(grow.layers[0].keys, plain.layers[0].keys)
    assert torch.equal(grow.layers[0].values, plain.layers[0].values)
    assert grow.layers[0].keys.data_ptr() == store
    # The freed row holds whatever was left there; poison it: a newcomer must overwrite every column of it in view.
    grow.layers[0]._key_store[2:] = float("nan")
    grow.layers[0]._value_store[2:] = float("nan")
    # A newcomer merged after the batch takes the freed row: zero-padded to the wider one, in the same storage.
    newcomer = kv.GrowingCache()
    newcomer.update(torch.randn(1, 2, 3, 4, generator=gen), torch.randn(1, 2, 3, 4, generator=gen), 0)
    keys, values = grow.layers[0].keys, grow.layers[0].values
    pad = keys.new_zeros(1, 2, keys.shape[2] - 3, 4)
    expected = torch.cat([keys, torch.cat([newcomer.layers[0].keys, pad], 2)])
    expected_values = torch.cat([values, torch.cat([newcomer.layers[0].values, pad], 2)])
    merged = kv.merge(grow, newcomer)
    assert torch.equal(merged.layers[0].keys, expected) and torch.equal(merged.layers[0].values, expected_values)
    assert merged.layers[0].keys.data_ptr() == store
    merged.update(torch.ones(3, 2, 1, 4), torch.ones(3, 2, 1, 4), 0)
    assert merged.layers[0].keys.data_ptr() == store and torch.equal(merged.layers[0].keys[:, :, :-1], expected)
    # After another drop, a newcomer wider than the batch: the batch's rows are zero-padded up to it (poisoned room
    # first), still in the same storage; one more newcomer than the storage has rows for gets a new one.
    kv.select(merged, [0, 2], merged.get_seq_length())
    layer = merged.layers[0]
    held, columns = layer.keys.shape[2], layer._key_store.shape[2]
    assert columns > held + 1
    layer._key_store[:, :, held:] = float("nan")
    layer._value_store[:, :, held:] = float("nan")
    wide = kv.GrowingCache()
    wide.update(torch.randn(1, 2, columns - 1, 4, generator=gen), torch.randn(1, 2, columns - 1, 4, generator=gen), 0)
    keys = layer.keys
    expected = torch.cat([torch.cat([keys, keys.new_zeros(2, 2, columns - 1 - held, 4)], 2), wide.layers[0].keys])
    merged = kv.merge(merged, wide)
    assert torch.equal(merged.layers[0].keys, expected) and not merged.layers[0].values.isnan().any()
    assert merged.layers[0].keys.data_ptr() == store
    merged = kv.merge(merged, newcomer)
    assert merged.layers[0].keys.data_ptr() != store and merged.layers[0].keys.shape[:3] == (4, 2, columns - 1)
    assert torch.equal(merged.layers[0].keys[:3], expected)
    before, store = merged.layers[0].keys.clone(), merged.layers[0].keys.data_ptr()
    merged.update(torch.ones(4, 2, 1, 4), torch.ones(4, 2, 1, 4), 0)
    assert merged.layers[0].keys.data_ptr() == store and torch.equal(merged.layers[0].keys[:, :, :-1], before)

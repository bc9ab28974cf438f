"""Draft vocabulary: drafts restricted to a subset of ids plus the context; output still exact (greedy) and exact
in distribution (sampling); adapter files, choosing one from data, the `maskspec draft-vocab` command."""

from __future__ import annotations

import json
import os
import random
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskspec.adapter import load_adapter, read_adapter_config
from maskspec.decode import drafters
from maskspec.decode.api import generate
from maskspec.decode.decoder import Decoder
from maskspec.decode.verify import SamplingConfig
from maskspec.errors import AdapterError, MaskspecError
from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
from maskspec.testing import tiny_model
from maskspec.train.data import Example
from maskspec.train.draft_vocab import choose_draft_vocab, count_target_tokens

from conftest import decode_alone
from test_decode import _exact_two_token_distribution, _p_value, _sampling_mtp
from train_helpers import single_thread, tiny_chat_model_folder

MAX_NEW = 20
VOCAB = 128


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _mtp(arch="llama", k=4, seed=0):
    model = tiny_model(arch, dtype=torch.float64, seed=seed)
    return randomize_adapter_(MTPModel(model, config=MTPConfig(k=k, rank=4)), seed=seed + 1)


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def _small_vocab(seed=0, size=40):
    """A third of the ids (and EOS): the tiny models emit many tokens outside it."""
    ids = random.Random(seed).sample(range(3, VOCAB), size)
    return sorted(ids + [2])


def _hf_greedy(model, ids, max_new=MAX_NEW):
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


# ---------------------------------------------------------------- the model
def test_set_draft_vocab_buffers_and_logits():
    mtp = _mtp("gemma3")  # final logit soft-capping applies to the restricted head too
    assert not mtp.draft_vocab_set and mtp.draft_ids() is None
    mtp.set_draft_vocab([9, 4, 4, 100, 2])
    assert mtp.draft_vocab.tolist() == [2, 4, 9, 100] and mtp.draft_vocab_set
    head = mtp.model.get_output_embeddings().weight
    assert torch.equal(mtp._draft_head_weight, head[[2, 4, 9, 100]]) and mtp._draft_head_weight.is_contiguous()

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    prev = torch.tensor([5, 6, 7])
    full = mtp.sampler_logits(prev, latents)
    logits, ids = mtp.draft_logits(prev, latents, extra_ids=torch.tensor([50, 4, 7, 50, 3]))
    assert ids.tolist() == [2, 4, 9, 100, 3, 7, 50]  # the vocabulary, then the context ids it lacks, sorted
    torch.testing.assert_close(logits, full[:, ids], rtol=1e-12, atol=1e-12)
    assert mtp.draft_ids(torch.tensor([50, 4])).tolist() == [2, 4, 9, 100, 50]

    # Moving the model moves the buffers.
    mtp.float()
    assert mtp._draft_head_weight.dtype == torch.float32 and mtp.draft_vocab.dtype == torch.long

    mtp.set_draft_vocab(None)
    assert not mtp.draft_vocab_set
    logits, ids = mtp.draft_logits(prev, latents.float(), torch.tensor([50]))
    assert ids is None and logits.shape == (3, VOCAB)

    for bad, match in (([], "empty"), ([5, VOCAB], "outside"), ([-1, 3], "outside"), ([1.5], "integers")):
        with pytest.raises(ValueError, match=match):
            mtp.set_draft_vocab(bad)


# ---------------------------------------------------------------- greedy: exact, and the drafts are restricted
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_greedy_with_draft_vocab_equals_hf_greedy(arch):
    mtp = _mtp(arch, k=4)
    vocab = set(_small_vocab())
    mtp.set_draft_vocab(sorted(vocab))
    prompts = _prompts(25, seed=5)
    refs = [_hf_greedy(mtp.model, p) for p in prompts]
    # The restriction matters: the model emits many tokens outside the draft vocabulary and the prompts.
    outside = sum(t not in vocab and t not in p for p, r in zip(prompts, refs) for t in r)
    assert outside > 50
    rejected = 0
    for mode in ("linear", "quadratic"):
        for k in (1, 2, 4):
            for p, ref in zip(prompts, refs):
                out = generate(mtp, p, max_new_tokens=MAX_NEW, mode=mode, k=k)
                assert out.new_token_ids == ref, (arch, mode, k, p)
                rejected += out.stats.accepted_histogram[0]
    assert rejected > 100


class Recorder:
    """Wraps the sampler chain: records every proposal with the context its sequence had at that moment."""

    def __init__(self, mtp):
        self.inner = drafters.SamplerChain(mtp)
        self.records = []

    def propose(self, requests):
        proposals = self.inner.propose(requests)
        for request, proposal in zip(requests, proposals):
            seq = request.sequence
            self.records.append((set(seq.prompt_ids) | set(seq.output), proposal.tokens))
        return proposals


def _recorded_drafts(mtp, prompts, sampling=None):
    records = []
    for i, p in enumerate(prompts):
        recorder = Recorder(mtp)
        decode_alone(mtp, p, "quadratic", 4, MAX_NEW, drafter=recorder, sampling=sampling, seed=i, eos=[])
        records += recorder.records
    return records


@pytest.mark.parametrize("sampling", [None, SamplingConfig(temperature=1.0)])
def test_drafts_stay_in_draft_vocab_and_context(sampling):
    mtp = _mtp("llama", k=4)
    vocab = set(_small_vocab(seed=1))
    prompts = _prompts(15, seed=2)
    # Without a draft vocabulary the drafts range over every id (so the check below is not vacuous).
    free = [t for context, tokens in _recorded_drafts(mtp, prompts, sampling) for t in tokens
            if t not in vocab and t not in context]
    assert len(free) > 20
    mtp.set_draft_vocab(sorted(vocab))
    from_context = 0
    for context, tokens in _recorded_drafts(mtp, prompts, sampling):
        for t in tokens:
            assert t in vocab or t in context, (t, sorted(context))
            from_context += t not in vocab
    assert from_context > 5  # context tokens outside the vocabulary are proposed too


# ---------------------------------------------------------------- sampling: exact in distribution
def _counts(mtp, prompt, cfg, samples=2000):
    vocab = mtp.vocab_size
    counts = torch.zeros(vocab * vocab)
    for seed in range(samples):
        out = generate(mtp, prompt, max_new_tokens=3, mode="quadratic", k=2, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, seed=seed, eos_token_ids=[])
        a, b = out.new_token_ids[:2]
        counts[a * vocab + b] += 1
    return counts


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=2)])
def test_sampling_with_draft_vocab_matches_plain_sampling(cfg):
    mtp = _sampling_mtp()  # 6 ids
    mtp.set_draft_vocab([1])
    prompt = torch.tensor([[4, 4]])  # drafts may be 1, 4 and the tokens emitted so far
    exact = _exact_two_token_distribution(mtp.model, prompt, cfg)
    assert _p_value(_counts(mtp, prompt, cfg), exact) > 1e-3


def test_sampling_test_detects_a_draft_distribution_that_ignores_the_restriction(monkeypatch):
    """Power: drafts sampled from the restricted q but accepted with the unrestricted sampler distribution are
    caught."""
    mtp = _sampling_mtp()
    mtp.set_draft_vocab([1])
    prompt = torch.tensor([[4, 4]])
    cfg = SamplingConfig(temperature=1.0)
    exact = _exact_two_token_distribution(mtp.model, prompt, cfg)
    real_draws = drafters._drawn_children

    def wrong_q(*args):
        # the drafts as drawn, but recorded with a distribution they did not come from
        return [(logp, token, torch.full_like(q, 1.0 / q.numel())) for logp, token, q in real_draws(*args)]

    monkeypatch.setattr(drafters, "_drawn_children", wrong_q)
    assert _p_value(_counts(mtp, prompt, cfg), exact) < 1e-6


# ---------------------------------------------------------------- batched decoding
def test_batched_equals_single_with_draft_vocab():
    mtp = _mtp("qwen2", k=3)
    mtp.set_draft_vocab(_small_vocab(seed=3))
    prompts = _prompts(6, seed=4)
    joins = [0, 0, 1, 2, 2, 5]
    configs = [SamplingConfig(), SamplingConfig(temperature=1.0), SamplingConfig(),
               SamplingConfig(temperature=0.7, top_p=0.9), SamplingConfig(temperature=1.3, top_k=20), SamplingConfig()]
    for mode in ("quadratic", "linear"):
        single = []
        for i, (p, c) in enumerate(zip(prompts, configs)):
            seq, _ = decode_alone(mtp, p, mode, 3, MAX_NEW, sampling=c, seed=100 + i, eos=[])
            single.append((seq.output, seq.stats.accepted_histogram))
        decoder = Decoder(mtp, mode=mode, k=3)
        seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=MAX_NEW, sampling=c, seed=100 + i,
                                      eos_token_ids=[]) for i, (p, c) in enumerate(zip(prompts, configs))], joins)
        assert [(s.output, s.stats.accepted_histogram) for s in seqs] == single, mode
        greedy = [i for i, c in enumerate(configs) if c.greedy]
        assert all(seqs[i].output == _hf_greedy(mtp.model, prompts[i])[:len(seqs[i].output)] for i in greedy)


def test_batched_drafts_use_each_sequences_own_context(monkeypatch):
    """Sequences in one batch draft over their own context, not over each other's."""
    mtp = _mtp("llama", k=4)
    vocab = set(_small_vocab(seed=1))
    mtp.set_draft_vocab(sorted(vocab))
    prompts = _prompts(6, seed=2)
    decoder = Decoder(mtp, mode="quadratic", k=4)
    checked = []
    real = decoder._propose

    def check(seqs, hidden, layouts, draft_for):
        real(seqs, hidden, layouts, draft_for)
        for b, _, _ in draft_for:
            s = seqs[b]
            context = set(s.prompt_ids) | set(s.output)
            assert all(t in vocab or t in context for t in s.proposal.tokens)
            checked.extend(t for t in s.proposal.tokens if t not in vocab)

    monkeypatch.setattr(decoder, "_propose", check)
    decoder.generate([dict(prompt_ids=p, max_new_tokens=MAX_NEW, eos_token_ids=[]) for p in prompts])
    assert len(checked) > 5


# ---------------------------------------------------------------- adapter files
def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_adapter_round_trip_with_and_without_draft_vocab(tmp_path):
    mtp = _mtp("llama", k=3)
    plain = mtp.save_adapter(tmp_path / "plain")
    assert "draft_vocab" not in load_file(str(plain / "adapter.safetensors"))
    mtp.set_draft_vocab([7, 3, 2, 90])
    with_vocab = mtp.save_adapter(tmp_path / "vocab")
    stored = load_file(str(with_vocab / "adapter.safetensors"))["draft_vocab"]
    assert stored.dtype == torch.int64 and stored.tolist() == [2, 3, 7, 90]

    other = MTPModel(tiny_model("llama", dtype=torch.float64),
                     config=MTPConfig(**read_adapter_config(with_vocab).mtp_kwargs()))
    load_adapter(other, with_vocab)
    assert other.draft_vocab.tolist() == [2, 3, 7, 90]
    assert torch.equal(other._draft_head_weight, other.model.get_output_embeddings().weight[[2, 3, 7, 90]])
    for (n1, t1), (n2, t2) in zip(mtp.adapter_state_dict().items(), other.adapter_state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    # An adapter without one (as every adapter before this feature) decodes with the full vocabulary.
    load_adapter(other, plain)
    assert not other.draft_vocab_set
    p = _prompts(1, seed=0)[0]
    assert generate(other, p, max_new_tokens=10).new_token_ids == _hf_greedy(other.model, p, 10)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_adapter_files_get_default_permissions(tmp_path, umask):
    mtp = _mtp("llama", k=3)
    mtp.set_draft_vocab([2, 3])
    old = os.umask(umask)
    try:
        folder = mtp.save_adapter(tmp_path / "ad")
    finally:
        os.umask(old)
    assert _mode(folder) == 0o777 & ~umask
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert _mode(folder / name) == 0o666 & ~umask, name


def test_bad_draft_vocab_in_file_is_an_adapter_error(tmp_path):
    mtp = _mtp("llama", k=3)
    good = mtp.save_adapter(tmp_path / "good")
    tensors = load_file(str(good / "adapter.safetensors"))
    cases = [(torch.tensor([2.0, 3.0]), "int64"), (torch.tensor([[2, 3]]), "1-D"),
             (torch.tensor([2, VOCAB]), "outside"), (torch.tensor([-1, 5]), "outside"),
             (torch.tensor([], dtype=torch.int64), "empty"), (torch.tensor([2, 3], dtype=torch.int32), "int64")]
    for i, (bad, match) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        save_file({**tensors, "draft_vocab": bad}, str(folder / "adapter.safetensors"))
        fresh = MTPModel(tiny_model("llama", dtype=torch.float64), config=MTPConfig(k=3, rank=4))
        with pytest.raises(AdapterError, match=match):
            load_adapter(fresh, folder)
        assert not fresh.draft_vocab_set


# ---------------------------------------------------------------- choosing one from data
def _example(tokens, labelled_from):
    ids = torch.tensor(tokens)
    labelled = torch.zeros(len(tokens), dtype=torch.bool)
    labelled[labelled_from:] = True
    return Example(ids, labelled)


def test_choose_draft_vocab_counts_answer_tokens():
    examples = [_example([50, 50, 50, 7, 7, 9, 9, 2], labelled_from=3),  # prompt tokens (50) are not counted
                _example([51, 8, 8, 9, 3, 2], labelled_from=1)]
    counts = count_target_tokens(examples, 64)
    assert {i: c for i, c in enumerate(counts.tolist()) if c} == {2: 2, 3: 1, 7: 2, 8: 2, 9: 3}
    # EOS first, then by count; equal counts (7 and 8) in id order.
    assert choose_draft_vocab(examples, 3, 64, eos_token_ids=[2]).ids == [2, 7, 9]
    choice = choose_draft_vocab(examples, 2, 64, eos_token_ids=[60])  # an EOS that never occurs is still in
    assert choice.ids == [9, 60] and choice.covered == 3 and choice.target_tokens == 10
    everything = choose_draft_vocab(examples, 1000, 64, eos_token_ids=[2])
    assert everything.ids == [2, 3, 7, 8, 9] and everything.coverage == 1.0
    with pytest.raises(MaskspecError):
        choose_draft_vocab(examples, 0, 64)


def test_training_saves_a_draft_vocab(tmp_path):
    from train_helpers import synthetic_examples, tiny_mtp

    from maskspec.train.trainer import TrainConfig, train

    examples = synthetic_examples(count=4)
    chosen = choose_draft_vocab(examples, 6, VOCAB, [2]).ids
    assert len(chosen) == 6 and 2 in chosen
    for size, expected in ((6, chosen), (0, None)):
        out = tmp_path / f"size{size}"
        train(TrainConfig(out=str(out), k=2, rank=4, steps=1, batch_size=2, warmup=0, progress=False, eval_size=0,
                          draft_vocab=size), mtp=tiny_mtp(k=2, rank=4), examples=examples)
        stored = load_file(str(out / "adapter.safetensors")).get("draft_vocab")
        assert (stored.tolist() if stored is not None else None) == expected


# ---------------------------------------------------------------- `maskspec draft-vocab`
def _records(path):
    chats = [("What is 2 + 2?", "2 + 2 = 4. The answer is 4."), ("Name a colour.", "Blue is a colour."),
             ("Count to three.", "One, two, three.")]
    path.write_text("".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": q},
                                                                   {"role": "assistant", "content": a}]}) + "\n"
                            for i, (q, a) in enumerate(chats)))
    return path


def _run_cli(args, capsys):
    from maskspec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.slow  # the embedded model's tokenizer
def test_draft_vocab_cli_end_to_end(tmp_path, capsys):
    from maskspec.hub import load_model_and_tokenizer
    from maskspec.train.draft_vocab import draft_vocab_from_records

    model_dir = tiny_chat_model_folder(tmp_path / "tiny")
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    mtp = randomize_adapter_(MTPModel(model, tokenizer, MTPConfig(k=2, rank=4)), seed=1)
    adapter = mtp.save_adapter(tmp_path / "adapter")
    weights = adapter / "adapter.safetensors"
    os.chmod(weights, 0o640)
    before = load_file(str(weights))
    data = _records(tmp_path / "data.jsonl")

    args = ["draft-vocab", "--adapter", str(adapter), "--data", str(data), "--model", str(model_dir)]
    code, out, err = _run_cli(args + ["--size", "12"], capsys)
    assert code in (0, None), err
    assert "draft vocabulary of 12 ids written" in out
    expected = draft_vocab_from_records(data, tokenizer, 12, len(tokenizer), mtp.eos_token_ids).ids
    assert tokenizer.eos_token_id in expected
    after = load_file(str(weights))
    assert after["draft_vocab"].tolist() == expected
    assert all(torch.equal(before[n], after[n]) for n in before)  # the rest of the adapter is untouched
    assert _mode(weights) == 0o640  # the file keeps its mode
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    loaded = MTPModel.from_pretrained(str(model_dir), adapter=adapter)
    assert loaded.draft_vocab.tolist() == expected

    # Larger than the number of distinct answer tokens: takes them all. Then --size 0 removes it.
    code, out, _ = _run_cli(args + ["--size", "100000"], capsys)
    everything = load_file(str(weights))["draft_vocab"].tolist()
    assert code in (0, None) and set(expected) < set(everything) and len(everything) < 100
    code, out, _ = _run_cli(args + ["--size", "0"], capsys)
    assert code in (0, None) and "removed" in out and "draft_vocab" not in load_file(str(weights))

    # User errors: one line, exit code 2, the adapter unchanged.
    other_model = tmp_path / "other"
    tiny_model("llama", vocab_size=len(tokenizer), seed=3).save_pretrained(other_model)
    tokenizer.save_pretrained(other_model)
    for bad_args, message in ((["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                              (["--size", "-1"], "--size"), (["--model", str(other_model)], "made for base model")):
        argv = ["draft-vocab", "--adapter", str(adapter), "--data", str(data), "--model", str(model_dir),
                "--size", "5"]
        for i in range(0, len(bad_args), 2):
            argv[argv.index(bad_args[i]) + 1] = bad_args[i + 1]
        code, out, err = _run_cli(argv, capsys)
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
        assert "draft_vocab" not in load_file(str(weights))

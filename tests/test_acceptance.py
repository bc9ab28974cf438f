"""The acceptance profile: its simulated passes must equal real greedy quadratic decoding, for every k."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from maskspec.bench.acceptance import TreeShape, draft_matches, simulate, tree_matches
from maskspec.decode.api import generate
from maskspec.train.data import Example
from maskspec.train.trainer import TrainConfig, train

from train_helpers import single_thread, tiny_chat_model_folder, tiny_mtp


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_simulate_walks_the_decoder_rules():
    # Nothing accepted: one token per pass (prefill included).
    assert simulate([0] * 10, k=4, new_tokens=10) == 10
    # Everything accepted: the prefill gives 1 token, each step k + 1.
    assert simulate([8] * 20, k=4, new_tokens=11) == 1 + 2
    # Heads move by accepted + 1: head 0 accepts 2 (3 tokens), head 3 accepts 0, head 4 accepts 1 ...
    assert simulate([2, 9, 9, 0, 1, 9, 9, 9], k=3, new_tokens=7) == 1 + 3
    # Drafts never run past the budget: 5 tokens with k = 8 take the prefill and one step.
    assert simulate([8] * 5, k=8, new_tokens=5) == 2
    assert simulate([], k=3, new_tokens=0) == 0
    # Linear: a rejection leaves no usable block, so the next step drafts nothing and gives one token.
    assert simulate([2, 9, 9, 0, 1, 9, 9, 9], k=3, new_tokens=7, mode="linear") == 1 + 1 + 1 + 1
    assert simulate([3, 9, 9, 9, 3, 9, 9, 9, 9], k=3, new_tokens=9, mode="linear") == 1 + 2


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny llama whose k=3 adapter is overfitted on its own greedy answers to three of five prompts, so the
    decoder sees long accepted runs (trained prompts) as well as rejections (held-out ones)."""
    with single_thread():
        mtp = tiny_mtp(k=3, rank=8)
        gen = torch.Generator().manual_seed(7)
        prompts = [torch.randint(3, 128, (6 + i,), generator=gen).tolist() for i in range(5)]
        examples = []
        for i, prompt in enumerate(prompts[:3]):  # the last two are held out: mostly rejected drafts
            answer = list(generate(mtp, prompt, max_new_tokens=30, mode="ar").new_token_ids)
            ids = torch.tensor(prompt + answer)
            labelled = torch.zeros(len(ids), dtype=torch.bool)
            labelled[len(prompt):] = True
            examples.append(Example(ids, labelled, f"p{i}"))
        cfg = TrainConfig(out=str(tmp_path_factory.mktemp("adapter")), k=3, rank=8, alpha=16.0, lr=2e-2, steps=40,
                          batch_size=3, warmup=5,
                          schedule="constant", save_every=10_000, progress=False, eval_size=0)
        train(cfg, mtp=mtp, examples=examples)
        mtp.double()  # float64 from here: no near-tie can make the two computations disagree
        mtp.eval()
        return mtp, prompts


@pytest.mark.parametrize("vocab", ["trained", "full", "small"])
def test_simulated_passes_equal_real_decoding(trained_tiny, vocab):
    """For the draft vocabulary that training chose, for none, and for a small one that lacks many answer tokens
    (drafts then come from the vocabulary and the context, in decoding and in the simulation alike)."""
    mtp, prompts = trained_tiny
    trained_vocab = mtp.draft_vocab
    assert trained_vocab is not None  # `train` gives every adapter one by default
    if vocab != "trained":
        mtp.set_draft_vocab(None if vocab == "full" else sorted(random.Random(0).sample(range(3, 128), 30) + [2]))
    try:
        _check_simulated_passes(mtp, prompts, vocab)
    finally:
        mtp.set_draft_vocab(trained_vocab)


def _check_simulated_passes(mtp, prompts, vocab):
    accepted_drafts, short_blocks, restricted, from_context = 0, 0, 0, 0
    allowed = set(mtp.draft_vocab.tolist()) if mtp.draft_vocab_set else None
    for prompt in prompts:
        answer = list(generate(mtp, prompt, max_new_tokens=30, mode="ar").new_token_ids)
        matches, hits, total = draft_matches(mtp, prompt, answer, ["sampler", "sampler-full"])
        assert len(matches["sampler"]) == len(answer)
        accepted_drafts += sum(matches["sampler"])
        # block i predicts answer[i + 1:], so at most min(k, len(answer) - 1 - i) drafts can match
        short_blocks += sum(m < min(mtp.k, len(answer) - 1 - i) for i, m in enumerate(matches["sampler"]))
        restricted += sum(a != b for a, b in zip(matches["sampler"], matches["sampler-full"]))
        if allowed is not None:  # accepted drafts outside the vocabulary: context tokens
            sequence = prompt + answer
            from_context += sum(sequence[len(prompt) + i + 1 + j] not in allowed
                                for i, m in enumerate(matches["sampler"]) for j in range(m))
        for mode in ("quadratic", "linear"):
            for k in range(1, mtp.k + 1):
                real = generate(mtp, prompt, max_new_tokens=30, mode=mode, k=k)
                assert list(real.new_token_ids) == answer
                simulated = simulate(matches["sampler"], k, len(answer), mode)
                assert real.stats.forward_passes == simulated, (prompt, mode, k)
        assert sum(total) > 0 and all(0 <= h <= t for h, t in zip(hits["sampler"], total))
    # The comparison is not vacuous: many drafts were accepted, and some blocks had a rejection.
    assert accepted_drafts > 30 and short_blocks > 0
    if vocab == "full":
        assert restricted == 0
    if vocab == "small":  # the small vocabulary changed the drafts, and context tokens were drafted and accepted
        assert restricted > 0 and from_context > 0


@pytest.mark.parametrize("vocab", ["trained", "small"])
def test_simulated_tree_passes_equal_real_decoding(trained_tiny, vocab):
    """Trees of several shapes (with and without the prompt-lookup branch), simulated from one teacher-forced
    pass, need exactly the passes real tree decoding needs, and their node counts are the real trees' sizes."""
    from maskspec.decode.decoder import Decoder
    from maskspec.decode.drafters import TreeDrafter

    mtp, prompts = trained_tiny
    trained_vocab = mtp.draft_vocab
    if vocab == "small":
        mtp.set_draft_vocab(sorted(random.Random(0).sample(range(3, 128), 30) + [2]))
    shapes = [TreeShape(2, 3), TreeShape(3, 6), TreeShape(3, 4, width=3, lookup=False), TreeShape(1, 2)]
    try:
        beyond_chain = 0
        for prompt in prompts:
            answer = list(generate(mtp, prompt, max_new_tokens=30, mode="ar").new_token_ids)
            chain, _, _ = draft_matches(mtp, prompt, answer, ["sampler"])
            matches, nodes = tree_matches(mtp, prompt, answer, shapes)
            for shape in shapes:
                drafter = TreeDrafter(mtp, shape.budget, shape.width, shape.lookup)
                decoder = Decoder(mtp, mode="quadratic", k=shape.k, drafter=drafter)
                seq = decoder.add(prompt, 30)
                sizes = []
                while decoder.has_work():
                    decoder.step()
                    if not seq.finished:
                        sizes.append(len(seq.proposal.tokens))
                assert seq.output == answer
                steps: list[int] = []
                assert seq.stats.forward_passes == simulate(matches[shape.key], shape.k, len(answer), "quadratic",
                                                            steps), (prompt, shape)
                # the trees the decoder verified are the simulated ones (the last step's drafts are never used)
                assert [nodes[shape.key][h] for h in steps] == sizes[:len(steps)]
                beyond_chain += sum(t > min(c, shape.k) for t, c in zip(matches[shape.key], chain["sampler"]))
        assert beyond_chain > 5  # the trees really accepted more than the chain somewhere
    finally:
        mtp.set_draft_vocab(trained_vocab)


@pytest.mark.slow  # the embedded model's tokenizer
def test_acceptance_cli(tmp_path, monkeypatch):
    from maskspec.cli import app
    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
    from maskspec.hub import load_model_and_tokenizer

    model_dir = tiny_chat_model_folder(tmp_path / "tiny")
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    mtp = randomize_adapter_(MTPModel(model, tokenizer, MTPConfig(k=2, rank=4)), seed=1)
    mtp.save_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    args = ["acceptance", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--domains",
            "math,code", "--n", "1", "--max-new-tokens", "6", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = json.loads((out / "acceptance.json").read_text())
    assert [(r["domain"], r["drafter"], r["mode"]) for r in payload["results"][:4]] == [
        ("math", "sampler", "quadratic"), ("math", "sampler", "linear"), ("math", "head", "quadratic"),
        ("math", "head", "linear")]
    assert [r["domain"] for r in payload["results"]][4::4] == ["code", "all"]
    for row in payload["results"]:
        assert set(row["tau"]) == {"1", "2"} and all(1.0 <= t <= 3.0 for t in row["tau"].values())
    assert len(payload["prompts"]) == 2 and "| domain | drafter |" in (out / "acceptance.md").read_text()

    trees = CliRunner().invoke(app, args[:-2] + ["--tree", "3,5", "--tree-k", "1,2", "--out", str(tmp_path / "t")])
    assert trees.exit_code == 0, trees.output + repr(trees.exception)
    tree_payload = json.loads((tmp_path / "t" / "acceptance.json").read_text())
    assert tree_payload["config"]["trees"] == ["k1-tree3-w2", "k1-tree5-w2", "k2-tree3-w2", "k2-tree5-w2"]
    shapes = [r["shape"] for r in tree_payload["tree_results"] if r["domain"] == "all"]
    assert shapes == ["k1-chain", "k2-chain", "k1-tree3-w2", "k1-tree5-w2", "k2-tree3-w2", "k2-tree5-w2"]
    for r in tree_payload["tree_results"]:
        assert 1.0 <= r["tau"] <= r["k"] + 1 and r["mean_rows"] == (r["mean_nodes"] + 1) * (r["k"] + 1)
    # The chain rows of the tree table are the main table's tau at the same k.
    chain_k2 = next(r for r in tree_payload["tree_results"] if r["shape"] == "k2-chain" and r["domain"] == "all")
    main_k2 = next(r for r in tree_payload["results"] if (r["domain"], r["drafter"], r["mode"]) ==
                   ("all", "sampler", "quadratic"))["tau"]["2"]
    assert chain_k2["tau"] == pytest.approx(main_k2)
    assert "| all | k2-tree5-w2 |" in (tmp_path / "t" / "acceptance.md").read_text()
    too_deep = CliRunner().invoke(app, args[:-2] + ["--tree", "3", "--tree-k", "3", "--out", str(tmp_path / "u")])
    assert too_deep.exit_code != 0 and "at most k = 2" in str(too_deep.exception)

    bad = CliRunner().invoke(app, args[:-2] + ["--drafters", "oracle", "--out", str(out)])
    assert bad.exit_code != 0 and "--drafters" in str(bad.exception)

    # Answers saved by one run are reused by the next (decoding is skipped), and a broken file is refused.
    answers = tmp_path / "answers.json"
    first = CliRunner().invoke(app, args + ["--answers", str(answers)])
    assert first.exit_code == 0, first.output
    saved = json.loads(answers.read_text())
    assert len(saved) == 2 and all(len(a["token_ids"]) <= 6 for a in saved.values())
    import maskspec.decode.api as decode_api

    def no_decoding(*a, **kw):
        raise AssertionError("answers should have been reused")

    monkeypatch.setattr(decode_api, "generate", no_decoding)
    again = CliRunner().invoke(app, args + ["--answers", str(answers), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert json.loads((tmp_path / "again" / "acceptance.json").read_text())["results"] == payload["results"]
    answers.write_text("{not json")
    broken = CliRunner().invoke(app, args + ["--answers", str(answers)])
    assert broken.exit_code != 0 and "--answers" in str(broken.exception)


@pytest.mark.slow  # the embedded model's tokenizer
def test_acceptance_cli_with_draft_vocab(tmp_path):
    from maskspec.adapter import write_draft_vocab
    from maskspec.cli import app
    from maskspec.hub import load_model_and_tokenizer
    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_

    model_dir = tiny_chat_model_folder(tmp_path / "tiny")
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    mtp = randomize_adapter_(MTPModel(model, tokenizer, MTPConfig(k=2, rank=4)), seed=1)
    adapter = mtp.save_adapter(tmp_path / "adapter")
    vocab = set(range(200)) | {tokenizer.eos_token_id}
    write_draft_vocab(adapter, sorted(vocab), len(tokenizer))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["acceptance", "--model", str(model_dir), "--adapter", str(adapter), "--domains",
                                      "math", "--n", "1", "--max-new-tokens", "6", "--drafters",
                                      "sampler,sampler-full", "--modes", "quadratic", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = json.loads((out / "acceptance.json").read_text())
    assert payload["config"]["draft_vocab"] == len(vocab)
    assert [(r["domain"], r["drafter"]) for r in payload["results"]] == [
        ("math", "sampler"), ("math", "sampler-full"), ("all", "sampler"), ("all", "sampler-full")]
    assert set(payload["prompts"][0]["matches"]) == {"sampler", "sampler-full"}

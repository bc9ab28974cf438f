"""Draft trees in the one decoder (greedy): the acceptance walk, trimming to the budget, exact output with trees
whose accepted paths are not prefixes of the step (so the KV cache is gathered), alone and batched."""

import random

import pytest
import torch

from conftest import decode_alone, hf_greedy_tokens, make_prompts, make_tiny_mtp
from maskspec.decode.decoder import Decoder
from maskspec.decode.drafters import DraftProposal, TreeDrafter, merge_branch, prompt_lookup
from maskspec.decode.steps import drafts_within_budget, layout_parents
from maskspec.decode.verify import accept_greedy, accept_greedy_tree
from maskspec.errors import UsageError


def test_greedy_tree_walk_table():
    #        (y0)
    #       /    \
    #    0:a=5   1:b=6
    #     |        |
    #   2:c=7    3:d=8
    tokens, parents = [5, 6, 7, 8], [-1, -1, 0, 1]
    # argmax after y0, a, b, c, d
    assert accept_greedy_tree(tokens, parents, [6, 0, 8, 0, 9]) == ([1, 3], 9)  # y0 -> b -> d, then 9
    assert accept_greedy_tree(tokens, parents, [5, 7, 0, 4, 0]) == ([0, 2], 4)
    assert accept_greedy_tree(tokens, parents, [5, 1, 0, 0, 0]) == ([0], 1)
    assert accept_greedy_tree(tokens, parents, [3, 0, 0, 0, 0]) == ([], 3)
    # A chain as a tree gives the chain's rule.
    chain, argmax = [4, 5, 6], [4, 5, 9, 1]
    path, bonus = accept_greedy_tree(chain, [-1, 0, 1], argmax)
    assert (len(path), bonus) == accept_greedy(chain, argmax) and path == [0, 1]


def test_tree_trimmed_to_the_budget_and_its_layout_parents():
    tree = DraftProposal([5, 6, 7, 8, 9], parents=[-1, -1, 0, 1, 2])  # depths 1, 1, 2, 2, 3
    assert drafts_within_budget(tree, 3).tokens == [5, 6, 7, 8]  # paths of at most 2 drafts
    assert drafts_within_budget(tree, 3).parents == [-1, -1, 0, 1]
    assert drafts_within_budget(tree, 1).tokens == []
    assert layout_parents(drafts_within_budget(tree, 9)) == [-1, 0, 0, 1, 2, 3]
    assert layout_parents(DraftProposal([1, 2])) is None
    assert drafts_within_budget(DraftProposal([1, 2, 3]), 3).tokens == [1, 2]


class OracleTree:
    """Trees around the true continuation: at each depth `width` siblings, the true token at a random place
    among them (or missing, with probability `miss`), so accepted paths often go through a later sibling."""

    def __init__(self, continuations, width=3, miss=0.15, seed=0):
        self.continuations, self.width, self.miss = continuations, width, miss
        self.rng = random.Random(seed)
        self.non_prefix_paths = 0

    def propose(self, requests):
        out = []
        for r in requests:
            truth, done = self.continuations[r.sequence.tag], len(r.sequence.output)
            tokens, parents, parent = [], [], -1
            for j in range(r.latents.shape[0]):
                true = truth[done + j] if done + j < len(truth) else 7
                siblings = [(true + 1 + s) % 128 for s in range(self.width)]
                if self.rng.random() > self.miss:
                    siblings[self.rng.randrange(self.width)] = true
                on_path = None
                for token in siblings:
                    tokens.append(token)
                    parents.append(parent)
                    if token == true and on_path is None:
                        on_path = len(tokens) - 1
                if on_path is None:
                    break
                if on_path != len(tokens) - self.width:
                    self.non_prefix_paths += 1
                parent = on_path
            out.append(DraftProposal(tokens, parents=parents))
        return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tree_decoding_is_exact_alone_and_batched(arch):
    mtp = make_tiny_mtp(arch, k=4)
    prompts = make_prompts(12, seed=4)
    refs = [hf_greedy_tokens(mtp.model, p, 30) for p in prompts]
    continuations = {i: r + [5, 6, 7] * 10 for i, r in enumerate(refs)}
    long_paths = 0
    for i, (p, ref) in enumerate(zip(prompts, refs)):
        oracle = OracleTree(continuations, seed=i)
        seq, _ = decode_alone(mtp, p, "quadratic", 4, 30, drafter=oracle, tag=i)
        assert seq.output == ref, (arch, p)
        long_paths += sum(seq.stats.accepted_histogram[2:])
    assert long_paths > 20 and oracle.non_prefix_paths > 0
    batched = Decoder(mtp, mode="quadratic", k=4, drafter=OracleTree(continuations, seed=99))
    seqs = batched.generate([dict(prompt_ids=p, max_new_tokens=30, tag=i) for i, p in enumerate(prompts)],
                            [0, 0, 1, 1, 2, 3, 3, 5, 6, 6, 8, 9])
    assert [s.output for s in seqs] == refs


def test_kv_cache_after_tree_steps_holds_the_accepted_path_only():
    mtp = make_tiny_mtp("llama", k=3)
    prompt = make_prompts(1, seed=8)[0]
    ref = hf_greedy_tokens(mtp.model, prompt, 60)
    oracle = OracleTree({0: ref + [9] * 10}, width=2, miss=0.2, seed=1)
    decoder = Decoder(mtp, mode="quadratic", k=3, drafter=oracle)
    seq = decoder.add(prompt, 60, eos_token_ids=[], tag=0)
    while len(seq.output) < 30:
        decoder.step()
    assert oracle.non_prefix_paths > 3  # the cache really was gathered, not cropped
    full = torch.tensor([prompt + seq.output[:-1]])
    with torch.no_grad():
        plain = mtp.model(full, use_cache=True).past_key_values
    assert decoder.cache.get_seq_length() == full.shape[1]
    for mine, theirs in zip(decoder.cache.layers, plain.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-10, rtol=0)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-10, rtol=0)


def test_sampler_trees_are_exact_and_contain_the_chain():
    mtp = make_tiny_mtp("qwen2", k=3)
    prompts = make_prompts(10, seed=12)
    drafter = TreeDrafter(mtp, budget=7, width=2, lookup=False)
    for p in prompts:
        ref = hf_greedy_tokens(mtp.model, p, 20)
        seq, _ = decode_alone(mtp, p, "quadratic", 3, 20, drafter=drafter)
        assert seq.output == ref
    # Every tree holds the greedy chain as a branch: node 0, then the chain's continuation at every depth.
    decoder = Decoder(mtp, mode="quadratic", k=3)
    s = decoder.add(prompts[0], 10)
    decoder.step()
    from maskspec.decode.drafters import DraftRequest, SamplerChain

    latents = torch.randn(3, mtp.mask_embeddings.shape[1], dtype=torch.float64)
    request = DraftRequest(s, latents, 9)
    chain = SamplerChain(mtp).propose([request])[0].tokens
    tree = drafter.propose([request])[0]
    assert len(tree.tokens) <= 7 and len(set(tree.parents)) > 1 or len(tree.tokens) == 3
    node, path = -1, []
    for token in chain:
        node = next(i for i, (t, par) in enumerate(zip(tree.tokens, tree.parents)) if par == node and t == token)
        path.append(node)
    assert len(path) == 3


def test_trees_are_refused_outside_quadratic_mode():
    mtp = make_tiny_mtp("llama", k=2)
    with pytest.raises(UsageError, match="quadratic"):
        Decoder(mtp, mode="linear", k=2, tree=4)
    with pytest.raises(UsageError, match=">= 0"):
        Decoder(mtp, mode="quadratic", k=2, tree=-1)


def test_server_with_trees_answers_exactly(served_files):
    import httpx

    from maskspec.decode.api import generate
    from maskspec.model.mtp import MTPModel
    from maskspec.serve.app import BackgroundServer, build_server

    mtp = MTPModel.from_pretrained(str(served_files / "model"), adapter=str(served_files / "adapter"), dtype="fp64")
    app, scheduler = build_server(mtp, mode="quadratic", max_batch=4, model_name="tiny", tree=5)
    messages = [[{"role": "user", "content": f"Question {i}"}] for i in range(4)]
    refs = [generate(mtp, m, max_new_tokens=12).text for m in messages]
    try:
        with BackgroundServer(app) as url:
            for m, ref in zip(messages, refs):
                r = httpx.post(url + "/v1/chat/completions", json={"messages": m, "max_tokens": 12, "temperature": 0},
                               timeout=60)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref
    finally:
        scheduler.stop()
    assert isinstance(scheduler.decoder.drafter, TreeDrafter)


def test_prompt_lookup_and_merging_a_branch():
    # ... 5 6 7 8 ... 5 6 -> the latest earlier "5 6" was followed by 7 8 9
    assert prompt_lookup([1, 5, 6, 7, 8, 9, 2, 5, 6], 3) == [7, 8, 9]
    assert prompt_lookup([1, 5, 6, 7, 3, 6], 2) == [7, 3]  # only the 1-gram "6" matches
    assert prompt_lookup([4, 9, 9, 1, 2, 9, 9], 2) == [1, 2]  # the longest n-gram first: "9 9"
    assert prompt_lookup([1, 2, 3], 4) == [] and prompt_lookup([7], 2) == []
    tokens, parents = [5, 6, 7], [-1, -1, 0]
    merge_branch(tokens, parents, [5, 7, 8])  # shares 5 -> 7, adds 8 under it
    assert (tokens, parents) == ([5, 6, 7, 8], [-1, -1, 0, 2])
    merge_branch(tokens, parents, [9])
    assert (tokens, parents) == ([5, 6, 7, 8, 9], [-1, -1, 0, 2, -1])


def test_lookup_branch_is_exact_and_accepted_on_repetitive_text():
    """A tiny model fed a prompt it repeats: the lookup branch carries long accepted runs, output still exact."""
    mtp = make_tiny_mtp("llama", k=3)
    prompts = make_prompts(12, seed=21)
    with_lookup = without = 0
    for p in prompts:
        ref = hf_greedy_tokens(mtp.model, p, 24)
        prompt = p + ref[:12]  # its own continuation in the prompt: lookup finds what comes next
        ref = hf_greedy_tokens(mtp.model, prompt, 24)
        for lookup in (True, False):
            seq, _ = decode_alone(mtp, prompt, "quadratic", 3, 24, drafter=TreeDrafter(mtp, 3, 1, lookup=lookup))
            assert seq.output == ref
            if lookup:
                with_lookup += seq.stats.forward_passes
            else:
                without += seq.stats.forward_passes
    assert with_lookup < without


# ---------------------------------------------------------------- sampling over trees: exact in distribution
SAMPLES = 3000


def _exact_three_token_distribution(model, prompt, cfg, vocab):
    from maskspec.decode.verify import warped_probs

    def next_probs(tokens):
        with torch.no_grad():
            return warped_probs(model(torch.tensor([tokens])).logits[0, -1], cfg).double()

    joint = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    first = next_probs(prompt)
    for a in range(vocab):
        second = next_probs(prompt + [a])
        for b in range(vocab):
            joint[a, b] = first[a] * second[b] * next_probs(prompt + [a, b])
    return joint.reshape(-1)


def _pooled_p_value(counts, expected_probs, min_expected=5.0):
    """Chi-square p-value with the cells expected fewer than `min_expected` times pooled into one."""
    from scipy.stats import chisquare

    possible = expected_probs > 0
    assert counts[~possible].sum() == 0, "sampled a sequence of probability zero"
    counts, expected_probs = counts[possible], expected_probs[possible]
    expected = expected_probs * counts.sum() / expected_probs.sum()
    big = expected >= min_expected
    observed, wanted = counts[big], expected[big]
    if not big.all():
        observed = torch.cat([observed, counts[~big].sum().reshape(1)])
        wanted = torch.cat([wanted, expected[~big].sum().reshape(1)])
    return chisquare(observed.numpy(), wanted.numpy()).pvalue


class PathRecorder:
    """Wraps the tree rule: counts the steps whose accepted path went through a child other than the first of
    its parent (so later siblings and the residual updates between them were really exercised)."""

    def __init__(self, rule):
        self.rule, self.later_sibling, self.steps = rule, 0, 0

    def __call__(self, tokens, parents, probs, target, generator):
        path, token = self.rule(tokens, parents, probs, target, generator)
        self.steps += 1
        at = -1
        for node in path:
            if node != parents.index(at):
                self.later_sibling += 1
                break
            at = node
        return path, token


def _tree_sampling_counts(mtp, prompt, cfg, drafter, vocab):
    counts = torch.zeros(vocab ** 3)
    for seed in range(SAMPLES):
        seq, _ = decode_alone(mtp, prompt, "quadratic", 2, 3, drafter=drafter, sampling=cfg, seed=seed, eos=[])
        a, b, c = seq.output[:3]
        counts[(a * vocab + b) * vocab + c] += 1
    return counts


def _first_two(joint, vocab):
    """The distribution of the first two tokens (the root's children decide the second)."""
    return joint.reshape(vocab, vocab, vocab).sum(dim=-1).reshape(-1)


def _tree_sampling_setup():
    from test_decode import VOCAB, _sampling_mtp

    mtp = _sampling_mtp()
    prompt = [3, 4, 5]
    return mtp, prompt, VOCAB


@pytest.mark.parametrize("cfg,lookup", [
    (dict(temperature=1.0), False),
    (dict(temperature=0.8, top_k=4, top_p=0.95), True),
])
def test_sampled_trees_match_plain_sampling(cfg, lookup, monkeypatch):
    import maskspec.decode.decoder as decoder_module
    from maskspec.decode.verify import SamplingConfig, accept_sampling_tree

    mtp, prompt, vocab = _tree_sampling_setup()
    cfg = SamplingConfig(**cfg)
    recorder = PathRecorder(accept_sampling_tree)
    monkeypatch.setattr(decoder_module, "accept_sampling_tree", recorder)
    counts = _tree_sampling_counts(mtp, prompt, cfg, TreeDrafter(mtp, budget=5, width=3, lookup=lookup), vocab)
    exact = _exact_three_token_distribution(mtp.model, prompt, cfg, vocab)
    assert _pooled_p_value(counts, exact) > 1e-3
    assert _pooled_p_value(_first_two(counts, vocab), _first_two(exact, vocab)) > 1e-3
    # Later siblings carried the accepted path in a good share of the steps.
    assert recorder.later_sibling > 0.05 * recorder.steps


def test_a_tree_rule_without_residual_updates_fails_the_sampling_test(monkeypatch):
    """Power: trying every sibling against the untouched target (the chain's rule applied to each child alone,
    no residual between siblings) over-weights drafted tokens, and the test sees it."""
    import maskspec.decode.decoder as decoder_module
    from maskspec.decode.verify import SamplingConfig, sample

    def no_residual(tokens, parents, probs, target, generator):
        path, at = [], -1
        while True:
            p = target[at + 1]
            kids = [i for i, parent in enumerate(parents) if parent == at]
            nxt = None
            for child in kids:
                q = probs[child]
                ratio = 1.0 if q is None else min(1.0, (p[tokens[child]] / q[tokens[child]]).item())
                if torch.rand((), generator=generator).item() < ratio:
                    nxt = child
                    break
            if nxt is None:
                q = probs[kids[0]] if kids and probs[kids[0]] is not None else torch.zeros_like(p)
                residual = (p - q).clamp(min=0)
                return path, sample(residual / residual.sum() if residual.sum() > 0 else p, generator)
            path.append(nxt)
            at = nxt

    mtp, prompt, vocab = _tree_sampling_setup()
    cfg = SamplingConfig(temperature=1.0)
    monkeypatch.setattr(decoder_module, "accept_sampling_tree", no_residual)
    counts = _tree_sampling_counts(mtp, prompt, cfg, TreeDrafter(mtp, budget=5, width=3, lookup=False), vocab)
    exact = _exact_three_token_distribution(mtp.model, prompt, cfg, vocab)
    assert _pooled_p_value(_first_two(counts, vocab), _first_two(exact, vocab)) < 1e-6


def test_sampled_tree_siblings_are_drawn_without_replacement():
    mtp, prompt, vocab = _tree_sampling_setup()
    from maskspec.decode.verify import SamplingConfig

    decoder = Decoder(mtp, mode="quadratic", k=2, drafter=TreeDrafter(mtp, budget=6, width=3, lookup=False))
    siblings_seen = 0
    for seed in range(40):
        seq = decoder.add(prompt, 2, sampling=SamplingConfig(temperature=1.0), seed=seed, eos_token_ids=[])
        decoder.step()
        tree = seq.proposal
        assert len(tree.tokens) == len(tree.parents) == len(tree.probs) <= 6
        for parent in set(tree.parents):
            kids = [i for i, p in enumerate(tree.parents) if p == parent]
            assert len({tree.tokens[i] for i in kids}) == len(kids)  # no token twice under one parent
            assert all(tree.probs[i] is tree.probs[kids[0]] for i in kids)  # drawn from one distribution
            siblings_seen += len(kids) > 1
        decoder.cancel(seq)
    assert siblings_seen > 40


def test_batched_trees_equal_single_ones_greedy_and_sampled():
    """Ragged trees per sequence in one batch, greedy and sampled sequences mixed, joining at different steps:
    each sequence's output and accepted-draft histogram equal its own decoding alone (same seed)."""
    from maskspec.decode.verify import SamplingConfig

    mtp = make_tiny_mtp("qwen2", k=3)
    prompts = make_prompts(6, seed=31)
    configs = [SamplingConfig(), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9),
               SamplingConfig(), SamplingConfig(temperature=1.2, top_k=20), SamplingConfig(temperature=1.0)]
    drafter = TreeDrafter(mtp, budget=5, width=2)
    alone = []
    for i, (p, cfg) in enumerate(zip(prompts, configs)):
        seq, _ = decode_alone(mtp, p, "quadratic", 3, 16, drafter=drafter, sampling=cfg, seed=50 + i, eos=[])
        alone.append((seq.output, seq.stats.accepted_histogram))
    decoder = Decoder(mtp, mode="quadratic", k=3, drafter=drafter)
    seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=16, sampling=c, seed=50 + i, eos_token_ids=[])
                             for i, (p, c) in enumerate(zip(prompts, configs))], [0, 0, 1, 2, 2, 4])
    assert [(s.output, s.stats.accepted_histogram) for s in seqs] == alone
    assert sum(sum(h[1:]) for _, h in alone) > 5  # drafts were accepted, so the trees mattered

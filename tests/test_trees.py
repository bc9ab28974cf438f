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

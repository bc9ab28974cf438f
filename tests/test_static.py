"""The static step (decode/static.py): the same greedy output as the usual step and as plain HF greedy, on every
tiny architecture, for chains and fixed-shape trees; no host sync inside a step; engines reused but never shared
by two live decoders; the stop rules; usage errors; and, on a GPU, the CUDA graph."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import decode_alone, hf_greedy_tokens, make_prompts, make_tiny_mtp
from maskspec.decode import static
from maskspec.decode.api import generate, prepare_input_ids
from maskspec.decode.decoder import Decoder
from maskspec.decode.drafters import SamplerChain, TreeDrafter, merge_branch, prompt_lookup
from maskspec.decode.static import StaticStep, engine_for, needed_capacity, step_rows, tree_shape
from maskspec.decode.verify import SamplingConfig
from maskspec.errors import UsageError
from maskspec.testing import TINY_ARCHITECTURES


def decode_static(mtp, prompt, mode, k, max_new, eos=None, tree=0, width=2):
    return decode_alone(mtp, prompt, mode, k, max_new, eos=eos, static=True, tree=tree, tree_width=width)[0]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_static_step_equals_the_usual_step_and_hf_greedy(arch):
    """Every tiny architecture (sliding windows, per-layer-type masks, soft-capping included), modes ar and
    quadratic at several k: the tokens of plain HF greedy, and the usual step's forward passes (same drafts)."""
    mtp = make_tiny_mtp(arch, k=4, seed=3)
    for i, prompt in enumerate(make_prompts(4, seed=11)):
        expected = hf_greedy_tokens(mtp.model, prompt, 24)
        for mode, k in (("ar", None), ("quadratic", 1), ("quadratic", 2), ("quadratic", 4)):
            usual, _ = decode_alone(mtp, prompt, mode, k, 24, eos=[2])
            fixed = decode_static(mtp, prompt, mode, k, 24, eos=[2])
            assert fixed.output == expected, (arch, i, mode, k)
            assert fixed.stats.forward_passes == usual.stats.forward_passes, (arch, i, mode, k)
            assert fixed.finish_reason == usual.finish_reason


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_static_trees_equal_the_usual_trees(arch):
    """Fixed-shape trees grow as `grow_trees` grows them and take the prompt-lookup branch as `TreeDrafter` merges
    it: the same tokens (HF greedy's) and the same forward passes as the usual step's trees."""
    mtp = make_tiny_mtp(arch, k=4, seed=3)
    for prompt in make_prompts(3, seed=11):
        expected = hf_greedy_tokens(mtp.model, prompt, 30)
        for tree, width in ((4, 2), (8, 2), (6, 3)):
            usual, _ = decode_alone(mtp, prompt, "quadratic", 4, 30, eos=[2], drafter=TreeDrafter(mtp, tree, width))
            fixed = decode_static(mtp, prompt, "quadratic", 4, 30, eos=[2], tree=tree, width=width)
            assert fixed.output == expected, (tree, width)
            assert fixed.stats.forward_passes == usual.stats.forward_passes, (tree, width)


def test_lookup_on_the_device_equals_prompt_lookup():
    """The device's prompt lookup finds what `drafters.prompt_lookup` finds, on contexts with many repeats (a
    vocabulary of 5), short ones included, for 4 slots at once, each with its own context; and its merge into
    each slot's tree gives `merge_branch`'s tree."""
    mtp = make_tiny_mtp("llama", k=4, seed=1)
    engine = StaticStep(mtp, 4, 64, tree=5, width=2, slots=4)
    rng = random.Random(0)
    for trial in range(60):
        contexts = [[rng.randrange(5) for _ in range(rng.randint(1, 40))] for _ in range(engine.slots)]
        engine.context.zero_()
        for slot, context in enumerate(contexts):
            engine.context[slot, :len(context)] = torch.tensor(context)
            engine.length[slot] = len(context) - 1  # the context is the cache's tokens and y0
        branch, valid = engine._lookup_branch(engine.context, engine.length)
        found = [branch[slot][valid[slot]].tolist() for slot in range(engine.slots)]
        assert found == [prompt_lookup(context, 4) for context in contexts], (trial, contexts)
        # Merge into random sampler trees of the engine's shape: the live nodes form merge_branch's trees.
        tokens = torch.tensor([[c[-1]] + [rng.randrange(5) for _ in range(engine.lookup_start - 1)] for c in contexts])
        parents = engine.parents[:, :engine.lookup_start].clone()
        for d, nodes in enumerate(engine._depth_nodes[1:], start=1):  # random parents among the depth before
            previous = engine._depth_nodes[d - 1].tolist()
            for slot in range(engine.slots):
                parents[slot, nodes] = torch.tensor([rng.choice(previous) for _ in nodes.tolist()])
        merged_tokens, merged_parents = engine._merge_lookup(tokens, parents, branch, valid)
        for slot in range(engine.slots):
            ref_tokens = tokens[slot, 1:].tolist()
            ref_parents = [p - 1 for p in parents[slot, 1:].tolist()]
            merge_branch(ref_tokens, ref_parents, found[slot])
            assert (_paths(merged_tokens[slot].tolist(), merged_parents[slot].tolist())
                    == _paths([None] + ref_tokens, [0] + [p + 1 for p in ref_parents])), (trial, slot)


def _paths(tokens, parents):
    """The token paths from node 0 to every node reachable from it (a node that hangs off itself is not)."""
    paths = set()
    for i in range(1, len(tokens)):
        path, at = [], i
        while at != 0 and parents[at] != at and len(path) <= len(tokens):
            path.append(tokens[at])
            at = parents[at]
        if at == 0:
            paths.add(tuple(reversed(path)))
    return paths


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_static_slots_decode_many_sequences_as_each_alone(arch):
    """A static decoder with 4 slots and 7 requests of different budgets, some joining later: sequences wait for
    a free slot, finish at different times (the kept ones move down to the first slots) and each gets the tokens
    and the forward passes of its own static decoding (HF greedy's tokens), for ar, chains and trees."""
    mtp = make_tiny_mtp(arch, k=3, seed=4)
    prompts = make_prompts(7, seed=21, max_len=12)
    budgets = [20, 4, 20, 1, 9, 15, 6]
    joins = [0, 0, 0, 0, 1, 4, 9]
    for mode, k, tree in (("ar", None, 0), ("quadratic", 3, 0), ("quadratic", 3, 5)):
        alone = [decode_static(mtp, p, mode, k, n, tree=tree) for p, n in zip(prompts, budgets)]
        decoder = Decoder(mtp, mode=mode, k=k, tree=tree, static=True, static_slots=4)
        seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=n) for p, n in zip(prompts, budgets)], joins)
        for i, (seq, ref) in enumerate(zip(seqs, alone)):
            assert seq.output == ref.output == hf_greedy_tokens(mtp.model, prompts[i], budgets[i]), (mode, tree, i)
            assert seq.stats.forward_passes == ref.stats.forward_passes, (mode, tree, i)
            assert seq.stats.accepted_histogram == ref.stats.accepted_histogram
        assert decoder.static_running == decoder.running == [] and decoder._engine is None
        engine = next(e for e in static._ENGINES[mtp] if e.slots == 4 and e.tree == tree)
        assert engine.occupied == 0 and not engine.in_use


def test_static_slots_step_the_smallest_bucket_and_free_their_slots():
    mtp = make_tiny_mtp("llama", k=2, seed=1)
    assert static.slot_buckets(1) == [1] and static.slot_buckets(6) == [1, 2, 4, 6]
    assert static.slot_buckets(8) == [1, 2, 4, 8]
    engine = StaticStep(mtp, 2, 256, slots=6)
    seen = []
    compute = engine._compute
    engine._compute = lambda n: (seen.append(n), compute(n))
    for prompt in make_prompts(3, seed=2):
        engine.prefill(prompt)
    lengths = engine.length.tolist()
    assert len(engine.step()) == 3 and seen == [4]
    after = engine.length.tolist()
    assert all(after[i] > lengths[i] for i in range(3)) and after[3:] == [0, 0, 0]  # a free slot stays put
    engine.keep([2])  # slot 2's sequence moves to slot 0
    assert engine.occupied == 1 and engine.free == 5 and engine.live.tolist() == [1, 0, 0, 0, 0, 0]
    engine.step()
    assert seen == [4, 1]
    with pytest.raises(ValueError, match="increasing occupied"):
        engine.keep([0, 3])
    for prompt in make_prompts(5, seed=3):
        engine.prefill(prompt)
    with pytest.raises(UsageError, match="0 of this engine.s 6 slots are free"):
        engine.prefill([4, 5])


@pytest.mark.parametrize("k,tree", [(0, 0), (3, 0), (3, 5)])
def test_prefill_of_several_prompts_equals_each_alone(k, tree):
    """One padded prefill pass over prompts of different lengths (repetitive, so the lookup branch finds matches)
    leaves each slot in the state a prefill of its prompt alone leaves (first token, drafts, tree, context,
    length), and the step after it emits the same tokens."""
    mtp = make_tiny_mtp("llama", k=3, seed=8)
    prompts = [[5, 6, 7] * 4 + [5, 6], [9, 10, 9, 10, 9], list(range(20, 31)), [11, 12, 11]]
    together = StaticStep(mtp, k, 256, tree=tree, slots=4)
    firsts = together.prefill_many(prompts)
    stepped = together.step()
    for slot, prompt in enumerate(prompts):
        alone = StaticStep(mtp, k, 256, tree=tree)
        assert alone.prefill(prompt) == firsts[slot]
        assert alone.step() == [stepped[slot]], slot
        assert alone.tokens[0].tolist() == together.tokens[slot].tolist()
        assert alone.parents[0].tolist() == together.parents[slot].tolist()
        assert alone.length.tolist() == together.length[slot:slot + 1].tolist() == [together._lengths[slot]]
        count = together._lengths[slot] + 1  # the cache's tokens and y0
        assert together.context[slot, :count].tolist() == alone.context[0, :count].tolist()
        assert together.context[slot, :len(prompt) + 1].tolist() == prompt + [firsts[slot]]


def test_a_static_decoder_samples_with_the_usual_step():
    """Greedy and sampled sequences in one static decoder: the greedy ones take the engine's slots (HF greedy's
    tokens), the sampled ones the usual step in a pass of their own (the tokens of the usual decoder with the
    same seeds), and a step with both runs one pass of each."""
    mtp = make_tiny_mtp("llama", k=3, seed=9)
    prompts = make_prompts(5, seed=17)
    sampled = SamplingConfig(temperature=0.8, top_p=0.9)
    requests = [dict(prompt_ids=p, max_new_tokens=14, sampling=sampled if i % 2 else None, seed=i)
                for i, p in enumerate(prompts)]
    usual = Decoder(mtp, k=3, tree=0).generate(requests)
    decoder = Decoder(mtp, k=3, tree=0, static=True, static_slots=2)
    seqs = [decoder.add(**r) for r in requests]
    passes = []
    with decoder.session():
        while decoder.has_work():
            decoder.step()
            passes.append((decoder.last_passes, len(decoder.running), len(decoder.static_running)))
    assert [s.output for s in seqs] == [s.output for s in usual]
    for i in (0, 2, 4):
        assert seqs[i].output == hf_greedy_tokens(mtp.model, prompts[i], 14)
    assert passes[0] == (2, 2, 2)  # the first step prefills both kinds: 2 sampled, 2 greedy in the 2 slots
    assert (2, 2, 2) in passes[1:] or (2, 2, 1) in passes[1:]  # a step of each kind together
    assert decoder._engine is None and decoder.static_running == decoder.running == []


def test_a_sequence_too_long_for_the_engine_waits_for_a_larger_one():
    """The engine is sized for the sequences that start together; a later one that needs more positions waits
    until they have finished, then gets its own engine: every output exact."""
    mtp = make_tiny_mtp("llama", k=2, seed=6)
    short, long_prompt = make_prompts(1, seed=4, max_len=6)[0], make_prompts(1, seed=5, max_len=12)[0]
    decoder = Decoder(mtp, k=2, static=True, static_slots=2)
    first = decoder.add(short, 12)
    decoder.step()  # starts an engine for the short one
    small = decoder._engine
    second = decoder.add(long_prompt, static.CAPACITY_STEP)  # needs a larger engine
    while not first.finished:
        decoder.step()
        assert second in decoder.pending or first.finished
    while decoder.has_work():
        decoder.step()
    assert decoder._engine is None
    assert first.output == hf_greedy_tokens(mtp.model, short, 12)
    assert second.output == hf_greedy_tokens(mtp.model, long_prompt, static.CAPACITY_STEP)
    assert max(e.capacity for e in static._ENGINES[mtp]) > small.capacity


@pytest.mark.parametrize("k,tree", [(2, 0), (3, 5)])
def test_a_prompt_that_fits_a_slot_prefills_and_steps_at_the_edge(k, tree):
    """`fits` is the one capacity rule: the longest prompt that fits with a budget of one token prefills and runs
    its first step (whose rows end at the last position) exactly; one that does not fit is a usage error."""
    mtp = make_tiny_mtp("llama", k=k, seed=3)
    engine = StaticStep(mtp, k, static.CAPACITY_STEP, tree=tree)
    longest = max(n for n in range(1, engine.capacity) if engine.fits(n, 1))
    assert longest + 1 + max(engine.rows, k + 1) == engine.capacity
    prompt = [random.Random(n).randrange(3, 128) for n in range(longest)]
    expected = hf_greedy_tokens(mtp.model, prompt, 2)
    assert engine.prefill(prompt) == expected[0]
    [(accepted, tokens)] = engine.step()
    assert tokens[0] == expected[1]
    with pytest.raises(UsageError, match="does not fit"):
        StaticStep(mtp, k, static.CAPACITY_STEP, tree=tree).prefill(prompt + [5, 6])


def test_tree_shapes_and_rows():
    assert tree_shape(3, 0, 2) == [1, 1, 1]  # a chain
    assert tree_shape(8, 16, 2) == [2] * 8
    assert tree_shape(2, 16, 2) == [2, 2]  # k depths at most
    assert tree_shape(8, 5, 2) == [2, 2, 1]
    assert tree_shape(4, 6, 3) == [3, 3]
    assert step_rows(8, 16, 2) == (17 + 8) * 9 and step_rows(8, 16, 2, lookup=False) == 17 * 9
    assert step_rows(4) == 25 and step_rows(0) == 1  # a chain has no lookup slots


def test_static_step_runs_long_sequences_past_the_step_rows():
    """A budget many times the step's rows: the KV storage is written and reused correctly all the way."""
    mtp = make_tiny_mtp("llama", k=3, seed=5)
    prompt = make_prompts(1, seed=2, max_len=30)[0]
    expected = hf_greedy_tokens(mtp.model, prompt, 200)
    assert decode_static(mtp, prompt, "quadratic", 3, 200).output == expected
    assert decode_static(mtp, prompt, "quadratic", 3, 200, tree=6).output == expected


SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
               "is_nonzero", "equal", "item"}


class _RefuseSyncs(TorchDispatchMode):
    """Fails on any op that reads a tensor's value back to the host or has a value-dependent shape."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.seen.add(name)
        if name in SYNCING_OPS:
            raise AssertionError(f"the static step reads a value back: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch,k,tree,slots", [("llama", 3, 0, 1), ("gemma3", 2, 0, 1), ("mistral", 0, 0, 2),
                                               ("llama", 3, 5, 4), ("llama", 3, 0, 4)])
def test_a_step_reads_nothing_back_until_its_one_sync(arch, k, tree, slots):
    """Everything a step computes (forward, verification, next drafts, state; a tree's attention and KV moves;
    several slots, a free one among them) runs without a value read back, so on a GPU it can be captured as one
    graph; the op list proves the forward really ran under the check."""
    mtp = make_tiny_mtp(arch, k=max(k, 1), seed=1)
    engine = StaticStep(mtp, k, needed_capacity(k, 8, 16, tree), tree=tree, slots=slots)
    for prompt in make_prompts(max(1, slots - 1), seed=9, max_len=8):
        engine.prefill(prompt)
    check = _RefuseSyncs()
    with torch.inference_mode(), check:
        engine._compute(slots)
    assert {"scaled_dot_product_attention", "argmax", "scatter_"} <= check.seen


def test_a_syncing_step_fails_the_check(monkeypatch):
    """The check above has teeth: a step that reads the accepted count back is caught."""
    mtp = make_tiny_mtp("llama", k=2, seed=1)
    engine = StaticStep(mtp, 2, needed_capacity(2, 8, 16))
    engine.prefill([5, 6, 7])
    compute = StaticStep._compute

    def with_a_sync(self, n):
        compute(self, n)
        int(self.length[0])

    monkeypatch.setattr(StaticStep, "_compute", with_a_sync)
    with torch.inference_mode(), _RefuseSyncs(), pytest.raises(AssertionError, match="reads a value back"):
        engine._compute(1)


def test_engines_are_reused_and_never_shared_by_live_decoders():
    mtp = make_tiny_mtp("llama", k=2, seed=2)
    prompts = make_prompts(2, seed=6)
    expected = [hf_greedy_tokens(mtp.model, p, 30) for p in prompts]
    # Two decoders stepped in turn: each has its own engine, both exact.
    decoders = [Decoder(mtp, k=2, static=True) for _ in prompts]
    seqs = [d.add(p, 30) for d, p in zip(decoders, prompts)]
    while any(d.has_work() for d in decoders):
        for d in decoders:
            if d.has_work():
                d.step()
    assert [s.output for s in seqs] == expected
    # Both are idle now: a later sequence that fits takes one of them (no new storage).
    pool = list(static._ENGINES[mtp])
    assert len(pool) == 2 and not any(e.in_use for e in pool)
    again = engine_for(mtp, 2, needed_capacity(2, len(prompts[0]), 30), user=decoders[0])
    assert any(again is e for e in pool)
    # One too big for them gets a new engine; the idle one of the same k it replaces is dropped.
    decoders[0]._engine = None
    bigger = engine_for(mtp, 2, needed_capacity(2, 10, static.CAPACITY_STEP * 2), user=decoders[1])
    assert all(bigger is not e for e in pool) and bigger.capacity >= static.CAPACITY_STEP * 2
    # A decoder queues several sequences and decodes them one after another, each exact.
    decoder = Decoder(mtp, k=2, static=True)
    done = decoder.generate([dict(prompt_ids=p, max_new_tokens=30) for p in prompts])
    assert [s.output for s in done] == expected


def test_new_weights_get_a_new_engine():
    mtp = make_tiny_mtp("llama", k=2, seed=2)
    prompt = make_prompts(1, seed=3)[0]
    decode_static(mtp, prompt, "quadratic", 2, 10)
    first = static._ENGINES[mtp][0]
    with torch.no_grad():
        mtp.sampler.fc1.weight = torch.nn.Parameter(mtp.sampler.fc1.weight.clone())  # a new tensor
    decode_static(mtp, prompt, "quadratic", 2, 10)
    assert all(e is not first for e in static._ENGINES[mtp])


def test_stop_rules_apply_to_the_static_step():
    mtp = make_tiny_mtp("llama", k=3, seed=4)
    prompt = make_prompts(1, seed=8)[0]
    expected = hf_greedy_tokens(mtp.model, prompt, 30)
    for budget in (1, 2, 5, 13):
        seq = decode_static(mtp, prompt, "quadratic", 3, budget)
        assert seq.output == expected[:budget] and seq.finish_reason == "length"
    # An EOS among the accepted drafts ends the output there (kept, as HF keeps it).
    eos = expected[6]
    seq = decode_static(mtp, prompt, "quadratic", 3, 30, eos=[eos])
    assert seq.output == expected[:expected.index(eos) + 1] and seq.finish_reason == "eos"


def test_static_usage_errors():
    mtp = make_tiny_mtp("llama", k=2)
    with pytest.raises(UsageError, match="greedily"):
        generate(mtp, [5, 6], max_new_tokens=4, k=2, static=True, temperature=0.7)
    with pytest.raises(UsageError, match="modes ar and quadratic"):
        Decoder(mtp, mode="linear", k=2, static=True)
    with pytest.raises(UsageError, match="k >= 1"):
        StaticStep(mtp, 0, 256, tree=4)
    with pytest.raises(UsageError, match="drafter"):
        Decoder(mtp, k=2, static=True, drafter=SamplerChain(mtp))
    with pytest.raises(UsageError, match="k must be in"):
        StaticStep(mtp, 3, 256)
    with pytest.raises(UsageError, match="at least 1 slot"):
        Decoder(mtp, k=2, static=True, static_slots=0)


@pytest.mark.slow
def test_static_generate_on_the_embedded_model(smollm):
    """The shipped adapter on the real model (fp32): the static step gives generate's tokens and tau, and the
    stop strings still cut the text."""
    from maskspec.model.mtp import MTPModel

    mtp = MTPModel.from_pretrained("default", adapter="default")
    prompt = "List three prime numbers and explain why each is prime."
    usual = generate(mtp, prompt, max_new_tokens=48, k=4, tree=0)
    fixed = generate(mtp, prompt, max_new_tokens=48, k=4, static=True)
    assert fixed.new_token_ids == usual.new_token_ids
    assert fixed.stats.forward_passes == usual.stats.forward_passes
    # A tree of 16 at k = 8: paths several nodes deep are accepted, so the KV moves are exercised.
    ids = prepare_input_ids(mtp, prompt)[0].tolist()
    tree_usual, _ = decode_alone(mtp, ids, "quadratic", 8, 64, drafter=TreeDrafter(mtp, 16, 2))
    tree_fixed = decode_static(mtp, ids, "quadratic", 8, 64, tree=16)
    assert tree_fixed.output == tree_usual.output
    assert tree_fixed.output[:len(usual.new_token_ids)] == usual.new_token_ids
    assert tree_fixed.stats.forward_passes == tree_usual.stats.forward_passes
    assert max(i for i, n in enumerate(tree_fixed.stats.accepted_histogram) if n) >= 3
    cut = generate(mtp, prompt, max_new_tokens=48, k=4, static=True, stop=[usual.text[10:14]])
    assert cut.text == usual.text[:usual.text.index(usual.text[10:14])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_equals_eager(dtype):
    """On a GPU the step is captured once and replayed: the same tokens as the usual step, no capture error."""
    mtp = make_tiny_mtp("llama", k=3, seed=3, dtype=dtype).to("cuda")
    for prompt in make_prompts(3, seed=12):
        for tree in (0, 6):
            drafter = TreeDrafter(mtp, tree, 2) if tree else None
            usual, _ = decode_alone(mtp, prompt, "quadratic", 3, 40, drafter=drafter)
            fixed = decode_static(mtp, prompt, "quadratic", 3, 40, tree=tree)
            assert fixed.output == usual.output
    engines = static._ENGINES[mtp]
    assert len(engines) == 2 and all(e.captured == [1] and e.graph_error is None for e in engines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_slots_equal_each_sequence_alone():
    """On a GPU, several slots: a graph per slot bucket reached, and every sequence gets its tokens alone."""
    mtp = make_tiny_mtp("llama", k=3, seed=3, dtype=torch.float32).to("cuda")
    prompts = make_prompts(6, seed=13)
    budgets = [30, 8, 30, 3, 20, 12]
    for tree in (0, 6):
        alone = [decode_static(mtp, p, "quadratic", 3, n, tree=tree).output for p, n in zip(prompts, budgets)]
        decoder = Decoder(mtp, k=3, tree=tree, static=True, static_slots=4)
        seqs = decoder.generate([dict(prompt_ids=p, max_new_tokens=n) for p, n in zip(prompts, budgets)],
                                [0, 0, 0, 1, 2, 5])
        assert [s.output for s in seqs] == alone
        engine = next(e for e in static._ENGINES[mtp] if e.slots == 4 and e.tree == tree)
        assert engine.graph_error is None and {1, 2, 4} & set(engine.captured)

"""MTPModel: gate exactness, the one-pass layout, adapter files, which parameters train."""

import copy
import gc
import json
import pickle
import weakref
from contextlib import nullcontext

import pytest
import torch

from maskspec.adapter import FORMAT_VERSION, load_adapter, read_adapter_config
from maskspec.errors import AdapterError
from maskspec.model import kernels
from maskspec.model.kernels import Kernels
from maskspec.model.layout import build_layout
from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
from maskspec.testing import TINY_ARCHITECTURES, tiny_model


def _random_mtp(arch, k=3, seed=0, dtype=torch.float32):
    return randomize_adapter_(MTPModel(tiny_model(arch, dtype=dtype, seed=seed), config=MTPConfig(k=k, rank=4)),
                              seed=seed + 1)


def _lora_b_nonzero(mtp):
    return all(t.abs().sum() > 0 for n, t in mtp.adapter_state_dict().items() if n.endswith(".B"))


def _normal_outputs(mtp, ids, layout):
    with torch.no_grad():
        hidden = mtp.forward_layout(ids, layout).hidden[0, layout.normal_rows()]
        return hidden, mtp.head_logits(hidden)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_gate_exactness_tiny(arch):
    mtp = _random_mtp(arch)
    assert _lora_b_nonzero(mtp)
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(3))
    # Masks after every token, LoRA on them: the normal rows must not notice.
    layout = build_layout(14, range(14), mtp.k)
    hidden, logits = _normal_outputs(mtp, ids, layout)
    # The plain base model on the same rows, with the adapter out of the picture (gate never set):
    with torch.no_grad():
        token_ids = ids[:, layout.normal_index.clamp(min=0)]
        embeds = mtp.embed_rows(token_ids, layout.mask_slot[None])
        mask = mtp.model_attention_mask(layout.attention[None], layout.position_ids[None],
                                        layout.key_positions[None], embeds.dtype)
        plain = mtp.model.get_decoder()(inputs_embeds=embeds, position_ids=layout.position_ids[None],
                                        attention_mask=mask).last_hidden_state[0, layout.normal_rows()]
    assert torch.equal(hidden, plain)
    # And with no mask rows at all, the wrapper's path is bit-identical to `model(input_ids)`.
    bare = build_layout(14, [], mtp.k)
    hidden0, logits0 = _normal_outputs(mtp, ids, bare)
    with torch.no_grad():
        ref = mtp.model(ids, output_hidden_states=True)
    assert torch.equal(logits0, ref.logits[0])
    assert torch.equal(hidden0, mtp.model.get_decoder()(ids).last_hidden_state[0])
    # The mask rows do change with the adapter (the test would pass trivially otherwise).
    with torch.no_grad():
        masked = mtp.forward_layout(ids, layout).hidden[0, layout.mask_rows()]
        for p in mtp.adapter_state_dict().values():
            p.mul_(2)
        masked2 = mtp.forward_layout(ids, layout).hidden[0, layout.mask_rows()]
    assert not torch.allclose(masked, masked2)


@pytest.mark.slow
def test_gate_exactness_smollm(smollm):
    model, tok = smollm
    mtp = randomize_adapter_(MTPModel(copy.deepcopy(model), tok, MTPConfig(k=4, rank=8)), scale=0.02)
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    n = ids.shape[1]
    layout = build_layout(n, range(n), 4)
    # The model called directly is the stock model, whatever the decoding kernel setting.
    with torch.no_grad():
        assert torch.equal(mtp.model(ids).logits, model(ids).logits)
    mtp.kernels = "stock"  # bitwise statements about the gate, with the stock kernel
    hidden, logits = _normal_outputs(mtp, ids, layout)
    bare_hidden, bare_logits = _normal_outputs(mtp, ids, build_layout(n, [], 4))
    with torch.no_grad():
        ref = model(ids)
    assert torch.equal(bare_logits, ref.logits[0])
    # Same rows with the gate off: bit-identical hidden states and logits.
    with torch.no_grad():
        token_ids = ids[:, layout.normal_index.clamp(min=0)]
        embeds = mtp.embed_rows(token_ids, layout.mask_slot[None])
        mask = mtp.model_attention_mask(layout.attention[None], layout.position_ids[None],
                                        layout.key_positions[None], embeds.dtype)
        plain = model.get_decoder()(inputs_embeds=embeds, position_ids=layout.position_ids[None],
                                    attention_mask=mask).last_hidden_state[0, layout.normal_rows()]
    assert torch.equal(hidden, plain)
    assert torch.equal(logits, mtp.head_logits(plain))
    # Different row count from `model(ids)` changes summation order only.
    torch.testing.assert_close(logits, ref.logits[0], atol=1e-4, rtol=0)

    # The decoding kernel: the gate isolates the normal rows just as well (bitwise, same rows, same kernel),
    # and the result differs from the stock kernel by rounding only.
    mtp.kernels = "packed"  # the default; outside a decoding session that is oneDNN on the plain matrices
    fast_hidden, fast_logits = _normal_outputs(mtp, ids, layout)
    with torch.no_grad(), mtp.gate.active(torch.empty(0, dtype=torch.long), Kernels.ONEDNN):
        fast_plain = mtp.model.get_decoder()(
            inputs_embeds=embeds, position_ids=layout.position_ids[None], attention_mask=mask
        ).last_hidden_state[0, layout.normal_rows()]
    assert torch.equal(fast_hidden, fast_plain)
    assert not torch.equal(fast_hidden, hidden)  # the other kernel really ran
    torch.testing.assert_close(fast_logits, logits, atol=5e-4, rtol=0)  # logits ~15: ~1e-5 relative


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_one_pass_layout_equals_separate_prefix_forwards(arch):
    k = 3
    mtp = _random_mtp(arch, k=k, dtype=torch.float64)
    n = 10
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(5))
    layout = build_layout(n, range(n), k)  # masks after every position
    with torch.no_grad():
        hidden = mtp.forward_layout(ids, layout).hidden[0]
        for h in range(n):
            single = build_layout(h + 1, [h], k)  # prefix x_0..x_h + k masks
            alone = mtp.forward_layout(ids[:, :h + 1], single).hidden[0, single.block_rows(h)]
            torch.testing.assert_close(hidden[layout.block_rows(h)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tree_step_equals_separate_forwards_of_each_path(arch):
    """A draft tree after y0 in one pass, after a cached prompt: every node's latent equals a plain forward of
    prompt + its path, and every mask block equals a forward of prompt + the node's path + that block."""
    from transformers import DynamicCache

    k = 2
    mtp = _random_mtp(arch, k=k, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 128, (1, 6), generator=gen)
    parents = [-1, 0, 0, 1, 1, 2, 3, 6]  # y0; a, b; a's children c, d; b's child e; c -> f -> g
    tokens = torch.randint(3, 128, (1, len(parents)), generator=gen)
    heads = [0, 2, 4, 5, 7]  # blocks after y0, b, d, e and the deepest node g
    with torch.no_grad():
        cache = mtp.forward_layout(prompt, build_layout(6, [], k), use_cache=True).past_key_values
        tree = build_layout(len(parents), heads, k, past_length=6, parents=parents, normals_first=True)
        hidden = mtp.forward_layout(tokens, tree, past_key_values=cache).hidden[0]
        for node in range(len(parents)):
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            path.reverse()
            ids = torch.cat([prompt, tokens[:, path]], dim=1)
            alone_layout = build_layout(ids.shape[1], [ids.shape[1] - 1] if node in heads else [], k)
            alone = mtp.forward_layout(ids, alone_layout).hidden[0]
            torch.testing.assert_close(hidden[tree.normal_rows()[node]], alone[alone_layout.normal_rows()[-1]],
                                       atol=1e-6, rtol=0)
            if node in heads:
                torch.testing.assert_close(hidden[tree.block_rows(node)],
                                           alone[alone_layout.block_rows(ids.shape[1] - 1)], atol=1e-6, rtol=0)
    assert isinstance(cache, DynamicCache)


def test_only_adapter_parameters_get_gradients():
    mtp = _random_mtp("llama")
    ids = torch.randint(3, 128, (1, 8))
    layout = build_layout(8, range(7), mtp.k)
    hidden = mtp.forward_layout(ids, layout).hidden[0]
    mask_rows = layout.mask_rows()
    loss = mtp.head_logits(hidden[mask_rows]).logsumexp(-1).mean()
    prev = torch.full((len(mask_rows),), 5, dtype=torch.long)
    loss = loss + mtp.sampler_logits(prev, hidden[mask_rows]).logsumexp(-1).mean()
    loss.backward()
    trainable = {id(p) for p in mtp.trainable_parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mtp.trainable_parameters())
    for name, p in mtp.named_parameters():
        if id(p) not in trainable:
            assert not p.requires_grad and p.grad is None, name
    names = set(mtp.adapter_state_dict())
    assert "mask_embeddings" in names and any(n.startswith("sampler.") for n in names)
    assert sum(n.startswith("lora.") for n in names) == 2 * 7 * 2  # A and B x 7 targets x 2 layers


def test_decoding_lora_update_equals_training_update():
    """Decoding (no grad, contiguous mask rows) adds LoRA with one fused addmm_; training uses the plain
    expression. Same numbers either way."""
    mtp = _random_mtp("llama", dtype=torch.float64)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    layout = build_layout(5, range(5), mtp.k, normals_first=True)  # every mask row after the normal rows
    with torch.no_grad():
        fused = mtp.forward_layout(ids, layout).hidden
    plain = mtp.forward_layout(ids, layout).hidden.detach()
    assert plain.dtype == torch.float64
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=0)
    with torch.no_grad():  # and the update is really there
        for p in mtp.adapter_state_dict().values():
            p.mul_(0.5)
        assert not torch.allclose(mtp.forward_layout(ids, layout).hidden[0, layout.mask_rows()],
                                  fused[0, layout.mask_rows()])


def test_gate_is_cleared_after_the_call():
    mtp = _random_mtp("llama")
    ids = torch.randint(3, 128, (1, 6))
    mtp.forward_layout(ids, build_layout(6, [5], mtp.k))
    assert mtp.gate.rows is None


def test_adapter_round_trip(tmp_path):
    mtp = _random_mtp("qwen2")
    folder = mtp.save_adapter(tmp_path / "ad")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    for key in ("format_version", "k", "rank", "alpha", "target_modules", "sampler_shape", "base_model",
                "base_fingerprint", "dtype"):
        assert key in cfg
    other = MTPModel(tiny_model("qwen2"), config=MTPConfig(**read_adapter_config(folder).mtp_kwargs()))
    load_adapter(other, folder)
    for (n1, t1), (n2, t2) in zip(mtp.adapter_state_dict().items(), other.adapter_state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    ids = torch.randint(3, 128, (1, 9))
    layout = build_layout(9, range(9), mtp.k)
    with torch.no_grad():
        assert torch.equal(mtp.forward_layout(ids, layout).hidden, other.forward_layout(ids, layout).hidden)
    # Saving over an existing adapter replaces it whole.
    mtp.save_adapter(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_adapter_decoding_defaults_pick_k(tmp_path):
    from maskspec.decode.api import generate

    mtp = _random_mtp("llama", k=3)
    folder = mtp.save_adapter(tmp_path / "ad")
    assert mtp.default_k == 3  # nothing measured: the adapter's k
    cfg_path = folder / "adapter_config.json"
    for recorded, expected in (({"cpu": {"k": 9}}, None), ({"cpu": "fast"}, None),
                               ({"cpu": {"k": 2, "tree": -1}}, None), ({"cpu": {"k": 2, "tree": "4"}}, None),
                               ({"cpu": {"k": 2, "measured": "bench"}}, 2), ({"cuda": {"k": 1}}, 3)):
        cfg = json.loads(cfg_path.read_text())
        cfg["decoding"] = recorded
        cfg_path.write_text(json.dumps(cfg))
        if expected is None:  # a recommendation the adapter cannot follow is a broken config, said at once
            with pytest.raises(AdapterError, match="decoding.cpu"):
                read_adapter_config(folder)
            continue
        other = MTPModel(tiny_model("llama"), config=MTPConfig(**read_adapter_config(folder).mtp_kwargs()))
        load_adapter(other, folder)
        assert other.default_k == expected, recorded
    # Decoding without k uses it: the histogram of accepted drafts has default_k + 1 bins.
    out = generate(other, [5, 6, 7], max_new_tokens=6, mode="quadratic")
    assert len(out.stats.accepted_histogram) == other.default_k + 1 == 4
    other.decoding_defaults = {"cpu": {"k": 2}}
    out = generate(other, [5, 6, 7], max_new_tokens=6, mode="quadratic")
    assert len(out.stats.accepted_histogram) == 3


def test_adapter_bad_inputs(tmp_path):
    mtp = _random_mtp("llama")
    good = mtp.save_adapter(tmp_path / "good")
    fresh = lambda seed=0, arch="llama": MTPModel(tiny_model(arch, seed=seed), config=MTPConfig(k=3, rank=4))  # noqa

    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(fresh(), tmp_path / "missing")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="no adapter.safetensors"):
        load_adapter(fresh(), no_weights)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    data = (good / "adapter.safetensors").read_bytes()
    (truncated / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(fresh(), truncated)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (garbage / "adapter.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(fresh(), garbage)

    with pytest.raises(AdapterError, match="made for base model"):
        load_adapter(fresh(seed=7), good)  # same architecture, other weights
    with pytest.raises(AdapterError, match="made for base model"):
        load_adapter(fresh(arch="qwen2"), good)
    # Shape mismatch (another rank) with a matching base model.
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(MTPModel(tiny_model("llama"), config=MTPConfig(k=3, rank=8)), good)

    future = tmp_path / "future"
    future.mkdir()
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg["format_version"] = FORMAT_VERSION + 1
    (future / "adapter_config.json").write_text(json.dumps(cfg))
    (future / "adapter.safetensors").write_bytes(data)
    with pytest.raises(AdapterError, match="format version"):
        load_adapter(fresh(), future)
    (future / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(fresh(), future)


def test_cli_reports_adapter_errors_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "maskspec.cli", "generate", "hi", "--adapter",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: adapter folder") and "does not exist" in proc.stderr


@pytest.mark.slow
def test_default_model_without_adapter_warns(smollm):
    from maskspec.adapter import shipped_adapter_available

    if not shipped_adapter_available():
        pytest.skip("no shipped adapter in this installation")
    with pytest.warns(UserWarning, match="adapter='default'"):
        MTPModel.from_pretrained("default")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*adapter='default'.*")  # no such warning with the adapter
        assert MTPModel.from_pretrained("default", adapter="default").default_k >= 1


@pytest.mark.skipif(not kernels.PACKING_AVAILABLE, reason="PyTorch without oneDNN weight packing")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q/k/v
@pytest.mark.parametrize("normals_first", [True, False])  # contiguous mask rows (decoding) or scattered
def test_packed_decoding_path(arch, normals_first, monkeypatch):
    """Inside `decoding_session` the wrapped projections use the packed [W; A]: normal rows bit-identical to the
    unpacked oneDNN kernel, mask rows equal up to rounding; a weight changed between sessions is repacked."""
    mtp = _random_mtp(arch, k=3)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    layout = build_layout(9, [2, 5, 8], mtp.k, normals_first=normals_first)
    normal, masks = layout.normal_rows(), layout.mask_rows()
    calls: list[int] = []
    real = kernels.linear_packed
    monkeypatch.setattr(kernels, "linear_packed", lambda *a: calls.append(1) or real(*a))

    def hidden(packed: bool) -> torch.Tensor:
        with torch.no_grad(), (mtp.decoding_session() if packed else nullcontext()):
            return mtp.forward_layout(ids, layout).hidden[0]

    plain = hidden(False)
    assert calls == []  # outside the block nothing packed is used
    packed = hidden(True)
    assert len(calls) >= len(mtp.lora_layers)
    assert torch.equal(packed[normal], plain[normal])
    torch.testing.assert_close(packed[masks], plain[masks], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for name, p in mtp.adapter_state_dict().items():
            if name.startswith("lora."):
                p.mul_(1.5)
    plain_changed, packed_changed = hidden(False), hidden(True)
    assert not torch.allclose(plain_changed[masks], plain[masks], atol=1e-3)
    torch.testing.assert_close(packed_changed[masks], plain_changed[masks], atol=1e-4, rtol=1e-4)
    assert mtp._sessions == 0
    calls.clear()
    hidden(False)
    assert calls == []  # nor after one
    with torch.no_grad(), mtp.decoding_session():
        with torch.enable_grad():  # nor where autograd records
            mtp.forward_layout(ids, layout)
        assert calls == []
    # Packed oneDNN tensors cannot be copied or pickled: a copy leaves them behind and packs its own.
    assert len(mtp._packs) > 0
    for clone in (copy.deepcopy(mtp), pickle.loads(pickle.dumps(mtp))):
        assert len(clone._packs) == 0 and clone._packs is not mtp._packs and clone.gate.packs is clone._packs
        with torch.no_grad(), clone.decoding_session():
            assert len(clone._packs) == len(mtp._packs)
            assert torch.equal(clone.forward_layout(ids, layout).hidden[0], packed_changed)


@pytest.mark.parametrize("choice", ["onednn", "stock"])
def test_kernels_without_packing_leave_the_plain_path(choice, monkeypatch):
    mtp = _random_mtp("llama")
    mtp.kernels = choice
    calls: list[int] = []
    monkeypatch.setattr(kernels, "linear_packed", lambda *a: calls.append(1))
    with torch.no_grad(), mtp.decoding_session():
        mtp.forward_layout(torch.randint(3, 128, (1, 6)), build_layout(6, [5], mtp.k, normals_first=True))
    assert calls == []
    assert len(mtp._packs) == 0


def test_kernels_switch_checks_its_value():
    mtp = _random_mtp("llama")
    assert mtp.kernels == "packed"  # the default
    for choice in ("onednn", "stock", "packed", Kernels.STOCK):
        mtp.kernels = choice
        assert mtp.kernels == choice and type(mtp.kernels) is str
    for bad in ("bogus", "oneDNN", "", None, True):
        with pytest.raises(ValueError, match="'packed', 'onednn', 'stock'"):
            mtp.kernels = bad
        assert mtp.kernels == "stock"  # unchanged
    assert not hasattr(mtp, "fast_kernels") and not hasattr(mtp, "pack_weights")


def test_stock_kernels_never_call_onednn(monkeypatch):
    """With "stock", decoding's passes (wrapped projections, head, sampler, draft head) run `F.linear` only,
    inside a decoding session too: the same numbers as the base model with the gate off."""
    mtp = _random_mtp("qwen2")  # biases on q/k/v
    mtp.set_draft_vocab(range(3, 60))
    mtp.kernels = "stock"
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(8))
    bare = build_layout(7, [], mtp.k)
    with torch.no_grad():
        ref = mtp.model(ids).logits[0]
        mtp.kernels = "packed"
        packed_outside = mtp.head_logits(mtp.forward_layout(ids, bare).hidden[0])
    mtp.kernels = "stock"

    def refuse(*args, **kwargs):
        raise AssertionError("oneDNN called with the stock kernels")

    monkeypatch.setattr(kernels, "linear_packed", refuse)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuse)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="oneDNN called"):  # the patch does intercept the other kernels
            mtp.kernels = "packed"
            mtp.head_logits(mtp.forward_layout(ids, bare).hidden[0])
        mtp.kernels = "stock"
        with mtp.decoding_session():
            hidden = mtp.forward_layout(ids, build_layout(7, range(7), mtp.k, normals_first=True)).hidden[0]
            logits = mtp.head_logits(mtp.forward_layout(ids, bare).hidden[0])
            prev = torch.full((hidden.shape[0],), 5, dtype=torch.long)
            mtp.sampler_logits(prev, hidden)
            mtp.draft_logits(prev, hidden, extra_ids=torch.tensor([90, 100]))
    assert torch.equal(logits, ref)
    torch.testing.assert_close(packed_outside, ref, atol=1e-4, rtol=0)


@pytest.mark.skipif(not kernels.PACKING_AVAILABLE, reason="PyTorch without oneDNN weight packing")
def test_pack_cache_is_per_model(monkeypatch):
    """Each model packs its own matrices into its own cache: another model's session neither fills nor uses it,
    packed results equal each model's own plain oneDNN ones, and a dropped model frees its packs."""
    models = [_random_mtp("llama", seed=0), _random_mtp("llama", seed=5)]
    for mtp, vocab in zip(models, (range(3, 50), range(40, 110))):
        mtp.set_draft_vocab(vocab)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    layout = build_layout(8, [3, 7], models[0].k, normals_first=True)
    prev = torch.full((len(layout.mask_rows()),), 9, dtype=torch.long)

    def outputs(mtp):
        hidden = mtp.forward_layout(ids, layout).hidden[0]
        masks = hidden[layout.mask_rows()]
        return (hidden[layout.normal_rows()], mtp.head_logits(hidden), mtp.sampler_logits(prev, masks),
                mtp.draft_logits(prev, masks)[0])

    with torch.no_grad():
        plain = [outputs(mtp) for mtp in models]  # outside a session: oneDNN on the plain matrices
    calls: list[int] = []
    real = kernels.linear_packed
    monkeypatch.setattr(kernels, "linear_packed", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad(), models[0].decoding_session():
        assert len(models[0]._packs) > 0 and len(models[1]._packs) == 0
        with models[1].decoding_session():
            for mtp, before in zip(models, plain):
                calls.clear()
                now = outputs(mtp)
                # wrapped projections, head (twice: full logits and the sampler's), sampler fc1/fc2, draft head
                assert len(calls) >= len(mtp.lora_layers) + 5
                normal, *heads = now
                assert torch.equal(normal, before[0])
                for got, want in zip(heads, before[1:]):
                    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert models[0]._sessions == 1 and models[1]._sessions == 0
        mine = {id(models[0]._packs.get(key).matrix) for key in models[0]._packs}
        theirs = {id(models[1]._packs.get(key).matrix) for key in models[1]._packs}
        assert mine.isdisjoint(theirs)
    refs = [weakref.ref(models[1]._packs.get(key).matrix) for key in models[1]._packs]
    assert refs
    del models[1], mtp
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert len(models[0]._packs) > 0


@pytest.mark.skipif(not kernels.PACKING_AVAILABLE, reason="PyTorch without oneDNN weight packing")
def test_packs_follow_module_to_and_sessions_nest(monkeypatch):
    """`module.to` gives new matrices: the next session repacks them (none in float64); sessions nest and end in
    any order, packing stays on while any is open."""
    mtp = _random_mtp("llama")
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    layout = build_layout(6, [5], mtp.k, normals_first=True)
    calls: list[int] = []
    real = kernels.linear_packed
    monkeypatch.setattr(kernels, "linear_packed", lambda *a: calls.append(1) or real(*a))

    def run():
        calls.clear()
        return mtp.forward_layout(ids, layout).hidden[0]

    with torch.no_grad():
        with mtp.decoding_session():
            first = run()
            assert calls
        packs = {key: mtp._packs.get(key) for key in mtp._packs}
        with mtp.decoding_session():  # nothing changed: nothing packed again
            assert all(mtp._packs.get(key) is pack for key, pack in packs.items())
        mtp.to(torch.float64)
        with mtp.decoding_session():
            assert len(mtp._packs) == 0
            run()
            assert calls == []
        mtp.to(torch.float32)
        outer, inner = mtp.decoding_session(), mtp.decoding_session()
        outer.__enter__()
        inner.__enter__()
        assert len(mtp._packs) == len(packs) and all(mtp._packs.get(key) is not packs[key] for key in packs)
        outer.__exit__(None, None, None)  # the first one ends first
        assert torch.equal(run(), first) and calls
        inner.__exit__(None, None, None)
        run()
        assert calls == [] and mtp._sessions == 0


@pytest.mark.skipif(not kernels.PACKING_AVAILABLE, reason="PyTorch without oneDNN weight packing")
def test_a_new_draft_vocabulary_inside_a_session_retires_the_old_pack():
    mtp = _random_mtp("llama")
    latents = torch.randn(4, mtp.model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    prev = torch.full((4,), 7, dtype=torch.long)
    with torch.no_grad():
        mtp.set_draft_vocab(range(3, 50))
        with mtp.decoding_session():
            assert "draft_head" in mtp._packs
            first = mtp.draft_logits(prev, latents)[0]
            mtp.set_draft_vocab(range(20, 67))  # the same size, other rows
            assert "draft_head" not in mtp._packs
            second = mtp.draft_logits(prev, latents)[0]
        mtp.set_draft_vocab(range(3, 50))
        plain_first = mtp.draft_logits(prev, latents)[0]
        mtp.set_draft_vocab(range(20, 67))
        plain_second = mtp.draft_logits(prev, latents)[0]
    torch.testing.assert_close(first, plain_first, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, plain_second, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first, second, atol=1e-3)

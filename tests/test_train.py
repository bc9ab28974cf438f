"""Training loop: frozen base, learning, losses, resume, checkpoints, gradient checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

from maskspec.adapter import load_adapter
from maskspec.model.layout import IGNORE_INDEX
from maskspec.train.data import make_batch
from maskspec.train.losses import LossWeights, compute_losses, row_counts
from maskspec.train.checkpoints import list_checkpoints
from maskspec.train.config import TrainConfig, TrainError
from maskspec.train.trainer import train

from train_helpers import single_thread, synthetic_examples, tiny_mtp


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out=str(out), k=3, rank=8, alpha=16.0, lr=1e-2, steps=4, batch_size=2, warmup=2,
                schedule="constant", save_every=1000, progress=False, eval_size=0)
    base.update(kw)
    return TrainConfig(**base)


def test_base_weights_and_normal_logits_unchanged(tmp_path):
    mtp = tiny_mtp()
    examples = synthetic_examples(4)
    before = {n: p.detach().clone() for n, p in mtp.base_parameters()}
    adapter_before = {n: p.detach().clone() for n, p in mtp.adapter_state_dict().items()}
    probe = examples[0].input_ids[None]
    with torch.no_grad():
        logits_before = mtp.model(probe).logits.clone()
    train(_cfg(tmp_path / "a", weight_decay=0.1), mtp=mtp, examples=examples)

    for name, p in mtp.base_parameters():
        assert not p.requires_grad, name
        assert torch.equal(p, before[name]), f"base parameter {name} changed"
    # The adapter did move (so the check above is not vacuous).
    moved = [n for n, p in mtp.adapter_state_dict().items() if not torch.equal(p, adapter_before[n])]
    assert any(n.startswith("lora.") for n in moved) and "mask_embeddings" in moved
    with torch.no_grad():
        assert torch.equal(mtp.model(probe).logits, logits_before)
        # Normal rows of a training layout (LoRA gated on for the masks) still give the base model's latents.
        batch = make_batch([examples[0]], k=3)
        hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                                  batch.key_positions).hidden[0]
        normal = batch.mask_slot[0] < 0
        base_hidden = mtp.model.get_decoder()(input_ids=probe).last_hidden_state[0]
        torch.testing.assert_close(hidden[normal], base_hidden, rtol=1e-5, atol=1e-5)


def test_overfit_tiny_dataset(tmp_path):
    mtp = tiny_mtp()
    examples = synthetic_examples(4)
    result = train(_cfg(tmp_path / "o", steps=80, lr=2e-2, warmup=5), mtp=mtp, examples=examples,
                   eval_examples=examples)
    ev = result.evals[-1]
    assert ev["targets"] > 100
    assert ev["acc_base_mean"] > 0.95, ev
    assert ev["acc_sampler_mean"] > 0.95, ev
    assert min(ev["acc_base"]) > 0.9  # every offset, not only the easy first one
    hist = result.history

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    for key in ("ce", "sampler", "lcm"):
        assert mean(key, hist[-10:]) < 0.5 * mean(key, hist[:5]) if key != "lcm" else \
            mean(key, hist[-10:]) < mean(key, hist[:5]), key
    # The final adapter is a loadable folder, with the hyperparameters recorded.
    fresh = tiny_mtp(adapter_seed=123)
    config = load_adapter(fresh, tmp_path / "o")
    assert config.training["steps"] == 80 and config.training["k"] == 3
    for name, p in fresh.adapter_state_dict().items():
        assert torch.equal(p, mtp.adapter_state_dict()[name])
    lines = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval" not in m] == list(range(1, 81))


def test_losses_definition():
    """The pieces are what the spec says: CE of the base head and of the sampler (prev = true previous token) at
    labelled mask rows, and LCM against the detached partner normal row."""
    torch.manual_seed(0)
    mtp = tiny_mtp()
    for p in mtp.sampler.parameters():  # a non-trivial sampler
        torch.nn.init.normal_(p, std=0.3)
    ex = synthetic_examples(1)[0]
    batch = make_batch([ex], k=3)
    hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                              batch.key_positions).hidden
    out = compute_losses(mtp, hidden, batch, LossWeights(kl=1.0), row_counts(batch))

    ids, h = ex.input_ids, hidden[0]
    ce = sampler = lcm = kl = 0.0
    n_ce = n_lcm = 0
    slots = batch.mask_slot[0].tolist()
    normal_row = {}  # normal index -> row
    for row, s in enumerate(slots):
        if s < 0:
            normal_row[len(normal_row)] = row
    for row, s in enumerate(slots):
        if s < 0:
            continue
        # Find the block head: the last normal row before this mask row.
        hd = max(i for i, rr in normal_row.items() if rr < row)
        j = s + 1
        partner = hd + j
        if partner < ids.numel():
            lcm += (h[row] - h[normal_row[partner]]).pow(2).mean()
            n_lcm += 1
        target = hd + 1 + j
        if target < ids.numel() and ex.labelled[target]:
            logits = mtp.head_logits(h[row])
            ce += torch.nn.functional.cross_entropy(logits[None], ids[target][None])
            sl = mtp.sampler_logits(ids[target - 1][None], h[row][None])
            sampler += torch.nn.functional.cross_entropy(sl, ids[target][None])
            p_t = torch.softmax(mtp.head_logits(h[normal_row[partner]]), -1)
            kl += (p_t * (p_t.log() - torch.log_softmax(logits, -1))).sum()
            n_ce += 1
    assert n_ce == int(((batch.labels != IGNORE_INDEX) & (batch.mask_slot >= 0)).sum())
    torch.testing.assert_close(out["ce"], ce / n_ce)
    torch.testing.assert_close(out["sampler"], sampler / n_ce)
    torch.testing.assert_close(out["lcm"], lcm / n_lcm)
    torch.testing.assert_close(out["kl"], kl / n_ce)
    torch.testing.assert_close(out["loss"], out["ce"] + out["sampler"] + out["lcm"] + out["kl"])
    # The LCM target is detached: its gradient reaches the mask latents only.
    hidden.retain_grad()
    out["lcm"].backward()
    grad = hidden.grad[0]
    assert grad[batch.mask_slot[0] >= 0].abs().sum() > 0
    assert grad[batch.mask_slot[0] < 0].abs().sum() == 0


def test_sampler_fed_its_own_predictions():
    """--sampler-prev own: at mask j > 0 the sampler's previous token is its own argmax at mask j - 1 of the same
    block (fed its own prediction in turn), the first mask keeping the true token, as decoding drafts."""
    torch.manual_seed(0)
    mtp = tiny_mtp()
    for p in mtp.sampler.parameters():
        torch.nn.init.normal_(p, std=0.3)
    examples = synthetic_examples(2)
    batch = make_batch(examples, k=3)
    hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                              batch.key_positions).hidden
    own = compute_losses(mtp, hidden, batch, LossWeights(sampler_prev="own"), row_counts(batch))
    true = compute_losses(mtp, hidden, batch, LossWeights(), row_counts(batch))

    total, count, fed_other = 0.0, 0, 0
    for b, ex in enumerate(examples):
        ids, h, slots = ex.input_ids, hidden[b], batch.mask_slot[b].tolist()
        normal_rows = [row for row, s in enumerate(slots) if s < 0][:ids.numel()]
        for row, s in enumerate(slots):
            if s != 0:
                continue
            head = max(i for i, rr in enumerate(normal_rows) if rr < row)
            prev = ids[head + 1]  # the first mask's previous token is the true one
            for j in range(3):
                target = head + 2 + j
                if slots[row + j] != j or target >= ids.numel() or not ex.labelled[target]:
                    break
                logits = mtp.sampler_logits(prev[None], h[row + j][None])
                total += torch.nn.functional.cross_entropy(logits, ids[target][None])
                count += 1
                fed_other += int(prev != ids[target - 1])
                prev = logits.argmax(-1)[0]
    assert count == row_counts(batch).target and fed_other > 5
    torch.testing.assert_close(own["sampler"], total / count)
    assert not torch.isclose(own["sampler"], true["sampler"])
    torch.testing.assert_close(own["ce"], true["ce"])  # only the sampler's input changes
    with pytest.raises(Exception, match="--sampler-prev"):
        TrainConfig(out="x", sampler_prev="mine").validate()


def test_flex_attention_and_normals_first_compute_the_same_losses():
    """--attention flex: FlexAttention over the normals-first layout (a block-sparse mask) gives the losses of the
    dense interleaved path (and, on CUDA, its adapter gradients; FlexAttention has no backward on CPU); the
    normals-first order alone changes no loss; and that layout's mask skips most tiles."""
    from maskspec.model.mtp import block_mask
    from maskspec.train.trainer import _set_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mtp = tiny_mtp().to(device)
    for p in mtp.sampler.parameters():
        torch.nn.init.normal_(p, std=0.3)
    examples = synthetic_examples(2, length=40)
    params = [p for p in mtp.parameters() if p.requires_grad]
    with_grad = device == "cuda"

    def run(normals_first):
        batch = make_batch(examples, k=3, normals_first=normals_first).to(device)
        for p in params:
            p.grad = None
        with torch.set_grad_enabled(with_grad):
            hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                                      batch.key_positions).hidden
            out = compute_losses(mtp, hidden, batch, LossWeights(kl=1.0, sampler_prev="own"), row_counts(batch))
        if with_grad:
            out["loss"].backward()
        return {n: v.detach() for n, v in out.items()}, [p.grad for p in params]

    dense = run(False)
    reordered = run(True)
    mtp.model.set_attn_implementation("flex_attention")  # what `_set_attention` does where training can use it
    try:
        flex = run(True)
    finally:
        mtp.model.set_attn_implementation("sdpa")
    assert dense[0]["loss"] > 0 and dense[0]["lcm"] > 0 and dense[0]["kl"] > 0
    for other in (reordered, flex):
        for name in dense[0]:
            torch.testing.assert_close(other[0][name], dense[0][name], atol=2e-5, rtol=1e-4)
        if with_grad:
            for a, b in zip(other[1], dense[1]):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)

    # 300 tokens at k = 8: normals first, most 128 x 128 tiles are empty, and FlexAttention skips them.
    long = [synthetic_examples(1, length=300, prompt=20)[0]]
    assert block_mask(make_batch(long, k=8, normals_first=True).attention).sparsity() > 75
    assert block_mask(make_batch(long, k=8).attention).sparsity() < 50  # interleaved: about a causal mask's
    if device == "cuda":
        _set_attention(mtp, "flex", torch.device(device))
        assert mtp.model.config._attn_implementation == "flex_attention"
    else:  # training needs the backward, which FlexAttention lacks on CPU: said at once
        with pytest.raises(TrainError, match="--attention flex"):
            _set_attention(mtp, "flex", torch.device("cpu"))


def test_padded_batch_matches_separate_sequences():
    """Padding rows change nothing: a batch of two sequences gives the summed losses and gradients of the two
    run one by one (with the same global normalisers)."""
    mtp = tiny_mtp()
    exs = synthetic_examples(2)
    both = make_batch(exs, k=3)
    norm = row_counts(both)
    assert both.token_ids.shape[1] == max(make_batch([e], 3).token_ids.shape[1] for e in exs)

    def run(batch):
        mtp.zero_grad()
        hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                                  batch.key_positions).hidden
        loss = compute_losses(mtp, hidden, batch, LossWeights(), norm)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in mtp.trainable_parameters()]

    loss_b, grads_b = run(both)
    parts = [run(make_batch([e], k=3)) for e in exs]
    torch.testing.assert_close(loss_b, parts[0][0] + parts[1][0])
    for gb, g0, g1 in zip(grads_b, parts[0][1], parts[1][1]):
        torch.testing.assert_close(gb, g0 + g1, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_and_chunking_match_plain(tmp_path):
    exs = synthetic_examples(4)
    plain = train(_cfg(tmp_path / "p", steps=3), mtp=tiny_mtp(), examples=exs)
    mtp = tiny_mtp()
    calls = []
    mtp.model.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    ckpt = train(_cfg(tmp_path / "c", steps=3, gradient_checkpointing=True, chunk_rows=16), mtp=mtp,
                 examples=exs)
    assert len(calls) == 2 * 3  # the layer runs again inside backward (pre-hook: recompute may stop early)
    for a, b in zip(plain.history, ckpt.history):
        for key in ("loss", "ce", "sampler", "lcm", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_bf16_autocast_block_subset_and_accumulation(tmp_path):
    exs = synthetic_examples(6)
    result = train(_cfg(tmp_path / "b", steps=3, bf16=True, block_fraction=0.5, max_blocks=4, grad_accum=2),
                   mtp=tiny_mtp(), examples=exs)
    assert len(result.history) == 3
    for h in result.history:
        assert all(torch.isfinite(torch.tensor(h[k])) for k in ("loss", "ce", "sampler", "lcm"))
        # at most 4 blocks of 3 masks in each of the 2 x 2 sequences of a step
        assert h["rows"] - h["tokens"] <= 4 * 3 * 4


def test_resume_reproduces_uninterrupted_run(tmp_path):
    exs = synthetic_examples(5)
    full = train(_cfg(tmp_path / "full", steps=6), mtp=tiny_mtp(), examples=exs)

    class Crash(Exception):
        pass

    def crash_after_4(step, metrics):
        if step == 4:
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Crash):
        train(_cfg(out, steps=6, save_every=3), mtp=tiny_mtp(), examples=exs, on_step=crash_after_4)
    assert [s for s, _ in list_checkpoints(out)] == [3]
    with pytest.raises(TrainError, match="--resume"):
        train(_cfg(out, steps=6, save_every=3), mtp=tiny_mtp(), examples=exs)
    # A different random init proves the adapter really comes from the checkpoint.
    resumed = train(_cfg(out, steps=6, save_every=3, resume=True), mtp=tiny_mtp(adapter_seed=7), examples=exs)
    assert resumed.start_step == 3
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for a, b in zip(full.history[3:], resumed.history):
        for key in ("loss", "ce", "sampler", "lcm", "grad_norm", "lr", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the crashed run's step 4 was replaced, not duplicated
    a = tiny_mtp(adapter_seed=1)
    b = tiny_mtp(adapter_seed=2)
    load_adapter(a, tmp_path / "full")
    load_adapter(b, out)
    for name, p in a.adapter_state_dict().items():
        torch.testing.assert_close(p, b.adapter_state_dict()[name], rtol=1e-6, atol=1e-7)


def test_interrupted_checkpoint_save_keeps_last_good(tmp_path, monkeypatch):
    import maskspec.train.checkpoints as checkpoints

    exs = synthetic_examples(4)
    out = tmp_path / "ck"
    real_save = torch.save

    def failing_save(obj, path, *a, **kw):
        if "step-00000004" in str(path) and str(path).endswith(checkpoints.STATE_FILE):
            raise KeyboardInterrupt  # stands for a kill in the middle of writing checkpoint 4
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out, steps=6, save_every=2), mtp=tiny_mtp(), examples=exs)
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    resumed = train(_cfg(out, steps=6, save_every=2, resume=True), mtp=tiny_mtp(), examples=exs)
    assert resumed.start_step == 2 and resumed.history[-1]["step"] == 6
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]  # keep_checkpoints=2


def test_bad_options_raise_user_errors(tmp_path):
    with pytest.raises(TrainError, match="block-fraction"):
        train(_cfg(tmp_path / "x", block_fraction=0.0), mtp=tiny_mtp(), examples=synthetic_examples(2))
    with pytest.raises(TrainError, match="--chunk-rows must be >= 1"):
        train(_cfg(tmp_path / "z", chunk_rows=0), mtp=tiny_mtp(), examples=synthetic_examples(2))
    with pytest.raises(TrainError, match="k=3"):
        train(_cfg(tmp_path / "y", k=4), mtp=tiny_mtp(k=3), examples=synthetic_examples(2))


def test_init_adapter_starts_from_its_weights(tmp_path):
    exs = synthetic_examples(4)
    train(_cfg(tmp_path / "first", steps=3), mtp=tiny_mtp(), examples=exs)
    saved = tiny_mtp(adapter_seed=5)
    load_adapter(saved, tmp_path / "first")
    # A different random init, and so small a learning rate that the weights cannot move: the result must be
    # the initial adapter's weights, not the fresh init.
    train(_cfg(tmp_path / "second", steps=1, lr=1e-12, init_adapter=str(tmp_path / "first")),
          mtp=tiny_mtp(adapter_seed=9), examples=exs)
    again = tiny_mtp(adapter_seed=6)
    load_adapter(again, tmp_path / "second")
    fresh = tiny_mtp(adapter_seed=9)
    for name, p in saved.adapter_state_dict().items():
        torch.testing.assert_close(again.adapter_state_dict()[name], p, rtol=0, atol=1e-8)
    assert not torch.allclose(fresh.adapter_state_dict()["mask_embeddings"], saved.mask_embeddings)
    with pytest.raises(TrainError, match="rank 8 \\(this run: 4\\)"):
        train(_cfg(tmp_path / "third", rank=4, init_adapter=str(tmp_path / "first")), mtp=tiny_mtp(rank=4),
              examples=exs)


class FakeClock:
    """Each reading advances time by `tick` seconds: every step then takes a known, fixed time."""

    def __init__(self, tick: float) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_limit_shortens_the_schedule_and_ends_cleanly(tmp_path):
    exs = synthetic_examples(4)
    out = tmp_path / "timed"
    cfg = _cfg(out, steps=1000, warmup=2, schedule="cosine", time_limit=40.0, save_every=5)
    result = train(cfg, mtp=tiny_mtp(), examples=exs, clock=FakeClock(0.5))
    steps = [h["step"] for h in result.history]
    assert 5 < steps[-1] < 1000  # stopped by the clock, long before --steps
    lrs = [h["lr"] for h in result.history]
    # The cosine schedule was planned for the steps that fit: the last step runs at (nearly) the minimum lr.
    assert cfg.lr * cfg.min_lr_ratio <= lrs[-1] < 1.1 * cfg.lr * cfg.min_lr_ratio
    assert max(lrs) == pytest.approx(cfg.lr)
    after_warmup = lrs[cfg.warmup:]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))  # re-planning never raised the lr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["training"]["final_step"] == steps[-1]
    assert config["training"]["schedule_steps"] == steps[-1]
    assert [s for s, _ in list_checkpoints(out)][-1] == steps[-1]


def test_the_held_out_split_follows_the_ids_and_never_takes_an_example_trained_on():
    from maskspec.train.data import Example
    from maskspec.train.evaluation import split_eval

    def examples(ids):
        return [Example(torch.tensor([i % 7, 1, 2]), torch.tensor([False, True, True]), f"r-{i}") for i in ids]

    first_train, first_held = split_eval(examples(range(300)), 20)
    assert len(first_held) == 20 and len(first_train) == 280
    # The same data in another order holds out the same examples.
    reordered = list(range(300))[::-1]
    assert {e.id for e in split_eval(examples(reordered), 20)[1]} == {e.id for e in first_held}
    # More of the same data, shuffled in: the held-out examples are still none the first run trained on.
    grown = torch.randperm(1000, generator=torch.Generator().manual_seed(3)).tolist()
    grown_train, grown_held = split_eval(examples(grown), 20)
    assert len(grown_held) == 20 and not {e.id for e in grown_held} & {e.id for e in first_train}
    assert {e.id for e in grown_held} != {e.id for e in first_held}  # the newcomers take their share
    assert len(split_eval(examples(range(50)), 20)[1]) == 5  # never more than a tenth

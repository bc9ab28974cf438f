"""`maskspec tune` and the per-device decoding defaults it records: the choice is the setting with the most
predicted tokens per second, it lands in the adapter's config, and decoding uses it only when given neither k nor
a tree."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from maskspec.cli import app
from maskspec.decode.decoder import Decoder
from maskspec.decode.steps import resolve_tree
from maskspec.errors import MaskspecError, UsageError

from conftest import make_tiny_mtp
from train_helpers import single_thread, tiny_chat_model_folder


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_resolve_tree_takes_the_recorded_default_only_without_k_and_tree():
    mtp = make_tiny_mtp("llama", k=3)
    assert mtp.default_tree == 0 and Decoder(mtp).tree == 0
    mtp.decoding_defaults = {"cpu": {"k": 2, "tree": 5}}
    assert mtp.default_k == 2 and mtp.default_tree == 5
    assert Decoder(mtp).tree == 5 and Decoder(mtp).k == 2
    assert Decoder(mtp, k=3).tree == 0  # a k chosen by hand: a chain unless a tree is asked for too
    assert Decoder(mtp, tree=0).tree == 0 and Decoder(mtp, k=1, tree=3).tree == 3
    assert Decoder(mtp, mode="linear").tree == 0 and Decoder(mtp, mode="ar").tree == 0
    assert resolve_tree(mtp, "quadratic", None, None) == 5
    with pytest.raises(UsageError, match="quadratic"):
        resolve_tree(mtp, "linear", None, 4)
    with pytest.raises(UsageError, match=">= 0"):
        resolve_tree(mtp, "quadratic", None, -1)
    mtp.decoding_defaults = {"cpu": {"k": 2, "tree": "big"}, "cuda": {"tree": 9}}
    assert mtp.default_tree == 0  # a malformed entry is ignored; other devices' entries do not apply


@pytest.fixture
def tiny_setup(tmp_path):
    from maskspec.hub import load_model_and_tokenizer
    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_

    model_dir = tiny_chat_model_folder(tmp_path / "tiny")
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    mtp = randomize_adapter_(MTPModel(model, tokenizer, MTPConfig(k=2, rank=4)), seed=1)
    mtp.save_adapter(tmp_path / "adapter")
    args = ["tune", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--domains", "math,code",
            "--n", "1", "--max-new-tokens", "10", "--k", "1,2", "--tree", "0,3", "--timing-prompts", "2"]
    return model_dir, tmp_path / "adapter", args


@pytest.mark.slow  # the embedded model's tokenizer
def test_tune_records_the_fastest_setting_and_decoding_uses_it(tiny_setup, tmp_path):
    from maskspec.model.mtp import MTPModel

    model_dir, adapter, args = tiny_setup
    before = json.loads((adapter / "adapter_config.json").read_text())
    out = tmp_path / "tune-out"
    result = CliRunner().invoke(app, args + ["--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = json.loads((out / "tune.json").read_text())
    rows = payload["results"]
    assert [(r["k"], r["tree"]) for r in rows] == [(1, 0), (1, 3), (2, 0), (2, 3)]
    for r in rows:
        assert r["tau"] >= 1.0 and r["ms_per_pass"] > 0
        assert r["predicted_tokens_per_second"] == pytest.approx(1000 * r["tau"] / r["ms_per_pass"])
        # every prompt was timed too, so the real runs' tau is the simulated one
        assert r["measured_tau"] == pytest.approx(r["tau"], rel=0.02)
        assert r["mean_rows"] == pytest.approx((r["mean_nodes"] + 1) * (r["k"] + 1))
    best = max(rows, key=lambda r: r["predicted_tokens_per_second"])
    choice = payload["choice"]
    assert (choice["k"], choice["tree"]) == (best["k"], best["tree"])
    after = json.loads((adapter / "adapter_config.json").read_text())
    assert after["decoding"]["cpu"] == choice and "tokens/s predicted" in choice["measured"]
    drop = lambda config: {key: v for key, v in config.items() if key != "decoding"}  # noqa: E731
    assert drop(after) == drop(before)  # nothing else changed
    mtp = MTPModel.from_pretrained(str(model_dir), adapter=str(adapter))
    assert (mtp.default_k, mtp.default_tree) == (choice["k"], choice["tree"])
    assert Decoder(mtp).tree == choice["tree"] and Decoder(mtp, k=1).tree == 0
    assert "Chosen: k=" in (out / "tune.md").read_text()


@pytest.mark.slow  # the embedded model's tokenizer
def test_tune_with_the_static_step(tiny_setup, tmp_path):
    """--static times every setting with the static step too; its trees' tau is simulated without the lookup
    branch, which the timed runs confirm; the choice records the step, and decoding follows it."""
    from maskspec.decode.api import generate
    from maskspec.model.mtp import MTPModel

    model_dir, adapter, args = tiny_setup
    out = tmp_path / "tune-static"
    result = CliRunner().invoke(app, args + ["--static", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = json.loads((out / "tune.json").read_text())
    rows = payload["results"]
    assert [(r["k"], r["tree"], r["static"]) for r in rows] == [
        (k, t, s) for k in (1, 2) for t in (0, 3) for s in (False, True)]
    for r in rows:
        assert r["measured_tau"] == pytest.approx(r["tau"], rel=0.02)  # the simulation matches each step
    best = max(rows, key=lambda r: r["predicted_tokens_per_second"])
    choice = payload["choice"]
    assert (choice["k"], choice["tree"], choice["static"]) == (best["k"], best["tree"], best["static"])
    mtp = MTPModel.from_pretrained(str(model_dir), adapter=str(adapter))
    assert mtp.default_static is choice["static"]
    # The recorded step is used only when neither k nor a tree is given, and only for greedy decoding.
    mtp.decoding_defaults = {"cpu": {"k": 2, "tree": 3, "static": True}}
    from maskspec.decode.steps import resolve_static

    assert resolve_static(mtp, "quadratic", None, None, None, greedy=True) is True
    assert resolve_static(mtp, "quadratic", 2, None, None, greedy=True) is False
    assert resolve_static(mtp, "quadratic", None, None, None, greedy=False) is False
    assert resolve_static(mtp, "quadratic", None, None, False, greedy=True) is False
    from maskspec.decode import static

    out_usual = generate(mtp, "2 + 2 =", max_new_tokens=6, static=False)
    assert not static.engine_report(mtp)
    out_default = generate(mtp, "2 + 2 =", max_new_tokens=6)
    assert [(e["k"], e["tree"]) for e in static.engine_report(mtp)] == [(2, 3)]  # the static step ran
    assert out_default.new_token_ids == out_usual.new_token_ids


@pytest.mark.slow
def test_tune_without_save_and_with_a_read_only_adapter(tiny_setup, tmp_path):
    _, adapter, args = tiny_setup
    config = adapter / "adapter_config.json"
    original = config.read_bytes()
    result = CliRunner().invoke(app, args + ["--no-save", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert config.read_bytes() == original and (tmp_path / "a" / "tune.json").exists()
    if os.geteuid() == 0:
        pytest.skip("root writes read-only folders")
    adapter.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        refused = CliRunner().invoke(app, args + ["--out", str(tmp_path / "b")])
    finally:
        adapter.chmod(stat.S_IRWXU)
    assert isinstance(refused.exception, MaskspecError) and "--no-save" in str(refused.exception)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_tune_option_errors(tiny_setup, tmp_path):
    _, adapter, args = tiny_setup
    for extra, needle in ((["--tree", "x"], "--tree"), (["--k", "9"], "at most k = 2"),
                          (["--tree-width", "0"], "--tree-width")):
        result = CliRunner().invoke(app, args + extra + ["--out", str(tmp_path / "o")])
        assert isinstance(result.exception, MaskspecError) and needle in str(result.exception), extra
        assert not (tmp_path / "o").exists()

"""End to end: `maskspec bench` on a tiny random llama with the embedded tokenizer (2 prompts, few tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from maskspec.errors import MaskspecError

pytest.importorskip("maskspec.decode.api")

ROW_KEYS = {"domain", "method", "mode", "k", "prompts", "new_tokens", "forward_passes", "tokens_per_pass",
            "tokens_per_second", "speedup_vs_hf", "exact_match", "accuracy", "repeats", "tokens_per_second_std",
            "speedup_vs_hf_std"}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama saved with the embedded model's tokenizer, and a random (untrained) k=2 adapter for it."""
    from maskspec.hub import load_model_and_tokenizer
    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
    from maskspec.testing import tiny_model

    root = tmp_path_factory.mktemp("bench")
    _, tokenizer = load_model_and_tokenizer("default")
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model_dir, adapter_dir = root / "tiny-llama", root / "adapter"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    mtp = MTPModel(model, tokenizer, MTPConfig(k=2, rank=4))
    randomize_adapter_(mtp, seed=1)
    mtp.save_adapter(adapter_dir)
    return model_dir, adapter_dir


def bench_app() -> typer.Typer:
    from maskspec.bench.cli import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keeps `bench` a named sub-command, as in the real CLI
        pass

    register(app)
    return app


@pytest.mark.slow  # the embedded model's tokenizer
def test_bench_end_to_end(tiny_folders, tmp_path):
    model_dir, adapter_dir = tiny_folders
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_app(), [
        "bench", "--model", str(model_dir), "--adapter", str(adapter_dir), "--domains", "math,code", "--n", "1",
        "--modes", "ar,linear,quadratic", "--max-new-tokens", "8", "--repeats", "2",
        "--out", str(out), "--device", "cpu", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "k = 4, 8 skipped" in result.output  # the default ks beyond the adapter's k = 2
    assert "exact match" in result.output

    for name in ("results.json", "records.jsonl", "report.md", "tau_vs_k.png", "speedup.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    payload = json.loads((out / "results.json").read_text())
    assert set(payload) == {"system", "config", "results", "mismatches"}
    assert {"cpu", "gpu", "threads", "torch", "transformers", "maskspec", "dtype"} <= set(payload["system"])
    assert payload["system"]["dtype"] == "float32"
    config = payload["config"]
    assert config["k"] == [1, 2, 4, 8] and config["k_skipped"] == [4, 8] and config["max_new_tokens"] == 8
    assert config["methods"] == ["hf", "hf-prompt-lookup", "ar", "quadratic k=1", "quadratic k=2", "linear k=1",
                                 "linear k=2"]

    rows = payload["results"]
    assert {(r["domain"], r["method"], r["mode"], r["k"]) for r in rows} == {
        (d, m, mode, k) for d in ("math", "code", "all")
        for m, mode, k in [("hf", None, None), ("hf-prompt-lookup", None, None), ("ar", "ar", None),
                           ("maskspec", "linear", 1), ("maskspec", "linear", 2),
                           ("maskspec", "quadratic", 1), ("maskspec", "quadratic", 2)]}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["prompts"] == (2 if r["domain"] == "all" else 1) and r["repeats"] == 2
        assert 1 <= r["new_tokens"] <= 8 * r["prompts"]
        assert r["exact_match"] == 1.0, r  # greedy: every method reproduces hf greedy
        assert r["exact_match_vs_ar"] == (1.0 if r["method"] in ("ar", "maskspec") else None)
        assert r["tokens_per_second"] > 0 and r["speedup_vs_hf"] > 0
        if r["method"] in ("hf", "ar"):
            assert r["forward_passes"] == r["new_tokens"] and r["tokens_per_pass"] == 1.0
        else:
            assert 1 <= r["forward_passes"] <= r["new_tokens"]
        if r["mode"] in ("linear", "quadratic"):
            assert 1.0 <= r["tokens_per_pass"] <= r["k"] + 1
        assert (r["accuracy"] is None) == (r["domain"] == "code")
    assert payload["mismatches"] == []
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 7
    report = (out / "report.md").read_text()
    assert "Tokens per forward pass (tau)" in report and "| math |" in report


@pytest.mark.slow  # the embedded model's tokenizer
def test_bench_with_draft_trees(tiny_folders, tmp_path):
    model_dir, adapter_dir = tiny_folders
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_app(), [
        "bench", "--model", str(model_dir), "--adapter", str(adapter_dir), "--domains", "math", "--n", "2",
        "--modes", "linear,quadratic", "--k", "2", "--tree", "0,4", "--max-new-tokens", "10", "--no-plots",
        "--baselines", "hf", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["trees"] == [0, 4]
    assert payload["config"]["methods"] == ["hf", "quadratic k=2", "quadratic k=2 tree=4", "linear k=2"]
    trees = [r for r in payload["results"] if r.get("tree")]
    assert trees and all(r["mode"] == "quadratic" and r["exact_match"] == 1.0 for r in trees)
    assert "k=2 tree=4" in (out / "report.md").read_text()
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted({r["tree"] for r in records}) == [0, 4]
    refused = CliRunner().invoke(bench_app(), ["bench", "--model", str(model_dir), "--adapter", str(adapter_dir),
                                               "--modes", "linear", "--tree", "4", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "--tree needs quadratic" in str(refused.exception)


@pytest.mark.slow  # the embedded model's tokenizer
def test_bench_with_the_static_step_and_hf_static_cache(tiny_folders, tmp_path):
    model_dir, adapter_dir = tiny_folders
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_app(), [
        "bench", "--model", str(model_dir), "--adapter", str(adapter_dir), "--domains", "math,code", "--n", "1",
        "--modes", "ar,quadratic", "--k", "2", "--tree", "0,4", "--static", "--baselines", "hf,hf-static",
        "--max-new-tokens", "10", "--no-plots", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["static"] is True
    engines = payload["config"]["static_engines"]  # ar's, the chain's and the tree's, eager on this CPU
    assert sorted((e["k"], e["tree"]) for e in engines) == [(0, 0), (2, 0), (2, 4)]
    assert not any(e["cuda_graph"] for e in engines)
    assert payload["config"]["methods"] == ["hf", "hf-static", "ar", "ar static", "quadratic k=2",
                                            "quadratic k=2 static", "quadratic k=2 tree=4",
                                            "quadratic k=2 tree=4 static"]
    by_label = {(r["domain"], r["label"]): r for r in payload["results"]}
    for domain in ("math", "code", "all"):
        fixed, usual = by_label[(domain, "quadratic k=2 static")], by_label[(domain, "quadratic k=2")]
        assert fixed["static"] is True and fixed["exact_match"] == 1.0
        assert fixed["forward_passes"] == usual["forward_passes"]  # the same drafts, the same passes
        assert by_label[(domain, "hf-static")]["exact_match"] == 1.0
    assert payload["mismatches"] == []
    refused = CliRunner().invoke(bench_app(), ["bench", "--model", str(model_dir), "--adapter", str(adapter_dir),
                                               "--static", "--temperature", "0.5", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "--static decodes greedily" in str(refused.exception)
    # A time limit that ends before the first prompt (the model load alone takes longer) is a one-line error.
    late = CliRunner().invoke(bench_app(), ["bench", "--model", str(model_dir), "--adapter", str(adapter_dir),
                                            "--domains", "math", "--n", "1", "--k", "2", "--baselines", "hf",
                                            "--time-limit", "0.001", "--no-plots", "--out", str(tmp_path / "y")])
    assert late.exit_code != 0 and "ended before the first prompt" in str(late.exception)


@pytest.mark.slow  # the embedded model's tokenizer
def test_bench_without_adapter_runs_baselines_and_ar(tiny_folders, tmp_path):
    model_dir, _ = tiny_folders
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_app(), [
        "bench", "--model", str(model_dir), "--domains", "chat", "--n", "1", "--max-new-tokens", "4",
        "--baselines", "hf", "--out", str(out), "--device", "cpu", "--no-plots"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "No --adapter given" in result.output
    payload = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in payload["results"]} == {"hf", "ar"}
    assert not list(out.glob("*.png"))
    assert "Tokens per forward pass" not in (out / "report.md").read_text()


def test_bench_malformed_suite(tmp_path):
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"domain": "chat", "messages": [{"role": "user", "content": "hi"}]}\n{"domain": 3}\n')
    result = CliRunner().invoke(bench_app(), ["bench", "--suite", str(suite), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, MaskspecError)
    assert f"{suite}:2:" in str(result.exception)
    result = CliRunner().invoke(bench_app(), ["bench", "--modes", "fast", "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, MaskspecError) and "--modes" in str(result.exception)


@pytest.mark.slow  # the embedded model's tokenizer
def test_bench_deadline_stops_between_prompts(tiny_folders):
    """No prompt starts after the deadline, and every method has run on each prompt that did."""
    import time

    from maskspec.bench.runner import BenchRunner, BenchSettings, build_methods
    from maskspec.bench.suites import load_suite, select_prompts
    from maskspec.model.mtp import MTPModel

    model_dir, adapter_dir = tiny_folders
    mtp = MTPModel.from_pretrained(str(model_dir), adapter=str(adapter_dir))
    methods, _ = build_methods(["ar", "quadratic"], [2], ["hf"], max_k=2)
    prompts = select_prompts(load_suite(), ["math"], 3)
    runner = BenchRunner(mtp, BenchSettings(max_new_tokens=4))
    deadline = time.perf_counter() + 0.5

    def slow_after_first(record):
        if record.method == methods[-1].method and record.prompt_id == prompts[0].id:
            time.sleep(max(0.0, deadline - time.perf_counter()) + 0.05)

    records = runner.run(prompts, methods, on_done=slow_after_first, deadline=deadline)
    assert {r.prompt_id for r in records} == {prompts[0].id}
    assert len(records) == len(methods)
    assert len(runner.run(prompts, methods, deadline=time.perf_counter() + 3600)) == 3 * len(methods)

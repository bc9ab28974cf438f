"""`maskspec distill` (resumable, deterministic) and the `maskspec train` command end to end, on a tiny random
model that carries the embedded model's chat tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from maskspec.cli import main
from maskspec.train.data import DataError
from maskspec.train.distill import (ADMISSION_WINDOW, DistillConfig, admission_order, distill, load_done_ids,
                                    select_prompts)

from train_helpers import single_thread, tiny_chat_model_folder

DOMAINS = ("math", "code", "chat")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_chat_model_folder(tmp_path_factory.mktemp("tinychat"))


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p-{i}", "domain": DOMAINS[i % 3], "source": "test", "license": "MIT",
             "messages": [{"role": "user", "content": f"Question number {i}: what is {i} + {i * 3}?"}],
             "reference": str(4 * i)} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(argv: list[str]) -> None:
    """The `maskspec` entry point in-process; it always exits (0 on success)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code in (0, None)


def _cfg(prompts, out, model, **kw):
    return DistillConfig(prompts=str(prompts), out=str(out), model=str(model), max_new_tokens=6, batch_size=3,
                         temperature=1.0, seed=5, progress=False, device="cpu", **kw)


@pytest.mark.slow  # the embedded model's tokenizer
def test_distill_records_resume_and_determinism(tmp_path, prompts, chat_model):
    ref = tmp_path / "ref.jsonl"
    stats = distill(_cfg(prompts, ref, chat_model))
    assert stats.written == 7
    lines = ref.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [f"p-{i}" for i in range(7)]
    r = records[2]
    assert r["domain"] == "chat" and r["reference"] == "8" and r["source"] == "test"
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"]
    assert r["distill"]["finish_reason"] in ("stop", "length") and 1 <= r["distill"]["new_tokens"] <= 6
    # Sampling really happens (temperature 1): another seed gives other answers.
    other = tmp_path / "other.jsonl"
    other_cfg = _cfg(prompts, other, chat_model)
    other_cfg.seed = 6
    distill(other_cfg)
    assert other.read_text() != ref.read_text()

    # A run killed while writing record 5: four whole records and half a line.
    out = tmp_path / "out.jsonl"
    out.write_text("".join(line + "\n" for line in lines[:4]) + lines[4][: len(lines[4]) // 2])
    stats = distill(_cfg(prompts, out, chat_model))
    assert stats.repaired_partial_line and stats.already_done == 4 and stats.written == 3
    assert out.read_text() == ref.read_text()  # no duplicates, no loss, same answers as the uninterrupted run
    again = distill(_cfg(prompts, out, chat_model))
    assert again.written == 0 and again.already_done == 7
    assert out.read_text() == ref.read_text()


def test_prompt_selection(tmp_path, prompts):
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    picked = select_prompts(rows, per_domain=2, seed=0)
    assert sorted(r["domain"] for r in picked) == ["chat", "chat", "code", "code", "math", "math"]
    assert [r["id"] for r in picked] == sorted((r["id"] for r in picked), key=lambda x: int(x[2:]))  # file order
    assert picked == select_prompts(rows, per_domain=2, seed=0)
    assert any(select_prompts(rows, per_domain=2, seed=s) != picked for s in range(1, 6))
    assert [r["id"] for r in select_prompts(rows, limit=3)] == ["p-0", "p-1", "p-2"]
    shuffled = select_prompts(rows, per_domain=2, shuffle=True, seed=0)
    assert sorted(r["id"] for r in shuffled) == sorted(r["id"] for r in picked)  # same prompts
    assert [r["id"] for r in shuffled] != [r["id"] for r in picked]  # another order
    assert shuffled == select_prompts(rows, per_domain=2, shuffle=True, seed=0)
    # Domain-balanced: the domains take turns, so every prefix is balanced while a domain has prompts left.
    balanced = select_prompts(rows, balanced=True, seed=0)
    assert sorted(r["id"] for r in balanced) == sorted(r["id"] for r in rows)
    counts = {d: sum(r["domain"] == d for r in rows) for d in {r["domain"] for r in rows}}
    fair = min(counts.values()) * len(counts)
    for n in range(1, fair + 1):
        prefix = [r["domain"] for r in balanced[:n]]
        assert max(prefix.count(d) for d in counts) - min(prefix.count(d) for d in counts) <= 1, prefix
    assert balanced == select_prompts(rows, balanced=True, seed=0)
    assert balanced != select_prompts(rows, balanced=True, seed=1)
    # Shards of three split the selection (after --limit) into every third prompt, from the first, second, third.
    shards = [select_prompts(rows, balanced=True, seed=0, limit=6, shard=(i, 3)) for i in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    assert [shards[i % 3][i // 3] for i in range(6)] == balanced[:6]


@pytest.mark.slow  # the embedded model's tokenizer
def test_shards_write_the_answers_of_the_whole_run(tmp_path, prompts, chat_model):
    whole = tmp_path / "whole.jsonl"
    distill(_cfg(prompts, whole, chat_model, balanced=True))
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    parts = []
    for i in range(2):
        out = tmp_path / f"shard{i}.jsonl"
        stats = distill(_cfg(prompts, out, chat_model, balanced=True, shard=(i, 2)))
        assert stats.selected == stats.written == (4, 3)[i]
        parts.append([json.loads(line) for line in out.read_text().splitlines()])
    assert parts[0] == records[0::2] and parts[1] == records[1::2]  # sampled answers too (temperature 1)


@pytest.mark.parametrize("shard", ["2/2", "x", "1", "-1/2", "0/0"])
def test_a_bad_shard_is_a_one_line_error(tmp_path, prompts, shard, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--shard", shard])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --shard") and "\n" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_admission_is_by_length_within_windows_of_the_selected_order():
    window = ADMISSION_WINDOW * 2
    lengths = [(7 * i) % 23 for i in range(3 * window + 5)]  # three whole windows and a partial one
    order = admission_order(lengths, batch_size=2)
    assert sorted(order) == list(range(len(lengths)))
    for start in range(0, len(lengths), window):
        part = order[start:start + window]
        assert sorted(part) == list(range(start, min(start + window, len(lengths))))  # the window's own prompts
        assert [lengths[i] for i in part] == sorted(lengths[i] for i in part)  # shortest first
        assert all(a < b for a, b in zip(part, part[1:]) if lengths[a] == lengths[b])  # stable


def test_done_ids_reject_corrupt_middle_line(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(DataError, match="o.jsonl:2"):
        load_done_ids(out)


@pytest.mark.slow  # the embedded model's tokenizer
def test_cli_distill_then_train(tmp_path, prompts, chat_model, capsys):
    data = tmp_path / "d.jsonl"
    _run(["distill", "--model", str(chat_model), "--prompts", str(prompts), "--out", str(data),
          "--max-new-tokens", "12", "--batch-size", "4", "--no-progress", "--device", "cpu"])
    assert "7 records written" in capsys.readouterr().out
    out = tmp_path / "adapter"
    _run(["train", "--model", str(chat_model), "--data", str(data), "--out", str(out), "--k", "3", "--rank", "4",
          "--steps", "3", "--batch-size", "2", "--save-every", "2", "--eval-size", "0", "--no-progress", "--cpu",
          "--warmup", "1", "--bf16", "--max-blocks", "5"])
    assert "adapter written to" in capsys.readouterr().out
    from maskspec.model.mtp import MTPModel

    mtp = MTPModel.from_pretrained(str(chat_model), adapter=str(out))
    assert mtp.k == 3 and not torch.equal(mtp.adapter_state_dict()["lora.model.layers.0.self_attn.q_proj.B"],
                                          torch.zeros_like(mtp.adapter_state_dict()[
                                              "lora.model.layers.0.self_attn.q_proj.B"]))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["training"]["steps"] == 3 and cfg["training"]["bf16"] and cfg["training"]["final_step"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow  # the embedded model's tokenizer
def test_cli_errors_are_one_line(tmp_path, prompts, chat_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(prompts.read_text() + '{"id": "x", "messages": 5}\n')
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--model", str(chat_model), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bad.jsonl:8" in err and "\n" not in err
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"id": "1", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit):
        main(["train", "--model", str(chat_model), "--data", str(records), "--out", str(tmp_path / "a"), "--cpu"])
    err = capsys.readouterr().err.strip()
    assert "r.jsonl:1: no assistant message" in err and "\n" not in err


@pytest.mark.slow  # the embedded model's tokenizer
def test_a_prompt_longer_than_the_context_is_skipped(tmp_path, prompts, chat_model):
    """A prompt the model cannot read (past its 512-position context) gets no record and the run goes on: the
    others are written, in order, as without it."""
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    rows.insert(3, {**rows[0], "id": "too-long", "messages": [{"role": "user", "content": "word " * 2000}]})
    longer = tmp_path / "longer.jsonl"
    longer.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    distill(_cfg(prompts, ref, chat_model))
    stats = distill(_cfg(longer, out, chat_model))
    assert stats.too_long == 1 and stats.written == 7
    assert out.read_text() == ref.read_text()


@pytest.mark.slow  # the embedded model's tokenizer
def test_cli_warnings_are_one_line(tmp_path, chat_model, capsys):
    """A maskspec warning printed by the command is one `warning:` line, not Python's file:line plus source."""
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"id": "1", "messages": [{"role": "user", "content": "What is 2 + 2?"},
                                                             {"role": "assistant", "content": "2 + 2 = 4."}]}) + "\n")
    out = tmp_path / "adapter"
    _run(["train", "--model", str(chat_model), "--data", str(records), "--out", str(out), "--k", "2", "--rank", "2",
          "--steps", "1", "--batch-size", "1", "--eval-size", "0", "--warmup", "0", "--no-progress", "--cpu",
          "--resume"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "--resume" in line]
    assert lines == [f"warning: --resume: no checkpoint in {out}; starting from scratch"], err
    assert "UserWarning" not in err and ".py:" not in err
    assert (out / "adapter_config.json").is_file()

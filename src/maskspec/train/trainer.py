"""The training loop: frozen base model, trainable masks + gated LoRA + sampler, losses of method.md §3.

Data parallelism (`accelerate launch --num_processes N maskspec train ...`): Accelerate sets up the process
group and the device; the model is *not* wrapped in DistributedDataParallel. Only the adapter is trainable
(the base weights have requires_grad False), the LoRA gate is a side channel set around forward and backward,
and with gradient checkpointing the forward runs again inside backward: DDP's bucket hooks add constraints
(find_unused_parameters when a loss is switched off, re-entrant backward) and buy nothing here. Instead each
process computes its share of the *globally normalised* loss and one flat all-reduce (sum) of the adapter
gradients per optimizer step gives every process the exact gradient of the global batch, so all processes
apply the same update and keep identical weights. On a machine without GPUs, start the processes with
`accelerate launch --multi_gpu --num_processes N` (torchrun, gloo backend): `--cpu` alone starts one process
unless an MPI hostfile is given.

Data order is a pure function of (seed, position in the stream): epoch e is a seeded permutation of the
examples and optimizer step s consumes positions [s * G, (s + 1) * G) of the stream, G = batch_size * grad_accum
* processes. A checkpoint therefore only needs the step number to continue with the same data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from maskspec.errors import MaskspecError
from maskspec.train.data import Example, TrainBatch, load_chat_records, make_batch, tokenize_records
from maskspec.train.losses import LOSS_NAMES, LossWeights, RowCounts, compute_losses, mask_accuracy, row_counts

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class TrainError(MaskspecError):
    """A training setup the user can fix (output folder, resume, options)."""


@dataclass
class TrainConfig:
    out: str
    model: str = "default"
    data: str | None = None
    data_split: str = "train"
    data_config: str | None = None
    # adapter shape
    k: int = 8
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 0.0
    steps: int = 1000
    batch_size: int = 4  # sequences per process per micro-batch
    grad_accum: int = 1
    warmup: int = 50
    schedule: str = "cosine"  # or "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    # data / layout
    max_length: int = 1024
    block_fraction: float = 1.0
    max_blocks: int | None = None
    # losses
    ce_weight: float = 1.0
    sampler_weight: float = 1.0
    lcm_weight: float = 1.0
    kl_weight: float = 0.0
    chunk_rows: int = 1024
    # draft vocabulary saved with the adapter: the N most frequent answer tokens of the data (0: full vocabulary)
    draft_vocab: int = 8192
    # bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end
    eval_size: int = 32
    resume: bool = False
    # replace the adapter, checkpoints and metrics of an earlier training run in `out`
    overwrite: bool = False
    # start from the weights of an existing adapter folder (same k, rank, alpha and target modules)
    init_adapter: str | None = None
    # stop after this many seconds of training steps; the lr schedule is shortened to the steps that fit
    time_limit: float | None = None
    seed: int = 0
    progress: bool = True
    cpu: bool = False

    def validate(self) -> None:
        checks = [
            (self.k >= 1, "--k must be >= 1"), (self.rank >= 1, "--rank must be >= 1"),
            (self.steps >= 1, "--steps must be >= 1"), (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"), (self.lr > 0, "--lr must be > 0"),
            (self.max_length >= 4, "--max-length must be >= 4"), (self.warmup >= 0, "--warmup must be >= 0"),
            (0 < self.block_fraction <= 1, "--block-fraction must be in (0, 1]"),
            (self.max_blocks is None or self.max_blocks >= 1, "--max-blocks must be >= 1"),
            (self.schedule in ("constant", "cosine"), "--schedule must be 'constant' or 'cosine'"),
            (self.save_every >= 1, "--save-every must be >= 1"), (self.eval_every >= 0, "--eval-every must be >= 0"),
            (self.draft_vocab >= 0, "--draft-vocab must be >= 0"),
            (self.time_limit is None or self.time_limit > 0, "--time-limit must be > 0 seconds"),
            (min(self.ce_weight, self.sampler_weight, self.lcm_weight, self.kl_weight) >= 0,
             "loss weights must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.ce_weight, self.sampler_weight, self.lcm_weight, self.kl_weight)


@dataclass
class TrainResult:
    out: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per optimizer step run
    evals: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0


# ---------------------------------------------------------------------------------------------- data stream
class DataStream:
    """Position p of the stream -> example: epoch p // N is a permutation of the N examples seeded by the seed
    and the epoch. Also gives each position a seed for its random block subset."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        self.examples = list(examples)
        self.seed = seed
        self._perm: dict[int, list[int]] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.examples))
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(len(self.examples), generator=gen).tolist()}
        return self._perm[epoch][offset]

    def block_seed(self, position: int) -> int:
        return (self.seed * 2_654_435_761 + position * 40_503 + 17) % (2**62)


def split_eval(examples: list[Example], eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out up to `eval_size` examples (never more than a tenth of the data) for evaluation."""
    size = min(eval_size, len(examples) // 10)
    if size <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 99991)).tolist()
    held = set(order[:size])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------------------------------------- helpers
def lr_lambda(cfg: TrainConfig, horizon: Callable[[], int] | None = None) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine to min_lr_ratio at step `horizon()` (default: cfg.steps)."""
    def factor(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        end = horizon() if horizon is not None else cfg.steps
        progress = min(1.0, (step - cfg.warmup) / max(1, end - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class StepBudget:
    """How many optimizer steps a run makes. Without a time limit: cfg.steps. With one, the horizon is re-planned
    after every step from the mean time per step so far (evaluations and checkpoints included; the first two
    steps, which pay for warm-up, are left out once there are others) and from the time the last evaluation and
    checkpoint took, which the end of the run needs again. So the lr schedule ends at the last step that fits; the
    run also stops as soon as the limit has passed."""

    def __init__(self, cfg: TrainConfig, clock: Callable[[], float], device: torch.device) -> None:
        self.limit = cfg.time_limit
        self.device = device  # where the collective decision tensor lives (the process group's device)
        self.steps = cfg.steps
        self.horizon = cfg.steps
        self.stop = False
        self.clock = clock
        self.started = self.mark = clock()
        self.cycles: list[float] = []
        self.reserve = 0.0  # seconds of the latest evaluation + checkpoint

    def begin(self, start_step: int) -> None:
        """Start the clock at the first step to run (after a resume: the checkpoint's step)."""
        self.stop = start_step >= self.steps
        self.started = self.mark = self.clock()

    def record(self, done: int) -> None:
        """After step `done`: re-plan, decide whether to stop, and make every process agree (rank 0 decides)."""
        now = self.clock()
        self.cycles.append(now - self.mark)
        self.mark = now
        if self.limit is not None:
            timed = self.cycles[2:] or self.cycles
            per_step = sum(timed) / len(timed)
            remaining = self.limit - (now - self.started) - self.reserve
            fit = done + max(0, int(remaining // per_step)) if per_step > 0 else self.steps
            self.horizon = max(done, min(self.steps, fit))
        self.stop = done >= self.horizon or (self.limit is not None and now - self.started >= self.limit)
        dist = _dist()
        if dist is not None and dist.get_world_size() > 1:
            decision = torch.tensor([self.horizon, int(self.stop)], dtype=torch.int64, device=self.device)
            dist.broadcast(decision, src=0)
            self.horizon, self.stop = int(decision[0]), bool(decision[1])


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients_(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over processes with one flat all-reduce (see the module docstring)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def broadcast_parameters_(params: Sequence[torch.nn.Parameter]) -> None:
    """Start every process from rank 0's adapter (random inits may differ across processes)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def _set_activation_checkpointing(model, on: bool) -> None:
    """HF activation (gradient) checkpointing, non-reentrant; newer transformers renamed the methods."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        save_adapter(mtp, tmp / "adapter", training={"step": step, **asdict(cfg)})
        state = {"step": step, "world_size": world, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "config": json.dumps(asdict(cfg))}
        torch.save(state, tmp / STATE_FILE)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(folder: Path, mtp, optimizer, scheduler, rank: int, expected_global_batch: int = 0) -> int:
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
    """Make `out` a loadable adapter folder without touching checkpoints/ and metrics next to it: the adapter
    is saved to a temporary sibling and its two files are renamed into `out` (weights first, config last)."""
    from maskspec.adapter import CONFIG_FILE, WEIGHTS_FILE, save_adapter

    tmp = out / ".final-adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(mtp, tmp, training=training)
    os.replace(tmp / WEIGHTS_FILE, out / WEIGHTS_FILE)
    os.replace(tmp / CONFIG_FILE, out / CONFIG_FILE)
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """metrics.jsonl in the output folder (main process), plus TensorBoard when it is installed."""

    def __init__(self, out: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            # After a resume, drop entries of steps that will be run again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / TENSORBOARD_DIR))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(mtp, examples: Sequence[Example], batch_size: int, *, bf16: bool = False,
             device: torch.device | str = "cpu", rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Per-offset top-1 accuracy of mask predictions on `examples` (every block), for the base head and the
    sampler (fed the true previous token). Shards the examples over processes and sums the counts."""
    k = mtp.k
    was_training = mtp.training
    mtp.eval()
    counts = torch.zeros(3, k, dtype=torch.float64)
    mine = list(examples)[rank::world]
    device = torch.device(device)
    for s in range(0, len(mine), batch_size):
        batch = make_batch(mine[s:s + batch_size], k).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                                      batch.key_positions).hidden
            acc = mask_accuracy(mtp, hidden, batch, k)
        counts += torch.stack([acc["total"], acc["base"], acc["sampler"]]).double()
    counts = all_reduce_sum_(counts.to(device)).cpu()
    mtp.train(was_training)
    total = counts[0].clamp(min=1)
    return {"acc_base": (counts[1] / total).tolist(), "acc_sampler": (counts[2] / total).tolist(),
            "acc_base_mean": float(counts[1].sum() / total.sum()) if counts[0].sum() else 0.0,
            "acc_sampler_mean": float(counts[2].sum() / total.sum()) if counts[0].sum() else 0.0,
            "targets": int(counts[0].sum())}


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
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainError(f"--out {out}: {parent} is not a folder; choose another --out")
            break
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


def _clear_training_output(out: Path) -> None:
    """--overwrite: the old run's checkpoints and metrics go, so a later --resume cannot mix two runs. The old
    adapter files stay until the new ones replace them (--init-adapter may name this folder)."""
    for name in (CHECKPOINT_DIR, TENSORBOARD_DIR):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    (out / METRICS_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- training
def _init_from_adapter(mtp, cfg: TrainConfig) -> None:
    """Start from an existing adapter's weights; its shape must be the one this run trains."""
    from maskspec.adapter import load_adapter, read_adapter_config

    found = read_adapter_config(cfg.init_adapter)
    wanted = {"k": cfg.k, "rank": cfg.rank, "alpha": cfg.alpha}
    differ = [f"{name} {getattr(found, name)} (this run: {value})" for name, value in wanted.items()
              if float(getattr(found, name)) != float(value)]
    if differ:
        raise TrainError(f"--init-adapter {cfg.init_adapter} has {', '.join(differ)}; pass the adapter's "
                         "--k/--rank/--alpha to continue training it")
    load_adapter(mtp, cfg.init_adapter)


def _load_examples(cfg: TrainConfig, tokenizer, eos_ids: Sequence[int]) -> list[Example]:
    if cfg.data is None:
        raise TrainError("no training data: pass --data FILE.jsonl (see `maskspec distill`) or a dataset name")
    if tokenizer is None:
        raise TrainError(f"model {cfg.model!r} has no tokenizer; cannot render chat records")
    records = load_chat_records(cfg.data, split=cfg.data_split, config_name=cfg.data_config)
    return tokenize_records(tokenizer, records, cfg.max_length, eos_ids).examples


def _set_draft_vocab(mtp, size: int, examples: Sequence[Example]) -> None:
    """The adapter's draft vocabulary, from the tokens it is trained to predict (saved with every checkpoint)."""
    from maskspec.train.draft_vocab import choose_draft_vocab

    ids = choose_draft_vocab(examples, size, mtp.vocab_size, mtp.eos_token_ids).ids if size > 0 else None
    mtp.set_draft_vocab(ids)


def train(cfg: TrainConfig, *, mtp=None, examples: Sequence[Example] | None = None,
          eval_examples: Sequence[Example] | None = None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None,
          clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Train an adapter as configured. `mtp` (an MTPModel) and pre-tokenized `examples` may be passed directly
    (tests, notebooks); otherwise the model and data named in `cfg` are loaded. `on_step(step, metrics)` is
    called after every optimizer step (step counted from 1). `clock` times steps (and the time limit)."""
    from accelerate import Accelerator

    from maskspec.model.mtp import MTPConfig, MTPModel

    cfg.validate()
    check_output_folder(cfg)  # every process, before the main one changes anything
    accelerator = Accelerator(cpu=cfg.cpu)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    out = Path(cfg.out)

    torch.manual_seed(cfg.seed)  # identical adapter init on every process (then broadcast, to be sure)
    if mtp is None:
        from maskspec.hub import load_model_and_tokenizer

        base, tokenizer = load_model_and_tokenizer(cfg.model, device=device)
        mtp = MTPModel(base, tokenizer, MTPConfig(k=cfg.k, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout),
                       model_name=base.config.name_or_path)
    else:
        mtp.to(device)
    if mtp.k != cfg.k:
        raise TrainError(f"the model's adapter has k={mtp.k} but the config asks for k={cfg.k}")
    if cfg.init_adapter is not None:
        _init_from_adapter(mtp, cfg)
    params = mtp.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    broadcast_parameters_(params)

    if examples is None:
        examples = _load_examples(cfg, mtp.tokenizer, mtp.eos_token_ids)
        train_examples, held_out = split_eval(list(examples), cfg.eval_size, cfg.seed)
    else:
        train_examples, held_out = list(examples), []
    if eval_examples is not None:
        held_out = list(eval_examples)
    if not train_examples:
        raise TrainError("no training examples")
    _set_draft_vocab(mtp, cfg.draft_vocab, examples)
    stream = DataStream(train_examples, cfg.seed)

    # --out changes only now that the model and the data have loaded: a run that fails to start leaves it as it was.
    _barrier()
    if main:
        if cfg.overwrite:
            _clear_training_output(out)
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    existing = list_checkpoints(out)
    if cfg.resume and not existing:
        if main:
            warnings.warn(f"--resume: no checkpoint in {out}; starting from scratch", stacklevel=2)

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    budget = StepBudget(cfg, clock, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, lambda: budget.horizon))
    start_step = 0
    if cfg.resume and existing:
        start_step = load_checkpoint(existing[-1][1], mtp, optimizer, scheduler, rank,
                                     cfg.batch_size * cfg.grad_accum * world)
        if start_step >= cfg.steps and main:
            warnings.warn(f"checkpoint is at step {start_step}, not below --steps {cfg.steps}", stacklevel=2)

    if cfg.gradient_checkpointing:
        _set_activation_checkpointing(mtp.model, True)
    mtp.train()
    weights = cfg.loss_weights()
    log = MetricsLog(out, main, start_step)
    result = TrainResult(out=out, start_step=start_step)
    per_step = cfg.batch_size * cfg.grad_accum * world
    pad_id = (getattr(mtp.tokenizer, "pad_token_id", None) if mtp.tokenizer is not None else None) or 0

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (main and cfg.progress), desc="train",
               dynamic_ncols=True)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else nullcontext
    budget.begin(start_step)
    done = start_step
    try:
        while not budget.stop:
            step = done
            t0 = clock()
            # This process's micro-batches of the global step, built first so the loss normalisers (row counts
            # over the whole global batch) are known before the first backward.
            micro: list[TrainBatch] = []
            for a in range(cfg.grad_accum):
                first = step * per_step + (a * world + rank) * cfg.batch_size
                positions = range(first, first + cfg.batch_size)
                micro.append(make_batch([stream.examples[stream.index(p)] for p in positions], cfg.k,
                                        block_fraction=cfg.block_fraction, max_blocks=cfg.max_blocks,
                                        seeds=[stream.block_seed(p) for p in positions], pad_token_id=pad_id))
            local = RowCounts()
            for b in micro:
                local = local + row_counts(b)
            stats = torch.tensor([local.target, local.anchor, local.kl, sum(b.num_tokens for b in micro),
                                  sum(b.num_rows for b in micro)], dtype=torch.float64, device=device)
            all_reduce_sum_(stats)
            norm = RowCounts(int(stats[0]), int(stats[1]), int(stats[2]))

            sums = torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.float64)
            for b in micro:
                b = b.to(device)
                gate_rows = torch.nonzero(b.is_mask.reshape(-1), as_tuple=False).squeeze(-1)
                # With checkpointing the forward is re-run during backward, so the gate must still be set then.
                gate_ctx = mtp.gate.active(gate_rows) if cfg.gradient_checkpointing else nullcontext()
                with gate_ctx:
                    with autocast():
                        hidden = mtp.forward_rows(b.token_ids, b.mask_slot, b.position_ids, b.attention,
                                                  b.key_positions,
                                                  keep_gate_for_backward=cfg.gradient_checkpointing).hidden
                        losses = compute_losses(mtp, hidden, b, weights, norm, cfg.chunk_rows)
                    losses["loss"].backward()
                sums += torch.stack([losses[n].detach().double().cpu() for n in ("loss", *LOSS_NAMES)])
            all_reduce_gradients_(params)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums = all_reduce_sum_(sums.to(device)).cpu()

            elapsed = clock() - t0
            done = step + 1
            metrics = {"step": done, "loss": float(sums[0]),
                       **{n: float(v) for n, v in zip(LOSS_NAMES, sums[1:].tolist())},
                       "lr": lr, "grad_norm": grad_norm, "tokens": int(stats[3]), "rows": int(stats[4]),
                       "seconds": elapsed, "tokens_per_s": float(stats[3]) / elapsed,
                       "rows_per_s": float(stats[4]) / elapsed}
            result.history.append(metrics)
            log.write(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            budget.record(done)
            if budget.horizon != bar.total:
                bar.total = budget.horizon
                bar.refresh()

            last = budget.stop
            extra = 0.0
            if cfg.eval_every and done % cfg.eval_every == 0 and not last and held_out:
                t1 = clock()
                ev = {"step": done, **evaluate(mtp, held_out, cfg.batch_size, bf16=cfg.bf16, device=device,
                                               rank=rank, world=world)}
                result.evals.append(ev)
                log.write({"eval": True, **ev})
                extra += clock() - t1
            if done % cfg.save_every == 0 and not last:
                t1 = clock()
                save_checkpoint(out, done, mtp, optimizer, scheduler, cfg, rank, world, cfg.keep_checkpoints)
                extra += clock() - t1
            if extra:
                budget.reserve = max(budget.reserve, extra)
            if on_step is not None:
                on_step(done, metrics)
    finally:
        bar.close()

    final_step = done  # the last step run (start_step when there was none left to run)
    if held_out:
        ev = {"step": final_step, **evaluate(mtp, held_out, cfg.batch_size, bf16=cfg.bf16, device=device,
                                             rank=rank, world=world)}
        result.evals.append(ev)
        log.write({"eval": True, **ev})
    save_checkpoint(out, final_step, mtp, optimizer, scheduler, cfg, rank, world, cfg.keep_checkpoints)
    if cfg.gradient_checkpointing:
        _set_activation_checkpointing(mtp.model, False)
    mtp.eval()
    if main:
        training = {**asdict(cfg), "final_step": final_step, "schedule_steps": budget.horizon, "processes": world,
                    "train_examples": len(train_examples), "eval_examples": len(held_out)}
        if result.evals:
            training["final_eval"] = {k: v for k, v in result.evals[-1].items() if k != "step"}
        write_final_adapter(mtp, out, training)
    log.close()
    _barrier()
    return result

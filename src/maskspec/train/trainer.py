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

The data order is fixed by the seed and the step (`maskspec.train.stream`), so a checkpoint only needs the step
number to continue with the same data.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from maskspec.train.checkpoints import (check_output_folder, list_checkpoints, load_checkpoint,
                                        prepare_output_folder, save_checkpoint, write_final_adapter)
from maskspec.train.config import TrainConfig, TrainError
from maskspec.train.data import Example, TrainBatch, load_chat_records, tokenize_records
from maskspec.train.distributed import (Processes, all_reduce_gradients_, all_reduce_sum_, barrier,
                                        broadcast_parameters_, start_processes)
from maskspec.train.evaluation import evaluate, split_eval
from maskspec.train.losses import LOSS_NAMES, LossWeights, RowCounts, compute_losses, row_counts
from maskspec.train.metrics import MetricsLog
from maskspec.train.schedule import StepBudget, lr_lambda
from maskspec.train.stream import DataStream

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass
class TrainResult:
    out: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per optimizer step run
    evals: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0


def train(cfg: TrainConfig, *, mtp=None, examples: Sequence[Example] | None = None,
          eval_examples: Sequence[Example] | None = None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None,
          clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Train an adapter as configured. `mtp` (an MTPModel) and pre-tokenized `examples` may be passed directly
    (tests, notebooks); otherwise the model and data named in `cfg` are loaded. `on_step(step, metrics)` is
    called after every optimizer step (step counted from 1). `clock` times steps (and the time limit)."""
    cfg.validate()
    check_output_folder(cfg)  # every process, before the main one changes anything
    procs = start_processes(cfg.cpu)
    out = Path(cfg.out)

    torch.manual_seed(cfg.seed)  # identical adapter init on every process (then broadcast, to be sure)
    mtp = _prepare_model(cfg, mtp, procs.device)
    params = mtp.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    broadcast_parameters_(params)

    if examples is None:
        examples = _load_examples(cfg, mtp.tokenizer, mtp.eos_token_ids)
        train_examples, held_out = split_eval(list(examples), cfg.eval_size)
    else:
        train_examples, held_out = list(examples), []
    if eval_examples is not None:
        held_out = list(eval_examples)
    if not train_examples:
        raise TrainError("no training examples")
    _set_draft_vocab(mtp, cfg.draft_vocab, examples)

    # --out changes only now that the model and the data have loaded: a run that fails to start leaves it as it was.
    prepare_output_folder(cfg, procs.main)
    existing = list_checkpoints(out)
    if cfg.resume and not existing and procs.main:
        warnings.warn(f"--resume: no checkpoint in {out}; starting from scratch", stacklevel=2)

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    budget = StepBudget(cfg, clock, procs.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, lambda: budget.horizon))
    start_step = 0
    if cfg.resume and existing:
        start_step = load_checkpoint(existing[-1][1], mtp, optimizer, scheduler, procs.rank,
                                     cfg.global_batch(procs.world))
        if start_step >= cfg.steps and procs.main:
            warnings.warn(f"checkpoint is at step {start_step}, not below --steps {cfg.steps}", stacklevel=2)

    if cfg.gradient_checkpointing:
        _set_activation_checkpointing(mtp.model, True)
    mtp.train()
    run = _Run(cfg=cfg, procs=procs, out=out, mtp=mtp, params=params, stream=DataStream(train_examples, cfg.seed),
               held_out=held_out, optimizer=optimizer, scheduler=scheduler, budget=budget, clock=clock,
               weights=cfg.loss_weights(), log=MetricsLog(out, procs.main, start_step),
               result=TrainResult(out=out, start_step=start_step), pad_token_id=_pad_token_id(mtp))
    final_step = _run_steps(run, start_step, on_step)  # start_step when there was none left to run
    _finish(run, final_step, len(train_examples))
    return run.result


@dataclass
class _Run:
    """What the steps of one training run share."""
    cfg: TrainConfig
    procs: Processes
    out: Path
    mtp: Any
    params: list[torch.nn.Parameter]
    stream: DataStream
    held_out: list[Example]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    budget: StepBudget
    clock: Callable[[], float]
    weights: LossWeights
    log: MetricsLog
    result: TrainResult
    pad_token_id: int


def _run_steps(run: _Run, start_step: int, on_step: Callable[[int, dict[str, Any]], None] | None) -> int:
    """Optimizer steps from `start_step` until the budget stops; returns the last step run."""
    from tqdm.auto import tqdm

    cfg, budget = run.cfg, run.budget
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (run.procs.main and cfg.progress), desc="train",
               dynamic_ncols=True)
    budget.begin(start_step)
    done = start_step
    try:
        while not budget.stop:
            metrics = _optimizer_step(run, done)
            done += 1
            run.result.history.append(metrics)
            run.log.write(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            budget.record(done)
            if budget.horizon != bar.total:
                bar.total = budget.horizon
                bar.refresh()
            if not budget.stop:  # after the last step, _finish evaluates and saves
                _evaluate_and_save(run, done)
            if on_step is not None:
                on_step(done, metrics)
    finally:
        bar.close()
    return done


def _optimizer_step(run: _Run, step: int) -> dict[str, Any]:
    """Optimizer step `step` (counted from 0) over the global batch; returns its metrics."""
    cfg, procs, mtp = run.cfg, run.procs, run.mtp
    t0 = run.clock()
    # This process's micro-batches, built first so the loss normalisers (row counts over the whole global batch)
    # are known before the first backward.
    micro = run.stream.micro_batches(step, cfg, procs.rank, procs.world, run.pad_token_id, procs.device)
    local = RowCounts()
    for b in micro:
        local = local + row_counts(b)
    stats = torch.tensor([local.target, local.anchor, local.kl, sum(b.num_tokens for b in micro),
                          sum(b.num_rows for b in micro)], dtype=torch.float64, device=procs.device)
    all_reduce_sum_(stats)
    norm = RowCounts(int(stats[0]), int(stats[1]), int(stats[2]))

    sums = torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.float64)
    for b in micro:
        sums += _backward(run, b, norm)
    all_reduce_gradients_(run.params)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    sums = all_reduce_sum_(sums.to(procs.device)).cpu()

    elapsed = run.clock() - t0
    return {"step": step + 1, "loss": float(sums[0]), **{n: float(v) for n, v in zip(LOSS_NAMES, sums[1:].tolist())},
            "lr": lr, "grad_norm": grad_norm, "tokens": int(stats[3]), "rows": int(stats[4]),
            "seconds": elapsed, "tokens_per_s": float(stats[3]) / elapsed, "rows_per_s": float(stats[4]) / elapsed}


def _backward(run: _Run, batch: TrainBatch, norm: RowCounts) -> torch.Tensor:
    """Forward and backward of one micro-batch (gradients accumulate); returns its losses, total first."""
    cfg, mtp = run.cfg, run.mtp
    checkpointing = cfg.gradient_checkpointing
    gate_rows = torch.nonzero(batch.is_mask.reshape(-1), as_tuple=False).squeeze(-1)
    # With checkpointing the forward is re-run during backward, so the gate must still be set then.
    gate_ctx = mtp.gate.active(gate_rows) if checkpointing else nullcontext()
    autocast = torch.autocast(run.procs.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    with gate_ctx:
        with autocast:
            hidden = mtp.forward_rows(batch.token_ids, batch.mask_slot, batch.position_ids, batch.attention,
                                      batch.key_positions, keep_gate_for_backward=checkpointing).hidden
            losses = compute_losses(mtp, hidden, batch, run.weights, norm, cfg.chunk_rows)
        losses["loss"].backward()
    return torch.stack([losses[n].detach().double().cpu() for n in ("loss", *LOSS_NAMES)])


def _evaluate_and_save(run: _Run, done: int) -> None:
    """The evaluation and checkpoint due after step `done` (not the last); their time is kept as the budget's
    reserve for the end of the run."""
    cfg, clock = run.cfg, run.clock
    extra = 0.0
    if cfg.eval_every and done % cfg.eval_every == 0 and run.held_out:
        t1 = clock()
        _evaluate(run, done)
        extra += clock() - t1
    if done % cfg.save_every == 0:
        t1 = clock()
        _save(run, done)
        extra += clock() - t1
    if extra:
        run.budget.reserve = max(run.budget.reserve, extra)


def _evaluate(run: _Run, step: int) -> None:
    procs = run.procs
    ev = {"step": step, **evaluate(run.mtp, run.held_out, run.cfg.batch_size, bf16=run.cfg.bf16, device=procs.device,
                                   rank=procs.rank, world=procs.world, normals_first=run.cfg.attention == "flex")}
    run.result.evals.append(ev)
    run.log.write({"eval": True, **ev})


def _save(run: _Run, step: int) -> None:
    save_checkpoint(run.out, step, run.mtp, run.optimizer, run.scheduler, run.cfg, run.procs.rank, run.procs.world,
                    run.cfg.keep_checkpoints)


def _finish(run: _Run, final_step: int, train_size: int) -> None:
    """The last evaluation and checkpoint, then the adapter in --out with what the run did in its config."""
    cfg, mtp = run.cfg, run.mtp
    if run.held_out:
        _evaluate(run, final_step)
    _save(run, final_step)
    if cfg.gradient_checkpointing:
        _set_activation_checkpointing(mtp.model, False)
    mtp.eval()
    if run.procs.main:
        training = {**asdict(cfg), "final_step": final_step, "schedule_steps": run.budget.horizon,
                    "processes": run.procs.world, "train_examples": train_size, "eval_examples": len(run.held_out)}
        if run.result.evals:
            training["final_eval"] = {k: v for k, v in run.result.evals[-1].items() if k != "step"}
        training.update(_rows_record(cfg, run.log.path))
        write_final_adapter(mtp, run.out, training)
    run.log.close()
    barrier()


def _rows_record(cfg: TrainConfig, metrics: Path) -> dict[str, Any]:
    """The layout rows behind the adapter, for `maskspec curve`: this run's (`rows_seen`, resumed steps included),
    those of the --init-adapter (`rows_before`: None when its config does not record them) and their sum; plus the
    init adapter's own training record, so a chain of continued runs keeps its history."""
    from maskspec.adapter import read_adapter_config
    from maskspec.train.curve import rows_seen

    rows = rows_seen(metrics)
    record: dict[str, Any] = {"rows_seen": rows}
    if cfg.init_adapter is None:
        return {**record, "rows_before": 0, "rows_seen_total": rows}
    parent = read_adapter_config(cfg.init_adapter).training or {}
    before = parent.get("rows_seen_total")
    before = before if isinstance(before, int) and not isinstance(before, bool) else None
    return {**record, "rows_before": before, "rows_seen_total": None if before is None else before + rows,
            "init_adapter_training": parent or None}


# ---------------------------------------------------------------------------------------------- setup
def _prepare_model(cfg: TrainConfig, mtp, device: torch.device):
    """The MTPModel to train on `device`: the one passed, or the configured base model with a fresh adapter (or
    the weights of --init-adapter)."""
    from maskspec.model.mtp import MTPConfig, MTPModel

    if mtp is None:
        from maskspec.hub import load_model_and_tokenizer

        base, tokenizer = load_model_and_tokenizer(cfg.model, device=device)
        mtp = MTPModel(base, tokenizer, MTPConfig(k=cfg.k, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout),
                       model_name=base.config.name_or_path)
    else:
        mtp.to(device)
    if mtp.k != cfg.k:
        raise TrainError(f"the model's adapter has k={mtp.k} but the config asks for k={cfg.k}")
    _set_attention(mtp, cfg.attention, device)
    if cfg.init_adapter is not None:
        _init_from_adapter(mtp, cfg)
    return mtp


def _set_attention(mtp, attention: str, device: torch.device) -> None:
    """Switch the base model's attention implementation for training (the adapter files do not depend on it)."""
    from maskspec.train.config import ATTENTIONS

    wanted = ATTENTIONS[attention]
    if attention == "flex" and device.type == "cpu":
        raise TrainError("--attention flex needs a GPU: FlexAttention has no backward pass on CPU (use sdpa there)")
    if mtp.model.config._attn_implementation == wanted:
        return
    try:
        mtp.model.set_attn_implementation(wanted)
    except (ValueError, ImportError) as exc:
        raise TrainError(f"--attention {attention}: {type(mtp.model).__name__} cannot use {wanted} here ({exc})") \
            from None


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


def _pad_token_id(mtp) -> int:
    return (getattr(mtp.tokenizer, "pad_token_id", None) if mtp.tokenizer is not None else None) or 0


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

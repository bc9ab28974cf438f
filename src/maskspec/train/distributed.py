"""The processes of a data-parallel run: who this process is, and the collectives training needs.

Accelerate (`accelerate launch --num_processes N maskspec train ...`) sets up the process group and the device;
the model is not wrapped in DistributedDataParallel (see `maskspec.train.trainer`). Every helper here is a no-op in
a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device
    main: bool


def start_processes(cpu: bool) -> Processes:
    """Join the process group Accelerate set up (a single process without one); `cpu` keeps to the CPU."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cpu)
    return Processes(accelerator.process_index, accelerator.num_processes, accelerator.device,
                     accelerator.is_main_process)


def _several() -> Any:
    """`torch.distributed` when a process group of more than one process is running, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def parallel() -> bool:
    """True when more than one process takes part."""
    return _several() is not None


def barrier() -> None:
    dist = _several()
    if dist is not None:
        dist.barrier()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Give every process rank `src`'s values of `tensor` (in place)."""
    dist = _several()
    if dist is not None:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    dist = _several()
    if dist is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients_(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over processes with one flat all-reduce."""
    dist = _several()
    if dist is None:
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
    dist = _several()
    if dist is None:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)

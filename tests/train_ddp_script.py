"""Run by tests/test_train_ddp.py, under `accelerate launch --num_processes 2 --cpu` or as one plain process:
trains a tiny adapter and saves every process's final adapter tensors to OUT/rank{R}.safetensors.

usage: train_ddp_script.py OUT BATCH_SIZE_PER_PROCESS GRAD_ACCUM
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import synthetic_examples, tiny_mtp  # noqa: E402

from maskspec.train.trainer import TrainConfig, train  # noqa: E402


def main() -> None:
    out, batch_size, grad_accum = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    rank = int(__import__("os").environ.get("RANK", "0"))
    # A different adapter init per process: the trainer must broadcast rank 0's.
    mtp = tiny_mtp(adapter_seed=rank)
    cfg = TrainConfig(out=str(out / "adapter"), k=3, rank=8, alpha=16.0, lr=1e-2, steps=3, batch_size=batch_size,
                      grad_accum=grad_accum, warmup=1, schedule="cosine", save_every=1000, progress=False,
                      eval_size=0, cpu=True, block_fraction=0.7)
    result = train(cfg, mtp=mtp, examples=synthetic_examples(8), eval_examples=synthetic_examples(3, seed=5))
    state = {n: p.detach().contiguous() for n, p in mtp.adapter_state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    # Loss and gradient norm (before clipping) per step: the norm catches a wrongly scaled all-reduce, which
    # Adam and clipping would otherwise hide in the weights.
    losses = [v for h in result.history for v in (h["loss"], h["grad_norm"])]
    (out / f"losses{rank}.txt").write_text(" ".join(f"{v:.10g}" for v in losses) + "\n")
    (out / f"eval{rank}.txt").write_text(f"{result.evals[-1]['acc_base_mean']:.10g}\n")


if __name__ == "__main__":
    main()

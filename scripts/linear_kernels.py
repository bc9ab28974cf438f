"""Float32 linear kernels on CPU at decoding row counts: the stock kernel (`F.linear`, MKL) vs oneDNN's matmul
(`maskspec.model.kernels`), over the projection matrices of the embedded model (every layer, so the weights
stream from memory as in a real forward pass). Prints milliseconds per pass over all of them.

    python scripts/linear_kernels.py [--threads 2] [--rows 1,4,9,16,25]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from maskspec.hub import load_model_and_tokenizer
from maskspec.model.kernels import linear


def median_ms(fn, repeats: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default="1,4,9,16,25")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer("default")
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    print(f"{len(weights)} matrices, {sum(w.numel() for w in weights) / 1e6:.0f}M weights, {args.threads} threads")
    print(f"{'rows':>5} {'stock ms':>9} {'oneDNN ms':>10} {'ratio':>6}")
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            inputs = [torch.randn(1, rows, w.shape[1]) for w in weights]
            stock = median_ms(lambda: [F.linear(x, w) for x, w in zip(inputs, weights)])
            fast = median_ms(lambda: [linear(x, w, fast=True) for x, w in zip(inputs, weights)])
            print(f"{rows:>5} {stock:>9.1f} {fast:>10.1f} {stock / fast:>6.2f}")


if __name__ == "__main__":
    main()

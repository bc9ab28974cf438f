"""Float32 linear kernels on CPU at decoding row counts, the values of `MTPModel.kernels`: the stock kernel
(`F.linear`, MKL) vs oneDNN's matmul on the plain matrices ("onednn") and on oneDNN-packed ones ("packed", which
leaves 1-row calls to the plain layout), `maskspec.model.kernels`, over the projection matrices of the embedded
model (every layer, so the weights stream from memory as in a real forward pass). Prints milliseconds per pass
over all of them.

    python scripts/linear_kernels.py [--threads 2] [--rows 1,4,9,16,25] [--kernels stock,onednn,packed]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from maskspec.hub import load_model_and_tokenizer
from maskspec.model.kernels import Kernels, PackCache, linear


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
    parser.add_argument("--kernels", default="stock,onednn,packed", help="any of stock, onednn, packed (any case)")
    args = parser.parse_args()
    try:
        kernels = [Kernels(k.strip().lower()) for k in args.kernels.split(",") if k.strip()]
    except ValueError:
        parser.error(f"--kernels takes {', '.join(k.value for k in Kernels)}")
    if not kernels:
        parser.error(f"--kernels takes {', '.join(k.value for k in Kernels)}")
    torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer("default")
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    packs = PackCache()
    if Kernels.PACKED in kernels:
        packs.refresh({i: ([w], None) for i, w in enumerate(weights)})
    packed = [None if packs.get(i) is None else packs.get(i).matrix for i in range(len(weights))]
    print(f"{len(weights)} matrices, {sum(w.numel() for w in weights) / 1e6:.0f}M weights, {args.threads} threads")
    print(f"{'rows':>5} " + " ".join(f"{k.value + ' ms':>10}" for k in kernels)
          + (f" {'stock / ' + kernels[-1].value:>16}" if Kernels.STOCK in kernels[:-1] else ""))
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            inputs = [torch.randn(1, rows, w.shape[1]) for w in weights]
            ms = {}
            for kernel in kernels:
                if kernel == Kernels.STOCK:
                    ms[kernel] = median_ms(lambda: [F.linear(x, w) for x, w in zip(inputs, weights)])
                else:
                    ms[kernel] = median_ms(lambda: [linear(x, w, kernel=kernel, packed=p)
                                                    for x, w, p in zip(inputs, weights, packed)])
            ratio = f" {ms[Kernels.STOCK] / ms[kernels[-1]]:>16.2f}" if Kernels.STOCK in kernels[:-1] else ""
            print(f"{rows:>5} " + " ".join(f"{ms[k]:>10.1f}" for k in kernels) + ratio)


if __name__ == "__main__":
    main()

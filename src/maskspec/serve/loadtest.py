"""Throughput benchmark of the server: tokens/s over all clients for several concurrency levels and modes.

    python -m maskspec.serve.loadtest [--model default] [--adapter A] [--clients 1,4,16] [--modes quadratic,ar]
        [--static] [--json FILE]

Each (clients, mode) cell, in that order, starts the server in-process on a free 127.0.0.1 port (uvicorn in a
thread), sends one warm-up request per client at once (so a static server has captured the step of every batch
size the cell reaches), then lets every client send `--requests` greedy chat requests one after the other
(distinct prompts, up to `--max-tokens` each or EOS). Throughput = completion tokens of all requests / wall time
of the cell. Each cell also counts the requests whose text is the same as in the reference cell of its
concurrency level (mode ar with the usual step when --modes has ar, else the first mode's usual cell): in fp32
every greedy text agrees; in bf16 a pass over more rows, or another batch, can flip a near-tie (README,
"Exactness"). Without --adapter the shipped adapter is used when there is one, else a random adapter
(tokens/pass then stays near 1: the numbers show the overhead, not the gain, of speculation). With --static every
cell runs again with the server's static step (`--max-batch` slots), right after its usual twin. --json is
rewritten after every cell, so a run stopped early keeps the cells it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

TOPICS = ["the ocean", "a small town", "prime numbers", "the history of tea", "learning to cook", "rain",
          "a city at night", "the moon", "trees in autumn", "a robot", "a long train journey", "bread",
          "music", "the desert", "friendship", "winter mornings"]


def load(model: str, adapter: str | None, k: int, dtype: str, device: str) -> tuple[object, str]:
    from maskspec.adapter import shipped_adapter_for
    from maskspec.model.mtp import MTPConfig, MTPModel, randomize_adapter_

    adapter = adapter if adapter is not None else shipped_adapter_for(model)
    if adapter is not None:
        return MTPModel.from_pretrained(model, adapter=adapter, dtype=dtype, device=device), f"adapter {adapter}"
    mtp = MTPModel.from_pretrained(model, config=MTPConfig(k=k, rank=16), dtype=dtype, device=device)
    randomize_adapter_(mtp, seed=0, scale=0.02)
    return mtp, f"random adapter (k={k}; none trained/shipped)"


def run_cell(mtp: object, mode: str, clients: int, requests: int, max_tokens: int, max_batch: int,
             static: bool = False) -> dict:
    from maskspec.serve.app import BackgroundServer, build_server

    app, scheduler = build_server(mtp, mode=mode, max_batch=max_batch, max_queue=1024,
                                  max_new_tokens_limit=max_tokens, static=static)
    try:
        with BackgroundServer(app) as url:
            def ask(i: int) -> dict:
                body = {"messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % 16]}."}],
                        "max_tokens": max_tokens, "temperature": 0}
                sent = time.perf_counter()
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=3600)
                r.raise_for_status()
                return {**r.json(), "latency_s": time.perf_counter() - sent}

            with ThreadPoolExecutor(max_workers=clients) as pool:  # warm-up, as many at once as the cell sends
                list(pool.map(ask, range(clients)))
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                results = list(pool.map(lambda c: [ask(c * requests + j) for j in range(requests)],
                                        range(clients)))
            wall = time.perf_counter() - start
    finally:
        scheduler.stop()
    flat = [r for rs in results for r in rs]
    texts = [r["choices"][0]["message"]["content"] for r in flat]  # request order, the same in every cell
    tokens = sum(r["usage"]["completion_tokens"] for r in flat)
    passes = sum(r["maskspec"]["forward_passes"] for r in flat)
    return {"mode": mode, "static": static, "clients": clients, "requests": len(flat), "tokens": tokens,
            "seconds": round(wall, 2),
            "tokens_per_second": round(tokens / wall, 2), "tokens_per_pass": round(tokens / passes, 3),
            "mean_latency_s": round(statistics.mean(r["maskspec"]["seconds"] for r in flat), 2),
            "p50_latency_s": round(percentile([r["latency_s"] for r in flat], 50), 3),
            "p99_latency_s": round(percentile([r["latency_s"] for r in flat], 99), 3), "texts": texts}


def mark_agreement(level: list[dict], reference: tuple[str, bool]) -> None:
    """Set `same_text_as` (the reference cell: mode, static) and `same_text` (how many requests got the
    reference's text, None until the reference has run) on the cells of one concurrency level."""
    ref = next((r for r in level if (r["mode"], r["static"]) == reference), None)
    for row in level:
        row["same_text_as"] = f"{reference[0]} {'static' if reference[1] else 'usual'}"
        row["same_text"] = None if ref is None else sum(a == b for a, b in zip(row["texts"], ref["texts"],
                                                                                 strict=True))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of the values, linearly interpolated between the nearest ranks."""
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--adapter", default=None)
    p.add_argument("--k", type=int, default=4, help="k of the random adapter (when no adapter is used)")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--modes", default="quadratic,ar")
    p.add_argument("--requests", type=int, default=1, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--static", action="store_true", help="also run every cell with the static step")
    p.add_argument("--json", default=None, help="also write the rows to this file (after every cell)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mtp, adapter_note = load(args.model, args.adapter, args.k, args.dtype, args.device)
    print(f"model {mtp.model_name}, {adapter_note}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"max_tokens {args.max_tokens}, {args.requests} request(s) per client, max batch {args.max_batch}",
          flush=True)
    modes = args.modes.split(",")
    reference = ("ar" if "ar" in modes else modes[0], False)
    rows: list[dict] = []
    for clients in [int(c) for c in args.clients.split(",")]:
        level: list[dict] = []
        for mode in modes:
            for static in (False, True) if args.static else (False,):
                level.append(run_cell(mtp, mode, clients, args.requests, args.max_tokens, args.max_batch, static))
                mark_agreement(level, reference)
                print(json.dumps(_public(level[-1])), flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"adapter": adapter_note, "device": args.device, "dtype": args.dtype,
                                   "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                                   "rows": [_public(r) for r in rows + level]}, f, indent=2)
        rows += level
    print("\n| mode | step | clients | requests | tokens | seconds | tokens/s | tokens/pass | mean decode s | "
          "p50 latency s | p99 latency s | same text |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {'static' if r['static'] else 'usual'} | {r['clients']} | {r['requests']} | "
              f"{r['tokens']} | {r['seconds']} | {r['tokens_per_second']} | {r['tokens_per_pass']} | "
              f"{r['mean_latency_s']} | {r['p50_latency_s']} | {r['p99_latency_s']} | "
              f"{r['same_text']}/{r['requests']} as {r['same_text_as']} |")


def _public(row: dict) -> dict:
    """A cell as printed and saved: without its texts."""
    return {k: v for k, v in row.items() if k != "texts"}


if __name__ == "__main__":
    main()

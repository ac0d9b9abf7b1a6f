#!/usr/bin/env python3
"""Decode-step time of N sessions batched in one ShardModel.forward_batch versus N solo steps.

Makes a random-weight tiny model offline in a temporary directory (default: llama, 8 blocks,
hidden 256), loads all its blocks, gives each of N sessions a cache of a random length in
[--min-len, --max-len], then times decode steps (one token per session): N solo `forward`
calls one after another, and one `forward_batch` of all N. Median of --steps steps each.
Prints a table; --out also writes the rows as JSON.

    .venv/bin/python scripts/bench_batch_forward.py --sessions 1 2 4 8 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--family", default="llama")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--min-len", type=int, default=64, help="shortest cached length")
    p.add_argument("--max-len", type=int, default=256, help="longest cached length")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def bench(shard: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per session count: median solo-sum and batched decode-step times."""
    import torch

    from agent.model.blocks import BatchItem, SessionCache

    gen = torch.Generator().manual_seed(args.seed)

    def sync() -> None:
        if shard.device.type == "cuda":
            torch.cuda.synchronize(shard.device)

    def fill(lengths: list[int]) -> list[SessionCache]:
        caches = []
        for n in lengths:
            cache = shard.new_cache()
            shard.forward(cache, torch.randn(1, n, shard.hidden_size, generator=gen), 0)
            caches.append(cache)
        return caches

    rows = []
    for n in args.sessions:
        lengths = torch.randint(args.min_len, args.max_len + 1, (n,), generator=gen).tolist()
        solo, batched = fill(lengths), fill(lengths)
        solo_ms, batch_ms = [], []
        for step in range(args.warmup + args.steps):
            xs = [torch.randn(1, 1, shard.hidden_size, generator=gen) for _ in range(n)]
            sync()
            t0 = time.perf_counter()
            for cache, x in zip(solo, xs, strict=True):
                shard.forward(cache, x, cache.length)
            sync()
            t1 = time.perf_counter()
            shard.forward_batch(
                [BatchItem(c, x, c.length) for c, x in zip(batched, xs, strict=True)]
            )
            sync()
            t2 = time.perf_counter()
            if step >= args.warmup:
                solo_ms.append((t1 - t0) * 1e3)
                batch_ms.append((t2 - t1) * 1e3)
        s, b = statistics.median(solo_ms), statistics.median(batch_ms)
        rows.append(
            {
                "sessions": n,
                "min_len": min(lengths),
                "max_len": max(lengths),
                "solo_sum_ms": round(s, 3),
                "batched_ms": round(b, 3),
                "speedup": round(s / b, 2),
                "batched_ms_per_session": round(b / n, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from agent.model.blocks import ShardModel
    from agent.model.tiny import make_tiny_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        model_dir = make_tiny_model(
            args.family, Path(tmp) / "model", n_layers=args.blocks, hidden=args.hidden
        )
        dtype = getattr(torch, args.dtype)
        shard = ShardModel.load(model_dir, 0, args.blocks, dtype=dtype, device=args.device)
        rows = bench(shard, args)

    print(
        f"{args.family}, {args.blocks} blocks, hidden {args.hidden}, {args.dtype} on "
        f"{args.device}, {args.threads} thread(s); cached lengths {args.min_len}-{args.max_len}; "
        f"median of {args.steps} decode steps"
    )
    header = f"{'sessions':>8} {'lengths':>9} {'solo sum ms':>12} {'batched ms':>11} "
    header += f"{'speedup':>8} {'ms/session':>11}"
    print(header)
    for r in rows:
        print(
            f"{r['sessions']:>8} {r['min_len']:>4}-{r['max_len']:<4} {r['solo_sum_ms']:>12.2f} "
            f"{r['batched_ms']:>11.2f} {r['speedup']:>7.2f}x {r['batched_ms_per_session']:>11.3f}"
        )
    if args.out is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Memory of serving a 2-block span with ShardModel versus loading the whole model.

Makes a Llama-shaped random-weight checkpoint offline in a temporary directory (sharded bf16
safetensors, like a real one), then measures each case in a fresh subprocess: RSS after the
imports, after loading, and after one forward pass (safetensors hands back lazy mmap views, so
pages count once touched), plus peak RSS. Prints a table and writes JSON with --out.

    .venv/bin/python scripts/bench_shard_memory.py --out /tmp/shard_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=24, help="blocks in the made model")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--start", type=int, default=11, help="first block of the measured span")
    p.add_argument("--span", type=int, default=2, help="blocks in the measured span")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-size", default="100MB", help="max_shard_size of the checkpoint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", type=Path, help="use this checkpoint instead of making one")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--child", choices=["shard", "head", "full"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's RSS high-water mark. Not getrusage's ru_maxrss: that one survives
    fork+exec, so it would report the parent's peak from making the model."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return rss()


def warm_up(dtype: Any) -> None:
    """Run each kind of kernel once on tiny tensors, so the baseline already holds the
    runtime's one-off allocations and the deltas are the model's own."""
    import torch

    x = torch.randn(1, 4, 64, dtype=dtype)
    w = torch.randn(64, 64, dtype=dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(x, w)
        q = x.view(1, 1, 4, 64)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.nn.functional.scaled_dot_product_attention(q[:, :, :1], q, q)
        torch.nn.functional.embedding(torch.tensor([[1]]), w)


def make_model(args: argparse.Namespace, out: Path) -> float:
    """Write the random-weight checkpoint; returns seconds taken."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.perf_counter()
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.blocks,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)  # initialise in the target dtype: half the time and memory
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size=args.shard_size)
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns the numbers."""
    import torch
    from transformers.models.llama import modeling_llama  # noqa: F401  (import cost in baseline)

    sys.path.insert(0, str(ROOT))
    from agent.model.blocks import ShardModel
    from agent.model.head import ClientHead

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    warm_up(dtype)
    base = rss()
    t0 = time.perf_counter()
    if args.child == "shard":
        end = args.start + args.span
        shard = ShardModel.load(args.model_dir, args.start, end, dtype=dtype, device="cpu")
        load_s = time.perf_counter() - t0
        loaded = rss()
        cache = shard.new_cache()
        shard.forward(cache, torch.randn(1, 1, shard.hidden_size, dtype=dtype), 0)
        params = sum(p.numel() for p in shard.blocks.parameters())
    elif args.child == "head":
        head = ClientHead.load(args.model_dir, dtype=dtype, device="cpu")
        load_s = time.perf_counter() - t0
        loaded = rss()
        head.logits(head.embed(torch.tensor([[1]]), 0))
        params = head.embed_weight.numel() + (0 if head.tied else head.head_weight.numel())
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
        load_s = time.perf_counter() - t0
        loaded = rss()
        with torch.inference_mode():
            model(torch.tensor([[1]]))
        params = sum(p.numel() for p in model.parameters())
    touched = rss()
    peak = peak_rss()
    return {
        "case": args.child,
        "params": params,
        "load_s": round(load_s, 3),
        "rss_base_mib": round(base / MIB, 1),
        "load_mib": round((loaded - base) / MIB, 1),
        "after_forward_mib": round((touched - base) / MIB, 1),
        "peak_over_base_mib": round((peak - base) / MIB, 1),
    }


def run_child(args: argparse.Namespace, case: str, model_dir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        case,
        "--model-dir",
        str(model_dir),
        "--start",
        str(args.start),
        "--span",
        str(args.span),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{case} measurement failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="shardmesh-bench-") as tmp:
        model_dir = args.model_dir
        make_s = 0.0
        if model_dir is None:
            model_dir = Path(tmp) / "bench-llama"
            print(f"making a {args.blocks}-block Llama-shaped model in {model_dir} ...")
            make_s = make_model(args, model_dir)
            print(f"  made in {make_s:.1f} s")
        sys.path.insert(0, str(ROOT))
        from agent.model.modelinfo import block_param_bytes, read_model_info

        info = read_model_info(model_dir)
        if not 0 <= args.start < args.start + args.span <= info.n_blocks:
            raise SystemExit(f"span does not fit the model's {info.n_blocks} blocks")
        files = sorted(model_dir.glob("*.safetensors"))
        disk = sum(f.stat().st_size for f in files)
        block_mib = block_param_bytes(info, args.dtype) / MIB
        results = [run_child(args, case, model_dir) for case in ("shard", "head", "full")]
    span = f"[{args.start}, {args.start + args.span})"
    labels = {"shard": f"ShardModel {span}", "head": "ClientHead", "full": "from_pretrained"}
    print(
        f"\nmodel {info.model_id}: {info.n_blocks} blocks, hidden {info.hidden_size}, "
        f"{args.dtype}, {len(files)} files, {disk / MIB:.0f} MiB on disk; "
        f"one block {block_mib:.1f} MiB"
    )
    header = f"{'case':<26}{'params':>13}{'load s':>9}{'+RSS load':>11}{'+RSS fwd':>10}{'peak':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{labels[r['case']]:<26}{r['params']:>13,}{r['load_s']:>9.2f}"
            f"{r['load_mib']:>10.1f}M{r['after_forward_mib']:>9.1f}M"
            f"{r['peak_over_base_mib']:>8.1f}M"
        )
    report = {
        "model_id": info.model_id,
        "n_blocks": info.n_blocks,
        "hidden_size": info.hidden_size,
        "dtype": args.dtype,
        "files": len(files),
        "disk_mib": round(disk / MIB, 1),
        "block_param_mib": round(block_mib, 2),
        "make_s": round(make_s, 1),
        "span": [args.start, args.start + args.span],
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

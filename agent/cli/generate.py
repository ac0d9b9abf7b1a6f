"""`shardmesh generate`: through the local agent's control socket, or as a standalone client
that joins the mesh itself (`--bootstrap`, with `--config FILE`'s [client] table if given).
Text streams to stdout as tokens arrive.

A model whose blocks peers are still loading is waited for, up to `--timeout`: one line on
stderr says so ("waiting: model X is loading on 2 peers (blocks 0:4 on ...)"), then the
generation runs once every block is online; a load that does not finish in time is one
"... still loading ..." error line (exit 1).

Several prompts (`--prompt` repeated, or `--prompts-file FILE`, one a line) run at once, each
its own generation: the agents batch their steps (continuous batching). Their texts are
printed in prompt order when all are done, each after a `[N]` line; `--json` prints a list."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ShardmeshError, UsageError

if TYPE_CHECKING:
    from agent.config import ClientConfig

# As agent.route.generation's limit on a request's `loading_wait` (not imported: it loads
# the client's modules, and a usage error must not wait for them).
MAX_LOADING_WAIT_S = 86_400.0
# Prompts one `shardmesh generate` runs at once (each holds a session on every hop).
MAX_PROMPTS = 64


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """The text prompts (--prompt, repeatable, or --prompts-file), or None for --prompt-ids."""
    if args.prompts_file is not None:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--prompts-file: cannot read {args.prompts_file}: {exc}") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file: {args.prompts_file} has no prompts")
    elif args.prompt is not None:
        prompts = list(args.prompt)
    else:
        return None
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
    return prompts


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("--prompt-ids: no ids given")
    return ids


def _request(args: argparse.Namespace, prompt: str | None) -> dict[str, Any]:
    req: dict[str, Any] = {
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    if prompt is None:
        req["prompt_ids"] = _parse_ids(args.prompt_ids)
    else:
        req["prompt"] = prompt
    if args.model_dir is not None:
        req["model_dir"] = str(Path(args.model_dir).resolve())
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    # The agent waits this long for blocks that peers are still loading (the CLI's own
    # limit: every wait is inside it; the agent's "waiting" lines keep the socket alive).
    req["loading_wait"] = min(args.timeout, MAX_LOADING_WAIT_S)
    verify = getattr(args, "verify", None)
    if verify is not None:
        if not 0.0 <= verify <= 1.0:
            raise UsageError("--verify must be a fraction between 0 and 1")
        req["verify"] = verify
    tolerance = getattr(args, "verify_tolerance", None)
    if tolerance is not None:
        if not tolerance > 0:
            raise UsageError("--verify-tolerance must be positive")
        req["verify_tolerance"] = tolerance
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    return req


class WaitingLine:
    """The one "waiting: ..." line on stderr while the model loads (later notices, which
    keep the control socket alive or say what changed, print nothing)."""

    def __init__(self) -> None:
        self.shown = False

    def show(self, message: str) -> None:
        if self.shown:
            return
        self.shown = True
        sys.stderr.write(f"waiting: {message}\n")
        sys.stderr.flush()


def _print_token(event: dict[str, Any], text_mode: bool) -> None:
    if text_mode:
        sys.stdout.write(event.get("text", ""))
    else:
        sys.stdout.write(f"{event['token_id']} ")
    sys.stdout.flush()


def _finish(result: dict[str, Any], args: argparse.Namespace, text_mode: bool) -> int:
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return 0
    sys.stdout.write("\n")
    route = " -> ".join(
        f"{r['peer_id'][-6:]}[{r['span'][0]}:{r['span'][1]}]" for r in result["route"]
    )
    sys.stderr.write(
        f"{len(result['token_ids'])} tokens, prefill {result['prefill_s'] * 1000:.0f} ms, "
        f"{result['decode_tokens_per_s']:.1f} tok/s, route {route}, "
        f"failovers {result['failovers']}\n"
    )
    if result.get("verified_steps") or result.get("unverified_steps"):
        sys.stderr.write(
            f"verified {result['verified_steps']} steps, unverified {result['unverified_steps']}, "
            f"mismatches {result['mismatches']}\n"
        )
    for s in result.get("suspect_peers", []):
        sys.stderr.write(f"suspect peer {s['peer_id']}: {s['reason']}\n")
    return 0


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The standalone client's ClientConfig: defaults < `--config FILE`'s [client] table <
    flags (`--verify` is `client.verify`, `--verify-tolerance` `client.verify_tolerance`)."""
    from agent.config import ClientConfig, load_config

    if getattr(args, "config", None) is None:
        return ClientConfig()
    overrides = {
        "client.verify": getattr(args, "verify", None),
        "client.verify_tolerance": getattr(args, "verify_tolerance", None),
    }
    return load_config(args.config, overrides).client


def run_generate(args: argparse.Namespace, control_path: Path) -> int:
    prompts = _prompts(args)
    reqs = [_request(args, p) for p in prompts] if prompts else [_request(args, None)]
    text_mode = prompts is not None
    if args.bootstrap:
        return _standalone(args, reqs, text_mode)
    if getattr(args, "config", None) is not None:
        raise UsageError(
            "--config: only with --bootstrap (the local agent uses its own config's [client])"
        )
    if len(reqs) > 1:
        return _many_local(args, reqs, control_path)
    req = reqs[0]
    from agent.api import control

    result = None
    waiting = WaitingLine()
    for event in control.stream_request(control_path, "generate", timeout=args.timeout, **req):
        kind = event.get("event")
        if kind == "token" and not args.json:
            _print_token(event, text_mode)
        elif kind == "waiting":
            waiting.show(str(event.get("message") or f"model {args.model} is loading"))
        elif kind == "result":
            result = event["result"]
    if result is None:
        raise ShardmeshError("the agent ended the generation without a result")
    return _finish(result, args, text_mode)


def _many_local(args: argparse.Namespace, reqs: list[dict[str, Any]], control_path: Path) -> int:
    """Several generations through the local agent at once, one control connection each."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.api import control

    waiting = WaitingLine()
    lock = threading.Lock()

    def one(req: dict[str, Any]) -> dict[str, Any]:
        for event in control.stream_request(control_path, "generate", timeout=args.timeout, **req):
            if event.get("event") == "waiting":
                with lock:
                    waiting.show(str(event.get("message") or f"model {args.model} is loading"))
            elif event.get("event") == "result":
                return event["result"]  # type: ignore[no-any-return]
        raise ShardmeshError("the agent ended a generation without a result")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(reqs)) as pool:
        results = list(pool.map(one, reqs))  # the first error, if any, is raised here
    return _finish_many(results, args, time.perf_counter() - t0)


def _finish_many(results: list[dict[str, Any]], args: argparse.Namespace, wall_s: float) -> int:
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
        return 0
    for i, result in enumerate(results, 1):
        sys.stdout.write(f"[{i}]\n{result.get('text') or ''}\n")
    for i, result in enumerate(results, 1):
        sys.stderr.write(
            f"[{i}] {len(result['token_ids'])} tokens, {result['decode_tokens_per_s']:.1f} tok/s, "
            f"failovers {result['failovers']}\n"
        )
    tokens = sum(len(r["token_ids"]) for r in results)
    sys.stderr.write(
        f"{len(results)} generations at once: {tokens} tokens in {wall_s:.1f} s, "
        f"{tokens / max(wall_s, 1e-9):.1f} tok/s in all\n"
    )
    return 0


def _standalone(args: argparse.Namespace, reqs: list[dict[str, Any]], text_mode: bool) -> int:
    import trio

    if args.model_dir is None:
        raise UsageError("a standalone client (--bootstrap) needs --model-dir DIR")
    cfg = client_config(args)  # a bad config file fails before the mesh is joined

    async def main() -> list[dict[str, Any]]:
        from agent.route.generation import ClientParts, GenerateRequest, run_generation
        from agent.route.loading import Loading
        from agent.route.standalone import open_standalone, wait_for_model

        requests = [GenerateRequest.from_json(req) for req in reqs]
        with trio.fail_after(args.timeout):
            async with open_standalone(
                args.bootstrap, swarm_secret_file=args.swarm_secret_file
            ) as view:
                waiting = WaitingLine()

                async def on_wait(loading: Loading) -> None:
                    waiting.show(loading.describe())

                model_id, _ = await wait_for_model(
                    view,
                    args.model,
                    timeout_s=20.0,
                    loading_wait_s=args.timeout,
                    notify=on_wait,
                )

                async def emit(event: dict[str, Any]) -> None:
                    if event.get("event") == "waiting":
                        waiting.show(str(event.get("message")))
                    elif not args.json and len(requests) == 1:
                        _print_token(event, text_mode)

                parts = ClientParts()  # one head and tokenizer for every prompt
                results: list[dict[str, Any]] = [{} for _ in requests]

                async def one(i: int) -> None:
                    results[i] = await run_generation(
                        view, parts, requests[i], model_id, Path(args.model_dir), emit, cfg=cfg
                    )

                async with trio.open_nursery() as nursery:
                    for i in range(len(requests)):
                        nursery.start_soon(one, i)
                return results

    t0 = time.perf_counter()
    try:
        results = trio.run(main)
    except trio.TooSlowError:
        raise ShardmeshError(f"generation did not finish within {args.timeout:g} s") from None
    if len(results) > 1:
        return _finish_many(results, args, time.perf_counter() - t0)
    return _finish(results[0], args, text_mode)

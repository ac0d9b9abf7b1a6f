"""`shardmesh` command line. Exit codes: 0 ok, 1 runtime failure (one line on stderr),
2 usage error. Expected failures never print a traceback.

Kept light: `status`, `peers` and `devices` import neither trio-heavy libp2p nor torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts and journald read it better.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--control",
        type=Path,
        help="agent control socket (default: $SHARDMESH_CONTROL or <state dir>/control.sock)",
    )
    p.add_argument("--state-dir", type=Path, help="state dir of the agent to ask")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardmesh", description="Peer-to-peer sharded inference agent.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser("up", help="run the agent in the foreground (systemd runs exactly this)")
    up.add_argument("--config", type=Path, help="TOML config file; flags override its keys")
    up.add_argument("--state-dir", type=Path, help="identity key and control socket live here")
    up.add_argument("--listen", action="append", metavar="MULTIADDR", help="repeatable")
    up.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="repeatable")
    up.add_argument("--mdns", action=argparse.BooleanOptionalAction, default=None)
    up.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    up.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None)
    up.add_argument("--control", type=Path, help="control socket path")
    up.add_argument("--announce-interval", type=float, metavar="S")
    up.add_argument("--ad-ttl", type=float, metavar="S")
    up.add_argument("--model", type=Path, metavar="DIR", help="Hugging Face checkpoint dir")
    up.add_argument("--blocks", metavar="START:END|auto")
    up.add_argument("--max-blocks", type=int, help="with --blocks auto: serve at most N blocks")
    up.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    up.add_argument("--device", metavar="auto|cpu|cuda:N")
    up.add_argument("--threads", type=int, help="torch threads (0: all cores)")
    up.add_argument(
        "--api", metavar="HOST:PORT", help="serve the OpenAI-compatible API and /metrics here"
    )
    up.add_argument("--api-key-file", type=Path, metavar="FILE", help="bearer keys, one a line")
    up.add_argument(
        "--swarm-secret-file", type=Path, metavar="FILE", help="join only a private swarm"
    )
    up.add_argument(
        "--idle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve only while the machine is idle (see [idle] in the config)",
    )

    for name, text in (("status", "this node"), ("peers", "the mesh as this node sees it")):
        _add_control_args(sub.add_parser(name, help=text))

    dev = sub.add_parser("devices", help="local device discovery (no daemon needed)")
    dev.add_argument("--json", action="store_true")

    gen = sub.add_parser("generate", help="run a model through the mesh")
    _add_control_args(gen)
    gen.add_argument("--model", required=True, help="model id, or its name when unambiguous")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt",
        action="append",
        help="text prompt (needs a tokenizer); repeat it to run several prompts at once",
    )
    src.add_argument(
        "--prompts-file",
        type=Path,
        metavar="FILE",
        help="text prompts, one a line, run at once (agents batch their steps)",
    )
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--model-dir", type=Path, help="local checkpoint dir for embeddings/head")
    gen.add_argument(
        "--bootstrap",
        action="append",
        metavar="MULTIADDR",
        help="join the mesh directly instead of asking a local agent",
    )
    gen.add_argument(
        "--swarm-secret-file", type=Path, metavar="FILE", help="with --bootstrap: a private swarm"
    )
    gen.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="with --bootstrap: TOML config file whose [client] table the client uses",
    )
    gen.add_argument("--timeout", type=float, default=300.0, help="overall limit in seconds")
    gen.add_argument(
        "--verify",
        type=float,
        metavar="FRACTION",
        help="recompute this share of steps on independent peers and outvote wrong ones (0-1)",
    )
    gen.add_argument(
        "--verify-tolerance",
        type=float,
        metavar="REL",
        help="per-row relative error still counted as agreement (default 0.05)",
    )

    demo = sub.add_parser("demo", help="a local mesh on loopback with a tiny model")
    demo.add_argument("--agents", type=int, default=3)
    demo.add_argument(
        "--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "gpt2"]
    )
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--workdir", type=Path, help="keep models and agent state here")
    demo.add_argument("--json", action="store_true")
    return parser


def _control_path(args: argparse.Namespace) -> Path:
    from agent.config import default_control_socket

    if args.control:
        return Path(args.control)
    if getattr(args, "state_dir", None) and not os.environ.get("SHARDMESH_CONTROL"):
        return Path(args.state_dir) / "control.sock"
    return default_control_socket()


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cmd_up(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from agent.daemon.logs import setup_logging

    overrides = {
        "state_dir": args.state_dir,
        "listen": args.listen,
        "bootstrap": args.bootstrap,
        "mdns": args.mdns,
        "log_level": args.log_level,
        "log_json": args.log_json,
        "control": args.control,
        "announce_interval": args.announce_interval,
        "ad_ttl": args.ad_ttl,
        "model": args.model,
        "blocks": args.blocks,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "max_blocks": args.max_blocks,
        "api.listen": args.api,
        "api.key_file": args.api_key_file,
        "swarm.secret_file": args.swarm_secret_file,
        "idle.enabled": args.idle,
    }
    cfg = load_config(args.config, overrides)
    setup_logging(cfg.log_level, json_lines=cfg.log_json)
    import trio

    from agent.daemon.node import run_agent

    trio.run(run_agent, cfg)
    if "torch" in sys.modules:
        # Stopped, with torch loaded: a block load that the signal abandoned may still run
        # in its worker thread, and the interpreter's exit under a thread inside torch
        # aborts ("terminate called without an active exception", exit 134); the exit also
        # spends seconds collecting torch's objects. Nothing is left to clean up (the
        # control socket is gone): flush the logs and end the process now.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    return _show(args, "status", "status_table")


def cmd_peers(args: argparse.Namespace) -> int:
    return _show(args, "peers", "peers_table")


def _show(args: argparse.Namespace, cmd: str, table: str) -> int:
    """Ask the agent for `cmd` and print its JSON, or the table render.`table` makes of it."""
    from agent.api import control
    from agent.cli import render

    result = control.request(_control_path(args), cmd, timeout=5.0)
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(getattr(render, table)(result))
    return EXIT_OK


def cmd_devices(args: argparse.Namespace) -> int:
    from agent.hw.devices import discover, render_devices

    report = discover()
    if args.json:
        _print_json(report.to_json())
    else:
        sys.stdout.write(render_devices(report))
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from agent.cli.generate import run_generate

    return run_generate(args, _control_path(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.cli.demo import run_demo

    return run_demo(args)


COMMANDS = {
    "up": cmd_up,
    "status": cmd_status,
    "peers": cmd_peers,
    "devices": cmd_devices,
    "generate": cmd_generate,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.daemon.logs import stderr_prefix
    from agent.errors import UsageError, expected_errors

    try:
        try:
            return COMMANDS[args.command](args)
        except BaseExceptionGroup as group:
            # trio nurseries wrap errors; an expected one inside is still expected.
            raise _first_leaf(group) from None
    except UsageError as exc:
        sys.stderr.write(f"{stderr_prefix()}shardmesh: error: {exc}\n")
        return EXIT_USAGE
    except expected_errors() as exc:
        sys.stderr.write(f"{stderr_prefix()}shardmesh: {exc}\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        sys.stderr.write("shardmesh: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    from agent.errors import expected_errors

    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, (*expected_errors(), KeyboardInterrupt)):
            return leaf
    return group


if __name__ == "__main__":
    sys.exit(main())

"""A real agent whose blocks load slowly: `python tests/slow_agent.py up ...` runs `shardmesh`
exactly as a user would, except that loading the blocks (`ShardModel.load`, inside the model
lock a real load holds) first waits until the file named by SHARDMESH_TEST_LOAD_GATE exists,
at most SHARDMESH_TEST_LOAD_MAX_S seconds (default 60). Test-only: the product reads neither
variable. Used by tests/test_loading_live.py."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.cli.main import main
from agent.model import blocks

GATE = Path(os.environ.get("SHARDMESH_TEST_LOAD_GATE", "/nonexistent/gate"))
MAX_S = float(os.environ.get("SHARDMESH_TEST_LOAD_MAX_S", "60"))
_real_load = blocks.ShardModel.load.__func__  # type: ignore[attr-defined]


def _gated_load(cls: Any, *args: Any, **kwargs: Any) -> Any:
    deadline = time.monotonic() + MAX_S
    while not GATE.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _real_load(cls, *args, **kwargs)


blocks.ShardModel.load = classmethod(_gated_load)  # type: ignore[method-assign,assignment]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

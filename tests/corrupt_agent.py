"""A real agent that lies: `python tests/corrupt_agent.py up ...` runs `shardmesh` exactly as a
user would, except that every step's output has its last row shifted by SHARDMESH_CORRUPT
(default 0.5), the row a decode step's next token comes from. Used by tests/test_verify.py."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from agent.cli.main import main
from agent.serve import batcher

AMOUNT = float(os.environ.get("SHARDMESH_CORRUPT", "0.5"))
_honest_run = batcher.StepBatcher.run


async def _corrupt_run(self: Any, *args: Any) -> torch.Tensor:
    """Every step's output, as the batcher hands it to the serving part, with a bump."""
    out = await _honest_run(self, *args)
    bump = torch.zeros_like(out)
    bump[:, -1] = AMOUNT
    return out + bump


batcher.StepBatcher.run = _corrupt_run  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Counters the serving hot path keeps as it goes (read by the API layer's /metrics)."""

from __future__ import annotations

from prometheus_client import Histogram

# One forward step on this agent's blocks (prefill chunks and decode steps alike); a tiny
# model steps in ~1 ms on a CPU, a 7B span in tens of ms on a GPU, a long prefill in seconds.
STEP_SECONDS = Histogram(
    "shardmesh_step_seconds",
    "Time of one forward step on the blocks this agent serves.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=None,
)

# Continuous batching (agent.serve.batcher): sequences and tokens one forward carried.
BATCH_ROWS = Histogram(
    "shardmesh_batch_rows",
    "Sequences (session rows) in one forward over this agent's blocks.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=None,
)
BATCH_TOKENS = Histogram(
    "shardmesh_batch_tokens",
    "Tokens (rows x new tokens) in one forward over this agent's blocks.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    registry=None,
)

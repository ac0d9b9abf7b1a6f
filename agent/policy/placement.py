"""Which blocks a joining agent serves (`--blocks auto`): pure functions over a peer-table snapshot.

Peers that are "online" or "joining" count as replicas (a joining peer is about to serve, and
counting it keeps agents started a few seconds apart from piling onto the same blocks); "draining"
and "leaving" peers are about to go and count for nothing. `coverage` also serves the peers
table's view (`shardmesh peers`, the API's model list), which counts online peers only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence

from agent.policy.snapshot import SERVING_STATES, PeerSpan


def blocks_that_fit(memory_budget_bytes: int, block_bytes: int, kv_bytes_per_block: int = 0) -> int:
    """How many blocks (weights plus their KV-cache reserve) fit in a memory budget."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    if kv_bytes_per_block < 0:
        raise ValueError(f"kv_bytes_per_block must be >= 0, got {kv_bytes_per_block}")
    if memory_budget_bytes <= 0:
        return 0
    return memory_budget_bytes // (block_bytes + kv_bytes_per_block)


def _counted(spans: Sequence[PeerSpan], n_blocks: int) -> list[PeerSpan]:
    # Spans reaching past the model (a stale or wrong ad) only count for the blocks that exist.
    return [s for s in spans if s.state in SERVING_STATES and s.start < n_blocks]


def _check_n_blocks(n_blocks: int) -> None:
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")


def coverage_runs(
    spans: Iterable[PeerSpan], n_blocks: int, states: Collection[str] = SERVING_STATES
) -> list[tuple[int, int, int]]:
    """Coverage as runs: (start, end, replicas) over [0, n_blocks), in order, neighbours
    with different counts. A sweep over the span endpoints: O(peers log peers), whatever
    `n_blocks` or the spans claim (a hostile ad's million-block span costs two events).
    Spans reaching past the model count for the blocks that exist."""
    _check_n_blocks(n_blocks)
    if n_blocks == 0:
        return []
    delta: dict[int, int] = {}
    for s in spans:
        if s.state in states and s.start < n_blocks:
            delta[s.start] = delta.get(s.start, 0) + 1
            end = min(s.end, n_blocks)
            delta[end] = delta.get(end, 0) - 1
    runs: list[tuple[int, int, int]] = []
    start, count = 0, 0
    for point in sorted(delta):
        if point >= n_blocks:
            break
        step = delta[point]
        if step == 0:
            continue
        if point > start:
            runs.append((start, point, count))
            start = point
        count += step
    runs.append((start, n_blocks, count))
    # Merge neighbours that ended up with the same count (a span ending where another starts).
    merged: list[tuple[int, int, int]] = []
    for run in runs:
        if merged and merged[-1][2] == run[2]:
            merged[-1] = (merged[-1][0], run[1], run[2])
        else:
            merged.append(run)
    return merged


def coverage(
    spans: Iterable[PeerSpan], n_blocks: int, states: Collection[str] = SERVING_STATES
) -> list[int]:
    """Replica count per block: how many peers in `states` serve it (by default online or
    joining ones, as placement counts; the peers table passes ROUTABLE_STATES). Spans reaching
    past the model count for the blocks that exist. The runs of `coverage_runs`, expanded:
    O(peers log peers + n_blocks)."""
    out: list[int] = []
    for start, end, count in coverage_runs(spans, n_blocks, states):
        out.extend([count] * (end - start))
    return out


def uncovered_blocks(spans: Sequence[PeerSpan], n_blocks: int) -> list[int]:
    """Blocks that no online or joining peer serves, in increasing order."""
    return [block for block, count in enumerate(coverage(spans, n_blocks)) if count == 0]


def _block_throughput(spans: Sequence[PeerSpan], n_blocks: int) -> list[float]:
    # A peer's advertised blocks*tokens/s is shared by all its blocks, so each block gets an equal
    # share: tokens/s that this peer can push through that block. Each block's value is the
    # exactly rounded sum of its shares (what math.fsum gives), so blocks with the same shares
    # get bit-identical sums and windows that should tie do tie. A sweep over span endpoints in
    # exact integer arithmetic (every float is an integer over a power of two): O(peers +
    # blocks), not O(peers * blocks).
    counted = [s for s in _counted(spans, n_blocks) if s.throughput > 0]
    if not counted:
        return [0.0] * n_blocks
    ratios = [(s.throughput / s.length).as_integer_ratio() for s in counted]
    scale_bits = max(den.bit_length() - 1 for _, den in ratios)
    scale = 1 << scale_bits
    steps = [0] * (n_blocks + 1)
    for s, (num, den) in zip(counted, ratios, strict=True):
        exact = num << (scale_bits - (den.bit_length() - 1))
        steps[s.start] += exact
        steps[min(s.end, n_blocks)] -= exact
    out: list[float] = []
    running = 0
    for block in range(n_blocks):
        running += steps[block]
        out.append(running / scale)  # int / int is correctly rounded
    return out


def _window_sums(values: list[float], length: int) -> list[float]:
    """math.fsum of every window of `length` values, in start order: exact prefix sums of the
    values (integers over a common power of two), each difference rounded once."""
    ratios = [v.as_integer_ratio() for v in values]
    scale_bits = max((den.bit_length() - 1 for _, den in ratios), default=0)
    scale = 1 << scale_bits
    prefix = [0]
    for num, den in ratios:
        prefix.append(prefix[-1] + (num << (scale_bits - (den.bit_length() - 1))))
    return [(prefix[i + length] - prefix[i]) / scale for i in range(len(values) - length + 1)]


def _weakest_runs_after(counts: list[int], start: int, length: int, weakest: int) -> int:
    """Number of maximal runs of blocks still at the weakest level once [start, start+length) is
    served one more time."""
    runs = 0
    in_run = False
    for block, count in enumerate(counts):
        level = count + 1 if start <= block < start + length else count
        if level == weakest and not in_run:
            runs += 1
        in_run = level == weakest
    return runs


def _id_index(self_id: str, n_choices: int) -> int:
    digest = hashlib.sha256(self_id.encode(errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % n_choices


def choose_span(
    others: Sequence[PeerSpan], n_blocks: int, capacity_blocks: int, *, self_id: str
) -> tuple[int, int]:
    """Pick the window [start, end) of L = min(capacity_blocks, n_blocks) blocks to serve.

    Every window is scored on, in order (the first difference decides):

    1. the fewest replicas among its blocks: lower first, so holes are filled before anything
       gets a second replica;
    2. how many of its blocks are at that fewest count: more first (cover as much of the
       weakest level as possible);
    3. the summed per-block throughput of the window: lower first (strengthen the slowest part).
       A peer's throughput is spread evenly over the blocks of its span;
    4. how many separate runs of weakest-level blocks the window leaves: fewer first. This keeps
       a hole in one piece, so agents that join one after another fill it exactly whatever their
       sizes: from one hole (an empty mesh included), as long as their capacities add up to the
       blocks missing, the model ends up covered.
       The price is that on an empty mesh only the two windows at the model's ends qualify;
    5. among windows still tied: sha256(self_id) modulo the number of tied windows (taken in
       increasing start order). Agents that start together with the same view then tend to pick
       different windows instead of all the same one, and one agent's pick is reproducible.

    `others` is the peer table for this model; a row carrying `self_id` (this agent's own stale
    ad) is ignored, as are draining and leaving peers.
    """
    if capacity_blocks < 1:
        raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    length = min(capacity_blocks, n_blocks)
    peers = [s for s in others if s.peer_id != self_id]
    counts = coverage(peers, n_blocks)
    block_throughput = _block_throughput(peers, n_blocks)
    weakest = min(counts)

    window_throughput = _window_sums(block_throughput, length)

    scored: list[tuple[tuple[int, int, float, int], int]] = []
    for start in range(n_blocks - length + 1):
        window = counts[start : start + length]
        window_min = min(window)
        key = (
            window_min,
            -window.count(window_min),
            window_throughput[start],
            _weakest_runs_after(counts, start, length, weakest),
        )
        scored.append((key, start))
    best = min(key for key, _ in scored)
    tied = [start for key, start in scored if key == best]
    start = tied[_id_index(self_id, len(tied))]
    return start, start + length

"""The client's batched LM head (agent.route.headbatch): concurrent streams' logits in one
matmul off the event loop, each equal to its own; a cancelled caller leaves the rest served."""

from __future__ import annotations

import pytest
import torch
import trio

from agent.model.head import ClientHead
from agent.model.tiny import make_tiny_model
from agent.route.headbatch import head_batcher


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> ClientHead:
    model = make_tiny_model("llama", tmp_path_factory.mktemp("head") / "tiny-llama", n_layers=2)
    return ClientHead.load(model, dtype="float32", device="cpu")


async def test_concurrent_streams_share_matmuls_and_get_their_own_logits(
    head: ClientHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = ClientHead.logits

    def counting(self: ClientHead, hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden.shape[0])
        return real(self, hidden)

    gen = torch.Generator().manual_seed(0)
    hiddens = [torch.randn(1, 1, head.info.hidden_size, generator=gen) for _ in range(8)]
    want = [real(head, h) for h in hiddens]
    monkeypatch.setattr(ClientHead, "logits", counting)
    got: dict[int, torch.Tensor] = {}

    async def stream(i: int) -> None:
        for _ in range(3):  # three tokens each, like three decode steps
            got[i] = await head_batcher(head).logits(hiddens[i])
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(stream, i)
    for i in range(8):
        assert (got[i] - want[i]).abs().max().item() < 1e-5
    assert sum(calls) == 24 and len(calls) < 24  # rows shared matmuls
    assert max(calls) > 1


async def test_a_cancelled_stream_does_not_strand_the_others(head: ClientHead) -> None:
    h = torch.zeros(1, 1, head.info.hidden_size)
    done: list[int] = []

    async def stream(i: int) -> None:
        await head_batcher(head).logits(h)
        done.append(i)

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as doomed:
            doomed.cancel()  # cancelled before it ever got its row
            await head_batcher(head).logits(h)
        for i in range(4):
            nursery.start_soon(stream, i)
        async with trio.open_nursery() as inner:
            inner.start_soon(stream, 99)
            await trio.sleep(0)
            inner.cancel_scope.cancel()  # possibly the one running the batch
    await trio.sleep(0)
    assert sorted(i for i in done if i != 99) == [0, 1, 2, 3]
    with trio.fail_after(5):
        assert (await head_batcher(head).logits(h)).shape[-1] == head.info.vocab_size


async def test_a_bad_row_fails_alone(head: ClientHead) -> None:
    good = torch.zeros(1, 1, head.info.hidden_size)
    bad = torch.zeros(1, 1, head.info.hidden_size + 1)
    results: dict[str, object] = {}

    async def one(name: str, h: torch.Tensor) -> None:
        try:
            results[name] = await head_batcher(head).logits(h)
        except ValueError as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "good", good)
        nursery.start_soon(one, "bad", bad)
        nursery.start_soon(one, "good2", good)
    assert isinstance(results["good"], torch.Tensor) and isinstance(results["good2"], torch.Tensor)
    assert isinstance(results["bad"], ValueError)

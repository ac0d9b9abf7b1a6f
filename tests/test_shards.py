"""Model side: block spans, client head, wire framing and tiny models, against the full HF model."""

from __future__ import annotations

import inspect
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.model.blocks import PositionError, SessionCache, ShardModel, causal_mask
from agent.model.head import ClientHead
from agent.model.modelinfo import ModelError, read_model_info, read_weight_index
from agent.model.tiny import (
    EOS_ID,
    QWEN2_SLIDING_WINDOW,
    TINY_FAMILIES,
    ensure_tiny_model,
    make_tiny_model,
)
from agent.model.wire import WireError, from_frame, to_frame
from protocol.tensors import TensorFrame

TOL = 1e-5
PROMPT_LEN = 12  # longer than the tiny qwen2's sliding window
DECODE_STEPS = 20
# Split points chosen so spans start and end inside and across qwen2's sliding layers (3-5).
SPLIT = {"llama": 3, "mistral": 1, "qwen2": 4, "qwen3": 5, "gpt2": 2}

assert PROMPT_LEN > QWEN2_SLIDING_WINDOW


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f"tiny-{f}") for f in TINY_FAMILIES}


@pytest.fixture(scope="module")
def full_models(tiny: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    return {
        f: AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        for f, d in tiny.items()
    }


class Chain:
    """Two separately loaded spans [0, k) and [k, n) plus the client head, as a client runs them."""

    def __init__(self, model_dir: Path, k: int, dtype: torch.dtype = torch.float32) -> None:
        n = read_model_info(model_dir).n_blocks
        self.head = ClientHead.load(model_dir, dtype=dtype, device="cpu")
        self.spans = [
            ShardModel.load(model_dir, 0, k, dtype=dtype, device="cpu"),
            ShardModel.load(model_dir, k, n, dtype=dtype, device="cpu"),
        ]
        self.reset()

    def reset(self) -> None:
        self.caches = [s.new_cache() for s in self.spans]
        self.position = 0

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.head.embed(ids, self.position)
        for span, cache in zip(self.spans, self.caches, strict=True):
            h = span.forward(cache, h, self.position)
        self.position += ids.shape[1]
        return self.head.logits(h)


def _full_step(model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """The full model's own cached step (`cache=` since transformers 5.24, else
    `past_key_values=`)."""
    keyword = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{keyword: cache})
    return out.logits, getattr(out, keyword)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chained_spans_match_full_model(
    family: str, tiny: dict[str, Path], full_models: dict[str, Any]
) -> None:
    full = full_models[family]
    chain = Chain(tiny[family], SPLIT[family])
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2):
        prompt = torch.randint(3, 500, (batch, PROMPT_LEN), generator=gen)
        for chunks in ((PROMPT_LEN,), (3, 4, PROMPT_LEN - 7)):
            chain.reset()
            ref, cache = _full_step(full, prompt, None)
            got = torch.cat([chain.step(c) for c in prompt.split(list(chunks), dim=1)], dim=1)
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() < TOL, (batch, chunks)
            token = ref[:, -1:].argmax(-1)
            for step in range(DECODE_STEPS):
                ref, cache = _full_step(full, token, cache)
                got = chain.step(token)
                assert (got - ref).abs().max().item() < TOL, (batch, chunks, step)
                token = ref[:, -1:].argmax(-1)
            assert all(c.length == PROMPT_LEN + DECODE_STEPS for c in chain.caches)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_tokens_match_generate(
    family: str, tiny: dict[str, Path], full_models: dict[str, Any]
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[family])
    prompt = torch.tensor([tok("Once upon a time there was a mesh")["input_ids"]])
    with torch.no_grad():
        out = full_models[family].generate(
            prompt, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id
        )
    expected = out[0, prompt.shape[1] :].tolist()
    chain = Chain(tiny[family], SPLIT[family])
    ids, got = prompt, []
    for _ in range(len(expected)):
        ids = chain.step(ids)[:, -1:].argmax(-1)
        got.append(int(ids))
    assert got == expected
    assert len(expected) == 16 or expected[-1] == EOS_ID


def _record_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import safetensors

    opened: list[str] = []
    real = safetensors.safe_open

    def spy(filename: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(filename).name)
        return real(filename, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    return opened


def test_span_reads_only_its_files_and_tensors(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny["llama"]
    index = read_weight_index(model_dir)
    prefixes = ("model.layers.2.", "model.layers.3.")
    names = [n for n in index if n.startswith(prefixes)]
    needed = {index[n].file for n in names}
    assert needed < {e.file for e in index.values()}

    opened = _record_opens(monkeypatch)
    shard = ShardModel.load(model_dir, 2, 4, dtype=torch.float32, device="cpu")
    assert set(opened) == needed and len(opened) == len(needed)
    assert sum(p.numel() for p in shard.blocks.parameters()) == sum(index[n].numel for n in names)
    assert len(shard.blocks) == 2 and shard.n_blocks == 2
    assert [b.self_attn.layer_idx for b in shard.blocks] == [2, 3]

    opened.clear()
    head = ClientHead.load(model_dir, dtype=torch.float32, device="cpu")
    head_names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert set(opened) == {index[n].file for n in head_names}
    assert not head.tied


def test_tied_head_shares_embeddings(tiny: dict[str, Path]) -> None:
    for family in ("qwen2", "gpt2"):
        head = ClientHead.load(tiny[family], dtype=torch.float32, device="cpu")
        assert head.tied
        assert "lm_head.weight" not in read_weight_index(tiny[family])


def test_gpt2_checkpoint_without_base_prefix(
    tiny: dict[str, Path], full_models: dict[str, Any], tmp_path: Path
) -> None:
    """The original gpt2 checkpoint names tensors "h.0...." and "wte.weight"."""
    from safetensors.torch import load_file, save_file

    src = tiny["gpt2"]
    tensors: dict[str, torch.Tensor] = {}
    for file in {e.file for e in read_weight_index(src).values()}:
        tensors.update(load_file(src / file))
    stripped = {k.removeprefix("transformer."): v.contiguous() for k, v in tensors.items()}
    assert not any(k.startswith("transformer.") for k in stripped)
    dst = tmp_path / "gpt2-legacy"
    dst.mkdir()
    save_file(stripped, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())

    chain = Chain(dst, 3)
    ids = torch.tensor([[5, 17, 99, 230, 7]])
    with torch.no_grad():
        ref = full_models["gpt2"](ids).logits
    assert (chain.step(ids) - ref).abs().max().item() < TOL


def _cache_state(cache: SessionCache) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for layer in cache.kv.layers:
        keys = getattr(layer, "keys", None)
        out.append(None if keys is None else (keys.clone(), layer.values.clone()))
    return out


def _same_state(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x is None) != (y is None):
            return False
        if x is not None and not (torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])):
            return False
    return True


def test_failed_steps_leave_the_cache_unchanged(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny["qwen2"]
    chain = Chain(model_dir, 2)
    reference = Chain(model_dir, 2)
    span, cache = chain.spans[1], chain.caches[1]
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 500, (1, 10), generator=gen)
    hidden = torch.randn(1, 3, span.hidden_size, generator=gen)

    # A failure on the very first step must not leave lazily created layers behind.
    with pytest.raises(PositionError):
        span.forward(cache, hidden, 1)
    assert cache.length == 0 and len(cache.kv.layers) == 0

    chain.step(prompt)
    reference.step(prompt)
    before = _cache_state(cache)
    nbytes = cache.nbytes()
    for wrong in (0, 9, 11):
        with pytest.raises(PositionError):
            span.forward(cache, hidden, wrong)
    with pytest.raises(ValueError):
        span.forward(cache, torch.randn(2, 1, span.hidden_size), 10)  # batch changed
    with pytest.raises(ValueError):
        span.forward(cache, torch.randn(1, 1, span.hidden_size + 1), 10)

    # An exception inside the second block, after the first block appended its keys.
    original = type(span.blocks[1]).forward

    def boom(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self is span.blocks[1]:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(span.blocks[1]), "forward", boom)
    with pytest.raises(RuntimeError, match="injected"):
        span.forward(cache, hidden, 10)
    monkeypatch.undo()

    assert cache.length == 10 and cache.nbytes() == nbytes
    assert _same_state(_cache_state(cache), before)
    # The next correct steps are still exact.
    token = torch.tensor([[42]])
    for _ in range(4):
        got, ref = chain.step(token), reference.step(token)
        assert torch.equal(got, ref)
        token = ref[:, -1:].argmax(-1)


def test_sessions_run_sub_spans_of_the_loaded_blocks(
    tiny: dict[str, Path], full_models: dict[str, Any]
) -> None:
    model_dir = tiny["qwen2"]
    shard = ShardModel.load(model_dir, 0, 6, dtype=torch.float32, device="cpu")
    head = ClientHead.load(model_dir, dtype=torch.float32, device="cpu")
    ids = torch.randint(3, 500, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = full_models["qwen2"](ids).logits
    first, second = shard.new_cache(), shard.new_cache()
    h = shard.forward(first, head.embed(ids, 0), 0, span=(0, 4))
    h = shard.forward(second, h, 0, span=(4, 6))
    assert (head.logits(h) - ref).abs().max().item() < TOL
    assert first.span == (0, 4) and second.span == (4, 6)
    assert {i for i, layer in enumerate(second.kv.layers) if layer.is_initialized} == {4, 5}

    x = torch.randn(1, 1, shard.hidden_size)
    with pytest.raises(ValueError, match="session runs blocks"):
        shard.forward(first, x, 11, span=(0, 6))
    with pytest.raises(ValueError, match="not within"):
        shard.forward(shard.new_cache(), x, 0, span=(5, 7))
    assert first.length == 11 and second.length == 11


def test_kv_accounting_and_throughput(tiny: dict[str, Path]) -> None:
    shard = ShardModel.load(tiny["llama"], 1, 4, dtype=torch.float32, device="cpu")
    cache = shard.new_cache()
    shard.forward(cache, torch.randn(2, 7, shard.hidden_size), 0)
    assert cache.nbytes() == 7 * shard.kv_bytes_per_token(batch=2)
    # 3 blocks x 2 kv heads x 16 dims x (k, v) x 4 bytes
    assert shard.kv_bytes_per_token() == 3 * 2 * 16 * 2 * 4
    rate = shard.measure_throughput(tokens=4)
    assert rate > 0


def test_bfloat16_span_runs_in_bfloat16(tiny: dict[str, Path]) -> None:
    fp32 = Chain(tiny["llama"], 3)
    bf16 = Chain(tiny["llama"], 3, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for s in bf16.spans for p in s.blocks.parameters())
    assert bf16.spans[0].rotary is not None
    assert bf16.spans[0].rotary.inv_freq.dtype == torch.float32
    ids = torch.tensor([[5, 17, 99, 230, 7, 8]])
    got, ref = bf16.step(ids), fp32.step(ids)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max().item() < 0.1


def test_load_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="span"):
        ShardModel.load(tiny["llama"], 4, 7, dtype=torch.float32, device="cpu")
    with pytest.raises(ModelError, match="span"):
        ShardModel.load(tiny["llama"], 3, 3, dtype=torch.float32, device="cpu")
    with pytest.raises(ModelError, match="dtype"):
        ShardModel.load(tiny["llama"], 0, 1, dtype="int8", device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        ShardModel.load(tmp_path / "nowhere", 0, 1, dtype=torch.float32, device="cpu")
    # A weight file deleted after the index was written.
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny["llama"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = read_weight_index(broken)
    (broken / index["model.layers.5.mlp.up_proj.weight"].file).unlink()
    with pytest.raises(ModelError, match="missing"):
        ShardModel.load(broken, 5, 6, dtype=torch.float32, device="cpu")


def test_causal_mask_shapes_and_windows() -> None:
    kw = {"dtype": torch.float32, "device": torch.device("cpu")}
    assert causal_mask(1, 1, 10, None, **kw) is None  # decode sees everything
    assert causal_mask(1, 5, 0, None, **kw) is None  # fresh prefill: sdpa is_causal is exact
    assert causal_mask(1, 1, 7, 8, **kw) is None  # still inside the window
    m = causal_mask(2, 1, 8, 8, **kw)  # 9th token: the first falls out of the window
    assert m is not None and m.shape == (2, 1, 1, 9)
    assert m[0, 0, 0, 0] == torch.finfo(torch.float32).min and (m[0, 0, 0, 1:] == 0).all()
    m = causal_mask(1, 3, 4, None, **kw)
    assert m is not None and m.shape == (1, 1, 3, 7)
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]


def test_model_info_of_tiny_models(tiny: dict[str, Path]) -> None:
    for family, d in tiny.items():
        info = read_model_info(d)
        assert info.model_type == family
        assert info.n_blocks == 6 and info.hidden_size == 64 and info.vocab_size == 512
        assert info.model_id.startswith(f"tiny-{family}@")
        assert info.torch_dtype == "float32"
    assert len({read_model_info(d).model_id for d in tiny.values()}) == len(tiny)


def test_tiny_models_are_deterministic_and_load(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    a = make_tiny_model("qwen3", tmp_path / "a", seed=3)
    b = make_tiny_model("qwen3", tmp_path / "b", seed=3)
    c = make_tiny_model("qwen3", tmp_path / "c", seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    for name in files:
        if name != "config.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert read_model_info(a).model_id.split("@")[1] == read_model_info(b).model_id.split("@")[1]
    assert read_model_info(a).model_id.split("@")[1] != read_model_info(c).model_id.split("@")[1]

    tok = AutoTokenizer.from_pretrained(a)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert len(tok) <= 512
    text = "Hello world, how are you?"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|bos|><|user|>hi<|eos|>")
    cfg = json.loads((a / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg


def test_ensure_tiny_model_is_atomic_and_reused(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_tiny_model("gpt2", tmp_path))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    path = results[0]
    assert path.name == "tiny-gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-gpt2"]  # no temp dirs left
    mtime = (path / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model("gpt2", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == mtime
    assert read_model_info(path).n_blocks == 6


def _bits(t: torch.Tensor) -> torch.Tensor:
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_wire_round_trip_is_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    if dtype.is_floating_point:
        x = torch.randn(2, 3, 64, generator=gen).to(dtype)
        x[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), -0.0, 1e-30]).to(dtype)
    else:
        x = torch.randint(-(2**40), 2**40, (2, 3, 64), generator=gen, dtype=dtype)
    for t in (x, x.transpose(0, 1), x[:, 1:2]):  # contiguous and not
        frame = to_frame(t)
        assert frame.shape == tuple(t.shape) and len(frame.data) == t.numel() * t.element_size()
        back = from_frame(frame, device="cpu")
        assert back.dtype == dtype and back.shape == t.shape
        assert back.is_contiguous()
        assert torch.equal(_bits(back), _bits(t))  # bit-exact, signed zeros included
    back[0, 0, 0] = 1  # writable, owns its memory
    nan = torch.tensor([float("nan")], dtype=torch.float32)
    assert torch.isnan(from_frame(to_frame(nan), device="cpu")).all()


def test_wire_rejects_bad_frames() -> None:
    with pytest.raises(WireError, match="cannot travel"):
        to_frame(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(WireError, match="bytes"):
        from_frame(TensorFrame("float32", (2, 2), b"\0" * 12), device="cpu")
    with pytest.raises(WireError, match="dtype"):
        from_frame(TensorFrame("float64", (1,), b"\0" * 8), device="cpu")
    empty = from_frame(TensorFrame("bfloat16", (1, 0, 8), b""), device="cpu")
    assert empty.shape == (1, 0, 8) and empty.dtype == torch.bfloat16

"""agent.modelinfo on hand-written checkpoints: no torch needed to read a model directory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agent.model.modelinfo import (
    SUPPORTED_MODEL_TYPES,
    ModelError,
    block_param_bytes,
    kv_bytes_per_block_token,
    read_model_info,
)

ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}
Tensors = dict[str, tuple[str, list[int], int]]  # name -> (dtype, shape, fill byte)


def llama_config(**overrides: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 32,
        "dtype": "bfloat16",
        "transformers_version": "5.24.0",
    }
    cfg.update(overrides)
    return cfg


def llama_tensors(n_blocks: int = 2, hidden: int = 8, dtype: str = "BF16") -> Tensors:
    t: Tensors = {"model.embed_tokens.weight": (dtype, [32, hidden], 1)}
    for i in range(n_blocks):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = (dtype, [hidden, hidden], 2 + i)
        t[p + "self_attn.k_proj.weight"] = (dtype, [4, hidden], 3 + i)
        t[p + "mlp.up_proj.weight"] = (dtype, [16, hidden], 4 + i)
        t[p + "input_layernorm.weight"] = (dtype, [hidden], 5 + i)
    t["model.norm.weight"] = (dtype, [hidden], 9)
    t["lm_head.weight"] = (dtype, [32, hidden], 10)
    return t


def write_safetensors(file: Path, tensors: Tensors) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name, (dtype, shape, fill) in tensors.items():
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        blobs.append(bytes([fill]) * n)
        offset += n
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def write_model(
    path: Path,
    config: dict[str, object] | None = None,
    tensors: Tensors | None = None,
    shards: int = 1,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or llama_config()))
    tensors = tensors or llama_tensors()
    if shards == 1:
        write_safetensors(path / "model.safetensors", tensors)
        return path
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(path / file, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def test_reads_fields_and_names_the_model(tmp_path: Path) -> None:
    info = read_model_info(write_model(tmp_path / "my-llama"))
    assert info.name == "my-llama"
    assert info.model_type == "llama"
    assert (info.n_blocks, info.hidden_size, info.vocab_size) == (2, 8, 32)
    assert info.torch_dtype == "bfloat16"
    assert info.path == (tmp_path / "my-llama").resolve()
    name, digest = info.model_id.split("@")
    assert name == "my-llama" and len(digest) == 16 and int(digest, 16) >= 0


def test_hf_cache_snapshot_takes_the_repo_name(tmp_path: Path) -> None:
    snap = tmp_path / "models--org--Cool-Model" / "snapshots" / "0123abcd"
    assert read_model_info(write_model(snap)).name == "Cool-Model"


def test_id_is_stable_and_tracks_content(tmp_path: Path) -> None:
    base = read_model_info(write_model(tmp_path / "m")).model_id
    assert read_model_info(tmp_path / "m").model_id == base
    # Same weights sharded differently and a different saving library: same model.
    cfg = llama_config(transformers_version="4.57.6", _name_or_path="/tmp/x", torch_dtype="x")
    resharded = write_model(tmp_path / "m2" / "m", cfg, shards=3)
    assert read_model_info(resharded).model_id == base

    changed_shape = llama_tensors()
    changed_shape["model.layers.1.mlp.up_proj.weight"] = ("BF16", [24, 8], 5)
    changed_dtype = {k: ("F32", s, f) for k, (_, s, f) in llama_tensors().items()}
    changed_value = dict(llama_tensors())
    changed_value["model.norm.weight"] = ("BF16", [8], 77)
    variants = {
        "shape": write_model(tmp_path / "a" / "m", tensors=changed_shape),
        "dtype": write_model(tmp_path / "b" / "m", tensors=changed_dtype),
        "value": write_model(tmp_path / "c" / "m", tensors=changed_value),
        "config": write_model(tmp_path / "d" / "m", llama_config(rms_norm_eps=1e-5)),
    }
    ids = {k: read_model_info(p).model_id for k, p in variants.items()}
    for what, model_id in ids.items():
        assert model_id.startswith("m@") and model_id != base, what
    assert len(set(ids.values())) == len(ids)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no_dir", "does not exist"),
        ("no_config", "no config.json"),
        ("bad_config", "cannot read"),
        ("no_weights", "no safetensors"),
        ("unsupported", "supported families: llama, mistral, qwen2, qwen3, gpt2"),
        ("missing_shard", "missing"),
        ("corrupt_header", "corrupt"),
        ("truncated", "bad header entry"),
        ("missing_block", "lack block 2"),
        ("no_layers", "num_hidden_layers"),
    ],
)
def test_unusable_directories_raise_model_error(tmp_path: Path, setup: str, message: str) -> None:
    d = tmp_path / "m"
    if setup != "no_dir":
        write_model(d, shards=2)
    if setup == "no_config":
        (d / "config.json").unlink()
    elif setup == "bad_config":
        (d / "config.json").write_text("{not json")
    elif setup == "no_weights":
        for f in d.glob("model*"):
            f.unlink()
    elif setup == "unsupported":
        (d / "config.json").write_text(json.dumps(llama_config(model_type="bert")))
    elif setup == "missing_shard":
        next(d.glob("model-00002*")).unlink()
    elif setup == "corrupt_header":
        f = next(d.glob("model-00001*"))
        f.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    elif setup == "truncated":
        f = next(d.glob("model-00001*"))
        f.write_bytes(f.read_bytes()[:-10])
    elif setup == "missing_block":
        (d / "config.json").write_text(json.dumps(llama_config(num_hidden_layers=3)))
    elif setup == "no_layers":
        cfg = llama_config()
        del cfg["num_hidden_layers"]
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as err:
        read_model_info(d)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_supported_types() -> None:
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def test_block_sizes(tmp_path: Path) -> None:
    info = read_model_info(write_model(tmp_path / "m", shards=2))
    numel = 8 * 8 + 4 * 8 + 16 * 8 + 8
    assert block_param_bytes(info, "bfloat16") == 2 * numel
    assert block_param_bytes(info, "float32") == 4 * numel
    assert block_param_bytes(info, "torch.float16") == 2 * numel
    with pytest.raises(ModelError, match="dtype"):
        block_param_bytes(info, "int4")
    # 1 kv head x (8 / 2 heads) dims x (k, v) x 2 bytes
    assert kv_bytes_per_block_token(info, "bfloat16") == 1 * 4 * 2 * 2


def test_gpt2_names_without_base_prefix(tmp_path: Path) -> None:
    cfg = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 32}
    tensors: Tensors = {
        "wte.weight": ("F32", [32, 8], 1),
        "h.0.attn.c_attn.weight": ("F32", [8, 24], 2),
        "h.0.ln_1.weight": ("F32", [8], 3),
        "ln_f.weight": ("F32", [8], 4),
    }
    info = read_model_info(write_model(tmp_path / "gpt2", cfg, tensors))
    assert (info.n_blocks, info.hidden_size) == (1, 8)
    assert block_param_bytes(info, "float32") == 4 * (8 * 24 + 8)


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, agent.model.modelinfo\n"
        "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0

"""What a model directory holds, read from config.json and safetensors headers only.

No torch or transformers import: the agent reads this before deciding to load a framework.

The model id is `<name>@<digest[:16]>`. `name` is the directory's basename, or the repository
name for a Hugging Face cache snapshot (`models--org--name/snapshots/<rev>`), whose basename is
a commit hash; config's `_name_or_path` is ignored because it often records where a model was
converted, not what it is. `digest` is sha256 over canonical JSON of config.json (minus keys
that change with the saving library, not the model) and the weight index: every tensor's name,
dtype and shape, plus a 64-byte sample from each end of its data, so that two fine-tunes of the
same architecture under the same directory name still get different ids. The sample reads a
few bytes per tensor, never whole tensors, and does not depend on how the files are sharded.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ShardmeshError
from agent.model.families import FAMILIES, block_key_prefix, checkpoint_base, family_for
from protocol.ads import MAX_BLOCKS

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Keys that the saving library rewrites without changing the model.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "torch_dtype",  # renamed "dtype" in transformers 5; the weight index carries dtypes
        "dtype",
        "use_cache",
        "_attn_implementation_autoset",
        "attn_implementation",
    }
)

# safetensors dtype codes -> bytes per element.
_ST_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# Target dtype names -> bytes per element (torch spellings accepted).
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_SAMPLE = 64


class ModelError(ShardmeshError):
    """A model directory cannot be used: missing files, bad headers, unsupported architecture."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_id: str
    model_type: str
    n_blocks: int
    hidden_size: int
    vocab_size: int
    torch_dtype: str | None
    path: Path


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    file: str  # file name inside the model directory
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_model_info(model_dir: str | Path) -> ModelInfo:
    """Describe the model in `model_dir`; ModelError with a one-line reason if it is unusable."""
    path = Path(model_dir).expanduser().resolve()
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(
            f"unsupported architecture {model_type!r} in {path}; "
            f"supported families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    n_blocks = _config_int(config, path, "num_hidden_layers", "n_layer")
    if n_blocks > MAX_BLOCKS:
        # Checked before any weights are read: no ad for such a model decodes (protocol.ads
        # bounds n_blocks and spans), so it could neither be announced nor routed.
        raise ModelError(
            f"{path} has {n_blocks} blocks; the mesh protocol allows at most {MAX_BLOCKS}, "
            "so no peer could announce or route it"
        )
    hidden = _config_int(config, path, "hidden_size", "n_embd")
    vocab = _config_int(config, path, "vocab_size")
    index = read_weight_index(path)
    family = family_for(model_type)
    for i in (0, n_blocks - 1):
        prefix = block_key_prefix(family, index, i)
        if not any(n.startswith(prefix) for n in index):
            raise ModelError(f"weights in {path} lack block {i} (no tensor named {prefix}*)")
    digest = _digest(path, config, index)
    name = model_name(path)
    dtype = config.get("dtype") or config.get("torch_dtype")
    return ModelInfo(
        name=name,
        model_id=f"{name}@{digest[:16]}",
        model_type=model_type,
        n_blocks=n_blocks,
        hidden_size=hidden,
        vocab_size=vocab,
        torch_dtype=dtype if isinstance(dtype, str) else None,
        path=path,
    )


def model_name(path: Path) -> str:
    """Directory basename, or the repo name of a Hugging Face cache snapshot."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        raw = parts[-3].split("--")[-1]
    else:
        raw = path.name
    # "@" separates name and digest in a model id; whitespace breaks one-line output.
    cleaned = "".join("-" if c == "@" or c.isspace() else c for c in raw)
    return cleaned or "model"


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; ModelError if the directory or file is missing or not JSON."""
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{path} has no config.json")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {cfg}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{cfg} is not a JSON object")
    return data


def read_weight_index(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint from the safetensors headers (no tensor data read)."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"cannot read {index_file}: {e}") from None
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ModelError(f"{path} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ModelError(f"{index_file} names a bad shard file {name!r}")
        entries.update(read_safetensors_header(path / name))
    return entries


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """Tensor entries of one safetensors file: 8-byte little-endian length, then JSON."""
    try:
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelError(f"{file} is too short to be safetensors")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ModelError(f"{file} claims a {n}-byte header; not safetensors")
            raw = f.read(n)
        size = file.stat().st_size
    except FileNotFoundError:
        raise ModelError(f"weight file {file} is missing") from None
    except OSError as e:
        raise ModelError(f"cannot read {file}: {e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{file} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file} has a corrupt safetensors header")
    base = 8 + n
    out: dict[str, TensorEntry] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = meta["dtype"]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{file}: bad header entry for {key!r}") from None
        if dtype not in _ST_ITEMSIZE or not 0 <= begin <= end or base + end > size:
            raise ModelError(f"{file}: bad header entry for {key!r}")
        out[key] = TensorEntry(file.name, dtype, shape, base + begin, base + end)
    return out


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a target dtype name ("bfloat16", "torch.float16", "fp32", ...)."""
    key = str(dtype).removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    try:
        return DTYPE_BYTES[key]
    except KeyError:
        raise ModelError(
            f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}"
        ) from None


def block_param_bytes(info: ModelInfo, dtype: str) -> int:
    """Bytes of one block's tensors in `dtype` (the largest block, should blocks differ)."""
    itemsize = dtype_bytes(dtype)
    index = read_weight_index(info.path)
    family = family_for(info.model_type)
    lead = f"{checkpoint_base(family, index)}{family.blocks}."
    per_block = [0] * info.n_blocks
    for name, entry in index.items():
        if not name.startswith(lead):
            continue
        head = name[len(lead) :].split(".", 1)[0]
        if head.isdigit() and int(head) < info.n_blocks:
            per_block[int(head)] += entry.numel * itemsize
    return max(per_block)


def kv_bytes_per_block_token(info: ModelInfo, dtype: str) -> int:
    """KV-cache bytes one block needs per token (keys and values) at batch 1 in `dtype`."""
    config = read_config(info.path)
    heads = _config_int(config, info.path, "num_attention_heads", "n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or info.hidden_size // heads
    return 2 * int(kv_heads) * int(head_dim) * dtype_bytes(dtype)


def _config_int(config: dict[str, Any], path: Path, *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ModelError(f"{path}/config.json lacks a positive integer {' or '.join(keys)}")


def _digest(path: Path, config: dict[str, Any], index: dict[str, TensorEntry]) -> str:
    h = hashlib.sha256()
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode())
    weights = {n: [e.dtype, list(e.shape)] for n, e in sorted(index.items())}
    h.update(json.dumps(weights, sort_keys=True, separators=(",", ":")).encode())
    by_file: dict[str, list[tuple[str, TensorEntry]]] = {}
    for name, entry in sorted(index.items()):
        by_file.setdefault(entry.file, []).append((name, entry))
    samples: dict[str, bytes] = {}
    for file, entries in by_file.items():
        try:
            with (path / file).open("rb") as f:
                for name, e in entries:
                    samples[name] = _sample(f, e)
        except OSError as err:
            raise ModelError(f"cannot read {path / file}: {err}") from None
    for name in sorted(samples):
        h.update(name.encode())
        h.update(samples[name])
    return h.hexdigest()


def _sample(f: Any, e: TensorEntry) -> bytes:
    length = e.end - e.begin
    if length <= 2 * _SAMPLE:
        f.seek(e.begin)
        return bytes(f.read(length))
    f.seek(e.begin)
    first = f.read(_SAMPLE)
    f.seek(e.end - _SAMPLE)
    return bytes(first + f.read(_SAMPLE))

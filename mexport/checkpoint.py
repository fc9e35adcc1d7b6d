"""Reading a Hugging Face checkpoint without loading it: config, safetensors headers, side files.

The exporter never materializes the model's weights; it needs only where each tensor lives (file, byte range,
dtype, shape), which the safetensors header says. Parsing the header here (8-byte little-endian length + JSON)
also lets a truncated or corrupt shard fail with a one-line error before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexport import hub
from mexport.errors import MexportError, first_line
from mexport.lazy import require
from mexport.models import supported_model_types

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# copied beside the ONNX graph so an export directory is self-contained (tokenizer and generation defaults)
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", *SIDE_FILES]
# either one makes a loadable tokenizer (the fast JSON or the SentencePiece model)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# a header larger than this is not a safetensors header (the format caps it at 100 MB)
MAX_HEADER_BYTES = 100 << 20
LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")
EMBEDDING_TENSOR = "model.embed_tokens.weight"

# safetensors dtype -> (bytes per element, ONNX TensorProto name)
SAFETENSORS_DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "DOUBLE"),
    "F32": (4, "FLOAT"),
    "F16": (2, "FLOAT16"),
    "BF16": (2, "BFLOAT16"),
    "I64": (8, "INT64"),
    "I32": (4, "INT32"),
    "I16": (2, "INT16"),
    "I8": (1, "INT8"),
    "U8": (1, "UINT8"),
    "BOOL": (1, "BOOL"),
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one checkpoint tensor's bytes are: ``file`` from byte ``offset``, ``nbytes`` long."""

    name: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return SAFETENSORS_DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Checkpoint:
    """A resolved local checkpoint directory with its parsed config and tensor table."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorLocation]
    weight_files: tuple[Path, ...]
    origin: str  # what the user named (local path or hub id)
    revision: str | None = None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Tensor table of one safetensors file, checked against the file size (truncated shards fail here)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise MexportError(f"{path}: not a safetensors file (only {size} bytes)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise MexportError(f"{path}: corrupt safetensors header (declared length {header_len}, file {size} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MexportError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise MexportError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors: dict[str, TensorLocation] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise MexportError(f"{path}: corrupt safetensors header entry for {name!r}") from exc
        if dtype not in SAFETENSORS_DTYPES:
            raise MexportError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * SAFETENSORS_DTYPES[dtype][0] or begin < 0:
            raise MexportError(f"{path}: corrupt safetensors header (tensor {name!r} byte range does not match shape)")
        if data_start + end > size:
            raise MexportError(
                f"{path}: truncated (tensor {name!r} ends at byte {data_start + end}, file has {size})",
                hint="re-download the checkpoint",
            )
        tensors[name] = TensorLocation(name, path, dtype, shape, data_start + begin, end - begin)
    return tensors


def incomplete_checkpoint(directory: Path, missing: list[str]) -> MexportError:
    """The refusal of a checkpoint that lacks tensors the model needs (loading it would initialise them at random)."""
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return MexportError(
        f"{directory}: checkpoint has no tensor {shown} (incomplete or mismatched checkpoint)",
        hint="re-download or re-save the checkpoint; every weight its config.json implies must be in its safetensors",
    )


def weight_files(directory: Path) -> tuple[Path, ...]:
    """The safetensors files of a checkpoint: the single file, or the shards its index names."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MexportError(f"{index}: malformed safetensors index ({exc})") from exc
        shards = tuple(directory / name for name in dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not shard.is_file():
                raise MexportError(f"{index}: names shard {shard.name}, which is missing", hint="re-download it")
        return shards
    single = directory / SINGLE_FILE
    if single.is_file():
        return (single,)
    raise MexportError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (not a safetensors checkpoint)",
        hint="pass a Hugging Face checkpoint directory saved with safe_serialization=True",
    )


def read_config(directory: Path) -> dict[str, Any]:
    """config.json, refusing architectures the exporter does not support."""
    path = directory / "config.json"
    if not path.is_file():
        raise MexportError(f"{directory}: no config.json (not a Hugging Face checkpoint)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MexportError(f"{path}: malformed JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise MexportError(
            f"{directory}: unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return config


def resolve_checkpoint(model: str | Path, revision: str | None = None) -> Checkpoint:
    """A local checkpoint directory, or a hub id downloaded (safetensors, config, tokenizer only)."""
    origin = str(model)
    directory = Path(model).expanduser()
    if not directory.exists():
        if _looks_like_hub_id(origin):
            directory = hub.snapshot(origin, HUB_PATTERNS, revision)
        else:
            raise MexportError(
                f"{model}: no such file or directory",
                hint="pass a local checkpoint directory (config.json + *.safetensors) or a hub id like org/name",
            )
    if not directory.is_dir():
        raise MexportError(
            f"{model}: not a directory (pass a checkpoint directory or a hub id)",
            hint="pass the directory holding config.json and the *.safetensors files, not a file inside it",
        )
    config = read_config(directory)
    files = weight_files(directory)
    tensors: dict[str, TensorLocation] = {}
    for shard in files:
        tensors.update(read_safetensors_header(shard))
    check_layers_match_config(directory, config, tensors)
    return Checkpoint(directory.resolve(), config, tensors, files, origin, revision)


def check_layers_match_config(directory: Path, config: dict[str, Any], tensors: dict[str, TensorLocation]) -> None:
    """Refuse, from the headers alone, a config whose layer count or widths the weights do not have (a 200-layer
    config over 3 layers of weights would otherwise be traced for minutes before the first missing tensor)."""
    layers = config.get("num_hidden_layers")
    found = {int(match[1]) for name in tensors if (match := LAYER_TENSOR.match(name))}
    if not isinstance(layers, int) or layers < 1:
        raise MexportError(f"{directory}: config.json num_hidden_layers {layers!r} is not a positive integer")
    if found != set(range(layers)):
        missing = sorted(set(range(layers)) - found)
        extra = sorted(found - set(range(layers)))
        detail = (f"no weights for layers {_ranges(missing)}" if missing else "") + (
            f"{'; ' if missing else ''}weights for layers {_ranges(extra)} beyond it" if extra else ""
        )
        raise MexportError(
            f"{directory}: config.json says {layers} layers, the safetensors hold {len(found)} ({detail})",
            hint="the config and the weights come from different models: re-download the checkpoint",
        )
    embedding = tensors.get(EMBEDDING_TENSOR)
    expected = (config.get("vocab_size"), config.get("hidden_size"))
    if embedding is not None and embedding.shape != expected:
        raise MexportError(
            f"{directory}: config.json says vocab {expected[0]} x hidden {expected[1]}, the embedding "
            f"{EMBEDDING_TENSOR} is {' x '.join(map(str, embedding.shape))}",
            hint="the config and the weights come from different models: re-download the checkpoint",
        )


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def copy_side_files(checkpoint: Checkpoint, out_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files next to the ONNX graph; returns their names."""
    copied = []
    for name in SIDE_FILES:
        source = checkpoint.path / name
        if source.is_file():
            shutil.copyfile(source, out_dir / name)
            copied.append(name)
    return copied


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path) -> Any:
    """The model's own tokenizer (never remote code), with a clear error when its files are missing."""
    if Path(path).is_dir() and not has_tokenizer(path):
        raise MexportError(
            f"{path}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); the checkpoint it came from had none",
            hint="add the tokenizer files to the checkpoint and export again",
        )
    transformers = require("transformers", "loading the tokenizer")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # tokenizers' Rust errors, JSON errors, KeyErrors from a broken or partial set of files
        raise MexportError(
            f"{path}: could not load its tokenizer: {first_line(exc)}",
            hint="the tokenizer files are missing or inconsistent: copy the model's own tokenizer files again",
        ) from exc
    vocab_size = _config_vocab_size(Path(path))
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise MexportError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: ids past "
            "the embedding would be scored",
            hint="use the tokenizer that came with this model (config.json and tokenizer files from one checkpoint)",
        )
    return tokenizer


def _config_vocab_size(path: Path) -> int | None:
    """``vocab_size`` from the directory's config.json (top level or ``text_config``), when it has one."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # reading the model reports a broken config.json with its own error
    if not isinstance(config, dict):
        return None
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def side_files_bytes(checkpoint: Checkpoint) -> int:
    return sum((checkpoint.path / n).stat().st_size for n in SIDE_FILES if (checkpoint.path / n).is_file())

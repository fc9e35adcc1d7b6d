"""What an ONNX decoder graph says about itself, for a graph made by another tool (ModelOpt,
ONNX Runtime's quantizers, Optimum, the GenAI builder: no ``mexport.json``) everything a runtime needs.

A foreign decoder is read as it is: IO names, dtypes and the past-KV layout from the graph, the model config and
tokenizer from the files beside it. Only Optimum's IO convention is run (``input_ids``, ``attention_mask``,
optional ``position_ids`` / ``logits_indices``, ``past_key_values.N.key|value`` in, ``logits`` and
``present.N.key|value`` out, caches shaped (batch, kv_heads, length, head_dim)); anything else is refused with the
names found, never guessed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mexport.checkpoint import SIDE_FILES
from mexport.errors import MexportError
from mexport.formats import GRAPH_FILE, LOGITS_INDICES, PAST_PREFIX, PRESENT_PREFIX
from mexport.lazy import require
from mexport.manifest import MANIFEST_NAME, io_signature

GRAPH_SUFFIX = ".onnx"
PAST_NAME = re.compile(re.escape(PAST_PREFIX) + r"(\d+)\.(key|value)$")
FEEDABLE_INPUTS = ("input_ids", "attention_mask", "position_ids", LOGITS_INDICES)
FLOAT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# op types that store weights in a quantized form, named in a foreign model's precision
QUANTIZED_OPS = ("DequantizeLinear", "MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "GatherBlockQuantized")


def _quantized_op(node: Any) -> str:
    """A quantized op as a report names it; MatMulNBits with the accuracy level that decides its compute (4: int8
    activations, 0 or unset: the weights dequantized to the activations' float type)."""
    levels = [attribute.i for attribute in node.attribute if attribute.name == "accuracy_level"]
    return f"{node.op_type} accuracy_level {levels[0]}" if node.op_type == "MatMulNBits" and levels else node.op_type


def find_graph(location: Path) -> Path:
    """The graph of a model location without a manifest: the ``.onnx`` file named, or the only one in the folder."""
    if location.is_file():
        if location.suffix != GRAPH_SUFFIX:
            raise MexportError(f"{location}: not an ONNX graph (expected a {GRAPH_SUFFIX} file or a directory)")
        return location
    graphs = sorted(location.glob(f"*{GRAPH_SUFFIX}"))
    if not graphs:
        raise MexportError(
            f"{location}: no {MANIFEST_NAME} and no ONNX graph (*{GRAPH_SUFFIX}) in it",
            hint=f"pass an mexport export / quantize directory, or a directory holding an ONNX decoder ({GRAPH_FILE})",
        )
    if len(graphs) > 1:
        raise MexportError(
            f"{location}: holds {len(graphs)} ONNX graphs ({', '.join(g.name for g in graphs)}) and no {MANIFEST_NAME} "
            "saying which one is the model",
            hint=f"pass the graph to score itself, e.g. --candidate {graphs[0]}",
        )
    return graphs[0]


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph stores: initializers and tensor attributes, in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def external_data_files(model: Any, directory: Path) -> list[str]:
    """The files (relative to ``directory``) holding a graph's external tensors; one outside it is refused."""
    names = set()
    for tensor in _tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    root = directory.resolve()
    for name in names:
        if root not in (directory / name).resolve().parents:
            raise MexportError(f"{directory}: the graph keeps tensors in {name!r}, outside its directory")
        if not (directory / name).is_file():
            raise MexportError(f"{directory}: the graph keeps tensors in {name}, which is missing")
    return sorted(names)


def _model_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise MexportError(
            f"{directory}: an ONNX graph without {MANIFEST_NAME} needs the model's config.json beside it",
            hint="copy config.json (and the tokenizer files) of the checkpoint it came from into the directory",
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MexportError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise MexportError(f"{path}: not a JSON object")
    return config


def _checked_int(config: dict[str, Any], path: Path, *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise MexportError(f"{path}: no positive integer {' or '.join(keys)}")


def describe_foreign_graph(graph_path: Path) -> dict[str, Any]:
    """What a runtime needs to run a graph without a manifest, read from the graph and its config.json: ``io``,
    ``model_config`` (DecoderSpec's keys), ``dtype`` (of the KV cache), ``quantized_ops`` and ``files`` (every file
    the runtime and tokenizer read: graph, external data, config and tokenizer files)."""
    onnx = require("onnx", "reading ONNX graphs")
    directory = graph_path.parent
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise MexportError(f"{graph_path}: not a readable ONNX graph ({type(exc).__name__}: {exc})") from exc
    io = io_signature(model)
    inputs = {entry["name"]: entry for entry in io["inputs"]}
    outputs = {entry["name"]: entry for entry in io["outputs"]}
    past = {name: entry for name, entry in inputs.items() if PAST_NAME.match(name)}
    unknown = [name for name in inputs if name not in past and name not in FEEDABLE_INPUTS]
    layers = sorted({int(PAST_NAME.match(name)[1]) for name in past})  # type: ignore[index]
    expected_past = {f"{PAST_PREFIX}{layer}.{part}" for layer in range(len(layers)) for part in ("key", "value")}
    missing = [name for name in ("input_ids", "attention_mask") if name not in inputs]
    missing += [name for name in ["logits", *(PRESENT_PREFIX + n[len(PAST_PREFIX) :] for n in sorted(past))]
                if name not in outputs]
    if unknown or missing or not past or set(past) != expected_past:
        raise MexportError(
            f"{graph_path}: not a decoder with a KV cache in Optimum's IO convention "
            f"(inputs {sorted(inputs)}, outputs {sorted(outputs)[:6]}{'...' * (len(outputs) > 6)}"
            + (f"; cannot feed {unknown}" if unknown else "") + (f"; missing {missing}" if missing else "") + ")",
            hint="export with past-KV IO (optimum-cli export onnx --task text-generation-with-past, or mexport onnx)",
        )
    past_dtypes = {entry["dtype"] for entry in past.values()}
    if len(past_dtypes) != 1 or next(iter(past_dtypes)) not in FLOAT_NAMES:
        raise MexportError(f"{graph_path}: KV-cache inputs have dtypes {sorted(past_dtypes)}, expected one float type")
    config_path = directory / "config.json"
    config = _model_config(directory)
    heads = _checked_int(config, config_path, "num_attention_heads")
    model_config = {
        **config,  # the family's own keys (model_type, window and rope facts) as DecoderSpec reads them
        "num_hidden_layers": _checked_int(config, config_path, "num_hidden_layers"),
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or _checked_int(config, config_path, "hidden_size") // heads,
        "vocab_size": _checked_int(config, config_path, "vocab_size"),
        "sliding_window": config.get("sliding_window"),
        "max_position_embeddings": config.get("max_position_embeddings"),
    }
    if model_config["num_hidden_layers"] != len(layers):
        raise MexportError(
            f"{graph_path}: the graph has a KV cache for {len(layers)} layers, "
            f"{config_path.name} says {model_config['num_hidden_layers']}"
        )
    for name, entry in past.items():
        shape = entry["shape"]
        wanted = [None, model_config["num_key_value_heads"], None, model_config["head_dim"]]
        if len(shape) != 4 or any(isinstance(d, int) and d > 0 and w and d != w for d, w in zip(shape, wanted)):
            raise MexportError(
                f"{graph_path}: input {name} has shape {shape}; expected (batch, {wanted[1]} KV heads, past length, "
                f"head_dim {wanted[3]}) as {config_path.name} says"
            )
    ops = sorted({_quantized_op(node) for node in model.graph.node if node.op_type in QUANTIZED_OPS})
    data_files = external_data_files(model, directory)
    side_files = [name for name in SIDE_FILES if (directory / name).is_file()]
    return {
        "io": io,
        "model_config": model_config,
        "dtype": FLOAT_NAMES[past_dtypes.pop()],
        "quantized_ops": ops,
        "files": [graph_path.name, *data_files, *side_files],
    }

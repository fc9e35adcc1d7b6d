"""The exported graph held without its weights, edited in place, and written back with one external-data file.

The graph proto is loaded with ``load_external_data=False``, so memory holds the structure only (a few MB for a
9B model). A weight is read from ``model.onnx.data`` by offset when it is needed and dropped afterwards; new or
rewritten tensors are *pending*: a function that computes them, run while the output data file is written, one
weight at a time. Unchanged tensors are copied byte ranges. Nothing ever holds more than one weight's worth of
new data.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mexport.console import progress
from mexport.formats import DATA_FILE, GRAPH_FILE, LARGE_ALIGNMENT, LARGE_TENSOR_BYTES, SMALL_ALIGNMENT
from mexport.lazy import require

# tensors below this size stay inside model.onnx (onnx's own external-data threshold)
INLINE_TENSOR_BYTES = 1024
COPY_CHUNK_BYTES = 64 << 20
# ops through which a constant expression (a norm's ``1 + w``, a cast weight) is evaluated
CONSTANT_OPS = {"Constant", "Cast", "Identity", "Add", "Sub", "Mul", "Div"}


@dataclass
class PendingTensor:
    """An initializer whose bytes are computed when the model is written.

    Tensors computed together (a quantized weight, its scales and zero points) share a ``group`` and one
    ``compute`` call that returns all of them by name.
    """

    name: str
    group: str
    compute: Callable[[], dict[str, np.ndarray]]


@dataclass
class Linear:
    """A linear layer: a MatMul whose second input is a stored weight (``[in, out]``), or the tied LM head's
    ``Transpose`` of the embedding table (stored ``[out, in]``)."""

    node: Any  # onnx.NodeProto
    weight: str  # initializer name
    transposed: bool
    in_features: int
    out_features: int
    lm_head: bool
    checkpoint_name: str | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def input(self) -> str:
        return self.node.input[0]

    def match_names(self) -> tuple[str, ...]:
        """Names an ``--exclude`` pattern is matched against."""
        return tuple(name for name in (self.node.name, self.weight, self.checkpoint_name) if name)


@dataclass
class ModelGraph:
    model_dir: Path
    weights_map: dict[str, str] = field(default_factory=dict)  # initializer -> checkpoint tensor (export manifest)
    vocab_size: int | None = None  # the LM head is the linear layer with this many outputs
    norm_form: str | None = None  # the model family's RMSNorm form (mexport.models); smoothing folds only into it

    def __post_init__(self) -> None:
        onnx = require("onnx", "editing ONNX graphs")
        self.model_dir = Path(self.model_dir)
        self.model = onnx.load(str(self.model_dir / GRAPH_FILE), load_external_data=False)
        self.graph = self.model.graph
        self.initializers: dict[str, Any] = {tensor.name: tensor for tensor in self.graph.initializer}
        # every tensor ever declared, also those pruned from the graph: pending ones may still be computed from them
        self._tensors: dict[str, Any] = dict(self.initializers)
        # where each stored tensor's bytes are in the export (saving repoints the protos at the output file)
        self._stored: dict[str, tuple[str, int, int]] = {
            name: _external_location(tensor)
            for name, tensor in self.initializers.items()
            if onnx.external_data_helper.uses_external_data(tensor)
        }
        self.pending: dict[str, PendingTensor] = {}
        self._inserts: dict[int, list[Any]] = {}
        self._producers = {output: node for node in self.graph.node for output in node.output}
        self._names: set[str] = {name for node in self.graph.node for name in (*node.input, *node.output)}
        self._names |= set(self.initializers) | {node.name for node in self.graph.node}

    # ---- structure -------------------------------------------------------------------------------------------

    def producers(self) -> dict[str, Any]:
        """Tensor name -> the node writing it (edits only add producers, so this is kept up to date)."""
        return self._producers

    def consumers(self, tensor: str) -> list[Any]:
        readers = [node for node in self.graph.node if tensor in node.input]
        readers += [node for nodes in self._inserts.values() for node in nodes if tensor in node.input]
        return readers

    def is_graph_output(self, tensor: str) -> bool:
        return any(output.name == tensor for output in self.graph.output)

    def unique_name(self, base: str) -> str:
        name, counter = base, 1
        while name in self._names:
            counter += 1
            name = f"{base}_{counter}"
        self._names.add(name)
        return name

    @property
    def opset(self) -> int:
        return next(entry.version for entry in self.model.opset_import if entry.domain in ("", "ai.onnx"))

    def require_opset(self, opset: int) -> int | None:
        """Raise the default-domain opset (and IR version) to at least ``opset``; returns the old one if raised.

        The ops updated between opsets 18 and 21 only gained new element types (int4, float8), so an exported
        graph keeps its meaning.
        """
        old = self.opset
        if old >= opset:
            return None
        for entry in self.model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
        min_ir = {19: 9, 20: 9, 21: 10}.get(opset, 10 if opset > 21 else 8)
        self.model.ir_version = max(self.model.ir_version, min_ir)
        return old

    def linears(self) -> list[Linear]:
        """Every MatMul that multiplies by a stored 2-D weight, in graph order."""
        producers = self.producers()
        found = []
        for node in self.graph.node:
            if node.op_type != "MatMul":
                continue
            weight_input = node.input[1]
            if weight_input in self.initializers:
                dims = list(self.initializers[weight_input].dims)
                if len(dims) == 2:
                    found.append(self._linear(node, weight_input, False, dims[0], dims[1]))
                continue
            transpose = producers.get(weight_input)
            if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in self.initializers:
                continue
            dims = list(self.initializers[transpose.input[0]].dims)
            perm = [list(attribute.ints) for attribute in transpose.attribute if attribute.name == "perm"]
            if len(dims) == 2 and (not perm or perm[0] == [1, 0]):
                found.append(self._linear(node, transpose.input[0], True, dims[1], dims[0]))
        return found

    def _linear(self, node: Any, weight: str, transposed: bool, in_features: int, out_features: int) -> Linear:
        checkpoint_name = self.weights_map.get(weight)
        # the tied LM head reads the embedding table through a Transpose; any LM head projects onto the vocabulary
        lm_head = transposed or out_features == self.vocab_size or checkpoint_name == "lm_head.weight"
        return Linear(node, weight, transposed, in_features, out_features, lm_head, checkpoint_name)

    # ---- tensors ---------------------------------------------------------------------------------------------

    def data_type(self, name: str) -> int:
        return self._tensors[name].data_type

    def numpy_dtype(self, name: str) -> np.dtype:
        onnx = require("onnx")
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.data_type(name)))

    def read(self, name: str, mapped: bool = False) -> np.ndarray:
        """An initializer's current value (its pending replacement if any), in its stored dtype.

        Stored tensors are read from the data file on demand; ``mapped`` returns a read-only memory map instead,
        for callers that go through a large tensor a slice at a time.
        """
        if name in self.pending:
            return self.pending[name].compute()[name]
        onnx = require("onnx")
        tensor = self._tensors[name]
        if name not in self._stored:
            return onnx.numpy_helper.to_array(tensor)
        location, offset, _ = self._stored[name]
        shape = tuple(tensor.dims)
        dtype = self.numpy_dtype(name)
        if mapped:
            return np.memmap(self.model_dir / location, dtype=dtype, mode="r", offset=offset, shape=shape)
        count = int(np.prod(shape, dtype=np.int64))
        return np.fromfile(self.model_dir / location, dtype=dtype, count=count, offset=offset).reshape(shape)

    def weight_matrix(self, name: str, transposed: bool) -> np.ndarray:
        """A linear layer's weight as an ``[in, out]`` view in its stored dtype (``transposed``: stored
        ``[out, in]``), memory-mapped where it lives in the data file: convert slices, not the whole."""
        weight = self.read(name, mapped=True)
        return weight.T if transposed else weight

    def constant_value(self, tensor: str, depth: int = 0) -> np.ndarray | None:
        """The value of ``tensor`` when it is a constant expression of initializers (else None)."""
        if tensor in self.initializers:
            return self.read(tensor)
        producer = self.producers().get(tensor)
        if producer is None or producer.op_type not in CONSTANT_OPS or depth > 8:
            return None
        onnx = require("onnx")
        if producer.op_type == "Constant":
            values = [attribute for attribute in producer.attribute if attribute.name == "value"]
            return onnx.numpy_helper.to_array(values[0].t) if values else None
        evaluated = [self.constant_value(name, depth + 1) for name in producer.input]
        operands = [value for value in evaluated if value is not None]
        if len(operands) != len(evaluated):
            return None
        if producer.op_type == "Cast":
            to = next(attribute.i for attribute in producer.attribute if attribute.name == "to")
            return operands[0].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        if producer.op_type == "Identity":
            return operands[0]
        operation = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[producer.op_type]
        return operation(operands[0], operands[1])

    def add_initializer(self, name: str, values: np.ndarray) -> str:
        """A small initializer known now (scales, zero points, smoothing vectors)."""
        onnx = require("onnx")
        tensor = onnx.numpy_helper.from_array(values, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self._tensors[name] = tensor
        self._names.add(name)
        return name

    def add_pending(
        self,
        group: str,
        shapes: Mapping[str, tuple[tuple[int, ...], int]],
        compute: Callable[[], dict[str, np.ndarray]],
    ) -> None:
        """Declare new initializers ``{name: (dims, onnx data type)}`` that ``compute`` returns together when the
        model is written (names from :meth:`unique_name`)."""
        onnx = require("onnx")
        for name, (dims, data_type) in shapes.items():
            tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
            self.graph.initializer.append(tensor)
            self.initializers[name] = self._tensors[name] = tensor
            self.pending[name] = PendingTensor(name, group, compute)

    def insert_before(self, consumer: Any, nodes: list[Any]) -> None:
        """Schedule ``nodes`` to go right before ``consumer`` (keeps the node list topologically sorted)."""
        for node in nodes:
            self._names.update(node.output)
            self._names.add(node.name)
            self._producers.update({output: node for output in node.output})
        self._inserts.setdefault(id(consumer), []).extend(nodes)

    # ---- finishing -------------------------------------------------------------------------------------------

    def finalize(self) -> None:
        """Apply scheduled insertions, then drop nodes and initializers nothing reads any more."""
        nodes = []
        for node in self.graph.node:
            nodes.extend(self._inserts.pop(id(node), []))
            nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        prune_unused(self.graph)
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}

    def save(self, out_dir: Path, description: str = "writing weights") -> None:
        """Write ``model.onnx`` and the single ``model.onnx.data`` into ``out_dir`` (graph finalized first)."""
        onnx = require("onnx")
        self.finalize()
        out_dir = Path(out_dir)
        cursor = 0
        group, computed = None, {}
        with open(out_dir / DATA_FILE, "wb") as data, progress() as bar:
            task = bar.add_task(description, total=len(self.initializers))
            for tensor in self.graph.initializer:
                if tensor.name in self.pending:
                    entry = self.pending[tensor.name]
                    if entry.group != group:
                        group, computed = entry.group, entry.compute()
                    values = onnx.numpy_helper.from_array(computed[tensor.name], tensor.name)
                    if values.data_type != tensor.data_type or list(values.dims) != list(tensor.dims):
                        raise RuntimeError(f"computed tensor {tensor.name} does not match its declaration")
                    if len(values.raw_data) < INLINE_TENSOR_BYTES:
                        tensor.CopyFrom(values)
                    else:
                        cursor = _append(tensor, [values.raw_data], len(values.raw_data), data, cursor)
                elif tensor.name in self._stored:
                    _, _, length = self._stored[tensor.name]
                    cursor = _append(tensor, self._copy_chunks(tensor.name), length, data, cursor)
                bar.advance(task)
        onnx.save_model(self.model, str(out_dir / GRAPH_FILE))

    def _copy_chunks(self, name: str) -> Iterator[bytes]:
        location, offset, length = self._stored[name]
        with open(self.model_dir / location, "rb") as source:
            source.seek(offset)
            remaining = length
            while remaining > 0:
                chunk = source.read(min(COPY_CHUNK_BYTES, remaining))
                if not chunk:
                    raise RuntimeError(f"{self.model_dir / location} ends inside tensor {name}")
                remaining -= len(chunk)
                yield chunk


def _external_location(tensor: Any) -> tuple[str, int, int]:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    return entries["location"], int(entries.get("offset", 0)), int(entries["length"])


def _append(tensor: Any, chunks: Iterable[bytes], length: int, data: Any, cursor: int) -> int:
    """Write a tensor's bytes at the next aligned offset of the data file and point the tensor at them."""
    onnx = require("onnx")
    alignment = LARGE_ALIGNMENT if length >= LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
    offset = -(-cursor // alignment) * alignment
    data.write(b"\0" * (offset - cursor))
    for chunk in chunks:
        data.write(chunk)
    tensor.ClearField("raw_data")
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return offset + length


def prune_unused(graph: Any) -> None:
    """Drop the nodes no graph output depends on, then the initializers nothing reads (ONNX Runtime keeps them)."""
    needed = {output.name for output in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            live.append(node)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    kept = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _subgraph_reads(node: Any) -> set[str]:
    """Outer-scope names read inside a node's subgraphs (If / Loop bodies)."""
    reads: set[str] = set()
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in subgraph.node:
                reads.update(inner.input)
                reads.update(_subgraph_reads(inner))
    return reads


def copy_model_side_files(source_dir: Path, out_dir: Path, skip: tuple[str, ...]) -> list[str]:
    """Copy everything beside the graph (tokenizer, configs) except ``skip``; returns the names copied."""
    copied = []
    for path in sorted(Path(source_dir).iterdir()):
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, Path(out_dir) / path.name)
            copied.append(path.name)
    return copied

"""Tracing the decoder graph without its weights, and rewriting its parameters into external initializers.

The model is built on the ``meta`` device and every parameter replaced by lazily-committed zeros (see
:func:`_lazy_zeros`), so the trace costs activations only, not weights. ``keep_initializers_as_inputs`` leaves each
parameter as a graph input named by its state-dict name (and stops TorchScript merging the identical fake weights);
:func:`externalize_parameters` then turns those inputs into initializers backed by ``model.onnx.data``, folding a
Linear's ``Transpose(weight)`` into the stored tensor so MatMuls read an initializer directly (what quantizers and
TensorRT expect). The tied embedding feeds both the Gather and the LM head's Transpose: it stays one tensor.

bf16 / fp16 traces: PyTorch computes a low-precision GELU in fp32 ("opmath": upcast, fp32 constants, one rounding of
the result), but the TorchScript exporter decomposes it into ops of the input dtype, baking sqrt(2/pi) and 0.044715 in
as bf16 constants (0.797 and 0.0447: ~0.1% off, in every MLP). :func:`_gelu_in_opmath` makes the trace say what
PyTorch does: Cast to fp32, the GELU with exact constants, Cast back (plain ops any runtime, TensorRT included, runs).
Constants PyTorch itself keeps in the model dtype stay so (Gemma's sqrt(hidden) embedding scale). The attention scale
``query_pre_attn_scalar ** -0.5`` is the same case as GELU: PyTorch multiplies the bf16 scores by it in fp32, the trace
would bake it as a bf16 constant (224**-0.5 of the 9B, 28**-0.5 of the tiny fixture: up to 0.2% off in every score);
:func:`_attention_scale_in_opmath` traces Cast, fp32 Mul, Cast.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mexport.formats import (
    DATA_FILE,
    ELEMENT_BYTES,
    EXPORT_DTYPES,
    LARGE_ALIGNMENT,
    LARGE_TENSOR_BYTES,
    LOGITS_INDICES,
    LOGITS_LENGTH_AXIS,
    ONNX_ELEMENT_TYPES,
    SMALL_ALIGNMENT,
    TRANSPOSED_SUFFIX,
    is_plain_transpose,
)
from mexport.lazy import require
from mexport.models import family_of


@dataclass
class StoredTensor:
    """One initializer in ``model.onnx.data``: which checkpoint tensor it holds and how it was transformed."""

    initializer: str
    source: str  # graph parameter (state-dict) name; the exporter maps it to a checkpoint tensor
    transform: str  # "none" | "transpose"
    shape: tuple[int, ...]
    dtype: str  # export dtype ("fp32" | "bf16" | "fp16")
    offset: int = 0
    nbytes: int = 0


@dataclass
class TracedGraph:
    """The weightless ONNX graph plus what the trace learned about the model."""

    model: Any  # onnx.ModelProto, parameters still graph inputs
    parameters: dict[str, tuple[int, ...]]  # graph-input parameter name -> shape
    model_config: dict[str, Any] = field(default_factory=dict)


def _lazy_zeros(torch: Any, shape: Any, dtype: Any) -> Any:
    """A zero tensor whose pages are never committed: a large calloc is a fresh anonymous mapping, and reading it
    maps the kernel's shared zero page. Unlike a zero-stride expanded scalar, a Linear can read it in place
    (BLAS needs real strides, so an expanded weight is copied: 1.8 GB for Gemma's LM head)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for dim in shape:
        numel *= dim
    return torch.from_numpy(np.zeros(numel * element_bytes, dtype=np.uint8)).view(dtype).reshape(tuple(shape))


def _activation_in_fp32(activation: Any, hidden: Any) -> Any:
    return activation(hidden.float()).to(hidden.dtype)


def _gelu_in_opmath(torch: Any, model: Any) -> None:
    """Trace the model's fused GELU activations (transformers' ``act``: ``F.gelu``, tanh or erf) of a bf16 / fp16 model
    as fp32 computations between casts, as PyTorch computes them."""
    gelu = torch.nn.functional.gelu
    for module in model.modules():
        activation = getattr(module, "act", None)
        if activation is gelu or (isinstance(activation, functools.partial) and activation.func is gelu):
            module.act = functools.partial(_activation_in_fp32, activation)


class _OpmathScale:
    """An attention scale that multiplies a low-precision tensor in fp32 and rounds once, as PyTorch's opmath does.

    transformers' eager attention computes ``scores * module.scaling``; a Python float would be traced as a constant
    of the scores' dtype. A tensor's ``__mul__`` refuses this object, so Python calls :meth:`__rmul__`."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __rmul__(self, tensor: Any) -> Any:
        return (tensor.float() * self.value).to(tensor.dtype)


def _attention_scale_in_opmath(model: Any) -> None:
    """Trace each attention's ``scaling`` of a bf16 / fp16 model as an fp32 multiply between casts."""
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), float):
            module.scaling = _OpmathScale(module.scaling)


def _weightless_model(checkpoint_dir: Path, dtype: str) -> Any:
    """The causal LM built from config with lazily-committed zero parameters (tied ones stay one object)."""
    torch = require("torch", "tracing the model")
    transformers = require("transformers", "building the model from its config")
    torch_dtype = getattr(torch, EXPORT_DTYPES[dtype])
    config = transformers.AutoConfig.from_pretrained(checkpoint_dir, local_files_only=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="eager")
    fakes: dict[int, Any] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            if id(parameter) not in fakes:
                fakes[id(parameter)] = torch.nn.Parameter(_lazy_zeros(torch, parameter.shape, torch_dtype), False)
            module._parameters[name] = fakes[id(parameter)]
    # the rotary table is a computed buffer, not a weight: rebuild it for real on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    meta_buffers = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if meta_buffers:
        raise RuntimeError(f"buffers left on the meta device after rebuilding: {meta_buffers}")
    if dtype != "fp32":
        _gelu_in_opmath(torch, model)
        _attention_scale_in_opmath(model)
    return model.eval()


def _model_config(model: Any) -> dict[str, Any]:
    summary = family_of(model.config.to_dict()).model_config(model.config.to_dict())
    summary["parameter_count"] = sum(p.numel() for p in model.parameters())  # shared parameters counted once
    return summary


@contextlib.contextmanager
def _shape_inference_without_weight_values(torch: Any) -> Iterator[None]:
    """Keep TorchScript's final ONNX shape inference from copying every weight.

    That pass serializes the graph together with each parameter's values (a full copy of the weights; beyond
    2 GB it then fails and is skipped anyway, after the copy). Here the parameters are typed graph inputs, so
    inference needs no values: the wrapper hands it none. The graph exported is the same (checked on the
    fixtures); peak memory of a full-width trace drops from ~4 GB to ~0.6 GB.
    """
    original = torch._C._jit_pass_onnx_graph_shape_type_inference

    def without_values(graph: Any, _params: Any, opset: int) -> Any:
        return original(graph, {}, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = without_values
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def trace_graph(checkpoint_dir: Path, dtype: str, opset: int, full_logits: bool = False) -> TracedGraph:
    """Trace the decoder (task text-generation-with-past, position_ids input) to a weightless ONNX graph.

    Lean (default): an int64 input ``logits_indices`` ["logits_length"] names the positions among the new tokens
    whose logits are computed, so ``logits`` is [batch, logits_length, vocab] (transformers' tensor
    ``logits_to_keep``: a Gather before the LM head). A prefill that needs the next token pays for one row of
    ``vocab`` logits, not ``sequence_length`` rows. ``full_logits``: the LM head over every position.
    """
    torch = require("torch", "tracing the model")
    onnx = require("onnx", "building the ONNX graph")
    model = _weightless_model(checkpoint_dir, dtype)
    onnx_config = family_of(model.config.to_dict()).onnx_config()(
        model.config, task="text-generation", use_past=True, use_past_in_inputs=True, float_dtype=dtype,
        int_dtype="int64",
    )
    for key, value in (onnx_config.values_override or {}).items():
        setattr(model.config, key, value)
    dummy_inputs = onnx_config.rename_ambiguous_inputs(onnx_config.generate_dummy_inputs(framework="pt"))
    inputs = onnx_config.ordered_inputs(model)
    outputs = dict(onnx_config.outputs)
    model_kwargs: dict[str, Any] = {"logits_to_keep": 0}
    if not full_logits:
        new_tokens = dummy_inputs["input_ids"].shape[1]
        # logits_to_keep is the forward's last argument: the traced input comes after the cache inputs
        dummy_inputs["logits_to_keep"] = torch.arange(new_tokens - 2, new_tokens)
        inputs[LOGITS_INDICES] = {0: LOGITS_LENGTH_AXIS}
        outputs["logits"] = {0: "batch_size", 1: LOGITS_LENGTH_AXIS}
        model_kwargs = {}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-constant shapes are expected here
        with onnx_config.patch_model_for_export(model, model_kwargs=model_kwargs), \
                _shape_inference_without_weight_values(torch):
            torch.onnx.export(
                model,
                (dummy_inputs,),
                f=buffer,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes={**inputs, **outputs},
                opset_version=opset,
                dynamo=False,
                export_params=False,
                keep_initializers_as_inputs=True,  # parameters stay named graph inputs, never value-deduplicated
                do_constant_folding=False,  # folding would materialize the weights
            )
    parameters = {name: tuple(p.shape) for name, p in model.named_parameters()}
    traced = TracedGraph(onnx.load_from_string(buffer.getvalue()), parameters, _model_config(model))
    del model
    return traced


def externalize_parameters(traced: TracedGraph, dtype: str, untie_embeddings: bool = False) -> list[StoredTensor]:
    """Turn parameter graph inputs into stored tensors (in place), folding transposes that cost no duplicate.

    A parameter's ``Transpose`` consumers are folded into one transposed copy when nothing else reads the
    parameter, or when ``untie_embeddings`` asks for a separate LM-head matrix; otherwise (the tied embedding)
    the Transpose node stays and the tensor is stored once.
    """
    graph = traced.model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    renamed: dict[str, str] = {}
    removed: set[int] = set()
    stored: list[StoredTensor] = []
    for name, shape in traced.parameters.items():
        readers = consumers.get(name, [])
        transposes = [n for n in readers if len(shape) == 2 and is_plain_transpose(n)]
        others = [n for n in readers if n not in transposes]
        if transposes and (not others or untie_embeddings):
            folded = name + TRANSPOSED_SUFFIX
            stored.append(StoredTensor(folded, name, "transpose", (shape[1], shape[0]), dtype))
            for transpose in transposes:
                renamed[transpose.output[0]] = folded
                removed.add(id(transpose))
        if others or not transposes:
            stored.append(StoredTensor(name, name, "none", shape, dtype))
    kept_nodes = [node for node in graph.node if id(node) not in removed]
    for node in kept_nodes:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inputs = [value for value in graph.input if value.name not in traced.parameters]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    return stored


def assign_offsets(stored: list[StoredTensor]) -> int:
    """Lay the tensors out in order in one file (aligned for memory mapping); returns the file size."""
    cursor = 0
    for tensor in stored:
        numel = 1
        for dim in tensor.shape:
            numel *= dim
        tensor.nbytes = numel * ELEMENT_BYTES[tensor.dtype]
        alignment = LARGE_ALIGNMENT if tensor.nbytes >= LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
        tensor.offset = -(-cursor // alignment) * alignment
        cursor = tensor.offset + tensor.nbytes
    return cursor


def attach_initializers(model: Any, stored: list[StoredTensor]) -> None:
    """Declare each stored tensor as an initializer whose bytes live in ``model.onnx.data``."""
    onnx = require("onnx")
    for tensor in stored:
        proto = onnx.TensorProto()
        proto.name = tensor.initializer
        proto.data_type = getattr(onnx.TensorProto, ONNX_ELEMENT_TYPES[tensor.dtype])
        proto.dims.extend(tensor.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", tensor.offset), ("length", tensor.nbytes)):
            entry = proto.external_data.add()
            entry.key, entry.value = key, str(value)
        model.graph.initializer.append(proto)

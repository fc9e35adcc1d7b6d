"""ONNX Runtime decoder over an mexport model directory (export or quantize output), or another tool's ONNX decoder.

On ``cuda`` a graph with compute nodes the CUDA provider has no kernel for (bf16 Q/DQ, for one) is refused with the
nodes named, instead of running them on the CPU (:mod:`mexport.runtime.cuda_kernels`).

Everything about the graph comes from ``mexport.json`` (IO names and dtypes, model config, float dtype); nothing is
guessed from names. A directory without one (ModelOpt, ONNX Runtime quantizer, Optimum or GenAI-builder output) is
read from its graph and config.json instead (:mod:`mexport.runtime.onnx_graph`). The KV cache is a tuple of ``OrtValue`` (one per ``past_key_values.*`` input, in manifest
order) that stays where the provider put it (host or GPU memory) between steps, bound with IO binding.

A lean graph (input ``logits_indices``, the export default) is bound ``arange(S-K, S)`` for ``logits_to_keep=K``
and computes only those rows of the LM head; a full-logits graph (``--full-logits``, older exports) computes all S
and is sliced here.

An empty past (prefill) has shape (batch, num_key_value_heads, 0, head_dim) in the graph's past dtype; sizing it
with the query-head count, as Optimum's ORTModelForCausalLM does, breaks grouped-query models such as Gemma2.

bf16 / fp16 graphs on CPU run with fp32 compute (see :mod:`mexport.runtime.upcast`): :attr:`OrtDecoder.compute_dtype`
says "fp32" then and :attr:`OrtDecoder.precision` spells it out for reports. On CUDA / TensorRT they run natively
(unless ``fp32_compute=True``), with only the logits cast to float32 at the end of the graph.

fp32 compute has two modes with the same results. Small models let ORT fold the weight casts into fp32 copies when
the session is created: ~2.5x the stored weights in RAM, fastest while they fit in cache (wide fixture, 40 MB: decode
steps of 3.3 ms vs 16 ms). From LOW_MEMORY_MIN_BYTES of weights on, or with ``low_memory=True``, the session keeps
the stored weights memory-mapped and each node casts its weight when it runs
(:func:`~mexport.runtime.upcast.bound_weight_upcasts`), without ORT's memory arena, which would keep the largest
transient set allocated (measured +0.85 GB vs +0.3 GB). Full-width 2-layer benchmark model (2.63 GB bf16): peak RSS
2.8 GB vs 7.3 GB folded, decode steps of 0.95 s vs 0.83 s (both memory-bound), prefill faster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mexport.errors import IntegrityError, MexportError, MissingDependencyError, first_line
from mexport.formats import DATA_FILE, GRAPH_FILE, LOGITS_INDICES, PAST_PREFIX, PRESENT_PREFIX
from mexport.lazy import require
from mexport.manifest import (
    MANIFEST_NAME,
    VerifiedFiles,
    check_graph_io,
    hash_files,
    read_manifest,
    verify_artifact_files,
)
from mexport.runtime.base import (
    DecoderRuntime,
    DecoderSpec,
    PastKV,
    check_forward_shapes,
    kept_logits,
    position_ids_from_mask,
)
from mexport.runtime.cuda_kernels import cuda_unsupported_nodes
from mexport.runtime.onnx_graph import describe_foreign_graph, find_graph
from mexport.runtime.upcast import (
    BOUNDED_UPCAST_DISABLED_OPTIMIZERS,
    LOW_PRECISION_NAMES,
    bound_weight_upcasts,
    cast_outputs_to_float32,
    upcast_to_float32,
)

LOW_MEMORY_MIN_BYTES = 1 << 30
SHOWN_UNSUPPORTED_NODES = 3
# device -> (ORT providers in priority order, where OrtValues live)
DEVICE_PROVIDERS: dict[str, tuple[list[str], str]] = {
    "cpu": (["CPUExecutionProvider"], "cpu"),
    "cuda": (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"),
    "tensorrt": (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"),
}
DEVICE_LABELS = {"cpu": "CPU", "cuda": "CUDA", "tensorrt": "TensorRT"}
GPU_PROVIDER_HINT = (
    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (on a host with an NVIDIA GPU and CUDA"
    "; TensorrtExecutionProvider also needs the TensorRT libraries: pip install 'mexport[gpu]')"
)


def _onnx_element_type(dtype_name: str) -> int:
    onnx = require("onnx")
    by_name = {
        "float32": onnx.TensorProto.FLOAT,
        "float16": onnx.TensorProto.FLOAT16,
        "bfloat16": onnx.TensorProto.BFLOAT16,
    }
    if dtype_name not in by_name:
        raise MexportError(
            f"unsupported KV-cache dtype {dtype_name!r} in manifest; expected one of {', '.join(by_name)}"
        )
    return by_name[dtype_name]


def prefers_low_memory(model_dir: Path) -> bool:
    """Whether fp32 compute over ``model_dir``'s weights should keep them stored (bounded upcasts): from
    LOW_MEMORY_MIN_BYTES of weights on, folded fp32 copies cost more memory than their speed is worth."""
    data_file = Path(model_dir) / DATA_FILE
    return data_file.is_file() and data_file.stat().st_size >= LOW_MEMORY_MIN_BYTES


# A Q/DQ graph is computed as written. ONNX Runtime's CPU provider rewrites DequantizeLinear -> MatMul into
# MatMulNBits with accuracy_level 4 (int8-quantized activations) and activation Q/DQ pairs into MatMulIntegerToFloat:
# arithmetic the graph does not contain. Measured on onnxruntime 1.32 (bench/ort_qdq_math.py, tiny fixture, max
# |logit diff| against the graph run node by node): default session int8-wo 6.8e-2 (KL 9.0e-5), int4-wo 7.2e-2,
# int8-sq 1.0e-1; session.qdq_matmulnbits_accuracy_level=0 fixes the weight-only ones (2.3e-6) but not int8-sq
# (MatMulIntegerToFloat is an ORT_ENABLE_EXTENDED rewrite); ORT_ENABLE_BASIC, which keeps every Q/DQ node, gives
# 3.1e-6 / 2.6e-6 / 9.5e-7. So Q/DQ graphs run at ORT_ENABLE_BASIC (plus accuracy level 0, should a MatMulNBits
# ever be formed); unquantized graphs keep every optimisation.
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
GRAPH_OPTIMIZATION = {False: "ORT_ENABLE_ALL", True: "ORT_ENABLE_BASIC"}  # by: the graph has Q/DQ nodes
# onnxruntime 1.31.1's default CPU session cannot load float8 Q/DQ (a MatMulIntegerToFloat type error); 1.32 can
MIN_FP8_ORT_VERSION = (1, 32)


def session_settings(providers: list[str], qdq: bool) -> dict[str, Any]:
    """What a session from :func:`ort_session` computes with, for manifests and reports."""
    return {"providers": list(providers), "graph_optimization": GRAPH_OPTIMIZATION[qdq], "config": dict(SESSION_CONFIG)}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def check_fp8_support(ort: Any, weights: str | None) -> None:
    """Refuse, naming the version, an onnxruntime too old to load float8 Q/DQ (``weights``: the manifest's recipe
    weight scheme, None for an unquantized export)."""
    if weights == "fp8" and _version_tuple(ort.__version__) < MIN_FP8_ORT_VERSION:
        wanted = ".".join(map(str, MIN_FP8_ORT_VERSION))
        raise MissingDependencyError(
            f"onnxruntime {ort.__version__} cannot load float8 Q/DQ graphs (it fails with a MatMulIntegerToFloat "
            f"type error); {wanted} or newer can",
            hint=f"pip install 'onnxruntime>={wanted}'",
        )


def ort_session(
    model_source: str | bytes,
    providers: list[str],
    model_dir: Path | None = None,
    bounded_upcasts: bool = False,
    intra_op_threads: int | None = None,
    qdq: bool = False,
) -> Any:
    """The one way mexport builds an ONNX Runtime session, external data read from ``model_dir``. ``qdq``: the graph
    has Q/DQ nodes, computed as written (``GRAPH_OPTIMIZATION``, ``SESSION_CONFIG``). ``bounded_upcasts``: the graph went through
    :func:`~mexport.runtime.upcast.bound_weight_upcasts`, so keep the optimizers that undo it and the memory arena
    (which would keep the largest transient set allocated) off."""
    ort = require("onnxruntime", "running ONNX models")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[qdq])
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if model_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
    if bounded_upcasts:
        options.enable_cpu_mem_arena = False
    return ort.InferenceSession(
        model_source,
        sess_options=options,
        providers=providers,
        disabled_optimizers=BOUNDED_UPCAST_DISABLED_OPTIMIZERS if bounded_upcasts else None,
    )


class OrtDecoder(DecoderRuntime):
    """An exported (or quantized) decoder run with ONNX Runtime on CPU, CUDA or TensorRT."""

    name = "onnxruntime"

    def __init__(
        self,
        model_dir: Path | str,
        device: str = "cpu",
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        fp32_compute: bool | None = None,
        low_memory: bool | None = None,
    ) -> None:
        """``fp32_compute`` None: fp32 compute for bf16/fp16 graphs on CPU only; True / False force it either way.
        ``low_memory`` (fp32 compute only) None: from LOW_MEMORY_MIN_BYTES of weights on; True / False force it."""
        location = Path(model_dir)
        # an mexport artifact describes itself in its manifest; a graph made by another tool is read as it is
        self.manifest: dict[str, Any] | None = None
        if (location / MANIFEST_NAME).is_file():
            self.model_dir = location
            self.manifest = read_manifest(location, expected_kind=("export", "quantize"))
            self.model_path = location / GRAPH_FILE
            if not self.model_path.is_file():
                raise MexportError(f"{location}: no {GRAPH_FILE}", hint="re-run the export into a fresh directory")
            for key in ("io", "model_config", "dtype"):
                if key not in self.manifest:
                    raise IntegrityError(f"{location}: manifest has no {key!r} (written by an incompatible mexport?)")
            self.graph_info = self.manifest
        else:
            self.model_path = find_graph(location)
            self.model_dir = self.model_path.parent
            self.graph_info = describe_foreign_graph(self.model_path)
        if device not in DEVICE_PROVIDERS:
            raise MexportError(f"unknown ONNX Runtime device {device!r}; expected one of {', '.join(DEVICE_PROVIDERS)}")
        self.device = device
        default_providers, self._value_device = DEVICE_PROVIDERS[device]
        self.providers = providers or default_providers
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self.dtype: str = self.graph_info["dtype"]
        if fp32_compute is None:
            fp32_compute = device == "cpu"
        self.emulated = fp32_compute and self.dtype in LOW_PRECISION_NAMES.values()
        self.compute_dtype = "fp32" if self.emulated else self.dtype
        if low_memory is None:
            low_memory = prefers_low_memory(self.model_dir)
        self.low_memory = self.emulated and low_memory

        io = self.graph_info["io"]
        self.input_dtypes = {entry["name"]: entry["dtype"] for entry in io["inputs"]}
        self.input_names = [entry["name"] for entry in io["inputs"]]
        self.output_names = [entry["name"] for entry in io["outputs"]]
        past_inputs = [entry for entry in io["inputs"] if entry["name"].startswith(PAST_PREFIX)]
        self.past_names = [entry["name"] for entry in past_inputs]
        self.present_names = [PRESENT_PREFIX + name[len(PAST_PREFIX) :] for name in self.past_names]
        missing = [name for name in ["input_ids", "attention_mask"] if name not in self.input_names]
        missing += [name for name in ["logits", *self.present_names] if name not in self.output_names]
        if missing:
            raise IntegrityError(f"{self.model_dir}: manifest io is not a decoder with KV cache (missing {missing})")
        past_dtypes = {entry["dtype"] for entry in past_inputs}
        if len(past_dtypes) != 1:
            raise IntegrityError(f"{self.model_dir}: manifest io has mixed KV-cache dtypes {sorted(past_dtypes)}")
        self.past_dtype = "float32" if self.emulated else past_dtypes.pop()
        self.uses_position_ids = "position_ids" in self.input_names
        self.lean_logits = LOGITS_INDICES in self.input_names  # older and --full-logits exports: sliced here
        self.spec = DecoderSpec.from_model_config(self.graph_info["model_config"])
        self._session: Any = None
        self._repeat_session: Any = None

    @property
    def precision(self) -> str:
        """How weights and compute are represented, for reports."""
        label = DEVICE_LABELS[self.device]
        where = f"{label} emulation" if self.emulated else f"ONNX Runtime {label}"
        if self.manifest is None:
            ops = self.graph_info["quantized_ops"]
            stored = f"{'/'.join(ops)} weights over {self.dtype}" if ops else f"{self.dtype} weights"
            weights = f"{stored} (graph without an mexport manifest)"
        else:
            recipe = self.manifest.get("recipe", {}).get("name")  # quantize outputs name their recipe
            weights = f"{recipe} Q/DQ weights over {self.dtype}" if recipe else f"{self.dtype} weights"
        as_written = ", Q/DQ computed as written" if self.qdq else ""
        return f"{weights}, {self.compute_dtype} compute ({where}, {GRAPH_OPTIMIZATION[self.qdq]}{as_written})"

    @property
    def qdq(self) -> bool:
        """Whether the graph has Q/DQ nodes (a quantize output, or another tool's graph with quantized ops), so that
        its session must not rewrite them."""
        if self.manifest is None:
            return bool(self.graph_info["quantized_ops"])
        return self.manifest.get("kind") == "quantize"

    @property
    def session_settings(self) -> dict[str, Any]:
        """The session's providers, optimisation level and config entries, and the compute dtype: what ran."""
        return {**session_settings(self.providers, self.qdq), "compute_dtype": self.compute_dtype}

    # -- session ---------------------------------------------------------------------------------------------

    def _check_providers(self, ort: Any) -> None:
        available = ort.get_available_providers()
        missing = [provider for provider in self.providers if provider not in available]
        if missing:
            raise MissingDependencyError(
                f"ONNX Runtime {ort.__version__} here has no {', '.join(missing)} (available: {', '.join(available)})",
                hint=GPU_PROVIDER_HINT if self.device != "cpu" else None,
            )

    def _model_source(self) -> str | bytes:
        """The model path, or the rewritten graph's bytes when it needs fp32 compute or float32 logits."""
        onnx = require("onnx")
        logits_dtype = next(entry["dtype"] for entry in self.graph_info["io"]["outputs"] if entry["name"] == "logits")
        if not self.emulated and logits_dtype == "float32":
            return str(self.model_path)
        # external data stays on disk: the session reads it from model_dir (see activate)
        model = onnx.load(str(self.model_path), load_external_data=False)
        if self.emulated:
            upcast_to_float32(model)
            if self.low_memory:
                bound_weight_upcasts(model)
        else:
            cast_outputs_to_float32(model, ["logits"])
        return model.SerializeToString()

    def _refuse_cpu_fallback(self) -> None:
        """On CUDA, refuse a graph with compute nodes the CUDA provider has no kernel for (ONNX Runtime would run
        them on the CPU without a word; see :mod:`mexport.runtime.cuda_kernels`)."""
        onnx = require("onnx")
        unsupported = cuda_unsupported_nodes(onnx.load(str(self.model_path), load_external_data=False))
        if unsupported:
            shown = "; ".join(node.describe() for node in unsupported[:SHOWN_UNSUPPORTED_NODES])
            more = f" and {len(unsupported) - SHOWN_UNSUPPORTED_NODES} more" * (
                len(unsupported) > SHOWN_UNSUPPORTED_NODES
            )
            raise MexportError(
                f"ONNX Runtime's CUDA provider has no kernel for {len(unsupported)} nodes of {self.model_path}, "
                f"which would silently run on the CPU: {shown}{more}",
                hint="run this model on the GPU through its TensorRT engine (mexport engine), "
                "or validate it with --backend-device cpu",
            )

    def activate(self) -> None:
        ort = require("onnxruntime", "running ONNX models")
        self._check_providers(ort)
        onnx = require("onnx")
        if self.device == "cuda":
            self._refuse_cpu_fallback()
        self.check_files_unchanged()  # what the session reads now is what verify_files hashed
        try:
            if self.manifest is not None:  # a foreign graph's description was read from the graph itself
                check_graph_io(self.manifest, onnx.load(str(self.model_path), load_external_data=False), self.model_dir)
                check_fp8_support(ort, self.manifest.get("recipe", {}).get("params", {}).get("weights"))
            session = ort_session(
                self._model_source(), self.providers, self.model_dir, self.low_memory, self.intra_op_threads, self.qdq
            )
        except (MissingDependencyError, IntegrityError):
            raise
        except Exception as exc:  # ORT raises bare pybind errors (Fail, InvalidGraph, NoSuchFile, ...)
            missing_low_precision_kernel = "NOT_IMPLEMENTED" in str(exc) and self.compute_dtype != "fp32"
            raise MexportError(
                f"ONNX Runtime could not load {self.model_path} on {self.device}: {first_line(exc)}",
                hint=f"fp32_compute=True runs this {self.dtype} graph with fp32 compute"
                if missing_low_precision_kernel
                else None,
            ) from exc
        if self.providers[0] not in session.get_providers():
            # ORT silently falls back to CPU when a GPU provider fails to initialise (e.g. missing CUDA libraries)
            raise MissingDependencyError(
                f"ONNX Runtime fell back to {session.get_providers()} instead of {self.providers[0]}",
                hint="check the CUDA / cuDNN (and TensorRT) libraries onnxruntime-gpu needs: " + GPU_PROVIDER_HINT,
            )
        self.check_files_unchanged()  # nor replaced while the session read them
        self._session = session

    def verify_files(self) -> VerifiedFiles:
        """An artifact's files against its manifest; a foreign graph's files (graph, external data, config and
        tokenizer) hashed as they are."""
        if self.manifest is None:
            self.files = hash_files(self.model_dir, self.graph_info["files"])
        else:
            self.files = verify_artifact_files(self.model_dir, self.manifest)
        return self.files

    def deactivate(self) -> None:
        self._session = None
        self._repeat_session = None

    def _active_session(self) -> Any:
        return self._activated(self._session)

    # -- decoding --------------------------------------------------------------------------------------------

    def empty_past(self, batch_size: int) -> tuple[Any, ...]:
        """A zero-length cache: (batch, num_key_value_heads, 0, head_dim) per past input, in the past dtype."""
        ort = require("onnxruntime")
        shape = [batch_size, self.spec.num_kv_heads, 0, self.spec.head_dim]
        element_type = _onnx_element_type(self.past_dtype)
        return tuple(
            ort.OrtValue.ortvalue_from_shape_and_type(shape, element_type, self._value_device) for _ in self.past_names
        )

    def _forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: PastKV, logits_to_keep: int
    ) -> tuple[np.ndarray, PastKV]:
        session = self._active_session()
        kept = kept_logits(input_ids.shape[1], logits_to_keep)
        input_ids = np.ascontiguousarray(input_ids, dtype=self.input_dtypes["input_ids"])
        attention_mask = np.ascontiguousarray(attention_mask, dtype=self.input_dtypes["attention_mask"])
        if past is None:
            past = self.empty_past(input_ids.shape[0])
        check_forward_shapes(input_ids, attention_mask, past_length=past[0].shape()[2])
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        new_tokens = input_ids.shape[1]
        if self.uses_position_ids:
            positions = position_ids_from_mask(attention_mask, new_tokens)
            binding.bind_cpu_input("position_ids", positions.astype(self.input_dtypes["position_ids"]))
        if self.lean_logits:
            indices = np.arange(new_tokens - kept, new_tokens, dtype=self.input_dtypes[LOGITS_INDICES])
            binding.bind_cpu_input(LOGITS_INDICES, indices)
        for name, value in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self._value_device)
        session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()  # in binding order
        return logits.numpy()[:, -kept:], tuple(present)

    def repeat_past(self, past: PastKV, repeats: int) -> PastKV:
        if past[0].shape()[0] != 1:
            raise ValueError(f"repeat_past expands a batch-1 cache; this one has batch {past[0].shape()[0]}")
        session = self._repeat_session or self._make_repeat_session()
        target_shape = np.array([repeats, 1, 1, 1], dtype=np.int64)
        repeated = []
        for value in past:
            binding = session.io_binding()
            binding.bind_ortvalue_input("past", value)
            binding.bind_cpu_input("target_shape", target_shape)
            binding.bind_output("repeated", self._value_device)
            session.run_with_iobinding(binding)
            repeated.append(binding.get_outputs()[0])
        return tuple(repeated)

    def _make_repeat_session(self) -> Any:
        """A one-node Expand graph on the same device, so caches are repeated without a host round trip."""
        onnx = require("onnx")
        helper = onnx.helper
        element_type = _onnx_element_type(self.past_dtype)

        def cache_shape(batch: str) -> list[str | int]:
            return [batch, self.spec.num_kv_heads, "past_sequence_length", self.spec.head_dim]

        graph = helper.make_graph(
            [helper.make_node("Expand", ["past", "target_shape"], ["repeated"])],
            "repeat_past",
            [
                helper.make_tensor_value_info("past", element_type, cache_shape("batch_size")),
                helper.make_tensor_value_info("target_shape", onnx.TensorProto.INT64, [4]),
            ],
            [helper.make_tensor_value_info("repeated", element_type, cache_shape("repeated_batch_size"))],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        # TensorRT would build an engine for this one node; CUDA / CPU kernels are enough
        providers = [provider for provider in self.providers if provider != "TensorrtExecutionProvider"]
        self._repeat_session = ort_session(model.SerializeToString(), providers)
        return self._repeat_session

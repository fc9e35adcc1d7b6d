"""TensorRT's vocabulary, shared by the engine builder (``mexport.optimize.engine``) and the engine runtime
(``mexport.runtime.trt``): whether TensorRT is here and its version, the symbolic axes of an engine's inputs, the
limits an engine is built for and the shapes they give.

Importing this module never imports TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mexport.errors import MexportError, MissingDependencyError
from mexport.formats import LOGITS_LENGTH_AXIS
from mexport.lazy import INSTALL_HINTS

GB = 1_000_000_000  # --gpu-memory / --workspace are decimal GB, like the sizes mexport prints

TENSORRT_STUBS_ONLY = "TensorRT not installed (only type stubs): the 'tensorrt' module found has no Builder"
TENSORRT_MISSING_HINT = (
    f"{INSTALL_HINTS['tensorrt']}; see https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/"
    "installing.html. `mexport engine MODEL_DIR -o OUT --plan` works without TensorRT"
)


def require_tensorrt() -> str:
    """TensorRT's version, or a clear error when its Python module is missing or cannot load its libraries.

    A module without ``Builder`` counts as missing: that is what the type-stub package or the bindings without
    their shared libraries look like.
    """
    try:
        import tensorrt
    except Exception as exc:  # a missing libnvinfer raises OSError / ImportError / RuntimeError
        raise MissingDependencyError(
            f"TensorRT is missing: the 'tensorrt' Python module does not import ({exc})", hint=TENSORRT_MISSING_HINT
        ) from exc
    if not hasattr(tensorrt, "Builder") or not hasattr(tensorrt, "__version__"):
        raise MissingDependencyError(TENSORRT_STUBS_ONLY, hint=TENSORRT_MISSING_HINT)
    return str(tensorrt.__version__)


def installed_tensorrt() -> str | None:
    """The installed TensorRT's version, or None (not installed, stubs only, or its libraries do not load)."""
    try:
        return require_tensorrt()
    except MissingDependencyError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); compares release numbers correctly ('10.15' > '10.8')."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


# first compute capability of each NVIDIA architecture TensorRT 10 supports, newest first
ARCHITECTURES: tuple[tuple[tuple[int, int], str], ...] = (
    ((10, 0), "Blackwell"),
    ((9, 0), "Hopper"),
    ((8, 9), "Ada"),
    ((8, 0), "Ampere"),
    ((7, 5), "Turing"),
)


def architecture_name(capability: tuple[int, int]) -> str:
    """The newest architecture whose first compute capability is at most ``capability``."""
    for first, name in ARCHITECTURES:
        if capability >= first:
            return name
    return "pre-Turing"


AMPERE = next(first for first, name in ARCHITECTURES if name == "Ampere")  # hardware_compatibility "ampere+"

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
LOGITS = LOGITS_LENGTH_AXIS  # rows of logits a lean graph computes (its logits_indices input)
SYMBOLS = (BATCH, SEQUENCE, PAST, LOGITS)

DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_PREFILL_CHUNK = 256  # keeps the 9B's batch-8 prefill activations near 1.5 GB (docs/engine.md)
DEFAULT_MAX_LOGITS = 64  # positions per call with logits: MCQ continuations and generation need a few


@dataclass(frozen=True)
class EngineLimits:
    """The largest shapes an engine accepts, and the batch it is tuned for."""

    max_batch: int
    max_input_len: int  # longest prompt (new tokens of one forward call), run in chunks of prefill_chunk
    max_context: int
    opt_batch: int = 1
    prefill_chunk: int | None = None  # new tokens per engine call; None (engines before chunking): max_input_len
    max_logits: int = DEFAULT_MAX_LOGITS  # lean-logits graphs: positions with logits per engine call

    @property
    def chunk(self) -> int:
        return self.prefill_chunk or self.max_input_len

    def validate(self, max_position_embeddings: int | None = None) -> None:
        for name in ("max_batch", "max_input_len", "max_context", "opt_batch", "prefill_chunk", "max_logits"):
            if getattr(self, name) is None:
                continue
            if getattr(self, name) < 1:
                raise MexportError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_context < 2:
            raise MexportError(f"--max-context must be at least 2 (prompt and generated token), got {self.max_context}")
        if self.opt_batch > self.max_batch:
            raise MexportError(f"--opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}")
        if self.max_input_len > self.max_context:
            raise MexportError(
                f"--max-input-len {self.max_input_len} is larger than --max-context {self.max_context} "
                "(the context holds the prompt plus generated tokens)"
            )
        if self.chunk > self.max_input_len:
            raise MexportError(f"--prefill-chunk {self.chunk} is larger than --max-input-len {self.max_input_len}")
        if max_position_embeddings is not None and self.max_context > max_position_embeddings:
            raise MexportError(
                f"--max-context {self.max_context} exceeds the model's max_position_embeddings "
                f"{max_position_embeddings}"
            )

    def to_dict(self) -> dict[str, int]:
        return {
            "max_batch": self.max_batch,
            "max_input_len": self.max_input_len,
            "max_context": self.max_context,
            "opt_batch": self.opt_batch,
            "prefill_chunk": self.chunk,
            "max_logits": self.max_logits,
        }


def dimension_value(dim: int | str, values: Mapping[str, int], where: str) -> int:
    """An int dimension as is; a symbolic one (``"past_sequence_length + sequence_length"``) evaluated."""
    if isinstance(dim, int):
        return dim
    total = 0
    for term in dim.split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in values:
            total += values[term]
        else:
            raise MexportError(
                f"{where}: dimension {dim!r} uses {term!r}, which is none of {', '.join(SYMBOLS)}",
                hint="engines are built from mexport exports, whose manifest io uses these names",
            )
    return total


def resolve_shape(shape: Sequence[int | str], values: Mapping[str, int], where: str) -> tuple[int, ...]:
    """A concrete shape from a manifest shape and symbol values."""
    return tuple(dimension_value(dim, values, where) for dim in shape)


def _option(default: Any, help: str, flag: str | None = None) -> Any:
    """A setting's default, its help text and (where it differs from the field's name) its CLI flag."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class EngineSettings:
    """What ``mexport engine`` was asked for; defaults suit MCQ validation (5 options share one prompt).

    The one declaration of the engine's settings: ``mexport engine`` makes one option of each field (its help and
    flag from the metadata), and the pipeline's config and TOML ``[engine]`` table take their defaults from here.
    """

    precision: str | None = _option(
        None, "bf16, fp16 or fp32 (default: the model's dtype; an fp32 export at bf16 needs TensorRT 10)."
    )
    max_batch: int = _option(8, "Largest batch the engine accepts.")
    max_input_len: int | None = _option(None, "Longest prompt in tokens (default: min(2048, --max-context)).")
    max_context: int = _option(4096, "Longest prompt + generated tokens (KV cache length).")
    opt_batch: int = _option(1, "Batch size TensorRT tunes kernels for.")
    prefill_chunk: int | None = _option(
        None, "New tokens per engine call; longer prompts run in chunks (default: min(256, --max-input-len))."
    )
    max_logits: int = _option(DEFAULT_MAX_LOGITS, "Lean-logits graphs: positions with logits per engine call.")
    workspace_gb: float = _option(4.0, "Builder workspace pool in GB.", "--workspace")
    timing_cache: Path | None = _option(
        None, "Tactic timing cache to read and update (default: OUT/timing.cache)."
    )
    hw_compat: str = _option("none", "none, or ampere+ for an engine that runs on any Ampere or newer GPU.")
    gpu_memory_gb: float | None = _option(None, "Check memory against a GPU of this many GB.", "--gpu-memory")
    target: str | None = _option(
        None,
        "Check memory against a named GPU: h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb, l4-24gb, "
        "a10g-24gb.",
    )
    tensorrt_version: str | None = _option(
        None, "Plan for this TensorRT (X.Y; default: the installed one, else the newest the [gpu] extra allows)."
    )

    @property
    def limits(self) -> EngineLimits:
        """The limits with unset ones adapted to those given (``--max-context 256`` alone is a valid request)."""
        max_input_len = self.max_input_len
        if max_input_len is None:
            max_input_len = min(DEFAULT_MAX_INPUT_LEN, self.max_context)
        chunk = self.prefill_chunk if self.prefill_chunk is not None else min(DEFAULT_PREFILL_CHUNK, max_input_len)
        return EngineLimits(self.max_batch, max_input_len, self.max_context, self.opt_batch, chunk, self.max_logits)

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gb * GB)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            **self.limits.to_dict(),
            "workspace_gb": self.workspace_gb,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "hw_compat": self.hw_compat,
            "gpu_memory_gb": self.gpu_memory_gb,
            "target": self.target,
            "tensorrt_version": self.tensorrt_version,
        }

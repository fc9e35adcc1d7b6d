"""What differs between the decoder families mexport exports, declared once per family.

In the style of Optimum's per-architecture export configs and ONNX Runtime GenAI's builder subclasses: each module
of :mod:`mexport.models` (``gemma2``, ``llama``, ``qwen2``) builds one :class:`ModelFamily` and registers it under
the Hugging Face ``model_type``\\ s it covers. Every stage asks :func:`family_of` for the facts it needs (the export
config, the norm form a smoothing scale folds into, the BOS policy of scoring, the export-check tolerance rule, the
KV layout) instead of naming a family. This module is the base layer: it imports no stage and no heavy package.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mexport.errors import MexportError
from mexport.lazy import require

# how an RMSNorm applies its weight w to the normalized activations: the constant a smoothing scale divides
NORM_ONE_PLUS_WEIGHT = "(1 + w)"  # Gemma: normed * (1 + w), the expression evaluated as one constant
NORM_WEIGHT = "w"  # Llama, Qwen2: normed * w
NORM_FORMS = (NORM_ONE_PLUS_WEIGHT, NORM_WEIGHT)

# keys of a manifest's ``model_config`` copied from the Hugging Face config (missing ones recorded as None)
CONFIG_KEYS = (
    "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
    "intermediate_size", "vocab_size", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
    "max_position_embeddings", "tie_word_embeddings", "rope_theta",
)


@dataclass(frozen=True)
class SpecialTokens:
    """A family's special tokens as its tokenizer names them, and whether prompts start with BOS.

    ``adds_bos``: the tokenizer prepends ``bos`` to every encoded text and lm-eval's HF backend scores prompts with
    it (Gemma's ``<bos>``, Llama-3's ``<|begin_of_text|>``); scoring then refuses a tokenizer that drops it. Without
    it (Qwen2: no BOS at all) prompts are scored as the tokenizer encodes them, as lm-eval does.
    """

    bos: str | None
    eos: str
    pad: str
    unk: str | None
    adds_bos: bool
    extra: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        """Every special token, in the order a fixture tokenizer assigns their ids (from 0)."""
        named = (self.pad, self.eos, self.bos, self.unk, *self.extra)
        return tuple(dict.fromkeys(token for token in named if token))


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """Everything mexport needs to know about one decoder architecture (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    # Optimum's ONNX export config class for task text-generation-with-past with a position_ids input (imported
    # when called: Optimum is heavy)
    onnx_config: Callable[[], type]
    norm_form: str
    # the embedding output is multiplied by sqrt(hidden_size), a constant PyTorch keeps in the model dtype
    scales_embeddings: bool
    special_tokens: SpecialTokens
    # lowest token id the export check feeds (ids below are special tokens whose rows may be untrained)
    first_ordinary_token: int
    # q / k / v projections carry a bias (Qwen2); smoothing scales their weights' input rows, never the bias
    qkv_bias: bool
    # fixture name -> "module:function" writing it as fn(out_dir, name=..., seed=..., overwrite=...)
    fixtures: Mapping[str, str] = field(default_factory=dict)
    # the family's sliding window from a config.json (None: every layer attends to the whole context)
    sliding_window: Callable[[Mapping[str, Any]], int | None] = lambda config: config.get("sliding_window")

    def __post_init__(self) -> None:
        if self.norm_form not in NORM_FORMS:
            raise ValueError(f"{self.name}: norm form {self.norm_form!r} is not one of {NORM_FORMS}")

    @property
    def genai_model_type(self) -> str:
        """ONNX Runtime GenAI's ``model.type`` (its builder's names match transformers' for these families)."""
        return self.model_types[0]

    @property
    def adds_bos(self) -> bool:
        return self.special_tokens.adds_bos

    def head_dim(self, config: Mapping[str, Any]) -> int:
        """The attention head size (transformers' rule: ``head_dim`` when the config has one, else hidden / heads)."""
        return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))

    def rope(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Rotary embedding: theta and the scaling type (``llama3`` for Llama-3.1; ``default`` when unscaled)."""
        scaling = config.get("rope_scaling") or {}
        return {
            "theta": config.get("rope_theta"),
            "scaling": scaling.get("rope_type") or scaling.get("type") or "default",
            "scaling_factor": scaling.get("factor"),
        }

    def model_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The ``model_config`` a manifest records for a checkpoint with this ``config.json``: the shapes every
        later stage reads (layers, heads, KV heads, head_dim, vocab, window, softcaps) and the family's facts."""
        summary = {key: config.get(key) for key in CONFIG_KEYS}
        summary["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", True))
        summary.update(
            family=self.name,
            head_dim=self.head_dim(config),
            sliding_window=self.sliding_window(config),
            rope_scaling=self.rope(config)["scaling"],
            qkv_bias=self.qkv_bias,
            norm_form=self.norm_form,
            scales_embeddings=self.scales_embeddings,
        )
        return summary

    def kv_bytes_per_token(self, config: Mapping[str, Any], element_bytes: int) -> int:
        """KV-cache bytes one token adds: K and V of every layer's KV heads (sliding layers keep a full-length
        cache in the exported graph, as the global ones do)."""
        layers, kv_heads = int(config["num_hidden_layers"]), int(config["num_key_value_heads"])
        return 2 * layers * kv_heads * self.head_dim(config) * element_bytes

    def embedding_scale_rounds(self, dtype_name: str, hidden_size: int) -> bool:
        """Whether a ``dtype_name`` (torch name) model rounds its embedding scale sqrt(hidden): then its fp32
        compute differs from an fp32 reference by that one constant (the export check widens its bound)."""
        if not self.scales_embeddings:
            return False
        torch = require("torch", f"computing the embedding scale as {self.name} does")
        scale = hidden_size**0.5
        return float(torch.tensor(scale, dtype=getattr(torch, dtype_name))) != scale


def optimum_onnx_config(class_name: str) -> Callable[[], type]:
    """A loader of Optimum's ONNX export config ``class_name`` (imported when called: Optimum is heavy)."""

    def load() -> type:
        model_configs = require("optimum.exporters.onnx.model_configs", "the ONNX export configuration")
        return getattr(model_configs, class_name)

    return load


FAMILIES: dict[str, ModelFamily] = {}  # model_type -> family


def register(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        if model_type in FAMILIES:
            raise ValueError(f"model_type {model_type!r} registered twice ({FAMILIES[model_type].name}, {family.name})")
        FAMILIES[model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_for(model_type: str | None) -> ModelFamily:
    """The family of a Hugging Face ``model_type``; an unsupported one is bad input."""
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise MexportError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}",
            hint="mexport exports the Meditron3 suite's families (Gemma2, Llama, Qwen2)",
        )
    return family


def family_of(config: Mapping[str, Any]) -> ModelFamily:
    """The family of a ``config.json`` or a manifest's ``model_config`` (both record ``model_type``)."""
    return family_for(config.get("model_type"))


def fixture_families() -> dict[str, ModelFamily]:
    """Fixture name -> the family whose module writes it."""
    return {name: family for family in FAMILIES.values() for name in family.fixtures}

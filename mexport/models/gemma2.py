"""Gemma2 (Meditron3-Gemma2-2B / -9B): alternating sliding-window layers, softcaps, (1 + w) norms, scaled embeddings.

- Export config: Optimum's ``Gemma2OnnxConfig`` with a ``position_ids`` input (Optimum's own has none, so left-padded
  batches would get wrong rotary positions).
- Attention: sliding window on alternating layers (the 9B: 4096), attention-logit softcap 50, final-logit softcap
  30 (only the eager attention implements them), scale ``query_pre_attn_scalar ** -0.5`` (224 vs head_dim 256).
- RMSNorm: ``normed * (1 + w)``; SmoothQuant / AWQ divide the evaluated ``1 + w`` (never re-rounded).
- Embeddings multiplied by sqrt(hidden) in the model dtype (59.87 -> 59.75 in bf16 at hidden 3584): the export
  check of a bf16 / fp16 export computed in fp32 uses the wider bound when the dtype rounds it.
- Tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3; BOS prepended, and lm-eval forces it.
"""

from __future__ import annotations

from mexport.lazy import require
from mexport.models.base import NORM_ONE_PLUS_WEIGHT, ModelFamily, SpecialTokens, register


def _onnx_config() -> type:
    require("optimum.exporters.onnx", "the ONNX export configuration")
    from optimum.exporters.onnx.config import TextDecoderWithPositionIdsOnnxConfig
    from optimum.exporters.onnx.model_configs import Gemma2OnnxConfig

    class Gemma2WithPositionIdsOnnxConfig(TextDecoderWithPositionIdsOnnxConfig):
        NORMALIZED_CONFIG_CLASS = Gemma2OnnxConfig.NORMALIZED_CONFIG_CLASS
        DUMMY_INPUT_GENERATOR_CLASSES = Gemma2OnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES
        DUMMY_PKV_GENERATOR_CLASS = Gemma2OnnxConfig.DUMMY_PKV_GENERATOR_CLASS
        MIN_TRANSFORMERS_VERSION = Gemma2OnnxConfig.MIN_TRANSFORMERS_VERSION
        _MODEL_PATCHER = Gemma2OnnxConfig._MODEL_PATCHER

    return Gemma2WithPositionIdsOnnxConfig


GEMMA2 = register(
    ModelFamily(
        name="gemma2",
        model_types=("gemma2",),
        onnx_config=_onnx_config,
        norm_form=NORM_ONE_PLUS_WEIGHT,
        scales_embeddings=True,
        special_tokens=SpecialTokens(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", adds_bos=True),
        first_ordinary_token=4,  # pad, eos, bos, unk
        qkv_bias=False,
        fixtures={
            name: "mexport.fixtures.tiny_gemma2:make_fixture" for name in ("tiny-gemma2", "wide-gemma2", "window-gemma2")
        }
        | {"learned-gemma2": "mexport.fixtures.learned:make_learned_fixture"},
    )
)

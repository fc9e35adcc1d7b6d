"""Qwen2 (Meditron3-Qwen2.5-7B / -14B): grouped-query attention with q/k/v biases, ``w`` norms, no BOS.

- Export config: Optimum's ``Qwen2OnnxConfig`` (a ``position_ids`` input); no forward patch.
- Attention: q, k and v projections carry a bias (o_proj none); scale head_dim ** -0.5; rotary theta 1e6 (Qwen2.5),
  no scaling. ``config.json`` lists a ``sliding_window`` that applies only with ``use_sliding_window`` (false in
  every Qwen2.5 release): then every layer is global.
- RMSNorm: ``normed * w``; no embedding scale. Qwen2.5-7B and -14B store a separate LM head, the small ones
  (0.5B-3B) tie it. Smoothing divides a layer's input channels and scales its weight's input rows: the bias,
  added after the MatMul, is unchanged and stays correct.
- Tokenizer: no BOS at all (``bos_token`` null); ``<|endoftext|>`` is EOS and pad; lm-eval's HF backend scores
  prompts as encoded, without any prefix token.
"""

from __future__ import annotations

from mexport.models.base import NORM_WEIGHT, ModelFamily, SpecialTokens, optimum_onnx_config, register

QWEN2 = register(
    ModelFamily(
        name="qwen2",
        model_types=("qwen2",),
        onnx_config=optimum_onnx_config("Qwen2OnnxConfig"),
        norm_form=NORM_WEIGHT,
        scales_embeddings=False,
        special_tokens=SpecialTokens(
            bos=None, eos="<|endoftext|>", pad="<|endoftext|>", unk=None, adds_bos=False,
            extra=("<|im_start|>", "<|im_end|>"),
        ),
        first_ordinary_token=0,  # special ids are at the top of the vocabulary (from 151643)
        qkv_bias=True,
        fixtures={"tiny-qwen2": "mexport.fixtures.tiny_qwen2:make_fixture"},
        sliding_window=lambda config: config.get("sliding_window") if config.get("use_sliding_window") else None,
    )
)

"""Llama (Meditron3-8B and -70B are Llama-3.1): grouped-query attention, ``w`` norms, llama3 rope scaling.

- Export config: Optimum's ``LlamaOnnxConfig`` (it has a ``position_ids`` input); no forward patch.
- Attention: every layer global (no window, no softcap), scale head_dim ** -0.5, no q/k/v bias; rotary theta 500000
  with ``rope_scaling`` type ``llama3`` (the inverse frequencies are rescaled once, when the model is built, so the
  trace bakes the scaled table).
- RMSNorm: ``normed * w``; no embedding scale. Llama-3.1-8B / -70B store a separate LM head (untied), the 1B / 3B
  Llama-3.2 tie it.
- Tokenizer: ``<|begin_of_text|>`` prepended to every text (lm-eval's HF backend keeps it), ``<|end_of_text|>``
  as EOS; the 256 reserved special tokens sit at the top of the vocabulary (ids from 128000).
"""

from __future__ import annotations

from mexport.models.base import NORM_WEIGHT, ModelFamily, SpecialTokens, optimum_onnx_config, register

LLAMA = register(
    ModelFamily(
        name="llama",
        model_types=("llama",),
        onnx_config=optimum_onnx_config("LlamaOnnxConfig"),
        norm_form=NORM_WEIGHT,
        scales_embeddings=False,
        special_tokens=SpecialTokens(
            bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|finetune_right_pad_id|>", unk=None, adds_bos=True
        ),
        first_ordinary_token=0,  # special ids are at the top of the vocabulary
        qkv_bias=False,
        fixtures={"tiny-llama3": "mexport.fixtures.tiny_llama3:make_fixture"},
        sliding_window=lambda config: None,
    )
)

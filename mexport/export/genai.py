"""``genai_config.json`` beside an export or quantized graph, so ONNX Runtime GenAI (``onnxruntime_genai.Model``)
loads the directory as it is.

Written from what the manifest records (IO names, model config) and the model's ``config.json`` (BOS / EOS / PAD
ids). The decoder's sliding-window mask is inside the graph, so there is no ``sliding_window`` section (GenAI
would apply a second one); ``position_ids`` is listed as an input; the KV cache is not shared between past and
present (``past_present_share_buffer: false``: the graph's present is past + new, not a fixed-size buffer).

A graph with inputs GenAI cannot feed (the lean-logits ``logits_indices`` input) gets no config: GenAI only feeds
the inputs it knows, and pre-allocates ``logits`` as [batch, sequence, vocab]. Export with full logits for GenAI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mexport import strict_json
from mexport.formats import GRAPH_FILE, PAST_PREFIX, PRESENT_PREFIX
from mexport.fsutil import write_atomic
from mexport.models import family_of

GENAI_CONFIG = "genai_config.json"
GENAI_INPUTS = ("input_ids", "attention_mask", "position_ids")  # besides the past key / value inputs


def genai_config(model_config: dict[str, Any], io: dict[str, Any], token_ids: dict[str, Any]) -> dict[str, Any] | None:
    """The GenAI config for a decoder with this manifest ``model_config`` and ``io``; None when GenAI cannot feed
    its inputs."""
    names = [entry["name"] for entry in io["inputs"]]
    if any(name not in GENAI_INPUTS and not name.startswith(PAST_PREFIX) for name in names):
        return None
    context = int(model_config["max_position_embeddings"])
    inputs = {name: name for name in GENAI_INPUTS if name in names}
    return {
        "model": {
            "type": family_of(model_config).genai_model_type,
            "bos_token_id": token_ids.get("bos_token_id"),
            "eos_token_id": token_ids.get("eos_token_id"),
            "pad_token_id": token_ids.get("pad_token_id"),
            "context_length": context,
            "vocab_size": int(model_config["vocab_size"]),
            "decoder": {
                "filename": GRAPH_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": int(model_config["head_dim"]),
                "hidden_size": int(model_config["hidden_size"]),
                "num_attention_heads": int(model_config["num_attention_heads"]),
                "num_hidden_layers": int(model_config["num_hidden_layers"]),
                "num_key_value_heads": int(model_config["num_key_value_heads"]),
                "inputs": {
                    **inputs,
                    "past_key_names": f"{PAST_PREFIX}%d.key",
                    "past_value_names": f"{PAST_PREFIX}%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": f"{PRESENT_PREFIX}%d.key",
                    "present_value_names": f"{PRESENT_PREFIX}%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def write_genai_config(model_dir: Path, model_config: dict[str, Any], io: dict[str, Any]) -> list[str]:
    """Write ``genai_config.json`` into ``model_dir`` (which holds the model's ``config.json``); returns the names
    written (none when GenAI cannot run this graph form)."""
    hf_config = Path(model_dir) / "config.json"
    token_ids = json.loads(hf_config.read_text()) if hf_config.is_file() else {}
    config = genai_config(model_config, io, token_ids)
    if config is None:
        return []
    write_atomic(Path(model_dir) / GENAI_CONFIG, (strict_json.dumps(config, indent=2) + "\n").encode())
    return [GENAI_CONFIG]

"""ONNX Runtime GenAI loads export and quantized directories by their genai_config.json and decodes as mexport does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mexport.export.genai import GENAI_CONFIG, genai_config
from mexport.lazy import is_available

PROMPT = "Question: What is the first-line treatment of severe malaria?\nAnswer:"
NEW_TOKENS = 24


def _genai_greedy(model_dir: Path, prompt_ids: list[int]) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(token) for token in generator.get_sequence(0)[len(prompt_ids) :]]


def _mexport_greedy(model_dir: Path, prompt_ids: list[int]) -> list[int]:
    """What `mexport generate` runs: OrtDecoder.generate (stops at EOS; GenAI stops there too)."""
    import numpy as np

    from mexport.runtime.ort import OrtDecoder

    with OrtDecoder(model_dir) as runtime:
        return [
            int(t) for t in runtime.generate(np.array([prompt_ids]), NEW_TOKENS, eos_token_id=runtime_eos(model_dir))
        ]


def runtime_eos(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["eos_token_id"])


@pytest.fixture(scope="module")
def genai_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 export GenAI can run: with every position's logits (GenAI cannot feed a lean graph's
    logits_indices input)."""
    from mexport.export import export_onnx

    out = tmp_path_factory.mktemp("genai") / "fp32"
    export_onnx(tiny_checkpoint, out, dtype="fp32", validate=False, full_logits=True)
    return out


@pytest.fixture(scope="module")
def quantized_dir(genai_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mexport.optimize.quantize import quantize

    out = tmp_path_factory.mktemp("genai") / "int8-wo"
    quantize(genai_export, out, "int8-wo", check_prompts=1)
    return out


def test_config_names_the_decoder_io_without_sliding_window(genai_export: Path) -> None:
    config = json.loads((genai_export / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert "sliding_window" not in decoder
    assert config["search"]["past_present_share_buffer"] is False
    hf_config = json.loads((genai_export / "config.json").read_text())
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"], config["model"]["context_length"]) == (
        hf_config["bos_token_id"],
        hf_config["eos_token_id"],
        hf_config["max_position_embeddings"],
    )
    manifest = json.loads((genai_export / "mexport.json").read_text())
    assert GENAI_CONFIG in manifest["files"]  # hashed like every other file of the artifact


def test_no_config_for_a_graph_with_inputs_genai_cannot_feed(genai_export: Path) -> None:
    manifest = json.loads((genai_export / "mexport.json").read_text())
    io = manifest["io"]
    lean = {**io, "inputs": [*io["inputs"], {"name": "logits_indices", "dtype": "int64", "shape": ["logits_length"]}]}
    assert genai_config(manifest["model_config"], io, {}) is not None
    assert genai_config(manifest["model_config"], lean, {}) is None


@pytest.mark.skipif(not is_available("onnxruntime_genai"), reason="onnxruntime-genai not installed (mexport[genai])")
@pytest.mark.parametrize("which", ["export", "quantized"])
def test_genai_generates_the_same_greedy_tokens(which: str, genai_export: Path, request: pytest.FixtureRequest) -> None:
    from mexport.validate.backends import load_tokenizer

    model_dir = genai_export if which == "export" else request.getfixturevalue("quantized_dir")
    assert (model_dir / GENAI_CONFIG).is_file()
    prompt_ids = list(load_tokenizer(model_dir)(PROMPT)["input_ids"])
    expected = _mexport_greedy(model_dir, prompt_ids)
    assert len(expected) > 0
    assert _genai_greedy(model_dir, prompt_ids) == expected

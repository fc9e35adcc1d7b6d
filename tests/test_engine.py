"""TensorRT engine planning without TensorRT: profiles, build modes, memory estimates, refusals, error paths, CLI.

Manifests are built as dicts in the shape ``mexport onnx`` / ``mexport quantize`` write (the real 9B config and the
tiny fixture's), so every number below is checked against hand arithmetic. Nothing here builds or loads an engine:
that is tests/test_engine_gpu.py, on a host with TensorRT and a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mexport.cli import app
from mexport.errors import MexportError, MissingDependencyError
from mexport.manifest import new_manifest, write_manifest
from mexport.optimize.engine import EngineSettings, GpuInfo, build_engine, builder, gpus, plan_engine, write_plan
from mexport.optimize.engine.builder import engine_manifest
from mexport.optimize.engine.gpus import GPU_TARGETS, parse_nvidia_smi, require_cuda_gpu
from mexport.optimize.engine.precision import select_build_mode
from mexport.optimize.engine.profiles import derive_profiles
from mexport.runtime.base import RuntimeLimits
from mexport.runtime.trt import TrtDecoder, check_engine_compatibility
from mexport.trt_common import EngineLimits, require_tensorrt, version_tuple

runner = CliRunner()

GEMMA2_9B = {
    "model_type": "gemma2", "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 256, "hidden_size": 3584, "intermediate_size": 14336, "vocab_size": 256000, "sliding_window": 4096,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "parameter_count": 9_241_705_984,
}
TINY = {
    **GEMMA2_9B, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "hidden_size": 64, "intermediate_size": 128, "vocab_size": 1024, "sliding_window": 8,
    "max_position_embeddings": 512, "parameter_count": 200_000,
}
NUMPY_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def decoder_io(config: dict[str, Any], dtype: str, lean: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The io signature of an mexport export of ``config`` in ``dtype`` (``lean``: with logits_indices)."""
    float_dtype = NUMPY_DTYPES[dtype]
    tokens = ["batch_size", "sequence_length"]
    kv = ["batch_size", config["num_key_value_heads"], "past_sequence_length", config["head_dim"]]
    total = "past_sequence_length + sequence_length"
    present = ["batch_size", config["num_key_value_heads"], total, config["head_dim"]]
    cache = [(i, kind) for i in range(config["num_hidden_layers"]) for kind in ("key", "value")]
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": tokens},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch_size", total]},
            {"name": "position_ids", "dtype": "int64", "shape": tokens},
            *({"name": f"past_key_values.{i}.{kind}", "dtype": float_dtype, "shape": kv} for i, kind in cache),
            *([{"name": "logits_indices", "dtype": "int64", "shape": ["logits_length"]}] if lean else []),
        ],
        "outputs": [
            {"name": "logits", "dtype": float_dtype,
             "shape": ["batch_size", "logits_length" if lean else "sequence_length", config["vocab_size"]]},
            *({"name": f"present.{i}.{kind}", "dtype": float_dtype, "shape": present} for i, kind in cache),
        ],
    }


def model_dir(
    tmp_path: Path, config: dict[str, Any] = GEMMA2_9B, dtype: str = "bf16", recipe: str | None = None,
    files: dict[str, Any] | None = None, opset: int = 18, lean: bool = False,
) -> Path:
    """A model directory holding only the manifest (planning never opens the ONNX files)."""
    kind = "quantize" if recipe else "export"
    extra: dict[str, Any] = {"recipe": {"name": recipe}} if recipe else {}
    manifest = new_manifest(
        kind, status="passed", dtype=dtype, opset=opset, model_config=config, io=decoder_io(config, dtype, lean),
        files=files or {}, **extra,
    )
    directory = tmp_path / f"{kind}-{dtype}-{recipe}-{opset}-{'lean' if lean else 'full'}"
    directory.mkdir()
    write_manifest(directory, manifest)
    return directory


# -- profiles ------------------------------------------------------------------------------------------------


def test_tiny_profiles_cover_prefill_decode_and_chunks_consistently() -> None:
    io = decoder_io(TINY, "fp32")
    prefill, decode, chunk = derive_profiles(io["inputs"], EngineLimits(max_batch=4, max_input_len=128,
                                                                        max_context=256, opt_batch=2))
    assert [(p.index, p.name) for p in (prefill, decode, chunk)] == [(0, "prefill"), (1, "decode"), (2, "chunk")]
    ids, mask, past = (prefill.shapes[name] for name in ("input_ids", "attention_mask", "past_key_values.0.key"))
    assert (ids.min, ids.opt, ids.max) == ((1, 1), (2, 64), (4, 128))
    assert (mask.min, mask.opt, mask.max) == ((1, 1), (2, 64), (4, 128))  # past 0 + new tokens
    assert (past.min, past.opt, past.max) == ((1, 2, 0, 16), (2, 2, 0, 16), (4, 2, 0, 16))  # no past in prefill
    ids, mask, past = (decode.shapes[name] for name in ("input_ids", "attention_mask", "past_key_values.3.value"))
    assert (ids.min, ids.opt, ids.max) == ((1, 1), (2, 1), (4, 1))
    assert (mask.min, mask.opt, mask.max) == ((1, 1), (2, 129), (4, 256))  # past + 1, up to the whole context
    assert (past.min, past.opt, past.max) == ((1, 2, 0, 16), (2, 2, 128, 16), (4, 2, 255, 16))
    ids, mask, past = (chunk.shapes[name] for name in ("input_ids", "attention_mask", "past_key_values.0.key"))
    assert (ids.min, ids.opt, ids.max) == ((1, 1), (2, 64), (4, 128))  # new tokens after a past
    assert (past.min, past.opt, past.max) == ((1, 2, 1, 16), (2, 2, 128, 16), (4, 2, 255, 16))
    assert (mask.min, mask.opt, mask.max) == ((1, 2), (2, 192), (4, 383))
    assert "logits_length" not in chunk.symbols  # full-logits graph: no logits_indices input
    for profile in (prefill, decode, chunk):
        assert list(profile.shapes) == [entry["name"] for entry in io["inputs"]]
        for shape in profile.shapes.values():  # TensorRT's rule: min <= opt <= max on every axis
            assert all(lo <= mid <= hi for lo, mid, hi in zip(shape.min, shape.opt, shape.max, strict=True))


def test_lean_profiles_bound_logits_indices() -> None:
    limits = EngineLimits(max_batch=2, max_input_len=128, max_context=256, prefill_chunk=32, max_logits=16)
    prefill, decode, chunk = derive_profiles(decoder_io(TINY, "fp32", lean=True)["inputs"], limits)
    assert prefill.shapes["logits_indices"].max == chunk.shapes["logits_indices"].max == (16,)
    assert decode.shapes["logits_indices"].max == (1,) and prefill.shapes["input_ids"].max == (2, 32)
    assert chunk.symbols["logits_length"] == (1, 1, 16)


def test_9b_profiles_have_every_kv_input() -> None:
    prefill, decode, _ = derive_profiles(decoder_io(GEMMA2_9B, "bf16")["inputs"], EngineLimits(1, 2048, 8192))
    assert len(decode.shapes) == 3 + 2 * 42
    assert decode.shapes["past_key_values.41.value"].max == (1, 8, 8191, 256)
    assert prefill.shapes["past_key_values.41.value"].max == (1, 8, 0, 256)
    assert prefill.shapes["input_ids"].opt == (1, 1024)


def test_unknown_dimension_symbol_is_refused() -> None:
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence_length"]}]
    with pytest.raises(MexportError, match="input input_ids: dimension 'batch' uses 'batch'"):
        derive_profiles(inputs, EngineLimits(1, 8, 8))


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (EngineLimits(2, 8, 16, opt_batch=3), "--opt-batch 3 is larger than --max-batch 2"),
        (EngineLimits(1, 64, 32), "--max-input-len 64 is larger than --max-context 32"),
        (EngineLimits(1, 8, 1024), "--max-context 1024 exceeds the model's max_position_embeddings 512"),
        (EngineLimits(0, 8, 16), "--max-batch must be at least 1"),
    ],
)
def test_limits_are_checked(limits: EngineLimits, message: str) -> None:
    with pytest.raises(MexportError, match=message):
        limits.validate(max_position_embeddings=512)


# -- build mode per dtype / precision / recipe ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("graph", "precision", "recipe", "strongly_typed", "flags", "effective", "capability"),
    [
        ("bf16", "bf16", None, True, (), "bf16", (8, 0)),
        ("fp32", "fp32", None, True, (), "fp32", (7, 5)),
        ("fp32", "bf16", None, False, ("BF16",), "bf16", (8, 0)),
        ("fp32", "fp16", None, False, ("FP16",), "fp16", (7, 5)),
        ("bf16", "bf16", "fp8", True, (), "bf16", (8, 9)),
        ("bf16", "bf16", "int8-sq", True, (), "bf16", (8, 0)),
        ("bf16", "bf16", "int8-wo", True, (), "bf16", (8, 0)),
        ("bf16", "bf16", "int4-wo", True, (), "bf16", (8, 0)),
        ("fp32", "bf16", "int4-wo", True, (), "fp32", (8, 0)),  # strongly typed: the graph's fp32 rules
        ("fp16", "fp16", "int8-sq", True, (), "fp16", (7, 5)),  # INT8 tensor cores: Turing and newer
    ],
)
def test_build_mode_selection(
    graph: str, precision: str, recipe: str | None, strongly_typed: bool, flags: tuple[str, ...], effective: str,
    capability: tuple[int, int],
) -> None:
    mode = select_build_mode(graph, precision, recipe, "10.11")  # weak typing exists (and warns from 10.12)
    assert (mode.strongly_typed, mode.builder_flags, mode.precision, mode.recipe) == (
        strongly_typed, flags, effective, recipe
    )
    assert mode.min_capability == capability
    assert mode.min_tensorrt == "10.0"
    assert mode.notes  # every choice is explained in the plan


def test_engine_and_quantizer_share_one_recipe_registry() -> None:
    from mexport.optimize.engine import precision
    from mexport.optimize.quantize import RECIPES

    assert precision.RECIPES is RECIPES  # no second table to drift
    assert {name: (r.weight_bits, r.min_capability, r.build_mode) for name, r in RECIPES.items()} == {
        "fp8": (8, (8, 9), "strongly typed"), "int8-sq": (8, (7, 5), "strongly typed"),
        "int8-wo": (8, (7, 5), "strongly typed"), "int4-wo": (4, (8, 0), "strongly typed"),
    }


def test_tensorrt_11_never_proposes_weak_typing_or_flags() -> None:
    with pytest.raises(MexportError, match="TensorRT 11 removed weak typing and the BF16 builder flag") as error:
        select_build_mode("fp32", "bf16", None, "11.4")
    assert "mexport onnx --dtype bf16" in (error.value.hint or "")
    for graph, precision, recipe in [("bf16", "bf16", None), ("fp32", "fp32", None), ("bf16", "bf16", "int4-wo")]:
        mode = select_build_mode(graph, precision, recipe, "11.0")
        assert mode.strongly_typed and mode.builder_flags == () and mode.warnings == ()


def test_weak_typing_warns_from_tensorrt_10_12() -> None:
    assert select_build_mode("fp32", "bf16", None, "10.11").warnings == ()
    (warning,) = select_build_mode("fp32", "bf16", None, "10.12").warnings
    assert "deprecated in TensorRT 10.12 and removed in 11.0" in warning


def test_plan_states_the_tensorrt_version_it_targets(tmp_path: Path) -> None:
    from mexport.optimize.engine.precision import NEWEST_TENSORRT

    directory = model_dir(tmp_path)
    default = plan_engine(directory, EngineSettings()).to_dict()["tensorrt"]
    assert default["version"] == NEWEST_TENSORRT
    assert "the newest release the [gpu] extra" in default["source"]
    assert default["strongly_typed_only"] is True
    pinned = plan_engine(directory, EngineSettings(tensorrt_version="10.13")).tensorrt
    assert (pinned.version, pinned.source, pinned.strongly_typed_only) == ("10.13", "--tensorrt-version", False)
    with pytest.raises(MexportError, match=r"TensorRT 9.2 \(--tensorrt-version\) is outside the range"):
        plan_engine(directory, EngineSettings(tensorrt_version="9.2"))
    with pytest.raises(MexportError, match="not of the form X.Y"):
        plan_engine(directory, EngineSettings(tensorrt_version="eleven"))
    with pytest.raises(MexportError, match=r"needs TensorRT >= 10.15 \(ONNX opset 21\); the plan targets TensorRT"):
        plan_engine(model_dir(tmp_path, opset=21), EngineSettings(tensorrt_version="10.13"))


def test_gpu_extra_pins_the_supported_range() -> None:
    import tomllib

    from mexport.optimize.engine.precision import NEWEST_TENSORRT, SUPPORTED_TENSORRT

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["gpu"]
    assert f"tensorrt>={SUPPORTED_TENSORRT[0]},<{SUPPORTED_TENSORRT[1]}" in extra
    assert version_tuple(SUPPORTED_TENSORRT[0]) <= version_tuple(NEWEST_TENSORRT) < version_tuple(SUPPORTED_TENSORRT[1])


def test_default_precision_is_the_graph_dtype(tmp_path: Path) -> None:
    plan = plan_engine(model_dir(tmp_path, config=TINY, dtype="fp32"), EngineSettings(max_context=256))
    assert (plan.mode.precision, plan.mode.strongly_typed, plan.mode.builder_flags) == ("fp32", True, ())


def test_quantized_build_explains_strong_typing_and_ignored_precision() -> None:
    mode = select_build_mode("fp32", "bf16", "int4-wo")
    assert "strongly typed" in mode.notes[0] and "no precision flags" in mode.notes[0]
    assert mode.warnings == (
        "--precision bf16 has no effect on a strongly typed fp32 graph; quantize a bf16 export to change it",
    )


def test_fp16_warns_about_gemma2_overflow() -> None:
    assert "overflows" in select_build_mode("fp32", "fp16", None, "10.11").warnings[0]
    assert select_build_mode("fp32", "bf16", None, "10.11").warnings == ()


@pytest.mark.parametrize(
    ("graph", "precision", "recipe", "message"),
    [
        ("bf16", "fp16", None, "cannot build a bf16 export at fp16"),
        ("bf16", "fp32", None, "cannot build a bf16 export at fp32"),
        ("bf16", "int8", None, "unknown precision 'int8'"),
        ("bf16", "bf16", "nf4", "unknown quantization recipe 'nf4'"),
    ],
)
def test_impossible_build_modes_are_refused(graph: str, precision: str, recipe: str | None, message: str) -> None:
    with pytest.raises(MexportError, match=message):
        select_build_mode(graph, precision, recipe)


# -- plan and memory -----------------------------------------------------------------------------------------

# 9B in bf16: weights 9_241_705_984 x 2; KV 2 x 42 layers x 8 heads x 256 x 2 bytes = 344_064 bytes per token
WEIGHTS_BF16 = 18_483_411_968
KV_PER_TOKEN = 344_064
# batch 1, context 8192, default prefill chunk 256: the chunk profile (256 new tokens after up to 8191 cached) peaks:
# logits 256 x 256000 x 2 + one layer 256 x (2 x 14336 + 4 x 3584) x 2 + fp32 scores and probabilities
# 2 x 16 heads x 256 x min(8191 + 256, 8192) x 4
ACTIVATIONS_B1_L2048 = 256 * 256000 * 2 + 256 * 43008 * 2 + 2 * 16 * 256 * 8192 * 4
RESERVES = 4_000_000_000 + 1_000_000_000  # default --workspace 4 GB + CUDA reserve


def test_9b_bf16_fits_h100_at_batch_1_context_8192(tmp_path: Path) -> None:
    settings = EngineSettings(max_batch=1, max_context=8192, target="h100-80gb")
    plan = plan_engine(model_dir(tmp_path), settings)
    memory = plan.memory
    assert memory.weights_bytes == WEIGHTS_BF16
    assert memory.kv_bytes_per_token == KV_PER_TOKEN
    assert memory.kv_cache_bytes == KV_PER_TOKEN * 8192 == 2_818_572_288
    assert memory.activation_bytes == ACTIVATIONS_B1_L2048 == 421_527_552
    assert memory.total_bytes == WEIGHTS_BF16 + 2 * 2_818_572_288 + 421_527_552 + RESERVES == 29_542_084_096
    assert plan.fits is True and plan.gpu == GPU_TARGETS["h100-80gb"]
    assert (plan.mode.precision, plan.mode.strongly_typed, plan.min_tensorrt) == ("bf16", True, "10.0")


def test_9b_lean_plan_at_h100_defaults_keeps_activations_small(tmp_path: Path) -> None:
    """Full logits with 2048-token prefill calls plan 14.09 GB of activations at batch 8, input 2048, context 4096."""
    before = plan_engine(model_dir(tmp_path), EngineSettings(prefill_chunk=2048, target="h100-80gb"))
    plan = plan_engine(model_dir(tmp_path, lean=True), EngineSettings(target="h100-80gb"))
    limits = plan.settings.limits
    assert (limits.max_batch, limits.max_input_len, limits.max_context, limits.chunk) == (8, 2048, 4096, 256)
    # chunk profile: logits 8 x 64 x 256000 x 2 + layer 8 x 256 x 43008 x 2 + scores 2 x 8 x 16 x 256 x 4096 x 4
    assert plan.memory.activation_bytes == 262_144_000 + 176_160_768 + 1_073_741_824 == 1_512_046_592
    assert plan.memory.activation_bytes <= 2.5e9
    assert before.memory.activation_bytes > 14e9
    assert [profile.name for profile in plan.profiles] == ["prefill", "decode", "chunk"]
    assert plan.profiles[2].shapes["logits_indices"].max == (64,)
    assert plan.profiles[2].shapes["attention_mask"].max == (8, 4095 + 256)  # chunks reach the whole context


def test_chunked_prefill_reaches_8192_with_a_short_prefill_profile(tmp_path: Path) -> None:
    plan = plan_engine(model_dir(tmp_path, lean=True), EngineSettings(max_batch=1, max_input_len=8192,
                                                                      max_context=8192, target="h100-80gb"))
    prefill, _, chunk = plan.profiles
    assert prefill.shapes["input_ids"].max == (1, 256) < (1, 8192)
    assert chunk.shapes["past_key_values.0.key"].max == (1, 8, 8191, 256)
    assert plan.fits is True


def test_limits_adapt_to_a_small_context(tmp_path: Path) -> None:
    plan = plan_engine(model_dir(tmp_path, config=TINY), EngineSettings(max_context=256))
    assert (plan.settings.limits.max_input_len, plan.settings.limits.chunk) == (256, 256)
    small = plan_engine(model_dir(tmp_path, config=TINY, lean=True), EngineSettings(max_context=100, max_logits=8))
    assert small.settings.limits.max_input_len == 100 and small.profiles[0].shapes["logits_indices"].max == (8,)
    with pytest.raises(MexportError, match="--prefill-chunk 300 is larger than --max-input-len 256"):
        plan_engine(model_dir(tmp_path, config=TINY, dtype="fp32"), EngineSettings(max_context=256, prefill_chunk=300))


def test_9b_bf16_is_refused_on_l4_with_the_numbers(tmp_path: Path) -> None:
    with pytest.raises(MexportError) as error:
        plan_engine(model_dir(tmp_path), EngineSettings(max_batch=1, max_context=8192, target="l4-24gb"))
    message = error.value.message
    assert "does not fit on NVIDIA L4 24GB (24.15 GB)" in message
    assert "needs about 29.54 GB = weights 18.48 GB + KV cache 2 x 2.82 GB + activations 421.53 MB" in message
    assert "int4-wo" in (error.value.hint or "")


def test_9b_int4_weight_only_is_smaller_and_fits_l4(tmp_path: Path) -> None:
    settings = EngineSettings(max_batch=1, max_context=8192, target="l4-24gb")
    plan = plan_engine(model_dir(tmp_path, recipe="int4-wo"), settings)
    embedding = 256000 * 3584  # kept in bf16 by weight-only recipes
    assert plan.memory.weights_bytes == (9_241_705_984 - embedding) // 2 + embedding * 2 == 5_997_108_992
    assert plan.memory.weights_bytes < WEIGHTS_BF16 / 3
    assert plan.memory.total_bytes == 5_997_108_992 + 2 * 2_818_572_288 + ACTIVATIONS_B1_L2048 + RESERVES
    assert plan.fits is True
    assert plan.mode.strongly_typed and plan.mode.builder_flags == ()


def test_quantized_weights_come_from_the_manifest_files(tmp_path: Path) -> None:
    files = {"model.onnx": {"bytes": 3_000_000, "sha256": "0"}, "model.onnx.data": {"bytes": 6_100_000_000,
             "sha256": "0"}, "tokenizer.json": {"bytes": 34_000_000, "sha256": "0"}}
    plan = plan_engine(model_dir(tmp_path, recipe="int4-wo", files=files), EngineSettings())
    assert plan.memory.weights_bytes == 6_103_000_000
    assert plan.memory.weights_source == "quantized ONNX files (int4-wo)"


def test_fp8_needs_ada_or_hopper(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, recipe="fp8")
    with pytest.raises(MexportError, match=r"recipe fp8 needs compute capability >= 8.9 \(Ada or newer\); "
                                           r"NVIDIA A100 80GB is 8.0 \(Ampere\)"):
        plan_engine(directory, EngineSettings(target="a100-80gb"))
    assert plan_engine(directory, EngineSettings(max_batch=1, target="l4-24gb")).fits is True
    assert plan_engine(directory, EngineSettings(target="h100-80gb")).fits is True


def test_gpu_memory_budget_and_unchecked_plans(tmp_path: Path) -> None:
    directory = model_dir(tmp_path)
    assert plan_engine(directory, EngineSettings()).fits is None  # no GPU named: estimated, not checked
    plan = plan_engine(directory, EngineSettings(gpu_memory_gb=100))
    assert plan.gpu == GpuInfo("100 GB GPU", 100_000_000_000) and plan.fits is True
    with pytest.raises(MexportError, match="--target and --gpu-memory both given"):
        plan_engine(directory, EngineSettings(gpu_memory_gb=100, target="l4-24gb"))
    with pytest.raises(MexportError, match="unknown GPU target 'v100'"):
        plan_engine(directory, EngineSettings(target="v100"))
    with pytest.raises(MexportError, match=r"unknown --hw-compat 'turing\+'"):
        plan_engine(directory, EngineSettings(hw_compat="turing+"))
    local = GpuInfo("NVIDIA L4", GPU_TARGETS["l4-24gb"].memory_bytes, (8, 9))
    with pytest.raises(MexportError, match="does not fit on NVIDIA L4"):
        plan_engine(directory, EngineSettings(), local_gpu=local)  # a build checks the GPU it runs on


def test_opset_sets_the_minimum_tensorrt(tmp_path: Path) -> None:
    assert plan_engine(model_dir(tmp_path, opset=21), EngineSettings()).min_tensorrt == "10.15"
    fp16 = EngineSettings(precision="fp16", tensorrt_version="11.5")
    assert plan_engine(model_dir(tmp_path, dtype="fp16", opset=25), fp16).min_tensorrt == "11.5"
    with pytest.raises(MexportError, match="ONNX opset 26 is outside what any TensorRT parser mexport knows documents"):
        plan_engine(model_dir(tmp_path, dtype="fp32", opset=26), EngineSettings())


def test_fp32_export_built_at_bf16_keeps_fp32_io_for_the_kv_cache(tmp_path: Path) -> None:
    settings = EngineSettings(precision="bf16", max_batch=1, max_context=8192, tensorrt_version="10.11")
    plan = plan_engine(model_dir(tmp_path, dtype="fp32"), settings)
    assert plan.mode.builder_flags == ("BF16",) and not plan.mode.strongly_typed
    assert plan.memory.weights_bytes == WEIGHTS_BF16  # weights are converted to bf16 ...
    assert plan.memory.kv_bytes_per_token == 2 * KV_PER_TOKEN  # ... but the cache IO stays fp32


def test_plan_dict_records_every_decision(tmp_path: Path) -> None:
    plan = plan_engine(model_dir(tmp_path, recipe="fp8"), EngineSettings(max_batch=2, target="h100-80gb"))
    record = json.loads(json.dumps(plan.to_dict()))
    assert record["source_kind"] == "quantize"
    assert record["build"]["recipe"] == "fp8" and record["build"]["strongly_typed"] is True
    assert record["build"]["builder_flags"] == [] and record["build"]["min_compute_capability"] == "8.9"
    assert record["tensorrt_min"] == "10.0" and record["hardware_compatibility"] == "none"
    assert [profile["name"] for profile in record["profiles"]] == ["prefill", "decode", "chunk"]
    decode_mask = record["profiles"][1]["inputs"]["attention_mask"]
    assert decode_mask == {"min": [1, 1], "opt": [1, 2049], "max": [2, 4096]}
    assert record["gpu"]["compute_capability"] == "9.0" and record["fits"] is True
    assert record["memory"]["total_bytes"] == plan.memory.total_bytes
    assert record["engine_bytes_estimate"] == plan.memory.weights_bytes


def test_write_plan_never_replaces_silently(tmp_path: Path) -> None:
    plan = plan_engine(model_dir(tmp_path), EngineSettings())
    path = write_plan(plan, tmp_path / "engine")
    assert json.loads(path.read_text())["profiles"][0]["name"] == "prefill"
    with pytest.raises(MexportError, match="plan.json: already exists"):
        write_plan(plan, tmp_path / "engine")
    write_plan(plan, tmp_path / "engine", overwrite=True)


def test_source_manifest_must_be_an_export_or_quantize(tmp_path: Path) -> None:
    write_manifest(tmp_path, new_manifest("validate"))
    with pytest.raises(MexportError, match="manifest kind is 'validate'"):
        plan_engine(tmp_path, EngineSettings())
    write_manifest(tmp_path, new_manifest("export", dtype="bf16", opset=18, model_config=TINY))
    with pytest.raises(MexportError, match="manifest has no 'io'"):
        plan_engine(tmp_path, EngineSettings())


# -- missing TensorRT / GPU ----------------------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import tensorrt` gives what tensorrt-stubs alone installs: a namespace package without Builder."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))


def test_stubs_only_tensorrt_is_reported_with_the_install_hint(no_tensorrt: None) -> None:
    with pytest.raises(MissingDependencyError, match=r"TensorRT not installed \(only type stubs\): the 'tensorrt' "
                                                     "module found has no Builder") as error:
        require_tensorrt()
    hint = error.value.hint or ""
    assert "pip install 'mexport[gpu]' on a host with an NVIDIA GPU and CUDA" in hint
    assert "`mexport engine MODEL_DIR -o OUT --plan` works without TensorRT" in hint


def test_tensorrt_bindings_without_libraries_count_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what a failing import looks like
    with pytest.raises(MissingDependencyError, match="the 'tensorrt' Python module does not import"):
        require_tensorrt()


def test_no_gpu_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "detect_gpus", list)
    with pytest.raises(MexportError, match="no CUDA GPU found: TensorRT is installed"):
        require_cuda_gpu()


def test_detection_falls_back_to_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "_torch_gpus", list)  # CPU-only torch
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    assert gpus.detect_gpus() == []  # no driver tools either: no GPU, no error
    answer = subprocess.CompletedProcess([], 0, stdout="NVIDIA L4, 23034, 8.9\n", stderr="")
    monkeypatch.setattr(gpus.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(gpus.subprocess, "run", lambda *args, **kwargs: answer)
    assert gpus.detect_gpus() == [GpuInfo("NVIDIA L4", 23034 << 20, (8, 9))]
    failed = subprocess.CompletedProcess([], 9, stdout="", stderr="No devices were found")
    monkeypatch.setattr(gpus.subprocess, "run", lambda *args, **kwargs: failed)
    assert gpus.detect_gpus() == []


def test_nvidia_smi_output_is_parsed() -> None:
    text = "NVIDIA H100 80GB HBM3, 81559, 9.0\nNVIDIA L4, 23034, 8.9\n"
    assert parse_nvidia_smi(text) == [
        GpuInfo("NVIDIA H100 80GB HBM3", 81559 << 20, (9, 0)),
        GpuInfo("NVIDIA L4", 23034 << 20, (8, 9)),
    ]


def test_build_checks_tensorrt_then_gpu_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_tensorrt: None
) -> None:
    source = model_dir(tmp_path, config=TINY, dtype="fp32")
    out = tmp_path / "engine"
    settings = EngineSettings(max_batch=2, max_input_len=64, max_context=128)
    with pytest.raises(MexportError, match="no model.onnx"):
        build_engine(source, out, settings)
    (source / "model.onnx").write_bytes(b"graph placeholder: never parsed, the build stops before")
    with pytest.raises(MissingDependencyError, match="TensorRT not installed"):
        build_engine(source, out, settings)
    monkeypatch.setattr(builder, "require_tensorrt", lambda: "10.13.0.35")
    monkeypatch.setattr(gpus, "detect_gpus", list)
    with pytest.raises(MexportError, match="no CUDA GPU found"):
        build_engine(source, out, settings)
    assert not out.exists()


# -- engine manifest and runtime checks ----------------------------------------------------------------------

H100 = GpuInfo("NVIDIA H100 80GB HBM3", 81559 << 20, (9, 0))


def test_engine_manifest_carries_what_the_runtime_needs(tmp_path: Path) -> None:
    source_dir = model_dir(tmp_path, config=TINY, dtype="fp32")
    plan = plan_engine(source_dir, EngineSettings(max_batch=2, max_input_len=64, max_context=128))
    source = json.loads((source_dir / "mexport.json").read_text())
    files = {"model.engine": {"bytes": 123, "sha256": "0"}}
    manifest = engine_manifest(plan, source, H100, "10.13.0.35", 12.34, files, tmp_path / "timing.cache")
    assert manifest["kind"] == "engine" and manifest["status"] == "not_validated"
    assert manifest["parent"] == source
    assert (manifest["io"], manifest["model_config"], manifest["dtype"]) == (source["io"], TINY, "fp32")
    engine = manifest["engine"]
    assert (engine["tensorrt_version"], engine["compute_capability"], engine["gpu"]) == (
        "10.13.0.35", "9.0", "NVIDIA H100 80GB HBM3"
    )
    assert engine["limits"] == {"max_batch": 2, "max_input_len": 64, "max_context": 128, "opt_batch": 1,
                                "prefill_chunk": 64, "max_logits": 64}
    assert engine["builder_flags"] == [] and engine["strongly_typed"] is True  # default precision: the graph's
    assert [profile["name"] for profile in engine["profiles"]] == ["prefill", "decode", "chunk"]
    assert (engine["engine_bytes"], engine["build_seconds"], engine["hardware_compatibility"]) == (123, 12.3, "none")


def test_engine_compatibility_names_both_sides() -> None:
    built = {"tensorrt_version": "10.13.0.35", "compute_capability": "9.0", "gpu": "NVIDIA H100",
             "hardware_compatibility": "none"}
    check_engine_compatibility(built, "10.13.0.35", "NVIDIA H100", (9, 0))
    with pytest.raises(MexportError, match="built with TensorRT 10.13.0.35 and TensorRT 10.8.0.43 is installed"):
        check_engine_compatibility(built, "10.8.0.43", "NVIDIA H100", (9, 0))
    with pytest.raises(MexportError) as error:
        check_engine_compatibility(built, "10.8.0.43", "NVIDIA L4", (8, 9))
    assert "TensorRT 10.13.0.35 and TensorRT 10.8.0.43" in error.value.message
    expected = "built on NVIDIA H100 (compute capability 9.0) and NVIDIA L4 has compute capability 8.9"
    assert expected in error.value.message
    assert "--hw-compat ampere+" in (error.value.hint or "")
    portable = {**built, "hardware_compatibility": "ampere+"}
    check_engine_compatibility(portable, "10.13.0.35", "NVIDIA A10G", (8, 6))
    with pytest.raises(MexportError, match="built for Ampere or newer GPUs and Tesla T4 has compute capability 7.5"):
        check_engine_compatibility(portable, "10.13.0.35", "Tesla T4", (7, 5))


def _engine_dir(tmp_path: Path) -> Path:
    """An engine directory whose manifest is real but whose model.engine holds no engine (error paths only)."""
    source_dir = model_dir(tmp_path, config=TINY, dtype="fp32")
    plan = plan_engine(source_dir, EngineSettings(max_batch=2, max_input_len=64, max_context=128))
    source = json.loads((source_dir / "mexport.json").read_text())
    directory = tmp_path / "engine"
    directory.mkdir()
    files = {"model.engine": {"bytes": 0, "sha256": "0"}}
    write_manifest(directory, engine_manifest(plan, source, H100, "10.13.0.35", 1.0, files, directory / "t.cache"))
    return directory


def test_trt_decoder_errors_before_touching_the_gpu(tmp_path: Path, no_tensorrt: None) -> None:
    directory = _engine_dir(tmp_path)
    with pytest.raises(MexportError, match="no model.engine"):
        TrtDecoder(directory)
    (directory / "model.engine").write_bytes(b"")  # never deserialized: activation stops at the missing TensorRT
    with pytest.raises(MexportError, match="CUDA devices only, not 'cpu'"):
        TrtDecoder(directory, device="cpu")
    decoder = TrtDecoder(directory)
    assert decoder.spec.num_layers == 4 and decoder.engine_limits == EngineLimits(2, 64, 128, 1, 64)
    assert decoder.limits == RuntimeLimits(max_batch=2, max_context=128, max_input_len=64)
    assert decoder.precision == "fp32 (TensorRT 10.13.0.35, strongly typed)"
    with pytest.raises(MissingDependencyError, match="TensorRT not installed"):
        decoder.activate()
    with pytest.raises(RuntimeError, match="outside its context"):
        decoder.forward(*([[2, 5]],) * 2)


def test_trt_decoder_refuses_other_kinds(tmp_path: Path) -> None:
    with pytest.raises(MexportError, match="manifest kind is 'export'"):
        TrtDecoder(model_dir(tmp_path, config=TINY))


# -- CLI -----------------------------------------------------------------------------------------------------


def test_cli_plan_prints_and_writes_plan_json(tmp_path: Path) -> None:
    source = model_dir(tmp_path, config=TINY, dtype="fp32")
    out = tmp_path / "engine"
    args = ["engine", str(source), "-o", str(out), "--plan", "--max-batch", "4", "--max-input-len", "64",
            "--max-context", "128", "--target", "l4-24gb"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "optimization profiles" in result.output and "GPU memory estimate" in result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["profiles"][1]["inputs"]["past_key_values.0.key"]["max"] == [4, 2, 127, 16]
    assert plan["build"]["builder_flags"] == [] and plan["fits"] is True
    assert plan["tensorrt"]["version"] == "11.4"
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output


def test_cli_plan_json_goes_to_stdout_only(tmp_path: Path) -> None:
    source = model_dir(tmp_path, config=TINY, dtype="fp32")
    out = tmp_path / "engine"
    args = ["engine", str(source), "-o", str(out), "--plan", "--json", "--max-input-len", "128", "--max-context", "256"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["max_context"] == 256
    assert not out.exists()


def test_cli_refuses_a_plan_that_does_not_fit(tmp_path: Path) -> None:
    result = runner.invoke(app, ["engine", str(model_dir(tmp_path)), "-o", str(tmp_path / "e"), "--plan",
                                 "--target", "l4-24gb"])
    assert result.exit_code == 2
    assert "does not fit on NVIDIA L4 24GB" in result.output
    assert not (tmp_path / "e").exists()


def test_cli_build_without_tensorrt_says_how_to_get_it(tmp_path: Path, no_tensorrt: None) -> None:
    source = model_dir(tmp_path, config=TINY, dtype="fp32")
    (source / "model.onnx").write_bytes(b"graph placeholder: never parsed, the build stops before")
    result = runner.invoke(app, ["engine", str(source), "-o", str(tmp_path / "e"), "--max-context", "256",
                                 "--max-input-len", "128"])
    assert result.exit_code == 3  # environment: a missing dependency
    assert "error: TensorRT not installed (only type stubs)" in result.output
    assert "hint: pip install 'mexport" in result.output and "--plan` works without TensorRT" in result.output


@pytest.mark.slow
def test_cli_plan_on_the_tiny_export(tiny_export_fp32: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["engine", str(tiny_export_fp32), "-o", str(tmp_path / "e"), "--plan", "--json",
                                 "--max-batch", "2", "--max-input-len", "32", "--max-context", "64"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    manifest = json.loads((tiny_export_fp32 / "mexport.json").read_text())
    names = [entry["name"] for entry in manifest["io"]["inputs"]]
    for profile in plan["profiles"]:  # every graph input gets a shape in both profiles
        assert sorted(profile["inputs"]) == sorted(names)
    assert plan["profiles"][1]["inputs"]["attention_mask"]["max"] == [2, 64]
    assert plan["build"]["precision"] == "fp32" and plan["build"]["builder_flags"] == []
    kv = manifest["model_config"]
    assert plan["memory"]["kv_bytes_per_token"] == 2 * kv["num_hidden_layers"] * kv["num_key_value_heads"] * kv[
        "head_dim"] * 4


def test_cli_plan_with_only_a_context_shows_version_profiles_and_lean_memory(tmp_path: Path) -> None:
    source = model_dir(tmp_path, config=TINY, lean=True)
    result = runner.invoke(app, ["engine", str(source), "-o", str(tmp_path / "e"), "--plan", "--max-context", "256",
                                 "--max-logits", "8"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.replace("│", " ").split())  # rich wraps table cells
    assert "11.4 (the newest release the [gpu] extra, tensorrt>=10.8,<12, allows)" in output
    assert "2 chunk" in output and "logits_indices" in output
    assert "logits for <= 8 positions" in output and "prefill chunk 256" in output
    plan = json.loads((tmp_path / "e" / "plan.json").read_text())
    assert plan["settings"]["max_input_len"] == 256 and plan["tensorrt"]["version"] == "11.4"
    assert plan["compatibility"]["checked"] is False  # a manifest-only directory: nothing to hold to the rules


def test_cli_plans_for_another_tensorrt_version(tmp_path: Path) -> None:
    source = model_dir(tmp_path, config=TINY, dtype="fp32")
    args = ["engine", str(source), "-o", str(tmp_path / "e"), "--plan", "--json", "--max-context", "256",
            "--precision", "bf16"]
    on_11 = runner.invoke(app, args)
    assert on_11.exit_code == 2 and "TensorRT 11 removed weak typing" in on_11.output
    on_10 = runner.invoke(app, [*args, "--tensorrt-version", "10.13"])
    assert on_10.exit_code == 0, on_10.output
    plan = json.loads(on_10.stdout)
    assert plan["build"]["builder_flags"] == ["BF16"] and plan["tensorrt"]["source"] == "--tensorrt-version"
    assert "weak typing is deprecated in TensorRT 10.13" in on_10.output


def test_plan_says_whether_onnx_runtime_cuda_can_run_the_model(tmp_path: Path) -> None:
    """A GPU validation must not fall back to the CPU: the plan says when the engine is the way to run it."""
    bf16_int4 = plan_engine(model_dir(tmp_path, recipe="int4-wo"), EngineSettings()).to_dict()["onnxruntime_cuda"]
    assert bf16_int4["runs"] is False and "bfloat16 scales" in bf16_int4["reason"]
    fp16_int8 = plan_engine(model_dir(tmp_path, dtype="fp16", recipe="int8-wo"), EngineSettings(max_context=512))
    assert fp16_int8.to_dict()["onnxruntime_cuda"] == {"runs": True, "reason": None}
    assert plan_engine(model_dir(tmp_path), EngineSettings()).ort_cuda_gap is None  # plain exports run on CUDA
    result = runner.invoke(app, ["engine", str(model_dir(tmp_path, recipe="fp8")), "-o", str(tmp_path / "e"),
                                 "--plan", "--max-context", "256"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.replace("│", " ").split())
    assert "ONNX Runtime CUDA" in output and "validate on the GPU through this engine" in output

"""Exporter unit tests: checkpoint reading and the refusals that must happen before anything is written."""

from __future__ import annotations

import json
import shutil
import struct
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from mexport.checkpoint import read_safetensors_header, resolve_checkpoint
from mexport.errors import MexportError
from mexport.export.graph import StoredTensor, assign_offsets
from mexport.formats import LARGE_ALIGNMENT, SMALL_ALIGNMENT


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def _copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_header_parsing_gives_exact_byte_ranges(tmp_path: Path) -> None:
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64)}
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, tensors)
    table = read_safetensors_header(path)
    assert set(table) == {"a", "b"}
    raw = path.read_bytes()
    for name, expected in tensors.items():
        location = table[name]
        assert location.shape == expected.shape
        assert raw[location.offset : location.offset + location.nbytes] == expected.tobytes()


def test_truncated_shard_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    _write_safetensors(path, {"w": np.ones((64, 64), dtype=np.float32)})
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(MexportError, match="truncated"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "content", [b"\x00\x01", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 5) + b"nope!"], ids=str
)
def test_corrupt_header_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(MexportError, match="safetensors"):
        read_safetensors_header(path)


def test_index_naming_a_missing_shard_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MexportError, match="model-00002-of-00002.safetensors, which is missing"):
        resolve_checkpoint(checkpoint)


def test_sharded_checkpoint_reads_every_shard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    checkpoint = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for filename, members in halves.items():
        save_file({name: tensors[name] for name in members}, str(checkpoint / filename))
    weight_map = {name: filename for filename, members in halves.items() for name in members}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    resolved = resolve_checkpoint(checkpoint)
    assert [f.name for f in resolved.weight_files] == list(halves)
    assert set(resolved.tensors) == set(names)
    assert {resolved.tensors[name].file.name for name in names} == set(halves)


def test_other_architectures_are_refused_naming_the_supported_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(MexportError, match="unsupported architecture 'mistral'; supported: gemma2, llama, qwen2"):
        resolve_checkpoint(checkpoint)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(MexportError, match="no such file or directory"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(MexportError, match="no config.json"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(MexportError, match="not a safetensors checkpoint"):
        resolve_checkpoint(tmp_path)


def test_non_empty_output_dir_is_refused_before_work(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from mexport.export import export_onnx

    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user file")
    with pytest.raises(MexportError, match="not empty"):
        export_onnx(tiny_checkpoint, output, validate=False)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_not_enough_disk_space_says_how_much_is_needed(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mexport.export import export_onnx

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 500, 500))
    with pytest.raises(MexportError, match=r"not enough disk space .*needs \d+\.\d+ (KB|MB), 500 B free"):
        export_onnx(tiny_checkpoint, tmp_path / "out", dtype="fp32", validate=False)
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == [".out.lock"]  # only the (empty) lock the export took first


@pytest.mark.parametrize(("option", "value"), [("dtype", "int8"), ("device", "tpu"), ("opset", 9)])
def test_bad_options_are_refused(tiny_checkpoint: Path, tmp_path: Path, option: str, value: object) -> None:
    from mexport.export import export_onnx

    with pytest.raises(MexportError, match=option if option != "device" else "device"):
        export_onnx(tiny_checkpoint, tmp_path / "out", **{option: value})  # type: ignore[arg-type]


def test_large_tensors_are_aligned_for_memory_mapping() -> None:
    stored = [
        StoredTensor("norm", "norm", "none", (3,), "bf16"),
        StoredTensor("big", "big", "none", (1024, 1024), "fp32"),
        StoredTensor("small", "small", "none", (5,), "fp16"),
    ]
    total = assign_offsets(stored)
    assert [t.offset % a for t, a in zip(stored, (SMALL_ALIGNMENT, LARGE_ALIGNMENT, SMALL_ALIGNMENT))] == [0, 0, 0]
    assert stored[1].offset == LARGE_ALIGNMENT and stored[1].nbytes == 4 << 20
    assert total == stored[2].offset + 10


def test_manifest_io_signature_matches_the_graph(tiny_export_fp32: Path) -> None:
    import onnx

    manifest = json.loads((tiny_export_fp32 / "mexport.json").read_text())
    io = manifest["io"]
    names = [entry["name"] for entry in io["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    layers = manifest["model_config"]["num_hidden_layers"]
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert names[3:] == [*past, "logits_indices"]
    by_name = {entry["name"]: entry for entry in io["inputs"] + io["outputs"]}
    assert by_name["attention_mask"]["shape"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert by_name["past_key_values.0.key"] == {
        "name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch_size", 2, "past_sequence_length", 32]
    }
    assert by_name["logits_indices"] == {"name": "logits_indices", "dtype": "int64", "shape": ["logits_length"]}
    assert by_name["logits"]["shape"] == ["batch_size", "logits_length", 1024]
    graph = onnx.load(str(tiny_export_fp32 / "model.onnx"), load_external_data=False).graph
    assert [v.name for v in graph.input] == names
    assert [v.name for v in graph.output] == [entry["name"] for entry in io["outputs"]]
    assert manifest["model_config"]["parameter_count"] == 263232


def test_validation_memory_is_one_copy_of_the_larger_weights(tiny_checkpoint: Path) -> None:
    from mexport.export.verify import VALIDATION_OVERHEAD_BYTES, validation_memory_bytes

    checkpoint = resolve_checkpoint(tiny_checkpoint)  # bf16
    parameters = 263232
    overhead = VALIDATION_OVERHEAD_BYTES
    assert validation_memory_bytes(checkpoint, "bf16") == int(1.1 * checkpoint.weight_bytes) + overhead
    assert validation_memory_bytes(checkpoint, "fp32") == int(1.1 * 4 * parameters) + overhead  # the fp32 export


def test_cpu_validation_that_cannot_fit_in_ram_is_refused_before_work(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    from mexport.export import export_onnx

    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(100 << 20))
    message = r"validating this bf16 export on CPU needs about 1\.07 GB of RAM, 104\.86 MB available"
    with pytest.raises(MexportError, match=message) as caught:
        export_onnx(tiny_checkpoint, tmp_path / "out", dtype="bf16")
    assert caught.value.hint is not None and "--no-validate" in caught.value.hint
    assert not (tmp_path / "out").exists()
    export_onnx(tiny_checkpoint, tmp_path / "out", dtype="bf16", device="cpu", validate=False)  # nothing to check


@pytest.mark.parametrize(
    ("dtype", "compute", "hidden_size", "expected"),
    [
        ("bf16", "fp32", 64, "fp32"),  # sqrt(64) = 8: exact in bf16, the fp32 bound applies
        ("bf16", "fp32", 3584, "rounded"),  # 59.87 -> 59.75 in bf16 (Meditron3-Gemma2-9B)
        ("fp16", "fp32", 3584, "rounded"),  # 59.87 -> 59.88 in fp16
        ("fp16", "fp32", 256, "fp32"),
        ("bf16", "bf16", 3584, "bf16"),  # native compute: compared with PyTorch in the same dtype
        ("fp32", "fp32", 3584, "fp32"),
    ],
)
def test_tolerance_follows_what_is_computed(dtype: str, compute: str, hidden_size: int, expected: str) -> None:
    from mexport.export.verify import ROUNDED_SCALE_TOLERANCE, TOLERANCES, tolerance_for

    tolerance = tolerance_for(dtype, compute, {"model_type": "gemma2", "hidden_size": hidden_size})
    assert tolerance == (ROUNDED_SCALE_TOLERANCE if expected == "rounded" else TOLERANCES[expected])


GEMMA2_9B_CONFIG = {
    "num_hidden_layers": 42, "hidden_size": 3584, "intermediate_size": 14336, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 256, "sliding_window": 4096,
}
NARROW_WINDOW_CONFIG = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "sliding_window": 4096,
}


def test_forward_flops_counts_projections_mlp_and_attention() -> None:
    from mexport.export.verify import forward_flops

    # q,k,v,o: 64 x 32 x (4 + 4 + 2 + 2); MLP: 3 x 64 x 128; scores and weighted sum: 2 x 2 x 4 heads x 32 x S^2
    per_token = 64 * 32 * 12 + 3 * 64 * 128
    assert forward_flops(NARROW_WINDOW_CONFIG, 10) == 2 * 2 * 10 * per_token + 4 * 2 * 4 * 32 * 100


@pytest.mark.parametrize(
    ("config", "long_check", "length", "exercised", "forced"),
    [
        (NARROW_WINDOW_CONFIG, False, 4096 + 64, True, False),  # ~1.1e11 FLOPs: within the budget
        (GEMMA2_9B_CONFIG, False, 24, False, False),  # ~4.6e14 FLOPs: short check, window not exercised
        (GEMMA2_9B_CONFIG, True, 4096 + 64, True, True),  # --long-check
        ({**NARROW_WINDOW_CONFIG, "sliding_window": 8}, False, 14, True, False),  # the tiny fixture: short check
        ({**NARROW_WINDOW_CONFIG, "sliding_window": None}, True, 24, False, False),  # no window to pass
    ],
)
def test_the_check_passes_the_window_when_affordable_or_forced(
    config: dict, long_check: bool, length: int, exercised: bool, forced: bool
) -> None:
    from mexport.export.verify import LONG_CHECK_CHUNK, LONG_CHECK_FLOPS, plan_check

    plan = plan_check(config, long_check)
    assert (plan.length, plan.window_exercised, plan.forced) == (length, exercised, forced)
    assert (plan.estimated_flops > LONG_CHECK_FLOPS) == (config is GEMMA2_9B_CONFIG)
    assert plan.prefill_chunk == (LONG_CHECK_CHUNK if length > 64 else None)

"""Shared test fixtures: the built-in tiny Gemma2 checkpoint, the learned one, and their ONNX exports, made once per
session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The learned fixture's cache (``MEXPORT_CACHE``): a temporary directory shared by the whole run, never the
    user's ``~/.cache``; ``MEXPORT_TEST_CACHE=DIR`` keeps it in DIR across runs instead."""
    cache = Path(os.environ.get("MEXPORT_TEST_CACHE") or tmp_path_factory.mktemp("mexport-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEXPORT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mexport.fixtures.tiny_gemma2 import make_fixture

    return make_fixture(tmp_path_factory.mktemp("ckpt") / "tiny-gemma2")


def _export(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, dtype: str) -> Path:
    from mexport.export import export_onnx

    out = tmp_path_factory.mktemp("export") / f"tiny-{dtype}"
    export_onnx(checkpoint, out, dtype=dtype)
    return out


@pytest.fixture(scope="session")
def tiny_export_fp32(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    return _export(tmp_path_factory, tiny_checkpoint, "fp32")


@pytest.fixture(scope="session")
def tiny_export_bf16(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    return _export(tmp_path_factory, tiny_checkpoint, "bf16")


@pytest.fixture(scope="session")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma2 fine-tuned on the shipped questions (cached in $MEXPORT_CACHE): it has accuracy to lose."""
    from mexport.fixtures.learned import make_learned_fixture

    return make_learned_fixture(tmp_path_factory.mktemp("learned") / "learned-gemma2")


@pytest.fixture(scope="session")
def learned_export(tmp_path_factory: pytest.TempPathFactory, learned: Path) -> Path:
    from mexport.export import export_onnx

    out = tmp_path_factory.mktemp("export") / "learned-fp32"
    export_onnx(learned, out, dtype="fp32")
    return out

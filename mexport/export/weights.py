"""Streaming checkpoint tensors into ``model.onnx.data`` one chunk at a time.

Tensors are written in checkpoint-file order, so each shard is read front to back once: that read also yields the
shard's SHA-256 for the manifest, and the output file's SHA-256 is computed as it is written (both on background
threads: hashing costs as much as the I/O, and hashlib releases the GIL). A same-dtype tensor is a pure byte copy; a
dtype change is done chunk by chunk; only a transposed tensor (one Linear weight, at most a few hundred MB) is ever
whole in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mexport.checkpoint import TensorLocation
from mexport.errors import MexportError
from mexport.export.graph import StoredTensor
from mexport.formats import EXPORT_DTYPES
from mexport.lazy import require

CHUNK_BYTES = 64 << 20
HASH_QUEUE_CHUNKS = 2  # bounds the memory held by blocks waiting to be hashed


class _BackgroundDigest:
    """SHA-256 computed on its own thread; blocks handed to :meth:`update` must not be modified afterwards."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._blocks: queue.Queue[Any] = queue.Queue(maxsize=HASH_QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            self._digest.update(block)

    def update(self, block: Any) -> None:
        self._blocks.put(block)

    def hexdigest(self) -> str:
        self._blocks.put(None)
        self._thread.join()
        return self._digest.hexdigest()

SAFETENSORS_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class _ShardReader:
    """Reads byte ranges of one shard; forward reads are hashed, so one front-to-back pass gives its SHA-256."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path = path
        self.handle = handle
        self.digest = _BackgroundDigest()
        self.hashed_up_to = 0

    def chunks(self, offset: int, length: int) -> Iterator[bytes]:
        hashing = offset >= self.hashed_up_to
        if hashing:
            self._hash_until(offset)
        self.handle.seek(offset)
        remaining = length
        while remaining:
            block = self.handle.read(min(CHUNK_BYTES, remaining))
            if not block:
                raise MexportError(f"{self.path}: truncated while reading (file changed during export?)")
            if hashing:
                self.digest.update(block)
                self.hashed_up_to += len(block)
            remaining -= len(block)
            yield block

    def _hash_until(self, offset: int) -> None:
        """Hash the bytes skipped before ``offset`` (the header, or tensors the graph does not use)."""
        self.handle.seek(self.hashed_up_to)
        while self.hashed_up_to < offset:
            block = self.handle.read(min(CHUNK_BYTES, offset - self.hashed_up_to))
            if not block:
                break
            self.digest.update(block)
            self.hashed_up_to += len(block)

    def finish(self) -> str:
        self._hash_until(self.path.stat().st_size)
        return self.digest.hexdigest()


@dataclass(frozen=True)
class WeightsWritten:
    sha256: str
    bytes: int
    source_sha256: dict[Path, str]


def _convert(torch: Any, data: bytearray, source: TensorLocation, stored: StoredTensor) -> Any:
    """The bytes of ``data`` (a chunk of ``source``) as a tensor of the export dtype; refuses fp16 overflow."""
    source_dtype = getattr(torch, SAFETENSORS_TORCH_DTYPES[source.dtype])
    values = torch.frombuffer(data, dtype=source_dtype)
    if stored.transform == "transpose":
        values = values.reshape(source.shape).t()
    converted = values.to(getattr(torch, EXPORT_DTYPES[stored.dtype])).contiguous()
    overflowed = stored.dtype == "fp16" and source_dtype != torch.float16 and bool(torch.isinf(converted).any())
    if overflowed and not bool(torch.isinf(values).any()):
        raise MexportError(
            f"weight {source.name} overflows float16 (|value| > 65504)", hint="export with --dtype bf16 or fp32"
        )
    return converted.reshape(-1).view(torch.uint8).numpy()


def write_weights(
    path: Path,
    stored: list[StoredTensor],
    sources: dict[str, TensorLocation],
    source_files: tuple[Path, ...],
    on_bytes: Callable[[int], None] = lambda n: None,
) -> WeightsWritten:
    """Write every stored tensor at its offset in ``path`` (``sources``: initializer -> checkpoint tensor).

    ``stored`` should be in checkpoint order (file, offset) so the shards are read sequentially; every file of
    ``source_files`` is hashed, including shards holding no tensor the graph uses.
    """
    torch = require("torch", "converting weights")
    digest = _BackgroundDigest()
    written = 0
    with contextlib.ExitStack() as files:
        readers = {file: _ShardReader(file, files.enter_context(open(file, "rb"))) for file in source_files}
        out = files.enter_context(open(path, "wb"))

        def emit(block: Any) -> None:
            nonlocal written
            out.write(block)
            digest.update(block)
            written += len(block)
            on_bytes(len(block))

        for tensor in stored:
            source = sources[tensor.initializer]
            if tensor.offset > written:
                emit(bytes(tensor.offset - written))
            reader = readers[source.file]
            same_dtype = EXPORT_DTYPES[tensor.dtype] == SAFETENSORS_TORCH_DTYPES.get(source.dtype)
            if tensor.transform == "none" and same_dtype:
                for block in reader.chunks(source.offset, source.nbytes):
                    emit(block)
            elif tensor.transform == "none":
                for block in reader.chunks(source.offset, source.nbytes):
                    emit(_convert(torch, bytearray(block), source, tensor))
            else:
                whole = bytearray(source.nbytes)
                filled = 0
                for block in reader.chunks(source.offset, source.nbytes):
                    whole[filled : filled + len(block)] = block
                    filled += len(block)
                emit(_convert(torch, whole, source, tensor))
        source_sha256 = {file: reader.finish() for file, reader in readers.items()}
    return WeightsWritten(digest.hexdigest(), written, source_sha256)

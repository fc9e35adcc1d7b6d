"""The artifact manifest, ``mexport.json``, written beside every output.

Every stage records what it read (inputs and their hashes), how it ran (versions, dtype, recipe, settings) and
what it produced (IO signature, files, check results); later stages read it instead of guessing. The parent
stage's manifest is embedded so a quantized model or engine carries its whole lineage.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from mexport import __version__
from mexport.errors import MexportError

MANIFEST_NAME = "mexport.json"
SCHEMA_VERSION = 1

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "polygraphy",
)


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when absent) without importing the packages."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    """Streamed SHA-256 of a file (weights can be tens of GB; never read whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """``files`` entry of a manifest: bytes and sha256 of every file beside it (the manifest itself excluded)."""
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(Path(directory).iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def new_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """A manifest skeleton for stage ``kind`` ("export", "quantize", "engine", ...)."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        "mexport_version": __version__,
        "created": utc_now(),
        "versions": package_versions(),
        **fields,
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``mexport.json`` atomically (temp file + rename) so a crash never leaves half a manifest."""
    target = Path(directory) / MANIFEST_NAME
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, target)
    return target


def read_manifest(directory: Path, expected_kind: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a stage's manifest, with a clear error when the directory is not an mexport artifact."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise MexportError(f"{directory}: not a directory")
    if not path.is_file():
        raise MexportError(
            f"{directory}: no {MANIFEST_NAME} (not an mexport artifact)",
            hint="export the model first with `mexport onnx MODEL -o DIR`",
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MexportError(f"{path}: malformed manifest ({exc})") from exc
    if expected_kind is not None and manifest.get("kind") not in expected_kind:
        raise MexportError(
            f"{directory}: manifest kind is {manifest.get('kind')!r}, expected one of {', '.join(expected_kind)}"
        )
    return manifest


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable hash of a settings dict (used to tell whether an existing output matches a request)."""
    return sha256_bytes(json.dumps(settings, sort_keys=True, default=str).encode())[:16]

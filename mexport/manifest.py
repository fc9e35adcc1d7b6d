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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mexport import __version__, strict_json
from mexport.errors import IntegrityError, MexportError
from mexport.formats import EXPORT_DTYPES, GRAPH_FILE, PAST_PREFIX
from mexport.fsutil import UNFINISHED_DIR, write_atomic
from mexport.lazy import require

GRAPH_KINDS = ("export", "quantize")  # artifacts whose graph is model.onnx

MANIFEST_NAME = "mexport.json"
SCHEMA_VERSION = 1
# beside the manifest: which files were fully hashed, keyed by their stat (see verify_artifact); never recorded
STAMP_NAME = ".mexport-verified.json"

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
        if path.is_file() and path.name not in (MANIFEST_NAME, STAMP_NAME)
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
    tmp.write_text(strict_json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, target)
    return target


def read_manifest(
    directory: Path, expected_kind: tuple[str, ...] | None = None, *, verify: bool = False
) -> dict[str, Any]:
    """Read a stage's manifest, with a clear error when the directory is not an mexport artifact.

    ``verify``: also check every recorded file against its hash (:func:`verify_artifact`) and, for ONNX
    artifacts, the graph's IO and dtype against the manifest's (:func:`check_graph_io`); every stage that
    reads an artifact's files passes it.
    """
    directory = Path(directory)
    refuse_unfinished(directory)
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
    if verify:
        verify_files(directory, manifest)
        if manifest.get("kind") in GRAPH_KINDS and (directory / GRAPH_FILE).is_file():  # a recorded one is checked
            check_graph_io(manifest, _graph_header(directory / GRAPH_FILE), directory)
    return manifest


def verify_artifact(directory: Path, expected_kind: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The manifest of an artifact whose every recorded file is present, of its recorded size and sha256.

    Raises :class:`IntegrityError` naming the first file that is missing, truncated or modified. A full hash is
    remembered in ``STAMP_NAME`` keyed by the file's (size, mtime_ns, inode, ctime_ns), so verifying the same
    unchanged file again costs a ``stat``; see docs/architecture.md for what that trusts.
    """
    return read_manifest(directory, expected_kind, verify=True)


def refuse_unfinished(directory: Path) -> None:
    """A staging directory of another process (still being written, or left by a killed run) is never an input."""
    match = UNFINISHED_DIR.match(Path(directory).resolve().name)
    if match and int(match["pid"]) != os.getpid():  # this process may read back its own staging directory
        raise IntegrityError(
            f"{directory}: an unfinished output (being written by process {match['pid']}, or left by a killed run)",
            hint=f"use the finished directory {match['name']}; the next run writing it removes stale leftovers",
        )


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def _read_stamp(directory: Path) -> dict[str, Any]:
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


@dataclass(frozen=True)
class VerifiedFiles:
    """Files of one directory as hashed at one moment: name -> sha256, and each file's stat when it was hashed.

    A runtime keeps this from verification to the end of scoring and calls :meth:`check_unchanged` right before
    and after it reads the files (and between batches), so what was hashed is what was read: a file replaced
    (new inode) or written (new ctime) since is refused, by the same metadata the verification stamp trusts.
    """

    directory: Path
    sha256: dict[str, str]
    stats: dict[str, list[int]]

    @property
    def digest(self) -> str:
        """One hash of every file's name and content: equal digests mean the same files, byte for byte."""
        return sha256_bytes(json.dumps(sorted(self.sha256.items())).encode())

    def check_unchanged(self) -> None:
        for name, key in sorted(self.stats.items()):
            path = self.directory / name
            try:
                now = _stat_key(path)
            except OSError:
                now = None
            if now != key:
                raise IntegrityError(
                    f"{path}: {'removed' if now is None else 'replaced or modified'} after it was verified "
                    "(what would be scored is not what was hashed)",
                    hint="keep a model's files unchanged while it is validated, then run again",
                )


def hash_files(directory: Path, names: list[str]) -> VerifiedFiles:
    """Hash ``names`` in ``directory`` in full (no stamp: for directories that are not mexport artifacts, such as
    a checkpoint, which stay as they are); each file's stat is taken before it is hashed."""
    directory = Path(directory)
    sha256: dict[str, str] = {}
    stats: dict[str, list[int]] = {}
    for name in sorted(set(names)):
        path = directory / name
        try:
            stats[name] = _stat_key(path)
            sha256[name] = sha256_file(path)
        except OSError as exc:
            raise IntegrityError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return VerifiedFiles(directory, sha256, stats)


def verify_artifact_files(directory: Path, manifest: dict[str, Any]) -> VerifiedFiles:
    """Verify an artifact a runtime opened with ``manifest``: the manifest on disk is still that one, and every
    file it records matches; the result covers the manifest file too (see :class:`VerifiedFiles`)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    own = hash_files(directory, [MANIFEST_NAME])
    try:
        on_disk = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: cannot be read back ({exc})") from exc
    if on_disk != manifest:
        raise IntegrityError(f"{path}: changed after the model was opened", hint="run again")
    files = verify_files(directory, manifest)
    return VerifiedFiles(directory, {**files.sha256, **own.sha256}, {**files.stats, **own.stats})


def verify_files(directory: Path, manifest: dict[str, Any], remember: bool = True) -> VerifiedFiles:
    """Check ``manifest["files"]`` against ``directory`` (see :func:`verify_artifact`); ``remember=False`` never
    writes the stamp (a directory that is not an artifact, e.g. a checkpoint, stays as it is). Returns what was
    verified, each file's stat taken before it was hashed."""
    directory = Path(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IntegrityError(
            f"{directory}: {MANIFEST_NAME} records no file hashes, so its files cannot be verified",
            hint="re-create the artifact with this mexport version",
        )
    stamp = _read_stamp(directory)
    verified: dict[str, Any] = {}
    for name, record in sorted(files.items()):
        path = directory / name
        if Path(name).name != name or not isinstance(record, dict) or "sha256" not in record:
            raise IntegrityError(f"{directory / MANIFEST_NAME}: malformed files entry {name!r}")
        if not path.is_file():
            raise IntegrityError(
                f"{directory}: no {name} (recorded in {MANIFEST_NAME}); the artifact is incomplete",
                hint="re-run the stage that wrote it",
            )
        key = _stat_key(path)
        if key[0] != record.get("bytes"):
            raise IntegrityError(
                f"{path}: {key[0]} bytes, but {MANIFEST_NAME} records {record.get('bytes')} (truncated or replaced)",
                hint="re-run the stage that wrote it",
            )
        known = stamp.get(name)
        if known == {"stat": key, "sha256": record["sha256"]}:
            verified[name] = known
            continue
        if sha256_file(path) != record["sha256"]:
            raise IntegrityError(
                f"{path}: sha256 does not match {MANIFEST_NAME} (the file is corrupt or was modified)",
                hint="re-run the stage that wrote it",
            )
        verified[name] = {"stat": key, "sha256": record["sha256"]}  # stat from before hashing: a change since misses
    if remember and verified != stamp:
        try:
            write_atomic(directory / STAMP_NAME, strict_json.dumps(verified, sort_keys=True).encode())
        except OSError:
            pass  # a read-only artifact: verification still holds, it just is not remembered
    return VerifiedFiles(
        directory,
        {name: entry["sha256"] for name, entry in verified.items()},
        {name: entry["stat"] for name, entry in verified.items()},
    )


def verified_input(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a derived manifest records about an input it verified: where, which files with which hashes, when."""
    return {
        "path": str(Path(directory).resolve()),
        "kind": manifest.get("kind"),
        "manifest_sha256": sha256_file(Path(directory) / MANIFEST_NAME),
        "files": {name: record["sha256"] for name, record in sorted(manifest["files"].items())},
        "verified_at": utc_now(),
    }


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable hash of a settings dict (used to tell whether an existing output matches a request)."""
    return sha256_bytes(json.dumps(settings, sort_keys=True, default=str).encode())[:16]


def io_signature(model: Any) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a graph (ModelProto): name, numpy dtype name, shape (ints or symbolic strings), as the
    manifest's ``io`` records them."""
    onnx = require("onnx")

    def describe(value: Any) -> dict[str, Any]:
        tensor_type = value.type.tensor_type
        return {
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
            "shape": [dim.dim_param if dim.HasField("dim_param") else dim.dim_value for dim in tensor_type.shape.dim],
        }

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def _graph_header(graph_path: Path) -> Any:
    """The ONNX graph without its external weights, or IntegrityError when the file is not a readable graph."""
    onnx = require("onnx", "reading the ONNX graph")
    try:
        return onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file: protobuf raises DecodeError and friends
        raise IntegrityError(
            f"{graph_path}: not a readable ONNX graph ({type(exc).__name__})",
            hint="the graph was changed after it was written: re-run the stage that made this directory",
        ) from exc


def check_graph_io(manifest: dict[str, Any], model: Any, where: Path | str) -> None:
    """Refuse a manifest whose ``io`` or KV-cache geometry no longer matches the graph it describes: the manifest is
    not among the hashed files, and stages size their inputs from it (an edited or mixed-up artifact, exit 3)."""
    actual = io_signature(model)
    recorded = manifest.get("io") or {}
    problems = []
    for side in ("inputs", "outputs"):
        by_name = {entry["name"]: entry for entry in actual[side]}
        written = {entry.get("name"): entry for entry in recorded.get(side, []) if isinstance(entry, dict)}
        for name in sorted(set(by_name) ^ set(written), key=str):
            problems.append(f"{side[:-1]} {name} is {'only in the graph' if name in by_name else 'not in the graph'}")
        for name in sorted(set(by_name) & set(written)):
            for key in ("dtype", "shape"):
                if by_name[name][key] != written[name].get(key):
                    problems.append(f"{name} {key} {written[name].get(key)} in the manifest, {by_name[name][key]} in the graph")
    config = manifest.get("model_config") or {}
    geometry = [config.get("num_key_value_heads"), config.get("head_dim")]
    for entry in actual["inputs"]:
        if entry["name"].startswith(PAST_PREFIX) and [entry["shape"][1], entry["shape"][3]] != geometry:
            problems.append(f"{entry['name']} has {entry['shape'][1]} KV heads of {entry['shape'][3]}, the manifest's "
                            f"model_config {geometry[0]} of {geometry[1]}")
            break
    dtype = manifest.get("dtype")
    past_dtypes = {entry["dtype"] for entry in actual["inputs"] if entry["name"].startswith(PAST_PREFIX)}
    if dtype not in EXPORT_DTYPES or (past_dtypes and past_dtypes != {EXPORT_DTYPES[dtype]}):
        problems.append(
            f"the manifest says dtype {dtype!r} but {GRAPH_FILE}'s KV cache is {', '.join(sorted(past_dtypes)) or 'unknown'}"
        )
    logits = next((entry for entry in actual["outputs"] if entry["name"] == "logits"), None)
    vocab = config.get("vocab_size")
    if logits and isinstance(logits["shape"][-1], int) and logits["shape"][-1] and logits["shape"][-1] != vocab:
        problems.append(f"logits are {logits['shape'][-1]} wide, the manifest's model_config vocab_size {vocab}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise IntegrityError(
            f"{where}: {MANIFEST_NAME} does not describe this graph ({shown})",
            hint="the manifest was edited or belongs to another artifact: re-create the artifact with mexport",
        )

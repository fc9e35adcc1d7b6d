"""Output directories that are never left half-written, and disk-space checks."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mexport.errors import MexportError, ValidationFailedError


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to touch an existing non-empty directory (or a file) unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MexportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MexportError(
            f"{out_dir}: output directory exists and is not empty", hint="pass --overwrite to replace it"
        )


@contextlib.contextmanager
def staged_output_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out_dir`` only when the block finishes.

    On success (or on a :class:`ValidationFailedError`, whose files are kept for inspection and marked failed in
    their manifest) the temp directory is renamed into place; on any other error it is deleted, so an interrupted
    run never leaves something that looks like a finished artifact.
    """
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except ValidationFailedError:
        _commit(staging, out_dir)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _commit(staging, out_dir)


def _commit(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def check_free_space(directory: Path, needed_bytes: int, what: str = "the output") -> None:
    """Fail before writing when the filesystem holding ``directory`` cannot take ``needed_bytes``."""
    probe = Path(directory)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise MexportError(
            f"not enough disk space for {what}: needs {format_bytes(needed_bytes)}, "
            f"{format_bytes(free)} free on {probe}"
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path

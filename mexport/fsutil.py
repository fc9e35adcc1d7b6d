"""Output directories that are never left half-written, and disk-space checks."""

from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

from mexport.errors import EnvironmentFailure, MexportError, ValidationFailedError

# staging and retired directories of staged_output_dir: ``.NAME.partial-PID`` / ``.NAME.old-PID``
UNFINISHED_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<state>partial|old)-(?P<pid>\d+)$")
FAILED_SUFFIX = ".failed"


def check_output_location(out_dir: Path) -> None:
    """An output beneath a file can never be created: an I/O failure (exit 3), said before any work is done."""
    blocker = next((parent for parent in Path(out_dir).resolve().parents if parent.is_file()), None)
    if blocker is not None:
        raise EnvironmentFailure(
            f"{out_dir}: cannot be created, {blocker} is a file", hint="write the output to a directory path"
        )


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to touch an existing non-empty directory (or a file) unless ``overwrite``."""
    check_output_location(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MexportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MexportError(
            f"{out_dir}: output directory exists and is not empty", hint="pass --overwrite to replace it"
        )


@contextlib.contextmanager
def output_lock(out_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``out_dir``: a second writer to the same output fails at once instead of racing.

    ``wait``: block until the other writer is done instead (a shared cache that the other one is filling).
    """
    from filelock import FileLock, Timeout

    out_dir = Path(out_dir).resolve()
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    # a singleton per path: this process may nest locks on one output (a stage inside the pipeline's run)
    lock = FileLock(lock_path, thread_local=False, is_singleton=True)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise EnvironmentFailure(
            f"{out_dir}: another mexport run is writing this output (it holds {lock_path})",
            hint="wait for that run to finish, or write to another output",
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def claimed_output(out_dir: Path) -> Iterator[Path]:
    """Hold the lock of an output that may not exist yet (its folder is created, a path under a file refused)."""
    out_dir = Path(out_dir).resolve()
    check_output_location(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir):
        yield out_dir


P = ParamSpec("P")
R = TypeVar("R")


def locks_output(parameter: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a stage function so it holds the lock of its output (the argument named ``parameter``) from its first
    step: a second writer fails in seconds instead of after the first one's hours of tracing or quantizing."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            with claimed_output(signature.bind(*args, **kwargs).arguments[parameter]):
                return function(*args, **kwargs)

        return locked

    return decorate


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete ``.NAME.partial-PID`` / ``.NAME.old-PID`` siblings of ``out_dir`` whose process is gone.

    Called under :func:`output_lock`, so no live mexport run is writing them; a live PID (possibly reused by an
    unrelated process) is left alone, which errs on the side of keeping data. A run killed between the two
    renames of a commit leaves the previous artifact as ``.NAME.old-PID`` and no ``NAME``: that one is restored.
    """
    out_dir = Path(out_dir).resolve()
    removed = []
    for path in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*-*")):
        match = UNFINISHED_DIR.match(path.name)
        if not (match and match["name"] == out_dir.name and path.is_dir()) or _process_alive(int(match["pid"])):
            continue
        if match["state"] == "old" and not out_dir.exists():
            os.replace(path, out_dir)
        else:
            shutil.rmtree(path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staged_output_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out_dir`` only when the block finishes.

    Holds the output's lock throughout (a concurrent writer fails fast) and first removes staging directories
    left by killed runs. On success the temp directory is renamed into place; on any other error it is deleted,
    so an interrupted run never leaves something that looks like a finished artifact. On a
    :class:`ValidationFailedError` the files are kept for inspection (marked failed in their manifest): as
    ``out_dir`` when there was nothing there, else as ``OUT.failed`` beside it, so a failed run never replaces a
    previous good artifact.
    """
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    with claimed_output(out_dir):
        remove_stale_staging(out_dir)
        check_output_dir(out_dir, overwrite)  # again under the lock: a run that just finished may have written it
        staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            yield staging
        except ValidationFailedError as exc:
            if _holds_artifact(out_dir):
                failed = out_dir.with_name(out_dir.name + FAILED_SUFFIX)
                _commit(staging, failed)
                exc.message = f"{exc.message} (kept as {failed}; the previous {out_dir.name} is unchanged)"
            else:
                _commit(staging, out_dir)
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _commit(staging, out_dir)


def replace_files_as_set(out_dir: Path, files: dict[str, bytes], drop: Iterable[str] = ()) -> dict[str, Path]:
    """Write ``files`` into ``out_dir`` so that readers see either the previous set or the new one, never a mix.

    The new set is written into a staging directory, whatever else ``out_dir`` holds (e.g. a score cache) is moved
    over except the entries named in ``drop`` (files of another set the new one supersedes), and the staging
    directory replaces ``out_dir`` in one rename. Returns name -> final path.
    """
    out_dir = Path(out_dir).resolve()
    with staged_output_dir(out_dir, overwrite=True) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if out_dir.is_dir():
            for entry in out_dir.iterdir():
                if entry.name not in files and entry.name not in drop:
                    os.replace(entry, staging / entry.name)
    return {name: out_dir / name for name in files}


def _holds_artifact(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a finished artifact that did not fail its own checks."""
    try:
        manifest = json.loads((out_dir / "mexport.json").read_text())  # manifest.MANIFEST_NAME (a layer above)
    except (OSError, ValueError):
        return out_dir.is_dir() and any(out_dir.iterdir())
    return not (isinstance(manifest, dict) and manifest.get("status") == "failed")


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
        raise EnvironmentFailure(
            f"not enough disk space for {what}: needs {format_bytes(needed_bytes)}, "
            f"{format_bytes(free)} free on {probe}",
            hint="free disk space, or write the output to another filesystem",
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

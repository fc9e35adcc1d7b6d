"""Shared rich consoles and progress bars, honouring the CLI's --quiet / -v / --json switches.

Progress, tables and summaries go to :data:`console` (stderr), which ``-q`` silences. Errors go to
:data:`error_console` (stderr too), which nothing silences: ``-q`` hides progress, never a failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
error_console = Console(stderr=True)
_state = {"quiet": False, "verbose": False, "json": False}


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state["quiet"] = quiet
    _state["verbose"] = verbose
    console.quiet = quiet


def is_verbose() -> bool:
    return _state["verbose"]


def is_quiet() -> bool:
    """``-q``: no progress and no summaries (a summary printed on stdout included); errors and warnings still show."""
    return _state["quiet"]


def request_json(enabled: bool = True) -> None:
    """The command prints machine-readable output: a failure then also prints a JSON error object on stdout."""
    _state["json"] = enabled


def json_requested() -> bool:
    return _state["json"]


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    """A warning the user must see even with ``-q`` (an ignored option, a thin margin)."""
    error_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress(bytes_mode: bool = False) -> Iterator[Progress]:
    """A progress display with ETA; ``bytes_mode`` shows transferred bytes instead of item counts."""
    counter = DownloadColumn() if bytes_mode else MofNCompleteColumn()
    with Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        counter,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=_state["quiet"],
    ) as bar:
        yield bar


@contextlib.contextmanager
def phase(description: str) -> Iterator[None]:
    """A spinner for a step whose length is unknown (tracing, a TensorRT build)."""
    with progress() as bar:
        task = bar.add_task(description, total=None)
        yield
        bar.update(task, total=1, completed=1)

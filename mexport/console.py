"""Shared rich console and progress bars, honouring the CLI's --quiet / -v switches."""

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
_state = {"quiet": False, "verbose": False}


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state["quiet"] = quiet
    _state["verbose"] = verbose
    console.quiet = quiet


def is_verbose() -> bool:
    return _state["verbose"]


def info(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


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

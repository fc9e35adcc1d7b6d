"""Thin typer CLI: each command parses its options, calls one library function, prints the result.

Command modules register themselves on :data:`app` when imported below; errors the user can fix
(:class:`~mexport.errors.MexportError`) become one red line plus a hint and the error's exit code, with the
traceback only under ``-v``.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.markup import escape

from mexport import __version__, console
from mexport.errors import MexportError

app = typer.Typer(
    name="mexport",
    help="Export Gemma2-architecture medical LLMs to ONNX / TensorRT, quantize them, and prove MCQ parity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

T = TypeVar("T")

# command modules, in the order their commands appear in --help
COMMAND_MODULES = (
    "mexport.cli.fixture_cmd",
    "mexport.cli.export_cmd",
    "mexport.cli.quantize_cmd",
    "mexport.cli.engine_cmd",
    "mexport.cli.pipeline_cmd",
    "mexport.cli.doctor_cmd",
    "mexport.cli.validate_cmd",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Verbose logs and tracebacks."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars or summaries (errors still print)."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    console.configure(quiet=quiet, verbose=verbose)


def run(call: Callable[[], T]) -> T:
    """Run a library call, turning a :class:`MexportError` into a one-line message and its exit code."""
    try:
        return call()
    except MexportError as exc:
        if console.is_verbose():
            console.console.print_exception()
        console.console.print(f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            console.console.print(f"[dim]hint: {escape(exc.hint)}[/dim]", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def emit_json(payload: Any) -> None:
    """Machine-readable result on stdout (progress and messages go to stderr)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def parse_assignments(values: list[str], option: str, value_name: str) -> dict[str, str]:
    """``KEY=VALUE`` option values as a dict, with a usage error naming the option for a malformed one."""
    parsed: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip() or not rest.strip():
            raise MexportError(f"{option} {value!r}: expected KEY={value_name}")
        parsed[key.strip()] = rest.strip()
    return parsed


def parse_margins(values: list[str]) -> dict[str, float]:
    margins: dict[str, float] = {}
    for recipe, text in parse_assignments(values, "--margin-for", "POINTS").items():
        try:
            margins[recipe] = float(text)
        except ValueError:
            raise MexportError(f"--margin-for {recipe}={text}: POINTS must be a number") from None
    return margins


for _module in COMMAND_MODULES:
    importlib.import_module(_module)


def main() -> None:
    app()

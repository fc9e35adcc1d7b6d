"""Thin typer CLI: each command parses its options, calls one library function, prints the result.

Command modules register themselves on :data:`app` when imported below. Every command runs inside
:class:`MexportGroup`, which turns whatever ends a command into the exit-code contract of :mod:`mexport.errors`:
an expected failure (:class:`~mexport.errors.MexportError`, an ``OSError`` such as a full disk) becomes one red
line plus a hint, never a traceback unless ``-v``; an unexpected exception is reported as an internal error (exit 5)
with its traceback. With ``--json`` a failure also prints a JSON error object on stdout. ``-q`` silences progress
and summaries, never errors.

A command imports its library function when it runs: the stage packages import numpy, pydantic and (lmeval)
lm-eval, which ``mexport --help`` and shell completion should not pay for.
"""

from __future__ import annotations

import errno
import functools
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from mexport import __version__, console, strict_json
from mexport.errors import (
    EXIT_CODES,
    EXIT_INTERNAL,
    EnvironmentFailure,
    MexportError,
)

EXIT_CODE_HELP = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."
# OS errors that mean the path the user gave is wrong (exit 2), not that the machine is (exit 3)
INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}
OS_ERROR_HINTS = {
    errno.ENOSPC: "free disk space, or write the output to another filesystem",
    errno.EDQUOT: "free space within your disk quota, or write the output elsewhere",
    errno.EACCES: "check the permissions of the path, or write the output elsewhere",
    errno.EPERM: "check the permissions of the path, or write the output elsewhere",
    errno.EROFS: "the filesystem is read-only: write the output elsewhere",
}


def as_mexport_error(exc: BaseException) -> MexportError | None:
    """The contract's view of an exception: itself, an I/O or memory failure as an error, or None for a bug."""
    if isinstance(exc, MexportError):
        return exc
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in INPUT_ERRNOS:
            return MexportError(f"{where}{reason}")
        return EnvironmentFailure(f"{where}{reason}", hint=OS_ERROR_HINTS.get(exc.errno or 0))
    if isinstance(exc, MemoryError):
        return EnvironmentFailure("out of memory", hint="close other programs, or use a machine with more RAM")
    return None


def report_error(exc: BaseException) -> int:
    """Print ``exc`` the way the contract says (one line + hint, JSON object under --json); returns the exit code."""
    error = as_mexport_error(exc)
    if error is None:
        console.error_console.print_exception()
        message, hint = f"{type(exc).__name__}: {exc}", "this is a bug in mexport: please report it"
        kind, code = "internal", EXIT_INTERNAL
    else:
        if console.is_verbose():
            console.error_console.print_exception()
        message, hint, kind, code = error.message, error.hint, error.kind, error.exit_code
    console.error_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        console.error_console.print(f"[dim]hint: {escape(hint)}[/dim]", highlight=False, soft_wrap=True)
    if console.json_requested():
        emit_json({"error": {"kind": kind, "message": message, "hint": hint, "exit_code": code}})
    return code


def expand_user_paths(value: Any) -> Any:
    """A path option's value with a leading ``~`` expanded (a shell leaves ``-o ~/x`` in quotes, or ``--opt=~/x``,
    alone; it must never become a literal ``./~``); lists of paths element-wise; anything else unchanged."""
    if isinstance(value, Path):
        return value.expanduser()
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, Path) for item in value):
        return type(value)(item.expanduser() for item in value)
    return value


def _with_expanded_paths(callback: Any) -> Any:
    """``callback`` (a command function) receiving every Path-typed option and argument with ``~`` expanded."""

    @functools.wraps(callback)
    def expanded(**params: Any) -> Any:
        return callback(**{name: expand_user_paths(value) for name, value in params.items()})

    expanded.expands_user_paths = True  # type: ignore[attr-defined]
    return expanded


class MexportGroup(TyperGroup):
    """Runs every command under the exit-code contract (see the module docstring), with ``~`` expanded in every
    path option (:func:`expand_user_paths`)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None and command.callback and not getattr(command.callback, "expands_user_paths", False):
            command.callback = _with_expanded_paths(command.callback)
        return command

    def main(self, args: Sequence[str] | None = None, *pos: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        console.request_json("--json" in argv)  # so that even a usage error is reported as JSON
        return super().main(argv, *pos, **kwargs)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except typer.TyperException as exc:  # usage errors: typer prints them (exit 2); add the JSON object
            if console.json_requested():
                message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
                code = getattr(exc, "exit_code", 2)
                command = ctx.invoked_subcommand or ""
                hint = f"`mexport {command} --help`".replace("  ", " ") + " lists the options and what they accept"
                emit_json({"error": {"kind": "usage", "message": message, "hint": hint, "exit_code": code}})
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every failure is mapped to an exit code
            raise typer.Exit(report_error(exc)) from None


app = typer.Typer(
    name="mexport",
    cls=MexportGroup,
    help="Export medical LLMs (the Meditron3 suite: Gemma2, Llama-3.1, Qwen2.5) to ONNX / TensorRT, quantize them, and prove MCQ parity.\n\n"
    + EXIT_CODE_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

# command modules, in the order their commands appear in --help
COMMAND_MODULES = (
    "mexport.cli.fixture_cmd",
    "mexport.cli.export_cmd",
    "mexport.cli.quantize_cmd",
    "mexport.cli.engine_cmd",
    "mexport.cli.pipeline_cmd",
    "mexport.cli.doctor_cmd",
    "mexport.cli.validate_cmd",
    "mexport.cli.merge_cmd",
    "mexport.cli.lmeval_cmd",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Verbose logs, and tracebacks with errors."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars or summaries (errors still print)."),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    console.configure(quiet=quiet, verbose=verbose)


def json_option() -> Any:
    """The ``--json`` option every command takes: its result (or a failure's JSON error object) on stdout."""
    return typer.Option(False, "--json", help="Print the result as JSON on stdout (a JSON error object on failure).")


def emit_json(payload: Any) -> None:
    """Machine-readable result on stdout (progress and messages go to stderr)."""
    sys.stdout.write(strict_json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def echo_summary(message: str) -> None:
    """A command's closing summary line on stdout; ``-q`` silences it (errors and warnings are never silenced)."""
    if not console.is_quiet():
        typer.echo(message)


def exit_with(code: int) -> None:
    """End a command with ``code`` (a finished run whose checks failed or were inconclusive)."""
    if code:
        raise typer.Exit(code)


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

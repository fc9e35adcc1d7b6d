"""The exit-code contract and the errors that map onto it.

CI jobs read mexport's exit code, so every way a command can end has exactly one code:

====  ===========================================================================================================
code  meaning
====  ===========================================================================================================
0     everything ran and every check passed
1     a numeric or parity check ran and failed (artifacts are kept, marked failed)
2     bad input or usage: a wrong option, path, config value or file the user can fix
3     environment or I/O failure: missing dependency or GPU, disk full, permission denied, a corrupt or tampered
      artifact, state left by another run
4     inconclusive: the checks ran, but the sample cannot resolve the margin (fails only under ``--fail-on``)
5     internal error: a bug in mexport (the traceback is printed; please report it)
====  ===========================================================================================================

Library code raises :class:`MexportError` (bad input) or one of its subclasses for anything expected; the CLI
prints one line (plus a hint) and exits with the error's code, never a traceback unless ``-v``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INCONCLUSIVE = 4
EXIT_INTERNAL = 5

EXIT_CODES = {
    EXIT_OK: "passed",
    EXIT_CHECK_FAILED: "a numeric or parity check failed",
    EXIT_USAGE: "bad input or usage",
    EXIT_ENVIRONMENT: "environment or I/O failure (dependency, GPU, disk, permission, corrupt artifact or state)",
    EXIT_INCONCLUSIVE: "inconclusive: the sample cannot resolve the margin",
    EXIT_INTERNAL: "internal error (a bug in mexport)",
}


class MexportError(Exception):
    """A problem with the user's input (exit 2), reported as one line and a hint, without a traceback."""

    exit_code = EXIT_USAGE
    kind = "input"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class EnvironmentFailure(MexportError):
    """The machine, not the input, is the problem (exit 3): missing GPU, full or read-only disk, bad state."""

    exit_code = EXIT_ENVIRONMENT
    kind = "environment"


class MissingDependencyError(EnvironmentFailure):
    """An optional heavy dependency (torch, onnxruntime, tensorrt, ...) is not installed."""

    kind = "missing_dependency"


class IntegrityError(EnvironmentFailure):
    """A file does not match the hash its manifest recorded, or an artifact is incomplete (exit 3)."""

    kind = "integrity"


class ValidationFailedError(MexportError):
    """A numeric or parity check ran and failed (exit 1); the artifacts are kept for inspection."""

    exit_code = EXIT_CHECK_FAILED
    kind = "check_failed"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): third-party errors as one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

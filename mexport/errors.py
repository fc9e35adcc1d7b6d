"""One user-facing error type, mapped by the CLI to a one-line message and an exit code.

Library code raises :class:`MexportError` for anything the user can fix (bad path, wrong schema, missing
dependency); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2


class MexportError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class MissingDependencyError(MexportError):
    """An optional heavy dependency (torch, onnxruntime, tensorrt, ...) is not installed."""


class ValidationFailedError(MexportError):
    """A numeric or parity check ran and failed; the artifacts are kept for inspection."""

    exit_code = EXIT_PARITY_FAILED

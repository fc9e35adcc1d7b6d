"""The skeleton every artifact-writing stage shares (export, quantize, engine build).

Each stage checks its output first (``fsutil.check_output_dir``), then, once it knows how many bytes it will
write, :func:`write_artifact`: free space is checked, the files go into a staging directory that becomes the
output when the block ends, the manifest is written through :class:`StagedArtifact`, and a failed numeric check
(:meth:`StagedArtifact.fail`) leaves the files marked ``status: failed`` where ``fsutil.staged_output_dir`` keeps
them, never in place of a good artifact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from mexport.errors import ValidationFailedError
from mexport.fsutil import check_free_space, staged_output_dir
from mexport.manifest import write_manifest


@dataclass
class StagedArtifact:
    """An artifact being written: its staging directory and the manifest it will carry."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def record(self, manifest: dict[str, Any] | None = None) -> None:
        """Write the manifest into the staging directory (``manifest`` replaces the one held)."""
        if manifest is not None:
            self.manifest = manifest
        write_manifest(self.path, self.manifest)

    def fail(self, message: str, hint: str | None = None) -> NoReturn:
        """Mark the artifact failed and end the stage with a failed check (exit 1); its files are kept."""
        self.manifest["status"] = "failed"
        self.record()
        raise ValidationFailedError(message, hint=hint)


@contextmanager
def write_artifact(output: Path, *, overwrite: bool, needs_bytes: int, what: str) -> Iterator[StagedArtifact]:
    """Check that ``needs_bytes`` fit beside ``output``, then stage ``output`` for the block to fill."""
    output = Path(output)
    check_free_space(output.resolve().parent, needs_bytes, what=what)
    with staged_output_dir(output, overwrite=overwrite) as staging:
        yield StagedArtifact(staging)

"""Checkpoints from the Hugging Face Hub, with an unreachable Hub said at once in one line (exit 3).

huggingface_hub retries a request that times out and logs each failure with its traceback (about 24 s of them
before its own error), so the Hub's host is probed first with one short TCP connect. When it cannot be reached, a
copy already in the local cache is used (as ``HF_HUB_OFFLINE=1`` would); without one the run stops with an
:class:`~mexport.errors.EnvironmentFailure`. A Hub that answers but refuses (missing repo, gated, bad revision) is
bad input (exit 2).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mexport.errors import EnvironmentFailure, MexportError, first_line
from mexport.lazy import require

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_SECONDS = 5.0
OFFLINE_VALUES = {"1", "on", "yes", "true"}
UNREACHABLE_HINT = (
    "check the network (or the proxy in HTTPS_PROXY / the endpoint in HF_ENDPOINT), or download the model on a "
    "connected machine (huggingface-cli download) and pass its local directory"
)


def unreachable_reason() -> str | None:
    """Why the Hub cannot be reached from here (offline mode, or its host, or the proxy's, refusing a TCP connect
    within PROBE_TIMEOUT_SECONDS), or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy) if proxy and endpoint.scheme == "https" else endpoint
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or first_line(exc)}"
    return None


def snapshot(repo_id: str, allow_patterns: list[str], revision: str | None = None) -> Path:
    """The local directory of ``repo_id``'s files matching ``allow_patterns`` (downloaded, or from the cache)."""
    hub = require("huggingface_hub", f"fetching {repo_id} from the Hugging Face Hub")
    unreachable = unreachable_reason()
    try:
        return Path(
            hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=unreachable is not None
            )
        )
    except Exception as exc:
        if unreachable is not None or _is_connection_failure(hub, exc):
            raise EnvironmentFailure(
                f"{repo_id}: the Hugging Face Hub cannot be reached ({unreachable or first_line(exc)}) and no copy "
                "is in the local cache",
                hint=UNREACHABLE_HINT,
            ) from exc
        raise MexportError(
            f"{repo_id}: could not get it from the Hugging Face Hub: {first_line(exc)}",
            hint="check the repository id (org/name) and --revision; for a gated model accept its terms on "
            "huggingface.co and log in (huggingface-cli login, or set HF_TOKEN); or pass a local directory",
        ) from exc


def _is_connection_failure(hub: Any, exc: BaseException) -> bool:
    """Whether ``exc`` means the Hub did not answer (no cached copy to fall back on), not that it refused."""
    errors = hub.errors
    if isinstance(exc, errors.LocalEntryNotFoundError):  # huggingface_hub's "check your internet connection"
        return True
    if isinstance(exc, (errors.HfHubHTTPError, errors.HFValidationError)):  # the Hub answered: missing, gated, ...
        return False
    return isinstance(exc, (ConnectionError, TimeoutError)) or "connect" in type(exc).__name__.lower()

"""JSON as strict parsers (JavaScript, Go, jq) read it: no bare ``NaN`` / ``Infinity`` tokens.

Every JSON file and stdout object mexport writes goes through :func:`dumps`. A non-finite float becomes ``null``;
where such a value means something (a NaN logit, an unmeasurable difference) the writer records why beside it.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def non_finite_text(value: float) -> str | None:
    """"nan", "inf" or "-inf" for a non-finite float (the reason beside its ``null``), else None."""
    return None if math.isfinite(value) else repr(float(value))


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN / Infinity (non-finite floats become null; ``allow_nan`` off)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)

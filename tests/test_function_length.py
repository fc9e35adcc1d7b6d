"""No function in mexport/ is longer than 80 lines, so each one can be read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import mexport

MAX_LINES = 80
PACKAGE = Path(mexport.__file__).parent


def long_functions(root: Path, max_lines: int) -> list[str]:
    """``file:line name (N lines)`` for each function or method under ``root`` longer than ``max_lines``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > max_lines:
                    found.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_80_lines() -> None:
    assert long_functions(PACKAGE, MAX_LINES) == []


def test_a_long_function_is_found(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert long_functions(tmp_path, MAX_LINES) == [f"long.py:1 long ({MAX_LINES + 1} lines)"]

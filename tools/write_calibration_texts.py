"""Write quantize's default calibration text from the shipped MCQ samples (prompt + correct answer per question).

Quantize owns this file (mexport/optimize/quantize/data/medical_mcq.jsonl) so that adding or editing a validation
task never changes a recipe's calibration silently; re-run this after a deliberate change to the samples, and
tests/test_data_schemas.py checks the two agree:

    PYTHONPATH=. python tools/write_calibration_texts.py
"""

from __future__ import annotations

import json

from mexport.optimize.quantize.calibration import DEFAULT_CALIBRATION_FILE
from mexport.validate.tasks import TASKS, calibration_texts


def expected_rows() -> list[dict[str, str]]:
    """One row per sample question of every built-in task, in task then file order."""
    return [{"task": name, "text": text} for name in TASKS for text in calibration_texts(name, "sample")]


def main() -> None:
    rows = expected_rows()
    DEFAULT_CALIBRATION_FILE.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"{DEFAULT_CALIBRATION_FILE}: {len(rows)} texts")


if __name__ == "__main__":
    main()

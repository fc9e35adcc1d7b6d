"""Validation: prove that an exported, quantized or TensorRT model answers medical MCQs like the PyTorch original.

``validate(reference, candidates, tasks, output=...)`` scores every backend on the same questions, compares each
candidate with the reference (paired CIs, McNemar, agreement, KL) and writes report.json / report.md / junit.xml /
accuracy.png. Importing this package loads no model framework.
"""

from __future__ import annotations

from mexport.validate.runner import merge_reports, validate, validate_shard

__all__ = ["merge_reports", "validate", "validate_shard"]

"""The one JUnit XML writer: validation reports (one case per task x candidate) and pipeline reports (one per step).

CI systems read ``<testsuites>`` with one ``<testsuite>``, counts on both, and per case a ``<failure>``, a
``<skipped>`` or, for a pass, the details as ``<system-out>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

FAILURE = "failure"
SKIPPED = "skipped"


@dataclass(frozen=True)
class JUnitCase:
    """One testcase; ``outcome`` is None for a pass, else :data:`FAILURE` or :data:`SKIPPED`."""

    classname: str
    name: str
    outcome: str | None = None
    message: str = ""
    failure_type: str | None = None  # the failure's ``type`` attribute
    details: str | None = None  # the failure's text, or a pass's system-out
    seconds: float = 0.0


def junit_xml(suite_name: str, cases: Sequence[JUnitCase]) -> bytes:
    """The JUnit XML document of ``cases``, in one suite named ``suite_name``."""
    outcomes = [case.outcome for case in cases]
    counts = {
        "tests": str(len(cases)),
        "failures": str(outcomes.count(FAILURE)),
        "errors": "0",
        "skipped": str(outcomes.count(SKIPPED)),
    }
    suites = ET.Element("testsuites", {"name": suite_name, **counts})
    suite = ET.SubElement(suites, "testsuite", {"name": suite_name, **counts})
    for case in cases:
        element = ET.SubElement(
            suite, "testcase", {"classname": case.classname, "name": case.name, "time": f"{round(case.seconds, 2):g}"}
        )
        if case.outcome == FAILURE:
            attributes = {"message": case.message}
            if case.failure_type:
                attributes["type"] = case.failure_type
            ET.SubElement(element, "failure", attributes).text = case.details
        elif case.outcome == SKIPPED:
            ET.SubElement(element, "skipped", {"message": case.message})
        elif case.details is not None:
            ET.SubElement(element, "system-out").text = case.details
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"

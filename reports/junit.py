"""JUnit XML for CI systems that read it: the gate's rules, or a report's prompt/arm agreement, as test cases.

ElementTree escapes markup; characters XML 1.0 forbids (most C0 controls), which a model can emit, are dropped.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from detaudit.reports.view_model import Report

from detaudit.gate import GateResult

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    return _XML_INVALID.sub("", text)


def _suite(name: str) -> ET.Element:
    return ET.Element("testsuite", name=_clean(name))


def _finish(suites: list[ET.Element]) -> str:
    root = ET.Element("testsuites")
    for suite in suites:
        cases = suite.findall("testcase")
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
        suite.set("errors", str(sum(1 for c in cases if c.find("error") is not None)))
        root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def gate_junit(result: GateResult) -> str:
    """One test case per rule and prompt/arm; rules that could not be judged are JUnit errors."""
    suite = _suite(f"detaudit gate {result.run}")
    for rule in result.rules:
        for check in rule.checks:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=_clean(f"detaudit.gate.{rule.rule}"),
                name=_clean(f"{check.where} {rule.threshold}"),
            )
            if check.passed:
                continue
            tag = "failure" if rule.judged else "error"
            ET.SubElement(case, tag, message=_clean(check.observed), type=rule.rule).text = _clean(rule.line())
    return _finish([suite])


def report_junit(report: Report) -> str:
    """One suite per run, one case per prompt/arm: it fails when the completions are not all identical."""
    suites = {run.label: _suite(f"detaudit {run.label}") for run in report.runs}
    for p in report.prompts:
        for c in p.cells:
            case = ET.SubElement(
                suites[c.run.label],
                "testcase",
                classname=_clean(f"detaudit.{c.run.label}"),
                name=_clean(f"{p.prompt_id}@{c.arm} identical completions"),
            )
            if c.ok == 0:
                ET.SubElement(case, "error", message=f"no successful samples ({c.errors} errors of {c.n})")
            elif c.unique > 1:
                first = "" if c.first_min is None else f"; first divergence at {c.run.noun} {c.first_min}"
                msg = f"{c.unique} unique completions in {c.ok}{first}"
                ET.SubElement(case, "failure", message=_clean(msg)).text = _clean(c.statistic)
    return _finish(list(suites.values()))

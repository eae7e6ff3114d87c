"""docs/summary.md's key tables are generated from the summary's models (their field descriptions); this test keeps
the two in step. Regenerate after a change to detaudit/analysis/summary_schema.py with:
python tests/test_summary_doc.py
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from detaudit.analysis.background_schema import BackgroundSummary, Temperature
from detaudit.analysis.summary_schema import Agreement, ArmStats, ArmSummary, PromptSummary, RescoreSummary, RunSummary

DOC = Path(__file__).resolve().parent.parent / "docs" / "summary.md"
# Each model with a table of its own in the doc; any other model a field holds is listed inline, as `key.sub`.
SECTIONS: tuple[type[BaseModel], ...] = (
    RunSummary,
    Agreement,
    PromptSummary,
    ArmSummary,
    ArmStats,
    RescoreSummary,
    BackgroundSummary,
    Temperature,
)


def _fields(model: Any) -> dict[str, FieldInfo]:
    """The fields of a model or of a pydantic dataclass (Limits)."""
    return model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else model.__pydantic_fields__


def _inner(annotation: Any) -> tuple[Any, str]:
    """The model a field holds (through `| None` and `list[...]`), with the suffix its keys take ("" or "[]")."""
    if get_origin(annotation) in (Union, types.UnionType):
        return _inner(next(a for a in get_args(annotation) if a is not type(None)))
    if get_origin(annotation) is list:
        model, _ = _inner(get_args(annotation)[0])
        return model, "[]"
    return annotation, ""


def _rows(model: Any, prefix: str = "") -> list[str]:
    rows = []
    for name, info in _fields(model).items():
        key = prefix + (info.alias or name)
        assert info.description, f"{model.__name__}.{name} has no description"
        rows.append(f"| `{key}` | {info.description.replace('|', chr(92) + '|')} |")
        inner, suffix = _inner(info.annotation)
        if hasattr(inner, "__pydantic_fields__") and inner not in SECTIONS:
            rows += _rows(inner, f"{key}{suffix}.")
    return rows


def render_table(model: type[BaseModel]) -> str:
    return "\n".join(["| key | meaning |", "|---|---|", *_rows(model)])


def _markers(model: type[BaseModel]) -> tuple[str, str]:
    return f"<!-- BEGIN generated: {model.__name__} -->", f"<!-- END generated: {model.__name__} -->"


def _current(text: str, model: type[BaseModel]) -> str:
    begin, end = _markers(model)
    m = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    assert m, f"{DOC} lacks the generated-table markers of {model.__name__}"
    return m.group(1)


def test_summary_doc_matches_the_models() -> None:
    text = DOC.read_text()
    for model in SECTIONS:
        assert _current(text, model) == render_table(model), "docs/summary.md is stale: run this file"


if __name__ == "__main__":
    text = DOC.read_text()
    for section in SECTIONS:
        begin, end = _markers(section)
        start, stop = text.index(begin), text.index(end) + len(end)
        text = f"{text[:start]}{begin}\n{render_table(section)}\n{end}{text[stop:]}"
    DOC.write_text(text)

"""docs/schema.md's column table is generated from detaudit.rundir.schema; this test keeps the two in step.

Regenerate after a schema change with: python tests/test_run_schema_doc.py
"""

from __future__ import annotations

import re
from pathlib import Path

from detaudit.rundir.schema import SCHEMA_VERSION, describe_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"
BEGIN = "<!-- BEGIN generated: samples columns -->"
END = "<!-- END generated: samples columns -->"


def render_table() -> str:
    lines = [
        f"samples.parquet, schema version {SCHEMA_VERSION}:",
        "",
        "| column | Arrow type | meaning |",
        "|---|---|---|",
    ]
    for row in describe_schema():
        doc = row["doc"].replace("|", "\\|")
        lines.append(f"| `{row['column']}` | `{row['type']}` | {doc} |")
    return "\n".join(lines)


def _current() -> str:
    text = DOC.read_text()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    assert m, f"{DOC} lacks the generated-table markers"
    return m.group(1)


def test_schema_doc_matches_the_schema() -> None:
    assert _current() == render_table(), "docs/schema.md is stale: run `python tests/test_run_schema_doc.py`"


if __name__ == "__main__":
    text = DOC.read_text()
    DOC.write_text(text.replace(_current(), render_table()))

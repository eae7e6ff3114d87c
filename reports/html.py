"""The HTML report: one self-contained file (inline CSS, JS and SVG) that makes no network request.

Every string that came from a model passes through jinja2 autoescaping, and its bidi controls (which could reorder
what a reader sees) are drawn as visible marks, ⟨U+202E⟩. A Content-Security-Policy meta tag
(`default-src 'none'`, the one inline script allowed by its hash) backs that up: even a string that escaped
escaping could neither run script nor load anything.
"""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files

import jinja2
from detaudit.reports.charts import histogram_svg
from detaudit.reports.view_model import Cell, Report
from markupsafe import Markup, escape

from detaudit import __version__
from detaudit.termsafe import BIDI_CONTROLS, bidi_marker, visible_bidi

_VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}


def visible_whitespace(token: str) -> Markup:
    """A token with its whitespace drawn as faint marks, so ' New' and 'New' look different. Escapes first."""
    out = []
    for ch in token:
        mark = _VISIBLE.get(ch) or (bidi_marker(ch) if BIDI_CONTROLS.match(ch) else None)
        out.append(Markup('<span class="ws">{}</span>').format(mark) if mark else escape(ch))
    return Markup("").join(out)


def _finalize(value: object) -> object:
    """Every {{ expression }}: plain strings get their bidi controls made visible before autoescaping; Markup (our
    own SVG, the `vis` filter's output) is already safe and left alone."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return visible_bidi(value)
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (files("detaudit.reports") / "templates" / name).read_text()),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
        finalize=_finalize,
    )
    env.filters["vis"] = visible_whitespace
    return env


def render_html(report: Report) -> str:
    """The whole report as one HTML document."""
    script = (files("detaudit.reports") / "templates" / "report.js").read_text()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    charts: list[str] = []

    def chart(cell: Cell) -> Markup:
        # SVG from matplotlib of numbers only; the salt keeps element ids unique across charts on one page.
        charts.append(cell.arm)
        return Markup(histogram_svg(cell.histogram, salt=f"detaudit-chart-{len(charts)}"))

    template = _environment().get_template("report.html.j2")
    return template.render(
        report=report,
        version=__version__,
        chart=chart,
        script=Markup(script),
        script_hash=f"sha256-{digest}",
    )

"""Charts as inline SVG from matplotlib: the HTML report embeds them, so they must load nothing and hold no text
from a model (matplotlib would read `$...$` as mathtext); they only ever plot numbers."""

from __future__ import annotations

import io
from collections.abc import Mapping

_BAR = "#c2410c"  # one accent colour, matching the report CSS


def histogram_svg(histogram: Mapping[str | int, int], *, salt: str) -> str:
    """First-divergence positions as a bar chart, returned as an `<svg>` element (no XML prolog).

    `salt` makes matplotlib's generated element ids unique per chart, so several charts can share one page.
    """
    # Imported here, not at module load: matplotlib costs ~1 s, and every CLI start would pay it.
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    points = sorted((int(k), int(v)) for k, v in histogram.items())
    positions = [p for p, _ in points]
    counts = [c for _, c in points]
    span = max(positions) - min(positions) if positions else 0
    fig = Figure(figsize=(4.4, 1.9))
    fig.subplots_adjust(left=0.13, right=0.98, top=0.95, bottom=0.25)  # fixed margins: no layout pass per chart
    ax = fig.add_subplot()
    ax.bar(positions, counts, width=max(0.8, span / 60), color=_BAR)
    ax.set_xlabel("first divergence (token index)", fontsize=8)
    ax.set_ylabel("samples", fontsize=8)
    ax.tick_params(labelsize=7)
    if span == 0 and positions:
        ax.set_xlim(positions[0] - 5, positions[0] + 5)
    for axis in (ax.xaxis, ax.yaxis):
        locator = axis.get_major_locator()
        if isinstance(locator, MaxNLocator):  # the default AutoLocator is one: ticks on whole numbers only
            locator.set_params(integer=True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue().decode("utf-8")
    return svg[svg.index("<svg") :]

"""The pieces every HTML report is built of (report/runs.py and report/sweep.py both use them, neither imports the
other): a section, a note on missing data, a table, a plot div drawn by `Plotly.newPlot`, and the page around them.
plotly.js is inlined once in the page's head; nothing links outside the file.
"""

from __future__ import annotations

import html
import json

import pandas as pd

from loratrace.errors import LoratraceError

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}  # no "produced with plotly" link: nothing outside the file
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
.missing{color:#8a6d3b;background:#fcf8e3;padding:.5em;border-radius:4px}.plot{width:100%;min-height:420px}"""


class ReportError(LoratraceError):
    """Runs that cannot be reported on (none found), or plotly missing."""

    exit_code = 1


def plotly_js() -> str:
    """plotly.js itself, to inline in the page's head; a missing plotly is one line naming the extra."""
    try:
        import plotly.offline  # an optional dependency: the `report` extra
    except ImportError:
        raise ReportError("loratrace report needs plotly: pip install 'loratrace[report]'") from None
    return plotly.offline.get_plotlyjs()


def page(title: str, body: str, script: str) -> str:
    """The whole HTML file: `body`'s sections under a heading, the style and `script` (plotly_js()) inlined."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style>\n<script>{script}</script></head>\n<body>\n"
            f"<h1>loratrace report: {html.escape(title)}</h1>\n{body}\n</body></html>\n")


def section(key: str, heading: str, content: str) -> str:
    return f'<section id="section-{key}"><h2>{html.escape(heading)}</h2>\n{content}\n</section>'


def missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
            return ""
        return html.escape(f"{value:.6g}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def plot(div_id: str, figure) -> str:
    """A div and the script that draws `figure` into it (plotly.js is in the page's head)."""
    import plotly.io  # an optional dependency: page() said so if it is missing

    payload = plotly.io.to_json(figure, validate=False).replace("</", "<\\/")  # text inside a <script> never closes it
    return (f'<div id="{div_id}" class="plot"></div>\n<script>(function(){{const f = {payload};'
            f'Plotly.newPlot("{div_id}", f.data, f.layout, {json.dumps(PLOT_CONFIG)});}})();</script>')

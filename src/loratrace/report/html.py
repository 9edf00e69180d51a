"""The pieces every HTML report is built of (report/runs.py and report/sweep.py both use them, neither imports the
other): a section, a note on missing data, a table, a plot div drawn by `Plotly.newPlot`, and the page around them.
plotly.js is inlined once in the page's head; nothing links outside the file.
"""

from __future__ import annotations

import html
import json
import re

import pandas as pd

try:
    import plotly.io
    import plotly.offline
except ImportError:  # the `report` extra: plotly_js() says so in one line
    plotly = None

from loratrace.errors import LoratraceError
from loratrace.report.script import SCRIPT

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}  # no "produced with plotly" link: nothing outside the file
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left;
vertical-align:top;max-width:32em;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}.tall{max-height:28em;overflow-y:auto}
td.prompt{max-width:18em;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.lt-table{font-size:.85em}.lt-table td{white-space:nowrap;overflow-wrap:normal}
.lt-table th{overflow-wrap:normal;min-width:3em}
th.sortable{cursor:pointer;user-select:none;background:#f6f6f6}th.asc:after{content:" \\25B2"}
th.desc:after{content:" \\25BC"}.controls{margin:.5em 0}.spark{vertical-align:middle}
nav.toc{background:#f8f8f8;border:1px solid #ddd;border-radius:4px;padding:.3em 1em;columns:2}
nav.toc ul{margin:.3em 0}.note{color:#555;font-size:.9em}
.missing{color:#8a6d3b;background:#fcf8e3;padding:.5em;border-radius:4px}.plot{width:100%;min-height:420px}"""
SECTION_HEADING = re.compile(r'<section id="(section-[^"]+)"><h2>([^<]*)</h2>')


class ReportError(LoratraceError):
    """Runs that cannot be reported on (none found), or plotly missing."""

    exit_code = 1


def plotly_js() -> str:
    """plotly.js itself, to inline in the page's head; a missing plotly is one line naming the extra."""
    if plotly is None:
        raise ReportError("loratrace report needs plotly: pip install 'loratrace[report]'")
    return plotly.offline.get_plotlyjs()


def page(title: str, body: str, script: str, data: dict | None = None) -> str:
    """The whole HTML file: a table of contents and `body`'s sections under a heading; the style, `script`
    (plotly_js()), the report's own script and `data` (set on its `LT` object before any plot is drawn) inlined."""
    toc = "".join(f'<li><a href="#{key}">{heading}</a></li>' for key, heading in SECTION_HEADING.findall(body))
    assign = "".join(f"LT.{name} = {as_script(value)};\n" for name, value in (data or {}).items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style>\n<script>{script}</script>\n<script>{SCRIPT}\n"
            f"LT.config = {json.dumps(PLOT_CONFIG)};</script></head>\n<body>\n"
            f"<h1>loratrace report: {html.escape(title)}</h1>\n<nav class=\"toc\"><ul>{toc}</ul></nav>\n"
            f"<script>{assign}</script>\n{body}\n</body></html>\n")


class Script(str):
    """JavaScript (or JSON) text built elsewhere (DuckDB's to_json), placed in the page as it is."""


def as_script(value) -> str:
    """`value` as a JavaScript literal inside a <script>: JSON, or a Script's text (JSON too)."""
    return _inert(value if isinstance(value, Script) else json.dumps(value, separators=(",", ":"), allow_nan=False))


def _inert(text: str) -> str:
    """JSON that no text in it (a prompt's `</script>` or `<!--`) can end or change the <script> holding it: every `<`
    as the escape `\\u003c`, the same character once parsed (JSON has `<` nowhere but inside strings)."""
    return text.replace("<", "\\u003c")


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
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def plot(div_id: str, figure, draw: str = "Plotly.newPlot") -> str:
    """A div and the script that draws `figure` into it (plotly.js is in the page's head); `draw`: a function of the
    report's script taking (div id, figure) instead (LT.curves adds the batches to the hover)."""
    payload = _inert(plotly.io.to_json(figure, validate=False))
    if draw != "Plotly.newPlot":
        return f'<div id="{div_id}" class="plot"></div>\n<script>{draw}("{div_id}", {payload});</script>'
    return (f'<div id="{div_id}" class="plot"></div>\n<script>(function(){{const f = {payload};'
            f'Plotly.newPlot("{div_id}", f.data, f.layout, {json.dumps(PLOT_CONFIG)});}})();</script>')

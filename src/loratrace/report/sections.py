"""The report's interactive sections (report/runs.py assembles the page): the curves with their batches, smoothing
and log scale; eval accuracy +/- standard error per checkpoint; the examples table; influence. Their data rides in
`LT.runs`, `LT.examples` and `LT.batches` (report/examples.py), drawn by report/script.py.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pandas as pd

from loratrace.report import figures
from loratrace.report.html import as_script, missing, plot, section, table
from loratrace.runs.find import read_run_info

LABEL_CHARS = 24
PAGE_ROWS = 100  # the examples table draws this many rows at a time (LT.pageSize)
INFLUENCE_TOP = 10  # proponents and opponents shown per run and method
STDERR_NOTE = ("stderr = sqrt(acc * (1 - acc) / (n - 1)) over the n examples scored, as lm-evaluation-harness computes "
               "it; two checkpoints whose accuracies differ by less than about 2 stderr are within the noise.")
# The examples table's columns: (label, index in examples.example_rows' rows, type, searched, help)
EXAMPLE_COLUMNS = (
    ("run", 0, "run", True, "the run (hover: its full id)"),
    ("example", 1, "text", True, "the example id"),
    ("prompt", 2, "text", True, "the formatted prompt's start"),
    ("exposures", 3, "number", False, "times the example was trained on"),
    ("first checkpoint", 4, "number", False, "the first checkpoint that includes it (empty: none saved after it)"),
    ("p(gold) in training", 5, "spark", False, "p(gold) at each exposure, in training order (sorts by the last)"),
    ("forgetting", 6, "number", False, "forgetting events: correct at one exposure, wrong at the next"),
    ("correct last seen", 7, "bool", False, "correct at its last exposure in training"),
    ("correct at last eval", 8, "bool", False, "correct at the last checkpoint evaluated on a split that holds it"),
    ("influence", 9, "number", False, "TracIn influence summed over the test examples computed (loratrace influence)"),
)


def run_labels(run_dirs: list[Path], run_ids: list[str]) -> dict[str, str]:
    """Run id -> a short label: run.json's `name` if it has one, else the id from its timestamp on (the dataset and
    method are in the runs table), at most LABEL_CHARS; the full id wherever two labels would be the same."""
    labels = {}
    for run_dir, run_id in zip(run_dirs, run_ids):
        name = read_run_info(run_dir).get("name")
        stamp = re.search(r"(?:^|_)(\d{8}_\d{6}(?:_\d+)?)$", run_id)
        short = str(name) if name else (stamp.group(1) if stamp else run_id)
        labels[run_id] = short if len(short) <= LABEL_CHARS else short[:LABEL_CHARS - 1] + "\u2026"
    if len(set(labels.values())) < len(labels):
        return {run_id: run_id for run_id in labels}
    return labels


def curves_section(data: dict, color: dict, note: str) -> str:
    heading = "Loss, learning rate, grad-norm per step"
    if not data["tracked"]:
        return section("curves", heading, note)
    options = "".join(f'<option value="{data["run_ids"].index(r)}">{html.escape(data["labels"][r])}</option>'
                      for r in data["tracked"])
    controls = ('<div class="controls"><label>smoothing <input type="range" id="curves-smoothing" min="0" max="0.99" '
                'step="0.01" value="0" oninput="LT.smooth(\'plot-curves\', Number(this.value));'
                'this.nextElementSibling.textContent = this.value"> <span>0</span></label> '
                '<label><input type="checkbox" id="curves-log" onchange="LT.logScale(\'plot-curves\', this.checked)">'
                ' log scale</label></div>')
    finder = ('<div class="controls">whole batch of <select id="batch-run">' + options + '</select> step '
              '<input type="number" id="batch-step" min="1" value="1"> <button id="batch-show" onclick="LT.showBatch('
              'Number(document.getElementById(\'batch-run\').value), document.getElementById(\'batch-step\').value)">'
              'show</button> <span class="note">(or click a point of the loss or grad-norm curve)</span></div>'
              '<div id="batch-view"></div>')
    hint = ('<p class="note">Hover a step of the loss or grad-norm curve for its batch (first example ids, its worst '
            'per-example losses); a click shows the whole batch below.</p>')
    return section("curves", heading, note + hint + controls + plot("plot-curves", figures.curves(data, color),
                                                                    draw="LT.curves") + finder)


def evals_section(data: dict, color: dict) -> str:
    heading = "Eval accuracy per checkpoint (+/- standard error)"
    frame = data["evals"]
    if frame.empty:
        return section("evals", heading, missing(
            "no evaluations: run `loratrace eval RUN`, or train with eval.every_checkpoint=true"))
    shown = frame.assign(run=[data["labels"][r] for r in frame.run_id],
                         checkpoint=[("final_model" if f else str(s)) for s, f in zip(frame.checkpoint_step,
                                                                                       frame.final_model)],
                         accuracy=[f"{a:.4f} +/- {s:.4f}" if s == s and s is not None else f"{a:.4f}"
                                   for a, s in zip(frame.accuracy, frame.stderr)])
    rows = shown[["run", "split", "scoring", "checkpoint", "examples", "accuracy", "run_id"]]
    return section("evals", heading, f'<p class="note">{html.escape(STDERR_NOTE)}</p>'
                   + plot("plot-evals", figures.evals(data, color)) + f'<div class="tall">{table(rows)}</div>')


def examples_section(data: dict) -> str:
    heading = "Examples: one row per training example and run"
    if not data["tracked"]:
        return section("examples", heading, missing("no tracking data: no per-example rows (trained without "
                                                     "--track-batches)"))
    influence = any(row[9] is not None for row in data["examples"])
    columns = [{"label": label, "index": index, "type": kind, "search": searched, "help": help_text,
                **({"cls": "prompt"} if index == 2 else {})}
               for label, index, kind, searched, help_text in EXAMPLE_COLUMNS
               if (index != 0 or len(data["tracked"]) > 1) and (index != 9 or influence)]
    note = ('<p class="note">Search matches the id, the prompt and the run; a header sorts (again: the other way). '
            f'{len(data["examples"]):,} rows, drawn {PAGE_ROWS} at a time.</p>')
    return section("examples", heading, note + '<div id="examples"></div>'
                   f'<script>LT.table("examples", {as_script(columns)}, LT.examples.rows);</script>')


def influence_section(data: dict, note: str = "") -> str | None:
    """Per run and method, the training examples with the largest and smallest summed influence; None without
    influence terms (the section is left out, as `loratrace influence` was not run). `note`: HTML put after them
    (a missing validation)."""
    totals = data["influence"]
    if totals.empty:
        return None
    parts = [f'<p class="note">From tracking/influence/ (`loratrace influence RUN`): each training example\'s TracIn '
             f"score summed over its terms and the test examples computed; the {INFLUENCE_TOP} strongest each way.</p>"]
    for number, ((run_id, method), group) in enumerate(totals.groupby(["run_id", "method"], sort=False)):
        top = group.nlargest(INFLUENCE_TOP, "score")
        bottom = group.nsmallest(INFLUENCE_TOP, "score")
        shown = pd.concat([top, bottom[~bottom.index.isin(top.index)]])
        label = f"{data['labels'].get(run_id, run_id)} {method}"
        parts.append(plot(f"plot-influence-{number}", figures.influence(shown, label))
                     + table(shown[["train_example_id", "score", "terms", "test_examples"]]))
    return section("influence", "Influence (TracIn): which training examples moved the test examples",
                   "".join(parts) + note)

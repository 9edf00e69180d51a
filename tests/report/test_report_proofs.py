"""`loratrace report`'s replays and validation of attribution (issue #24): what the page shows is checked against
run.json, the runs view and the validations rows written here, read independently. A copy of the session's small run
(16 updates, full checkpoints 9..16) is replayed for one step; validation rows are a VALIDATIONS part written into a
copy's tracking/validations/ (as `loratrace influence RUN --validate` writes them)."""

import json
import re
import shutil
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import loratrace
from loratrace.proof.replay import replay
from loratrace.track import schema

pytest.importorskip("plotly")


class Tables(HTMLParser):
    """Each <table>'s rows, as lists of cell texts (the header row first)."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def _section_tables(report: Path, key: str) -> list[list[dict]] | None:
    """The tables of the report's section `key`, each as dicts of header -> cell; None without the section."""
    text = report.read_text()
    start = text.find(f'<section id="section-{key}">')
    if start < 0:
        return None
    parser = Tables()
    parser.feed(text[start:text.index("</section>", start)])
    return [[dict(zip(rows[0], row)) for row in rows[1:]] for rows in parser.tables]


def _labels(report: Path) -> dict[str, str]:
    runs = re.search(r"^LT\.runs = (.*);$", report.read_text(), flags=re.M).group(1)
    return {r["run_id"]: r["label"] for r in json.loads(runs)}


def _final_loss(run: Path) -> float:
    with loratrace.open_runs(run) as db:
        return db.sql("SELECT final_loss FROM runs").fetchall()[0][0]


@pytest.fixture(scope="module")
def replayed(small_run, tmp_path_factory):
    """A copy of the small run and its replay from checkpoint 13 for one step, four examples dropped."""
    run = shutil.copytree(small_run, tmp_path_factory.mktemp("replay") / "runs" / small_run.name)
    with loratrace.open_runs(run) as db:
        ids = db.sql("SELECT DISTINCT example_id FROM samples WHERE step = 14 ORDER BY example_id").df().example_id
    dropped = sorted(ids)[:4]
    return run, replay(run, 13, dropped, steps=1), dropped


def test_a_replay_names_its_original_step_drops_and_both_losses(replayed, tmp_path):
    run, made, dropped = replayed
    report = loratrace.write_report([run, made], tmp_path / "both.html")
    labels = _labels(report)
    [rows] = _section_tables(report, "replays")
    original_id = json.loads((run / "run.json").read_text())["run_id"]
    assert json.loads((made / "run.json").read_text())["replay_of"]["run"] == original_id
    assert len(rows) == 1 and rows[0]["run_id"] == made.name
    row = rows[0]
    assert (row["replay"], row["original"], row["from step"], row["to step"]) == (labels[made.name],
                                                                                  labels[original_id], "13", "14")
    assert row["dropped"] == f"{dropped[0]}, {dropped[1]}, {dropped[2]} +1"
    assert float(row["final loss"]) == pytest.approx(_final_loss(made), rel=1e-5)
    assert float(row["original's final loss"]) == pytest.approx(_final_loss(run), rel=1e-5)
    assert _final_loss(made) != _final_loss(run)  # the two numbers are the two runs', not one twice
    assert re.findall(r'<section id="(section-[^"]+)">', report.read_text())[:2] == ["section-runs", "section-replays"]

    alone = loratrace.write_report(made, tmp_path / "alone.html")  # the original is not in it: named, no loss
    [[row]] = _section_tables(alone, "replays")
    assert (row["original"], row["original's final loss"]) == (original_id, "")
    assert _section_tables(loratrace.write_report(run, tmp_path / "original.html"), "replays") is None


def _validation_rows(run_id: str) -> dict[str, list[dict]]:
    """Two test examples scored by tracin (exact), tracin-cp (d=64) and the random baseline, one --validate call."""
    setup = {"run_id": run_id, "test_split": "validation", "subsets": 5, "fraction": 0.5, "seed": 0, "from_step": 9,
             "to_step": 16, "computed_at": datetime(2026, 12, 4, tzinfo=timezone.utc)}
    methods = {"tracin": (None, [0.6, 0.2], 0.4, 0.1, 0.7), "tracin-cp": (64, [0.5, 0.3], 0.35, 0.2, 0.6),
               "random": (None, [-0.1, 0.05], -0.025, -0.3, 0.25)}
    return {method: [{**setup, "method": method, "project_dim": dim, "test_example_id": f"validation-{i}",
                      "test_line": i, "spearman": rho, "lds": lds, "lds_low": low, "lds_high": high}
                     for i, rho in enumerate(spearman)]
            for method, (dim, spearman, lds, low, high) in methods.items()}


def test_validation_of_attribution_shows_lds_beside_random_and_spearman(small_run, tmp_path):
    run = shutil.copytree(small_run, tmp_path / "runs" / small_run.name)
    without = loratrace.write_report(run, tmp_path / "without.html")
    assert _section_tables(without, "validations") is None and "--validate" not in without.read_text()
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    rows = _validation_rows(run_id)
    for method, part in rows.items():
        name = f"{method}-0123abcd.parquet"
        assert schema.PART_NAMES["validations"].fullmatch(name)
        (run / "tracking" / "validations").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part, schema=schema.VALIDATIONS), run / "tracking" / "validations" / name)

    report = loratrace.write_report(run, tmp_path / "with.html")
    label = _labels(report)[run_id]
    summary, spearman = _section_tables(report, "validations")
    assert [(r["method"], r["project_dim"]) for r in summary] == [("tracin", "exact"), ("tracin-cp", "64")]
    for row, method in zip(summary, ["tracin", "tracin-cp"]):
        first = rows[method][0]
        assert row["run"] == label and float(row["LDS"]) == pytest.approx(first["lds"])
        assert row["95% interval"] == f"[{first['lds_low']:.4f}, {first['lds_high']:.4f}]"
        assert float(row["random LDS"]) == pytest.approx(-0.025)
        assert (row["test examples"], row["subsets"], row["steps"]) == ("2", "5", "9-16")
    assert [r["test_example_id"] for r in spearman] == ["validation-0", "validation-1"]
    for column, method in ((f"{label} tracin", "tracin"), (f"{label} tracin-cp d=64", "tracin-cp"),
                           (f"{label} random", "random")):
        assert [float(r[column]) for r in spearman] == pytest.approx([r["spearman"] for r in rows[method]])

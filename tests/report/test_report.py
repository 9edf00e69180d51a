"""`loratrace report` (issues #14, #24): one self-contained HTML file, drawn in a real headless Chromium; it renders for
a run without evals and for an untracked run. What the page carries (each step's batch, the examples table's rows,
eval accuracy +/- stderr, influence) is checked against the views, read independently here."""

import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, small_config

import loratrace
from loratrace.evaluate import evaluate_run
from loratrace.report.compare import FORGETTING

pytest.importorskip("plotly")

SHORT = ["training.max_steps=6", "training.stage1_steps=4", "export.merged_model=false"]
PLOTS = ["plot-curves", "plot-evals", "plot-influence-0", "plot-cartography-0", "plot-cartography-1", "plot-forgetting",
         "plot-cost"]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots of the browser test (git-ignored)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("report-runs")
    variants = {"evaluated": ["eval.every_checkpoint=true", "eval.limit=16"], "no_evals": ["training.seed=7"],
                "untracked": ["tracking.enabled=false"]}
    trained = {name: loratrace.train(small_config(runs, *SHORT, *extra), progress=False)
               for name, extra in variants.items()}
    # influence of its training examples on two validation examples, and its last checkpoint scored on training
    # examples (the examples table's "correct at last eval")
    loratrace.influence(trained["evaluated"], limit=2, progress=False)
    evaluate_run(trained["evaluated"], "last", ["eval.split=train", "eval.limit=64"], progress=False)
    return trained


@pytest.fixture(scope="module")
def reports(three_runs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reports")
    return {"all": loratrace.write_report(list(three_runs.values()), out / "all.html"),
            "untracked": loratrace.write_report(three_runs["untracked"], out / "untracked.html"),
            "no_evals": loratrace.write_report(three_runs["no_evals"], out / "no_evals.html")}


class Outside(HTMLParser):
    """Every attribute that would load or link something, and every plot div."""

    def __init__(self):
        super().__init__()
        self.links, self.plots, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "action", "data", "srcset", "poster"):
            if attrs.get(name) and not attrs[name].startswith("#"):  # a link inside the page (table of contents)
                self.links.append((tag, attrs[name]))
        if tag == "div" and (attrs.get("id") or "").startswith("plot-"):
            self.plots.append(attrs["id"])
        self.scripts += tag == "script"


def _parsed(path: Path) -> Outside:
    parser = Outside()
    parser.feed(path.read_text())
    return parser


def test_the_report_is_one_file_that_links_to_nothing(reports, three_runs):
    page = _parsed(reports["all"])
    assert page.links == [] and page.plots == PLOTS
    text = reports["all"].read_text()
    assert "plotly.js v" in text[:20000]  # the library itself, inlined in the head
    assert f"no tracking data for {three_runs['untracked'].name} (trained without --track-batches)" in text
    assert "training.seed" in text and "tracking.enabled" in text  # config differences


def test_missing_data_is_said_not_drawn(reports, three_runs):
    untracked = reports["untracked"].read_text()
    name = three_runs["untracked"].name
    assert f"<td>{name}</td><td>{name.split('_', 2)[2]}</td><td>completed</td><td>6</td>" in untracked  # run.json
    assert _parsed(reports["untracked"]).plots == []
    for missing in ("no tracking data for", "no evaluations: run `loratrace eval RUN`", "no tracking cost recorded"):
        assert missing in untracked
    no_evals = _parsed(reports["no_evals"])
    assert no_evals.plots == ["plot-curves", "plot-cartography-0", "plot-forgetting", "plot-cost"]
    assert "no evaluations" in reports["no_evals"].read_text()
    assert "section-influence" not in reports["no_evals"].read_text()  # no influence computed: no section


def _page_data(path: Path) -> dict:
    """The data the page's script draws from (`LT.name = <JSON>;` lines at the top of the body), as JSON reads it."""
    script = re.search(r"</nav>\n<script>(.*?)</script>", path.read_text(), flags=re.S).group(1)
    return {m.group(1): json.loads(m.group(2)) for m in re.finditer(r"^LT\.(\w+) = (.*);$", script, flags=re.M)}


def test_sections_are_listed_and_runs_have_short_labels(reports, three_runs):
    text = reports["all"].read_text()
    toc = re.search(r'<nav class="toc"><ul>(.*?)</ul></nav>', text).group(1)
    sections = re.findall(r'<section id="(section-[^"]+)">', text)
    assert re.findall(r'href="#([^"]+)"', toc) == sections
    assert sections == ["section-runs", "section-config", "section-curves", "section-evals", "section-examples",
                        "section-influence", "section-cartography", "section-forgetting", "section-cost"]
    runs = _page_data(reports["all"])["runs"]
    assert [r["run_id"] for r in runs] == [d.name for d in three_runs.values()]
    assert [r["label"] for r in runs] == [d.name.split("_", 2)[2] for d in three_runs.values()]  # the timestamp on


def test_a_run_named_in_run_json_is_labelled_by_its_name(three_runs, tmp_path):
    run = shutil.copytree(three_runs["no_evals"], tmp_path / "runs" / "renamed")  # the run id stays in run.json
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "name": "baseline-lr"}))
    report = loratrace.write_report(run, tmp_path / "named.html")
    data = _page_data(report)
    assert data["runs"] == [{"run_id": info["run_id"], "label": "baseline-lr"}]
    assert f"<td>{info['run_id']}</td><td>baseline-lr</td>" in report.read_text()
    assert "plot-curves" in _parsed(report).plots and data["batches"][0]["steps"] == [1, 2, 3, 4, 5, 6]


def test_a_prompt_cannot_end_the_script_that_holds_it(three_runs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = shutil.copytree(three_runs["no_evals"], tmp_path / "runs" / "hostile")
    path = run / "tracking" / "examples.parquet"
    table = pq.read_table(path)
    hostile = "</script><!--<script>document.title='owned'</script>"
    prompts = [hostile] * table.num_rows
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts)), path)
    report = loratrace.write_report(run, tmp_path / "hostile.html")
    body = report.read_text().split("</head>", 1)[1]  # after plotly.js
    assert "</script><!--" not in body and "<!--" not in body
    clean = loratrace.write_report(three_runs["no_evals"], tmp_path / "clean.html")
    assert _parsed(report).scripts == _parsed(clean).scripts
    rows = _page_data(report)["examples"]["rows"]
    assert rows and all(row[2] == hostile for row in rows)  # the same text once parsed


def test_each_steps_whole_batch_is_in_the_page(reports, three_runs):
    data = _page_data(reports["all"])
    rows = data["examples"]["rows"]
    with loratrace.open_runs(list(three_runs.values())) as db:
        samples = db.sql("""SELECT run_id, step, example_id, loss, correct FROM samples
                            ORDER BY run_id, step, micro_batch, rank, position""").df()
    for number, run in enumerate(data["runs"]):
        batches, mine = data["batches"][number], samples[samples.run_id == run["run_id"]]
        if mine.empty:
            assert batches is None  # the untracked run
            continue
        assert batches["steps"] == sorted(set(mine.step))
        for k, step in enumerate(batches["steps"]):
            expected = mine[mine.step == step]
            members = [rows[batches["offset"] + (v if v >= 0 else -v - 1)] for v in batches["ids"][k]]
            assert [m[0] for m in members] == [number] * len(expected)
            assert [m[1] for m in members] == list(expected.example_id)
            assert [v >= 0 for v in batches["ids"][k]] == list(expected.correct)
            assert batches["loss"][k] == pytest.approx(list(expected.loss), abs=5e-4)


def test_the_examples_rows_are_the_views(reports, three_runs):
    data = _page_data(reports["all"])
    run_ids = [r["run_id"] for r in data["runs"]]
    rows = {(run_ids[r[0]], r[1]): r for r in data["examples"]["rows"]}
    with loratrace.open_runs(list(three_runs.values())) as db:
        seen = db.sql("""SELECT run_id, example_id, count(*) AS n, min(step) AS first, list(p_gold ORDER BY step) AS p,
                                last(correct ORDER BY step) AS last FROM samples GROUP BY ALL""").df()
        checkpoints = db.sql("SELECT run_id, step FROM checkpoints").df()
        forgetting = db.sql(FORGETTING).df().set_index(["run_id", "example_id"]).forgetting_events
        last_eval = db.sql("""SELECT example_id, correct FROM evals WHERE split = 'train'
                              AND checkpoint_step = (SELECT max(checkpoint_step) FROM evals WHERE split = 'train')
                              AND checkpoint_path <> 'final_model'""").df().set_index("example_id").correct
        influence = db.sql("SELECT train_example_id, sum(score) AS s FROM influence GROUP BY ALL").df()
        prompts = db.sql("SELECT run_id, example_id, prompt FROM examples").df()
    assert sorted(rows) == sorted(zip(seen.run_id, seen.example_id))
    for r in seen.itertuples():
        row = rows[(r.run_id, r.example_id)]
        saved = sorted(s for s in checkpoints[checkpoints.run_id == r.run_id].step if s >= r.first)
        assert row[3] == r.n and row[4] == (saved[0] if saved else None)
        assert row[5] == pytest.approx(list(r.p), abs=5e-4) and row[6] == forgetting[(r.run_id, r.example_id)]
        assert row[7] == r.last
        evaluated = r.run_id == three_runs["evaluated"].name and r.example_id in last_eval.index
        assert row[8] == (bool(last_eval[r.example_id]) if evaluated else None)
        prompt = prompts[(prompts.run_id == r.run_id) & (prompts.example_id == r.example_id)].prompt.iloc[0]
        assert prompt.startswith(row[2]) and len(row[2]) == min(len(prompt), 160)
    assert any(row[8] is not None for row in rows.values())  # some trained examples were scored at the last eval
    totals = dict(zip(influence.train_example_id, influence.s))
    influenced = {k[1]: r[9] for k, r in rows.items() if r[9] is not None}
    assert influenced and set(influenced) == set(totals)
    assert all(influenced[e] == pytest.approx(totals[e]) for e in influenced)


def test_eval_accuracy_comes_with_its_standard_error(reports, three_runs):
    text = reports["all"].read_text()
    with loratrace.open_runs(three_runs["evaluated"]) as db:
        per_example = db.sql("SELECT checkpoint_step, checkpoint_path, split, scoring, correct FROM evals").df()
    shown = 0
    for (step, path, split, scoring), group in per_example.groupby(["checkpoint_step", "checkpoint_path", "split",
                                                                     "scoring"]):
        n, accuracy = len(group), group.correct.mean()
        stderr = math.sqrt(accuracy * (1 - accuracy) / (n - 1))  # lm-evaluation-harness's
        checkpoint = "final_model" if path == "final_model" else step
        assert (f"<td>{split}</td><td>{scoring}</td><td>{checkpoint}</td><td>{n}</td>"
                f"<td>{accuracy:.4f} +/- {stderr:.4f}</td>") in text
        shown += 1
    assert shown >= 3  # validation at each checkpoint, train at the last
    assert "as lm-evaluation-harness computes it" in text


def test_influence_section_lists_the_strongest_examples(reports, three_runs):
    text = reports["all"].read_text()
    section = text[text.index('<section id="section-influence">'):]
    section = section[:section.index("</section>")]
    with loratrace.open_runs(three_runs["evaluated"]) as db:
        totals = db.sql("""SELECT train_example_id, sum(score) AS s FROM influence GROUP BY ALL
                           ORDER BY s DESC""").df()
    listed = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td>", section)
    assert [e for e, _ in listed[:10]] == list(totals.train_example_id[:10])
    assert float(listed[0][1]) == pytest.approx(totals.s.iloc[0], rel=1e-5)
    assert set(totals.train_example_id[-10:]) <= {e for e, _ in listed}  # the strongest opponents too
    assert "influence not validated: run `loratrace influence RUN --validate`" in section  # no validations section


def test_cli_report_and_its_errors(three_runs, tmp_path):
    out = tmp_path / "r.html"
    result = run_cli("report", str(three_runs["evaluated"]), "-o", str(out))
    assert result.returncode == 0 and out.is_file() and str(out) in result.stdout
    for args, message in ([["report", str(tmp_path / "nope"), "-o", str(tmp_path / "x.html")], "is not a run folder"],
                          [["report", str(three_runs["evaluated"]), "-o", str(tmp_path / "no" / "x.html")], "folder"]):
        failed = run_cli(*args)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1 and len(lines) == 1 and message in lines[0], failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
@pytest.mark.parametrize("which", ["all", "untracked", "no_evals"])
def test_the_report_renders_in_headless_chromium(reports, which):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[dev])")
    path = reports[which]
    expected = _parsed(path).plots
    errors, outside = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:", "blob:"))
                else None)
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        drawn = page.eval_on_selector_all("div.plot", """els => els.map(e => [e.id,
            e.classList.contains('js-plotly-plot') && e.querySelectorAll('.main-svg').length > 0])""")
        links = page.eval_on_selector_all("[href], [src]", """els => els.map(e => e.getAttribute('href') ||
            e.getAttribute('src')).filter(u => !u.startsWith('#') && !u.startsWith('data:'))""")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"report-{which}.png"), full_page=True)
        browser.close()
    assert errors == [] and outside == [] and links == []  # drawn, the page still links to nothing outside
    assert drawn == [[plot, True] for plot in expected]
    assert (ARTIFACTS / f"report-{which}.png").stat().st_size > 10_000


HOVER_POINT = """([trace, step]) => {  // where a curve's point is on the screen
    const gd = document.getElementById('plot-curves'), tr = gd.data[trace], i = tr.x.indexOf(step);
    const xa = gd._fullLayout[tr.xaxis.replace('x', 'xaxis')], ya = gd._fullLayout[tr.yaxis.replace('y', 'yaxis')];
    const box = gd.getBoundingClientRect();
    return [box.left + xa._offset + xa.l2p(tr.x[i]), box.top + ya._offset + ya.l2p(tr.y[i])];
}"""


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
def test_hover_click_search_sort_and_curve_controls_in_chromium(reports):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install .[dev])")
    data = _page_data(reports["all"])
    rows, batches = data["examples"]["rows"], data["batches"][0]
    member = [rows[batches["offset"] + (v if v >= 0 else -v - 1)][1] for v in batches["ids"][1]]  # step 2's batch
    worst = member[max(range(len(member)), key=lambda j: batches["loss"][1][j])]
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(reports["all"].as_uri())
        page.wait_for_load_state("load")
        for trace, curve in ((0, "loss"), (2, "grad-norm")):  # the first run's loss and grad-norm curves
            page.locator("#plot-curves").scroll_into_view_if_needed()
            point = page.evaluate(HOVER_POINT, [trace, 2])
            page.mouse.move(*point)
            page.wait_for_selector("#plot-curves .hoverlayer .hovertext")
            hover = page.text_content("#plot-curves .hoverlayer .hovertext")  # svg text: its lines run together
            assert "step 2" in hover and curve in hover and ", ".join(member[:5]) in hover and "+3" in hover
            assert f"worst losses: {worst}" in hover
            page.mouse.click(*point)
            shown = page.inner_text("#batch-view")
            assert "step 2: the whole batch (8 examples" in shown and all(m in shown for m in member)
        page.click(f'#batch-view a[data-id="{member[0]}"]')  # an example of the batch: its row in the table
        assert page.input_value("#examples-search") == member[0]
        assert page.inner_text("#examples .count").startswith("rows 1-1 of 1 (of")
        page.fill("#examples-search", "no such example anywhere")
        assert page.inner_text("#examples .count") == "no rows match"
        assert page.eval_on_selector_all("#examples tbody tr", "t => t.length") == 0
        page.fill("#examples-search", "")
        column = 'th:text-is("p(gold) in training")'
        last_p = """els => {  // each row's last p(gold), the number after its sparkline
            const heads = [...document.querySelectorAll('#examples th')];
            const at = heads.findIndex(t => t.textContent.startsWith('p(gold)'));
            return els.map(e => e.children[at].textContent.trim().split(' ').pop());
        }"""
        page.click(f"#examples {column}")
        ascending = [float(v) for v in page.eval_on_selector_all("#examples tbody tr", last_p)]
        page.click(f"#examples {column}")
        descending = [float(v) for v in page.eval_on_selector_all("#examples tbody tr", last_p)]
        assert ascending == sorted(ascending) and descending == sorted(descending, reverse=True)
        assert ascending[0] < ascending[-1]
        page.evaluate("LT.pageSize = 10")
        page.click("#examples button.next")
        assert page.inner_text("#examples .count") == f"rows 11-20 of {len(rows)}"
        page.check("#curves-log")
        assert page.evaluate("document.getElementById('plot-curves').layout.yaxis.type") == "log"
        page.locator("#curves-smoothing").fill("0.9")
        raw, smoothed = page.evaluate("[0].map(i => document.getElementById('plot-curves').data[i])"
                                      ".map(t => [t.customdata, t.y])[0]")
        browser.close()
    expected, last = [], 0.0
    for n, value in enumerate(raw, start=1):  # TensorBoard's debiased exponential moving average
        last = last * 0.9 + 0.1 * value
        expected.append(last / (1 - 0.9 ** n))
    assert smoothed == pytest.approx(expected) and smoothed != pytest.approx(raw)
    assert errors == []


def test_the_compare_and_report_bench_runs_at_small_size(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bench.reports", "--steps", "120", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| runs | 2 synthetic runs, 120 steps x 32 examples each (7,680 sample rows) |" in result.stdout
    size = (tmp_path / "report.html").stat().st_size
    assert f"| report file size | {size:,} B" in result.stdout
    assert _parsed(tmp_path / "report.html").links == []

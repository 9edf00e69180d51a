"""`loratrace report` (issue #14): one self-contained HTML file, drawn in a real headless Chromium; it renders for a run
without evals and for an untracked run."""

import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, small_config

import loratrace

pytest.importorskip("plotly")

SHORT = ["training.max_steps=6", "training.stage1_steps=4", "export.merged_model=false"]
PLOTS = ["plot-curves", "plot-evals", "plot-cartography-0", "plot-cartography-1", "plot-forgetting", "plot-cost"]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots of the browser test (git-ignored)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("report-runs")
    variants = {"evaluated": ["eval.every_checkpoint=true", "eval.limit=16"], "no_evals": ["training.seed=7"],
                "untracked": ["tracking.enabled=false"]}
    return {name: loratrace.train(small_config(runs, *SHORT, *extra), progress=False)
            for name, extra in variants.items()}


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
            if attrs.get(name):
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
    assert f"<td>{three_runs['untracked'].name}</td><td>completed</td><td>6</td>" in untracked  # from run.json
    assert _parsed(reports["untracked"]).plots == []
    for missing in ("no tracking data for", "no evaluations: run `loratrace eval RUN`", "no tracking cost recorded"):
        assert missing in untracked
    no_evals = _parsed(reports["no_evals"])
    assert no_evals.plots == ["plot-curves", "plot-cartography-0", "plot-forgetting", "plot-cost"]
    assert "no evaluations" in reports["no_evals"].read_text()


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

import json
import re

import pytest
from conftest import ROOT, run_cli

from loratrace.cli import COMMANDS, _parser


def test_every_command_has_help_and_appears_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name in COMMANDS:
        assert sub.choices[name].description, name
        assert f"loratrace {name}" in readme, name


def test_help_exits_zero():
    result = run_cli("trace", "--help")
    assert result.returncode == 0 and "--example-id" in result.stdout


def test_query_formats_params_and_stdin(small_run, tmp_path):
    runs = str(small_run.parent)
    table = run_cli("query", "SELECT step, loss FROM batches WHERE step <= ? ORDER BY step", "-p", "3",
                    "--runs-dir", runs)
    assert table.returncode == 0 and re.search(r"^\s*step\s+loss", table.stdout, re.MULTILINE)
    assert len(table.stdout.strip().splitlines()) == 4
    csv = run_cli("query", "-", "--format", "csv", "--runs-dir", runs, stdin="SELECT count(*) AS n FROM samples")
    assert csv.stdout.splitlines() == ["n", str(16 * 8)]
    js = run_cli("query", "SELECT step FROM batches ORDER BY step LIMIT 2", "--format", "json", "--runs-dir", runs)
    assert [json.loads(line)["step"] for line in js.stdout.splitlines()] == [1, 2]
    out = tmp_path / "steps.parquet"
    pq = run_cli("query", "SELECT * FROM step_checkpoint", "--format", "parquet", "--output", str(out),
                 "--runs-dir", runs)
    assert pq.returncode == 0
    import pandas as pd

    assert len(pd.read_parquet(out)) == 16


@pytest.mark.parametrize("sql, message", [
    ("SELEC 1", "SQL error"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY statements are not allowed"),
])
def test_query_errors_are_one_line_exit_1(small_run, sql, message):
    result = run_cli("query", sql, "--runs-dir", str(small_run.parent))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("loratrace: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_trace_and_runs(small_run):
    runs = str(small_run.parent)
    example = run_cli("query", "SELECT example_id FROM samples ORDER BY step, position LIMIT 1", "--format", "csv",
                      "--runs-dir", runs).stdout.splitlines()[1]
    result = run_cli("trace", "--example-id", example, "--runs-dir", runs)
    assert result.returncode == 0 and f"{small_run.name}: {example}" in result.stdout
    assert "first included in checkpoint-step 9" in result.stdout
    line = run_cli("query", "SELECT line FROM samples WHERE example_id = ? LIMIT 1", "-p", example, "--format", "csv",
                   "--runs-dir", runs).stdout.splitlines()[1]
    by_line = run_cli("trace", "--line", line, "--run", small_run.name, "--runs-dir", runs)
    assert by_line.returncode == 0 and f"{example} (line {line})" in by_line.stdout
    missing = run_cli("trace", "--example-id", "LTSYN_TRA_99999", "--runs-dir", runs)
    assert missing.returncode == 1 and "closest: LTSYN_TRA_" in missing.stderr
    listing = run_cli("runs", "--runs-dir", runs)
    assert small_run.name in listing.stdout and "completed" in listing.stdout


@pytest.mark.parametrize("args", [["query", "SELECT 1"], ["runs"], ["trace", "--line", "0"]])
def test_query_trace_and_runs_import_neither_torch_nor_transformers(small_run, args):
    import subprocess
    import sys

    code = ("import sys; from loratrace.cli import main; main(sys.argv[2:] + ['--runs-dir', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code, str(small_run.parent), *args], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr

"""Generated hostile inputs (hypothesis), judged by the same rule as the table (conftest.judge).

In-process where a command is cheap (query, runs: `loratrace.cli.main` with stdout and stderr captured; an exception
that escapes main is a traceback), the whole case folder hashed before and after every example. Each property is one
case of the session summary: clean, or the class of the smallest input hypothesis found.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import traceback

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile.conftest import Result, Verdict, changed_paths, judge, keep, snapshot
from loratrace.cli import main

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Finding(AssertionError):
    """One generated input that breaks the rule: its class, the command and why."""

    def __init__(self, outcome: str, command: str, first_line: str, reasons: list[str]):
        super().__init__(f"{outcome}: {command}\n{first_line}\n{'; '.join(reasons)}")
        self.outcome, self.command, self.first_line, self.reasons = outcome, command, first_line, reasons


def run_in_process(w, argv: list[str]) -> Result:
    before = snapshot(w.root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # what escapes main is what a user would see as a traceback
            traceback.print_exc()
            rc = 1
    return Result(argv, rc, out.getvalue(), err.getvalue(), changed_paths(before, snapshot(w.root)))


def judged(w, argv: list[str], note: str = "", **rule) -> None:
    result = run_in_process(w, argv)
    outcome, reasons = judge(w, result, **rule)
    if outcome != "clean":
        command = "loratrace " + " ".join(argv) + (f"  # {note}" if note else "")
        raise Finding(outcome, command.replace(str(w.root), "$CASE"),
                      result.first_stderr_line.replace(str(w.root), "$CASE"), reasons)


def as_case(case_id: str, body) -> None:
    """Run a hypothesis property as one case of the summary."""
    try:
        body()
    except Finding as finding:
        keep(Verdict(case_id, finding.outcome, finding.command, finding.first_line[:200], finding.reasons))
        raise
    keep(Verdict(case_id, "clean", "(generated)", ""))


# ------------------------------------------------------------------------------------------------ run.json

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=8)
RUN_FIELDS = ("run_id", "status", "steps", "attempts", "checkpoints", "created_at", "dataset", "final_loss")


def untracked_listed(result, w) -> str | None:
    """`runs` over a damaged run.json of the tracked run: the untracked run still shows as it is."""
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    mine = [r for r in rows if r.get("run_id") == w.untracked]
    return None if len(mine) == 1 and mine[0].get("status") == "completed" else "the untracked run is not listed"


def test_generated_run_json(world):
    original = (world.T / "run.json").read_text()

    @PROPERTY_SETTINGS
    @given(whole=st.booleans(), value=JSON, key=st.sampled_from(RUN_FIELDS))
    def body(whole, value, key):
        info = json.loads(original)
        info[key] = value
        text = json.dumps(value if whole else info)
        (world.T / "run.json").write_text(text)
        note = f"run.json: {text[:150]}"
        judged(world, ["runs", "--format", "json", "--runs-dir", str(world.runs)], note, names=("run.json",),
               check=untracked_listed)
        judged(world, ["query", "SELECT run_id, status, steps FROM runs", "--format", "json", "--runs-dir",
                       str(world.runs)], note, names=("run.json",))

    as_case("runs-generated-run_json", body)


# ------------------------------------------------------------------------------------------------ SQL

FRAGMENTS = ["SELECT", "*", "count(*)", "FROM", "batches", "samples", "runs", "WHERE", "step", ">", "1", ",", "(", ")",
             "UNION ALL", "WITH x AS", "AS", ";", "--", "/*", "*/", "'", "\"", "?", "read_text('{sentinel}')",
             "read_csv('{sentinel}')", "read_parquet('{case}/*.parquet')", "glob('/*')", "glob('{case}/*')",
             "COPY", "TO '{case}/copied.csv'", "ATTACH '{case}/x.db'", "INSTALL httpfs", "LOAD httpfs",
             "SET enable_external_access=true", "PRAGMA", "EXPORT DATABASE '{case}/db'", "CREATE TABLE t AS",
             "read_text('{runs}/../sentinel-*')", "getenv('HOME')", "current_setting('allowed_directories')",
             "EXPLAIN", "EXPLAIN ANALYZE", "query_table('batches')", "\x00", "\u202e", "é"]


def test_generated_sql(world):
    @PROPERTY_SETTINGS
    @given(words=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8), noise=st.text(max_size=6),
           fmt=st.sampled_from(["table", "csv", "json"]))
    def body(words, noise, fmt):
        sql = world.fill(" ".join(words) + noise)
        judged(world, ["query", sql, "--format", fmt, "--runs-dir", str(world.runs)])

    as_case("query-generated-sql", body)


# ------------------------------------------------------------------------------------------------ config overrides

def _finite(low, high=math.inf, low_open=False):
    def ok(value) -> bool:
        return isinstance(value, int | float) and math.isfinite(value) and \
            (value > low if low_open else value >= low) and value < high
    return ok


OVERRIDE_KEYS = {  # key -> what a value the config accepts must be (else the config refuses it, naming the key)
    "training.learning_rate_stage1": _finite(0, low_open=True),
    "training.learning_rate_stage2": _finite(0, low_open=True),
    "training.weight_decay": _finite(0),
    "training.max_grad_norm": _finite(0),
    "training.seed": _finite(0, 2**32),
    "training.batch_size": _finite(1, 2**31),
    "training.max_steps": _finite(1, 2**63),
    "training.warmup_steps": _finite(0, 2**63),
    "lora.r": _finite(1, 2**31),
    "lora.alpha": _finite(0, low_open=True),
    "lora.dropout": _finite(0, 1),
    "data.max_length": _finite(8, 2**31),
    "checkpoint.full_every": _finite(1, 2**63),
    "method": lambda v: isinstance(v, str) and not set("/\\\x00") & set(v),  # a piece of the run folder's name
    "runs_dir": lambda v: isinstance(v, str) and v.strip() != "",
    "model.name": lambda v: isinstance(v, str) and v.strip() != "",
}
VALUES = st.one_of(st.floats().map(repr), st.integers(-2**70, 2**70).map(str), st.text(max_size=8),
                   st.sampled_from(["", "..", "../x", "../../escaped", "nan", "inf", "-inf", "1e999", "null", "~",
                                    "[]", "{}", "0x10", "1_000", " 1 ", "true", "-0", ".5", "1e-400", "'1'"]))


def test_generated_config_overrides():
    """Any value for any key: the config refuses it in one LoratraceError naming the key, or it is a value the key
    can run with (finite, in range, a folder name where it names one)."""
    from loratrace.config import load_config
    from loratrace.errors import LoratraceError

    @PROPERTY_SETTINGS
    @given(key=st.sampled_from(sorted(OVERRIDE_KEYS)), value=VALUES)
    def body(key, value):
        command = f"train training.max_steps=2 {key}={value}"
        try:
            cfg = load_config(None, ["training.max_steps=2", "training.stage1_steps=1", f"{key}={value}"],
                              notice=lambda line: None)
        except LoratraceError as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if key.split(".")[-1] not in line:
                raise Finding("wrong", command, line, [f"the error does not name {key}"]) from None
            return
        except Exception as exc:  # noqa: BLE001 - anything else reaches the user as a traceback
            raise Finding("traceback", command, f"{type(exc).__name__}: {exc}", ["not a LoratraceError"]) from None
        section, _, leaf = key.rpartition(".")
        accepted = getattr(getattr(cfg, section) if section else cfg, leaf)
        if not OVERRIDE_KEYS[key](accepted):
            raise Finding("wrong", command, "", [f"accepted {key}={accepted!r}"])

    as_case("train-generated-config_overrides", body)


# ------------------------------------------------------------------------------------------------ data rows

ROW_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats() | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                              st.sampled_from(["text", "label", "stem", "choices"]), inner, max_size=3),
                          max_leaves=10)


def test_generated_data_rows(tmp_path):
    """A local train.jsonl with one generated row at line 3: loading gives well-formed examples, or one DataError that
    names the file and the line."""
    from loratrace.data.datasets import SAMPLE_DIR, load_split
    from loratrace.errors import LoratraceError

    good = (SAMPLE_DIR / "train.jsonl").read_text().splitlines()[:6]
    folder = tmp_path / "data"
    folder.mkdir()

    @PROPERTY_SETTINGS
    @given(row=st.fixed_dictionaries({}, optional={"id": ROW_VALUES, "question": ROW_VALUES,
                                                   "choices": ROW_VALUES, "answerKey": ROW_VALUES}) | ROW_VALUES)
    def body(row):
        lines = list(good)
        lines[2] = json.dumps(row)
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
        command = f"train data.source=data/  (train.jsonl line 3: {json.dumps(row)[:120]})"
        try:
            examples = load_split("arc-challenge", str(folder), "train", notice=lambda line: None)
        except LoratraceError as exc:
            line = str(exc).strip().splitlines()[0]
            if "train.jsonl" not in line or not any(f in line for f in (":3", "line 3")):
                raise Finding("wrong", command, line, ["the error does not name train.jsonl and line 3"]) from None
            return
        except Exception as exc:  # noqa: BLE001
            raise Finding("traceback", command, f"{type(exc).__name__}: {exc}", ["not a LoratraceError"]) from None
        for example in examples:
            if not (isinstance(example.prompt, str) and example.choices and
                    all(isinstance(c, str) for c in example.choices) and 0 <= example.gold < len(example.choices)):
                raise Finding("wrong", command, "", [f"a malformed example was loaded: {example!r}"[:200]])

    as_case("train-generated-data_rows", body)


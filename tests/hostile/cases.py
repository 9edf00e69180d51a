"""The hostile-input table: every command (a row set per subcommand of `loratrace.cli._parser()`) crossed with every
kind of damage, and the hostile arguments of each command.

A `Case` is one command line on one damaged copy of the world (conftest.World). Its command line is a template:
{runs}, {T} (the tracked run), {U} (the untracked run), {legacy}, {out}, {case} and {sentinel} become the case's
paths. What the rule asks of it is in expect/names/check (conftest.judge); `quick` marks the one case per damage class
that runs by default, the rest carry the `hostile_full` marker (run with `-m hostile_full`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

Check = Callable  # (conftest.Result, conftest.World) -> reason it is wrong, or None


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # the subcommand it exercises (every subcommand of the parser needs rows)
    argv: tuple[str, ...]
    damage: Callable | None = None  # (World) -> None, applied before the "before" snapshot
    expect: str = "either"  # ok | fail | either
    names: tuple[str, ...] = ()  # on failure, the error line names one of these (templates)
    check: Check | None = None  # on success, the result is right
    writes_runs: bool = False  # on success it may write under runs/ (it trains, evaluates, imports)
    outputs: tuple[str, ...] = ()  # named outputs (templates): on success they may be written
    stdin: bytes | None = None
    timeout: float = 120
    cwd: str | None = None  # template; default the case folder
    quick: bool = False
    needs: str | None = None  # a condition the machine must meet ("mknod")
    probe: str | None = None  # a probe crossed with a damage: on success it prints what it prints undamaged


# ------------------------------------------------------------------------------------------------ result checks

def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def query_count_sum(result, w) -> str | None:
    expected = ["n,s", f"{w.facts['rows']},{w.facts['sum_step']}"]
    printed = result.stdout.splitlines()
    return None if printed == expected else f"expected {expected}, printed {printed[:3]}"


def sum_is_json_number(result, w) -> str | None:
    """`SELECT sum(step) FROM batches --format json`: a JSON number equal to pyarrow's sum over the parts."""
    rows = _json_lines(result.stdout)
    value = rows[0].get("sum(step)") if len(rows) == 1 else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != w.facts["sum_step"]:
        return f"expected the JSON number {w.facts['sum_step']}, printed {result.stdout.strip()[:80]}"
    return None


def trace_steps(result, w) -> str | None:
    steps = sorted(row["step"] for row in _json_lines(result.stdout))
    return None if steps == w.facts["example_steps"] else f"steps {steps} != {w.facts['example_steps']}"


def runs_listed(result, w) -> str | None:
    rows = {row["run_id"]: row for row in _json_lines(result.stdout)}
    if set(rows) != {w.tracked, w.untracked}:
        return f"listed {sorted(rows)}, not the two runs"
    tracked = rows[w.tracked]
    if tracked.get("steps") != w.facts["last_step"] or tracked.get("status") != "completed":
        return f"the tracked run shows steps={tracked.get('steps')!r} status={tracked.get('status')!r}"
    return None


def compare_lists_both(result, w) -> str | None:
    ids = [row.get("run_id") for row in _json_lines(result.stdout)]
    return None if ids == [w.tracked, w.untracked] else f"compare listed {ids}"


def report_written(result, w) -> str | None:
    path = w.out / "report.html"
    if not path.is_file() or w.tracked not in path.read_text(errors="replace"):
        return "report.html missing or without the run id"
    return None


def eval_scored_last(result, w) -> str | None:
    return None if "best: checkpoints/checkpoint-step-016.ckpt" in result.stdout else "no best line for step 16"


def export_manifest(result, w) -> str | None:
    import pyarrow.parquet as pq

    manifest = w.out / "adapters" / "manifest.parquet"
    if not manifest.is_file():
        return "no manifest.parquet"
    steps = pq.read_table(manifest).column("step").to_pylist()
    return None if steps == [16] else f"manifest steps {steps}"


def influence_rows(result, w) -> str | None:
    rows = _json_lines(result.stdout)
    return None if rows and all(r.get("test_example_id") == "LTSYN_VAL_0000" for r in rows) else "no influence rows"


def new_run_completed(steps: int) -> Check:
    def check(result, w) -> str | None:
        fresh = [p for p in w.runs.iterdir() if p.name not in (w.tracked, w.untracked) and p.name != "sweeps"]
        if len(fresh) != 1:
            return f"{len(fresh)} new run folders under runs/, not one"
        info = json.loads((fresh[0] / "run.json").read_text())
        if info.get("status") != "completed" or info.get("steps") != steps:
            return f"the new run: status {info.get('status')!r}, steps {info.get('steps')!r}"
        return None
    return check


def resumed_to(steps: int) -> Check:
    def check(result, w) -> str | None:
        info = json.loads((w.T / "run.json").read_text())
        if len(info.get("attempts", [])) != 2 or info.get("steps") != steps:
            return f"the resumed run: {len(info.get('attempts', []))} attempts, steps {info.get('steps')!r}"
        return None
    return check


def imported(result, w) -> str | None:
    folder = w.runs / "arc-challenge_lora_20250720_143052"
    return None if (folder / "run.json").is_file() else "no imported run folder"


def study_written(result, w) -> str | None:
    studies = list((w.runs / "sweeps").glob("*/trials.parquet")) if (w.runs / "sweeps").is_dir() else []
    return None if len(studies) == 1 else "no study with trials.parquet under runs/sweeps/"


def title_escaped(result, w) -> str | None:
    """A title is text: the report shows it, it never runs as markup."""
    html = (w.out / "r.html").read_text(errors="replace")
    return "the title's <script> is in the HTML unescaped" if "<script>alert(1)</script>" in html else None


def no_outside_paths(result, w) -> str | None:
    """A listing that succeeded shows nothing outside the runs folder."""
    for line in result.stdout.splitlines():
        for word in ("/etc", "/usr", "/proc", "/root", str(w.root / "out"), str(w.sentinel)):
            if word in line:
                return f"a path outside the runs folder in the result: {line[:100]}"
    return None


def not_passwd(result, w) -> str | None:
    return "/etc/passwd's content in the result" if "root:" in result.stdout else None


# ------------------------------------------------------------------------------------------------ probes

@dataclass(frozen=True)
class Probe:
    """One command's ordinary call on the world; crossed with each damage it meets."""

    name: str
    command: str
    argv: tuple[str, ...]
    check: Check
    writes_runs: bool = False
    outputs: tuple[str, ...] = ()
    reference: bool = True  # its stdout is deterministic: a damaged world must print the same or warn
    heavy: bool = False  # imports torch / trains: crossed only with the damages it reads


PROBES = [
    Probe("query", "query", ("query", "SELECT count(*) AS n, sum(step)::BIGINT AS s FROM batches", "--format", "csv",
                             "--runs-dir", "{runs}"), query_count_sum),
    Probe("trace", "trace", ("trace", "--example-id", "{example}", "--format", "json", "--runs-dir", "{runs}"),
          trace_steps),
    Probe("runs", "runs", ("runs", "--format", "json", "--runs-dir", "{runs}"), runs_listed),
    Probe("compare", "compare", ("compare", "{T}", "{U}", "--section", "runs", "--format", "json"),
          compare_lists_both),
    Probe("report", "report", ("report", "{T}", "-o", "{out}/report.html"), report_written,
          outputs=("{out}/report.html",), reference=False),
    Probe("eval", "eval", ("eval", "{T}", "--checkpoints", "last", "--limit", "4"), eval_scored_last,
          writes_runs=True, heavy=True),
    Probe("export", "export", ("export", "{T}", "--adapters", "{out}/adapters", "--steps", "16"), export_manifest,
          outputs=("{out}/adapters",), heavy=True),
    Probe("influence", "influence", ("influence", "{T}", "--example-id", "LTSYN_VAL_0000", "--method", "tracin-cp",
                                     "--checkpoints", "last", "--top", "2", "--format", "json"),
          influence_rows, writes_runs=True, heavy=True),
    Probe("train", "train", ("train", "--runs-dir", "{runs}", "--config", "{T}/config.yaml", "training.max_steps=2",
                             "training.stage1_steps=1"), new_run_completed(2), writes_runs=True, reference=False,
          heavy=True),
    Probe("resume", "train", ("train", "--runs-dir", "{runs}", "--resume-from-checkpoint",
                              "{T}/checkpoints/checkpoint-step-016.ckpt", "training.max_steps=18"), resumed_to(18),
          writes_runs=True, reference=False, heavy=True),
    Probe("import-legacy", "import-legacy", ("import-legacy", "{legacy}", "--runs-dir", "{runs}"), imported,
          writes_runs=True, reference=False, heavy=True),
    Probe("sweep", "sweep", ("sweep", "--runs-dir", "{runs}", "--config", "{T}/config.yaml", "--param",
                             "lora.dropout=uniform(0.0,0.1)", "--trials", "1", "--objective", "final_loss",
                             "training.max_steps=2", "training.stage1_steps=1"), study_written, writes_runs=True,
          reference=False, heavy=True),
]
READERS = ("query", "trace", "runs", "compare", "report")


# ------------------------------------------------------------------------------------------------ damage

def _first_part(w) -> Path:
    return sorted((w.T / "tracking" / "batches").glob("*.parquet"))[0]


def _write_part(path: Path, table) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def wrong_typed_part(w) -> None:
    """A batches part whose step column is text and whose example_ids are numbers: a file the tracker never wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = _first_part(w)
    table = pq.read_table(part)
    table = table.set_column(table.schema.get_field_index("step"), "step",
                             pa.array([f"s{v}" for v in table.column("step").to_pylist()]))
    table = table.set_column(table.schema.get_field_index("example_ids"), "example_ids",
                             pa.array([[7] * len(v) for v in table.column("example_ids").to_pylist()]))
    _write_part(part, table)


def garbage_pages(w) -> None:
    """A real part whose footer is intact but whose data pages are overwritten: it lists, and reads garbage."""
    part = _first_part(w)
    data = bytearray(part.read_bytes())
    for i in range(8, len(data) // 2):
        data[i] = (i * 131) % 251
    part.write_bytes(bytes(data))


def symlink_part_outside(w) -> None:
    """A batches part that is a link to a valid part outside the runs folder whose example id is the sentinel's
    content: reading through it reads outside the runs folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(_first_part(w))
    ids = [[w.content_token] * len(v) for v in table.column("example_ids").to_pylist()]
    table = table.set_column(table.schema.get_field_index("example_ids"), "example_ids",
                             pa.array(ids, pa.list_(pa.string())))
    outside = w.root / "outside-part.parquet"
    _write_part(outside, table)
    os.symlink(outside, w.T / "tracking" / "batches" / "a000-r00-000099.parquet")


def gap(w) -> None:
    sorted((w.T / "tracking" / "batches").glob("*.parquet"))[3].unlink()


def tracking_is_a_file(w) -> None:
    shutil.rmtree(w.T / "tracking")
    (w.T / "tracking").write_text("not a folder\n")


def _text(relative: str, text: str | bytes) -> Callable:
    def damage(w) -> None:
        path = w.T / relative
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    damage.__name__ = f"write_{relative}"
    return damage


def _run_json(**changes) -> Callable:
    def damage(w) -> None:
        info = json.loads((w.T / "run.json").read_text())
        info.update(changes)
        (w.T / "run.json").write_text(json.dumps(info))  # NaN is written as the bare word, as json allows
    return damage


def _config(**changes) -> Callable:
    def damage(w) -> None:
        import yaml

        config = yaml.safe_load((w.T / "config.yaml").read_text())
        config.update(changes)
        (w.T / "config.yaml").write_text(yaml.safe_dump(config))
    return damage


def truncated_checkpoint(w) -> None:
    ckpt = w.T / "checkpoints" / "checkpoint-step-016.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def other_runs_checkpoint(w) -> None:
    shutil.copyfile(w.U / "checkpoints" / "checkpoint-step-004.ckpt", w.T / "checkpoints" / "checkpoint-step-016.ckpt")


def garbage(relative: str) -> Callable:
    return _text(relative, b"PAR1" + bytes(range(256)) * 4 + b"PAR1")


@dataclass(frozen=True)
class Damage:
    name: str
    apply: Callable
    names: tuple[str, ...]  # what a one-line error must name (templates)
    read_by: tuple[str, ...]  # probes that read what is damaged; the others must print their undamaged result
    fatal_for: tuple[str, ...] = ()  # probes for which a success is wrong (the damaged thing is what they need)
    quick: str | None = None  # the probe of this damage class's quick case


RUN_READERS = ("query", "trace", "runs", "compare", "report", "eval", "export", "influence", "resume")
CONFIG_READERS = ("query", "trace", "runs", "compare", "report", "eval", "export", "influence", "train", "resume",
                  "sweep")  # query and trace too: the runs view's columns come from config.yaml
TRACKING_READERS = ("query", "trace", "runs", "compare", "report", "eval", "export", "influence", "resume")
CKPT_READERS = ("eval", "export", "influence", "resume")

DAMAGES = [
    Damage("runjson_list", _text("run.json", "[1, 2]\n"), ("run.json",), RUN_READERS, quick="runs"),
    Damage("runjson_string", _text("run.json", '"completed"\n'), ("run.json",), RUN_READERS),
    Damage("runjson_not_json", _text("run.json", "{\"run_id\": \n"), ("run.json",), RUN_READERS, quick="query"),
    Damage("runjson_wrong_types", _run_json(steps="sixteen", attempts=5, status=7, checkpoints=[1]),
           ("run.json",), RUN_READERS, quick="compare"),
    Damage("runjson_nan", _run_json(steps=float("nan"), final_loss=float("nan")), ("run.json",), RUN_READERS),
    Damage("config_list", _text("config.yaml", "- a\n- b\n"), ("config.yaml",), CONFIG_READERS, ("train",),
           quick="runs"),
    Damage("config_unparsable", _text("config.yaml", "model: [unclosed\n  name: {\n"), ("config.yaml",),
           CONFIG_READERS, ("train",), quick="compare"),
    Damage("config_scalar", _text("config.yaml", "42\n"), ("config.yaml",), CONFIG_READERS, ("train",)),
    Damage("config_data_number", _config(data=7), ("config.yaml", "data"), CONFIG_READERS, ("train",),
           quick="runs"),
    Damage("config_method_dotdot", _config(method="../../escaped"), ("config.yaml", "method"), CONFIG_READERS),
    Damage("tracking_is_a_file", tracking_is_a_file, ("tracking",), TRACKING_READERS, quick="query"),
    Damage("part_wrong_types", wrong_typed_part, ("a000-r00-000000", "batches"), TRACKING_READERS, quick="query"),
    Damage("part_garbage_pages", garbage_pages, ("a000-r00-000000", "batches"), TRACKING_READERS, quick="query"),
    Damage("part_symlink_outside", symlink_part_outside, ("a000-r00-000099",), TRACKING_READERS, quick="query"),
    Damage("part_gap", gap, ("a000-r00-000003", "step", "gap", "missing"), TRACKING_READERS, quick="query"),
    Damage("samples_index_garbage", garbage("tracking/samples_index.parquet"), ("samples_index",),
           ("trace",), quick="trace"),
    Damage("examples_garbage", garbage("tracking/examples.parquet"), ("examples.parquet",),
           ("query", "trace", "compare", "report", "export", "influence"), quick="trace"),
    Damage("checkpoint_truncated", truncated_checkpoint, ("checkpoint-step-016",), CKPT_READERS,
           ("resume", "export", "eval"), quick="resume"),
    Damage("checkpoint_zero_bytes", _text("checkpoints/checkpoint-step-016.ckpt", b""), ("checkpoint-step-016",),
           CKPT_READERS, ("resume", "export", "eval")),
    Damage("checkpoint_of_another_run", other_runs_checkpoint, ("checkpoint-step-016",), CKPT_READERS,
           ("resume", "export", "eval")),
]


def cross_cases() -> list[Case]:
    """Every probe on the undamaged world, and crossed with every damage (a heavy probe, one that imports torch or
    trains: the first damage of each class it reads, so the full product stays within half an hour on two cores)."""
    cases = [Case(f"{p.name}-pristine", p.command, p.argv, expect="ok", check=p.check, writes_runs=p.writes_runs,
                  outputs=p.outputs, quick=p.name in READERS) for p in PROBES]
    first_of_class = {}
    for damage in DAMAGES:
        first_of_class.setdefault(damage.name.split("_")[0], damage.name)
    for damage in DAMAGES:
        for p in PROBES:
            reads = p.name in damage.read_by
            every_one = damage.name in first_of_class.values() or damage.name.startswith("checkpoint")  # what they load
            if p.heavy and not (reads and every_one) and damage.quick != p.name:
                continue
            expect = "fail" if p.name in damage.fatal_for else ("either" if reads else "ok")
            cases.append(Case(f"{p.name}-{damage.name}", p.command, p.argv, damage.apply, expect=expect,
                              names=damage.names, check=p.check, writes_runs=p.writes_runs, outputs=p.outputs,
                              quick=damage.quick == p.name, probe=p.name if p.reference else None))
    return cases


# ------------------------------------------------------------------------------------------------ hostile arguments

QUERY = ("query", "--runs-dir", "{runs}")


def _q(case_id: str, sql: str, expect: str = "fail", check: Check | None = None, quick: bool = False,
       extra: tuple[str, ...] = (), **kw) -> Case:
    return Case(f"query-sql-{case_id}", "query", (*QUERY, *extra, sql), expect=expect, check=check, quick=quick,
                **kw)


SQL_CASES = [
    _q("sum_json_number", "SELECT sum(step) FROM batches", "ok", sum_is_json_number, True, ("--format", "json")),
    _q("read_text_sentinel", "SELECT * FROM read_text('{sentinel}')", quick=True),
    _q("read_text_dotdot", "SELECT * FROM read_text('{runs}/../sentinel-*')"),
    _q("read_csv_passwd", "SELECT * FROM read_csv('/etc/passwd')", check=not_passwd),
    _q("read_parquet_outside", "SELECT * FROM read_parquet('{case}/out/../*.parquet')"),
    _q("glob_root", "SELECT * FROM glob('/*')", "either", no_outside_paths, True),
    _q("glob_case", "SELECT * FROM glob('{case}/*')", "either", no_outside_paths),
    _q("copy_to", "COPY (SELECT 1 AS x) TO '{out}/copied.csv'", quick=True),
    _q("copy_to_in_select", "SELECT * FROM (COPY (SELECT 1) TO '{out}/copied.csv')"),
    _q("attach", "ATTACH '{out}/attached.db' AS x"),
    _q("install", "INSTALL httpfs"),
    _q("load", "LOAD httpfs"),
    _q("set_external_access", "SET enable_external_access = true"),
    _q("two_statements", "SELECT 1; SELECT 2"),
    _q("pragma_import", "PRAGMA import_database('{case}')"),
    _q("export_database", "EXPORT DATABASE '{out}/db'"),
    Case("query-sql-non_utf8_stdin", "query", (*QUERY, "-"), stdin=b"SELECT '\xff\xfe' AS x", quick=True),
    Case("query-sql-runaway_cross_join_timeout", "query",
         (*QUERY, "--timeout", "5", "SELECT count(*) FROM range(100000000000) a, range(100000000000) b"),
         expect="fail", names=("timeout", "time"), timeout=30, quick=True),
]


def still_a_device(result, w) -> str | None:
    """An output onto a device (a copy of /dev/null) writes into it: it never replaces the device with a file."""
    return None if stat.S_ISCHR((w.out / "null").lstat().st_mode) else "the device node was replaced by a file"


def _out(case_id: str, command: str, argv: tuple[str, ...], output: str, expect: str = "either",
         quick: bool = False, needs: str | None = None) -> Case:
    return Case(f"{command}-output-{case_id}", command, (*argv, "-o", output), expect=expect, outputs=(output,),
                quick=quick, needs=needs, check=still_a_device if needs == "mknod" else None)


OUTPUT_COMMANDS = {"query": ("query", "SELECT step FROM batches", "--format", "csv", "--runs-dir", "{runs}"),
                   "compare": ("compare", "{T}", "{U}", "--section", "runs", "--format", "json"),
                   "report": ("report", "{T}")}
OUTPUT_TARGETS = [  # (id, path, expect): a reader's output may not land in a run, replace one or leave /dev/null
    ("inside_run", "{T}/tracking/batches/a000-r00-000100.parquet", "fail"),
    ("the_run", "{T}", "fail"),
    ("runs_folder", "{runs}", "fail"),
    ("run_json", "{T}/run.json", "fail"),
    ("symlink_to_sentinel", "{out}/link", "either"),
    ("dev_null", "{out}/null", "either"),
    ("dash", "-", "either"),
]


def output_cases() -> list[Case]:
    cases = []
    for command, argv in OUTPUT_COMMANDS.items():
        for target_id, path, expect in OUTPUT_TARGETS:
            quick = command == "query" and target_id in ("run_json", "dev_null")
            cases.append(_out(target_id, command, argv, path, expect, quick,
                              needs="mknod" if target_id == "dev_null" else None))
    return cases


def prepare_outputs(w) -> None:
    """The symlink and the device node some output cases name (a copy of /dev/null: never the machine's own)."""
    os.symlink(w.sentinel, w.out / "link")
    try:
        os.mknod(w.out / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        pass


def _glob_top(path: Path) -> str:
    """An absolute glob that matches `path` only: its first component's last letter made a `*`."""
    parts = path.parts
    return str(Path(parts[0], parts[1][:-1] + "*", *parts[2:]))


RUNS_DIR_CASES = [
    Case("runs-runsdir-a_file", "runs", ("runs", "--runs-dir", "{T}/run.json"), names=("run.json",), quick=True),
    Case("query-runsdir-a_file", "query", ("query", "SELECT 1", "--runs-dir", "{T}/config.yaml"),
         names=("config.yaml",)),
    Case("runs-runsdir-glob_relative", "runs", ("runs", "--format", "json", "--runs-dir", "r*"), check=runs_listed),
    Case("runs-runsdir-glob_star_runs", "runs", ("runs", "--runs-dir", "*/runs")),
    Case("query-runsdir-glob_then_read_sentinel", "query",
         ("query", "SELECT * FROM read_text('{sentinel}')", "--runs-dir", "{case}/ru*"), expect="fail", quick=True),
    Case("query-runsdir-absolute_glob_then_read_sentinel", "query",
         ("query", "SELECT * FROM read_text('{sentinel}')", "--runs-dir", "{glob_top_runs}"), expect="fail"),
    Case("query-runsdir-absolute_glob", "query", ("query", "SELECT count(*) AS n, sum(step)::BIGINT AS s FROM batches",
                                                  "--format", "csv", "--runs-dir", "{glob_top_runs}"),
         expect="ok", check=query_count_sum),
    Case("runs-runsdir-dotdot", "runs", ("runs", "--format", "json", "--runs-dir", "../.."), cwd="{T}/tracking",
         expect="ok", check=runs_listed, quick=True),
    Case("trace-runsdir-dotdot_case", "trace", ("trace", "--example-id", "{example}", "--runs-dir", ".."),
         cwd="{runs}"),
    Case("runs-runsdir-empty", "runs", ("runs", "--runs-dir", "")),
]


TRAIN = ("train", "--runs-dir", "{runs}", "--config", "{T}/config.yaml", "training.max_steps=2",
         "training.stage1_steps=1")  # overrides last: argparse takes no positional after an option here


def _train(case_id: str, override: str, key: str, expect: str = "fail", quick: bool = False) -> Case:
    return Case(f"train-override-{case_id}", "train", (*TRAIN, override), expect=expect, names=(key,),
                writes_runs=True, quick=quick, check=new_run_completed(2))


OVERRIDE_CASES = [
    _train("lr_inf", "training.learning_rate_stage1=inf", "training.learning_rate_stage1", quick=True),
    _train("lr_nan", "training.learning_rate_stage2=nan", "training.learning_rate_stage2"),
    _train("weight_decay_inf", "training.weight_decay=inf", "training.weight_decay"),
    _train("grad_norm_nan", "training.max_grad_norm=nan", "training.max_grad_norm"),
    _train("seed_negative", "training.seed=-1", "training.seed", quick=True),
    _train("seed_huge", "training.seed=18446744073709551616", "training.seed"),
    _train("lora_r_huge", "lora.r=4611686018427387904", "lora.r"),
    _train("batch_size_huge", "training.batch_size=4611686018427387904", "training.batch_size", "either"),
    _train("eval_limit_negative", "eval.limit=-1", "eval.limit"),
    _train("method_dotdot", "method=../../escaped", "method", "either", quick=True),
    _train("dataset_dotdot", "data.dataset=../../x", "data.dataset"),
    _train("runs_dir_empty", "runs_dir=", "runs_dir", "either"),  # empty: the default, runs/ of the case folder
    _train("source_dotdot", "data.source={runs}/../../nowhere", "data.source"),
    _train("empty_key", "=3", "config key"),
    _train("empty_value", "training.max_steps=", "training.max_steps"),
    _train("nan_steps", "training.max_steps=nan", "training.max_steps"),
    _train("dtype_dotdot", "model.dtype=../x", "model.dtype"),
]


# Hostile data rows: the sample's rows with one bad row at line 3 (0-based 2) of a local train.jsonl.
BAD_ROWS = {
    "number_question": {"id": "BAD", "question": 42, "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                        "answerKey": "A"},
    "null_choice": {"id": "BAD", "question": "q?", "choices": {"text": ["a", None], "label": ["A", "B"]},
                    "answerKey": "A"},
    "choices_string": {"id": "BAD", "question": "q?", "choices": "ABCD", "answerKey": "A"},
    "answer_number_out_of_range": {"id": "BAD", "question": "q?", "choices": {"text": ["a", "b"],
                                                                               "label": ["A", "B"]}, "answerKey": 9},
    "row_a_list": [1, 2, 3],
}


def data_folder(bad_row) -> Callable:
    def damage(w) -> None:
        from loratrace.data.datasets import SAMPLE_DIR

        folder = w.root / "data"
        folder.mkdir()
        rows = (SAMPLE_DIR / "train.jsonl").read_text().splitlines()[:40]
        rows[2] = json.dumps(bad_row)
        (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
        shutil.copyfile(SAMPLE_DIR / "validation.jsonl", folder / "validation.jsonl")
    return damage


DATA_CASES = [
    Case(f"train-data-{name}", "train", (*TRAIN, "data.source={case}/data"), data_folder(row), expect="fail",
         names=("train.jsonl:3", "line 3", "train.jsonl line 3"), writes_runs=True, quick=name == "number_question")
    for name, row in BAD_ROWS.items()
]


# Legacy folders: the JSONL, mappings and config with wrong types and indices out of range.
def _legacy_jsonl(edit: Callable[[dict], dict], line: int = 2) -> Callable:
    def damage(w) -> None:
        path = next((w.legacy / "logs").glob("batch_tracking_*.jsonl"))
        rows = path.read_text().splitlines()
        rows[line] = json.dumps(edit(json.loads(rows[line])))
        path.write_text("\n".join(rows) + "\n")
    return damage


def _legacy_file(pattern: str, text: str) -> Callable:
    def damage(w) -> None:
        next(w.legacy.glob(pattern)).write_text(text)
    return damage


IMPORT = ("import-legacy", "{legacy}", "--runs-dir", "{runs}")
LEGACY_DAMAGES = {
    "step_a_string": (_legacy_jsonl(lambda r: {**r, "step": "three"}), ("line 3", ":3")),
    "indices_a_string": (_legacy_jsonl(lambda r: {**r, "sample_indices": "1,2,3"}), ("line 3", ":3")),
    "index_out_of_range": (_legacy_jsonl(lambda r: {**r, "sample_indices": [10**9] * len(r["sample_indices"]),
                                                    "sample_ids": None}), ("line 3", ":3")),
    "index_negative": (_legacy_jsonl(lambda r: {**r, "sample_indices": [-5] * len(r["sample_indices"]),
                                                "sample_ids": None}), ("line 3", ":3")),
    "loss_a_string": (_legacy_jsonl(lambda r: {**r, "loss": "low"}), ("line 3", ":3")),
    "line_a_list": (_legacy_jsonl(lambda r: [r]), ("line 3", ":3")),
    "mapping_a_list": (_legacy_file("logs/checkpoint_mapping_*.json", "[1, 2]"), ("checkpoint_mapping",)),
    "config_a_list": (_legacy_file("training_config.yaml", "- 1\n- 2\n"), ("training_config.yaml",)),
    "trainer_state_garbage": (_legacy_file("checkpoints/checkpoint-12/trainer_state.json", "{oops"),
                              ("trainer_state.json", "checkpoint-12")),
}


def legacy_reported(result, w) -> str | None:
    """A legacy import that succeeded over damage says so: the import report lists a quirk."""
    reports = list(w.runs.glob("*/import_report.json"))
    if not reports:
        return "no import_report.json"
    quirks = json.loads(reports[0].read_text()).get("quirks") or {}
    return None if quirks else "the damage is in no quirk of the import report"


def legacy_step_from_name(result, w) -> str | None:
    """checkpoint-12/'s step is its name: its trainer_state.json, damaged or not, is never read, so the checkpoint is
    converted as on the undamaged folder (nothing read, nothing to report)."""
    reports = list(w.runs.glob("*/import_report.json"))
    if not reports:
        return "no import_report.json"
    converted = json.loads(reports[0].read_text()).get("checkpoints", {}).get("converted", [])
    return None if any("012" in name or name.endswith("-12") for name in converted) else \
        f"checkpoint-12 was not converted: {converted}"


LEGACY_CASES = [
    Case(f"import-legacy-{name}", "import-legacy", IMPORT, damage, names=names,
         check=legacy_step_from_name if name == "trainer_state_garbage" else legacy_reported,
         writes_runs=True, quick=name == "index_out_of_range")
    for name, (damage, names) in LEGACY_DAMAGES.items()
]


OTHER_CASES = [
    Case("trace-args-line_negative", "trace", ("trace", "--line", "-1", "--runs-dir", "{runs}"), quick=True),
    Case("trace-args-line_huge", "trace", ("trace", "--line", "99999999999999999999999", "--runs-dir", "{runs}")),
    Case("trace-args-run_dotdot", "trace", ("trace", "--example-id", "{example}", "--run", "../x", "--runs-dir",
                                            "{runs}")),
    Case("eval-args-limit_negative", "eval", ("eval", "{T}", "--limit", "-1"), names=("limit",), expect="fail",
         writes_runs=True, quick=True),
    Case("eval-args-checkpoints_garbage", "eval", ("eval", "{T}", "--checkpoints", "16,x,../1"),
         names=("checkpoints", "x"), expect="fail", writes_runs=True),
    Case("eval-args-split_dotdot", "eval", ("eval", "{T}", "--split", "../../sentinel", "--limit", "2"),
         names=("split",), expect="fail", writes_runs=True),
    Case("export-args-steps_garbage", "export", ("export", "{T}", "--adapters", "{out}/a", "--steps", "9..x"),
         names=("--steps", "steps"), expect="fail", outputs=("{out}/a",), quick=True),
    Case("export-args-adapters_in_run", "export", ("export", "{T}", "--adapters", "{T}/tracking", "--overwrite",
                                                   "--steps", "16"), expect="fail", outputs=("{T}/tracking",)),
    Case("export-args-adapters_runs_folder", "export", ("export", "{T}", "--adapters", "{runs}", "--overwrite",
                                                        "--steps", "16"), expect="fail", outputs=("{runs}",)),
    Case("influence-args-top_zero", "influence", ("influence", "{T}", "--top", "0"), names=("--top",),
         expect="fail", writes_runs=True, quick=True),
    Case("influence-args-unknown_example", "influence", ("influence", "{T}", "--example-id", "NOPE", "--method",
                                                         "tracin-cp", "--checkpoints", "last"),
         names=("NOPE",), expect="fail", writes_runs=True),
    Case("influence-args-validate_fraction_one", "influence", ("influence", "{T}", "--validate", "--fraction", "1"),
         names=("--fraction",), expect="fail", writes_runs=True, quick=True),
    Case("influence-args-validate_subsets_one", "influence", ("influence", "{T}", "--validate", "--subsets", "1"),
         names=("--subsets",), expect="fail", writes_runs=True),
    Case("influence-args-validate_loo_negative", "influence", ("influence", "{T}", "--validate", "--loo", "-1"),
         names=("--loo",), expect="fail", writes_runs=True),
    Case("influence-args-validate_untracked", "influence", ("influence", "{U}", "--validate"), expect="fail",
         writes_runs=True),
    Case("verify-args-from_no_checkpoint", "verify", ("verify", "{T}", "--from", "4"), names=("4",), expect="fail",
         quick=True),
    Case("verify-args-missing_run", "verify", ("verify", "{runs}/nope"), names=("nope",), expect="fail"),
    Case("verify-args-steps_zero", "verify", ("verify", "{T}", "--steps", "0"), names=("--steps",), expect="fail"),
    Case("verify-args-tolerance_negative", "verify", ("verify", "{T}", "--tolerance", "-1"), names=("--tolerance",),
         expect="fail"),
    Case("verify-args-untracked", "verify", ("verify", "{U}"), expect="fail"),
    Case("replay-args-from_no_checkpoint", "replay", ("replay", "{T}", "--from", "4", "--drop", "{example}"),
         names=("4",), expect="fail", writes_runs=True, quick=True),
    Case("replay-args-missing_run", "replay", ("replay", "{runs}/nope", "--from", "15", "--drop", "{example}"),
         names=("nope",), expect="fail", writes_runs=True),
    Case("replay-args-unknown_drop", "replay", ("replay", "{T}", "--from", "15", "--drop", "LTSYN_TRA_99999"),
         names=("LTSYN_TRA_99999",), expect="fail", writes_runs=True),
    Case("replay-args-drop_file_missing", "replay", ("replay", "{T}", "--from", "15", "--drop-file",
                                                     "{out}/nope.txt"), names=("nope.txt",), expect="fail",
         writes_runs=True),
    Case("replay-args-keep_only_sentinel", "replay", ("replay", "{T}", "--from", "15", "--keep-only", "{out}"),
         expect="fail", writes_runs=True),
    Case("replay-args-steps_zero", "replay", ("replay", "{T}", "--from", "15", "--drop", "{example}", "--steps", "0"),
         names=("--steps",), expect="fail", writes_runs=True),
    Case("compare-args-top_zero", "compare", ("compare", "{T}", "{U}", "--top", "0"), names=("--top",),
         expect="fail"),
    Case("compare-args-glob_nothing", "compare", ("compare", "{runs}/nothing*"), expect="fail"),
    Case("report-args-nothing", "report", ("report", "-o", "{out}/r.html"), expect="fail", outputs=("{out}/r.html",),
         quick=True),
    Case("report-args-title_html", "report", ("report", "{T}", "-o", "{out}/r.html", "--title",
                                              "<script>alert(1)</script>"), outputs=("{out}/r.html",),
         check=title_escaped),
    Case("import-legacy-args-not_legacy", "import-legacy", ("import-legacy", "{T}", "--runs-dir", "{runs}"),
         expect="fail", writes_runs=True),
    Case("import-legacy-args-runs_dir_a_file", "import-legacy", ("import-legacy", "{legacy}", "--runs-dir",
                                                                 "{T}/run.json"), names=("run.json",),
         expect="fail", writes_runs=True),
    Case("sweep-args-bad_param", "sweep", ("sweep", "--config", "{T}/config.yaml", "--param", "lora.r=uniform(b,a)",
                                           "--runs-dir", "{runs}"), names=("lora.r",), expect="fail",
         writes_runs=True, quick=True),
    Case("sweep-args-jobs_zero", "sweep", ("sweep", "--config", "{T}/config.yaml", "--param",
                                           "lora.dropout=uniform(0.0,0.1)", "--jobs", "0", "--runs-dir", "{runs}"),
         names=("--jobs",), expect="fail", writes_runs=True),
    Case("sweep-args-study_dotdot", "sweep", ("sweep", "--runs-dir", "{runs}", "--config", "{T}/config.yaml",
                                              "--param", "lora.dropout=uniform(0.0,0.1)", "--study", "../../escaped",
                                              "--trials", "1", "--objective", "final_loss",
                                              "training.max_steps=2", "training.stage1_steps=1"),
         writes_runs=True),
    Case("sweep-args-resume_a_run", "sweep", ("sweep", "--resume", "{T}"), names=("sweep.json",),
         expect="fail", writes_runs=True),
    Case("train-args-resume_missing", "train", ("train", "--resume-from-checkpoint", "{T}/checkpoints/nope.ckpt",
                                                "--runs-dir", "{runs}"), names=("nope.ckpt",), expect="fail",
         writes_runs=True),
    Case("train-args-config_a_folder", "train", ("train", "--config", "{T}", "--runs-dir", "{runs}"),
         names=("{T}",), expect="fail", writes_runs=True),
    Case("config-args-unknown_key", "config", ("config", "training.nope=1"), names=("training.nope",),
         expect="fail", quick=True),
    Case("config-args-format_without_keys", "config", ("config", "--format", "json"), names=("--keys",),
         expect="fail"),
    Case("config-args-config_a_folder", "config", ("config", "--config", "{T}"), names=("{T}",), expect="fail"),
    Case("tail-args-a_finished_run", "tail", ("tail", "{T}", "--format", "json"), expect="ok", quick=True),
    Case("tail-args-missing_run", "tail", ("tail", "{runs}/nope"), names=("nope",), expect="fail", quick=True),
    Case("tail-args-follow_a_finished_run", "tail", ("tail", "{T}", "--follow", "-n", "2"), expect="ok"),
]


def all_cases() -> list[Case]:
    cases = cross_cases() + SQL_CASES + output_cases() + RUNS_DIR_CASES + OVERRIDE_CASES + DATA_CASES + \
        LEGACY_CASES + OTHER_CASES
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids are unique"
    return cases


def fill(w, case: Case) -> Case:
    """The case with its templates made the world's paths."""
    def one(text: str) -> str:
        text = text.replace("{example}", w.facts["example"]).replace("{glob_top_runs}", _glob_top(w.runs))
        return w.fill(text)

    return replace(case, argv=tuple(one(a) for a in case.argv), names=tuple(one(n) for n in case.names),
                   outputs=tuple(one(o) for o in case.outputs), cwd=one(case.cwd) if case.cwd else None)



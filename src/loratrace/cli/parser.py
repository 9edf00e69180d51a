"""The `loratrace` command: it parses and prints; the library does the work.

    loratrace train [--config F] [key=value ...] [--track-batches] [--resume-from-checkpoint CKPT] [--dataset D ...]
    loratrace query "SELECT ..." [-p VALUE ...] [--format table|csv|json|parquet] [--output FILE] [--runs-dir DIR]
                    [--timeout SECONDS]
    loratrace trace --example-id ID | --line N [--run RUN_ID]
    loratrace eval RUN [--checkpoints all|last|final|76,100] [--split S] [--limit N]
    loratrace influence RUN [--example-id ID ...] [--split S] [--limit N] [--method tracin|tracin-cp] [--top N]
    loratrace runs
    loratrace compare RUN RUN... [--format table|csv|json] [--section NAME ...] [--top N] [--output FILE]
    loratrace report RUN... -o report.html
    loratrace export RUN --adapters OUT [--steps 76..125|76,100] [--flat] [--overwrite]
    loratrace import-legacy PATH... [--runs-dir DIR] [--force]
    loratrace sweep [--config F] [key=value ...] --param 'key=uniform(a,b)' ... [--trials N] [--objective O] [--jobs N]
    loratrace sweep --resume runs/sweeps/<study> [--jobs N]

Errors a user can cause (`LoratraceError`) end in one line on stderr: exit 2 for a bad config, data set, model or
checkpoint (before any work starts), exit 1 for a query or lookup that cannot be answered. `query`, `trace` and
`runs` never import torch; `compare` and `report` read the same views (with pandas, and plotly for the report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loratrace.cli.sweep import add_sweep, cmd_sweep
from loratrace.runs import storage

FORMATS = ("table", "csv", "json", "parquet")
COMPARE_SECTIONS = ("runs", "config", "metrics", "evals", "data_order", "examples", "forgetting")  # comparison.SECTIONS
# views.VIEW_NAMES (tests/test_cli.py checks --help lists each), without importing pyarrow for every command
VIEWS = ("runs", "batches", "batches_all", "samples", "examples", "checkpoints", "attempts", "step_checkpoint",
         "example_checkpoint", "metrics", "example_trace", "evals", "trials", "influence")
QUERY_DESCRIPTION = f"""SQL over the views {', '.join(VIEWS)} (docs/ARCHITECTURE.md, README "Query views").

The connection is read-only: one SELECT (or EXPLAIN [ANALYZE] SELECT, or a reporting PRAGMA such as
PRAGMA show_tables); SQL reads files only under the runs folder; a refused or failing query is one line, exit 1.
--timeout SECONDS stops a query that runs longer (one line, exit 1); Ctrl+C stops it at once (exit 130).

Formats (every value comes back from csv, json and parquet as the views hold it):
  table    for reading: at most 200 rows, cells cut at 60 characters, floats to 6 significant digits, NULL as NULL
  csv      RFC 4180 with a header row; NULL is an empty field, an empty string is ""; lists and structs are JSON text
           (e.g. ["a", null]; maps too); float32 values written as their exact double; DECIMAL/HUGEINT exact digits
  json     JSON Lines: one JSON object per row, keys in column order; lists as arrays (null inside kept); timestamps
           ISO 8601 with microseconds and offset; NaN/Infinity as bare words (Python's json and DuckDB read them);
           DECIMAL/HUGEINT as numbers with their exact digits; INTERVAL as DuckDB's text; BLOB as base64
  parquet  the result as an Arrow table (needs --output)"""


def _parser() -> argparse.ArgumentParser:
    from loratrace import __version__
    parser = argparse.ArgumentParser(prog="loratrace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"loratrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune with LoRA and write a run folder",
                           description="Fine-tune with LoRA; writes runs/<dataset>_<method>_<time>/.")
    train.add_argument("--config", help="YAML config (default: the embedded default: tiny model, bundled sample)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    train.add_argument("--track-batches", action="store_true", help="record every batch in tracking/ (Parquet)")
    train.add_argument("--resume-from-checkpoint", metavar="CKPT",
                       help="continue a run from one of its .ckpt files, or from a Hugging Face Trainer checkpoint-N/ "
                            "folder (a legacy run's is imported first)")
    train.add_argument("--dataset", action="append", metavar="NAME", help="train one run per data set, in turn")
    train.add_argument("--runs-dir", help="folder for run folders (config key runs_dir)")

    def add_runs_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runs-dir", default="runs", help="runs folder, one run folder, or a glob (default: runs)")

    query = sub.add_parser("query", help="run SQL over the tracking views (read-only)",
                           description=QUERY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    query.add_argument("sql", help="the query, or - to read it from stdin")
    query.add_argument("-p", "--param", action="append", default=[], metavar="VALUE",
                       help="value for the next ? placeholder (repeatable)")
    query.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table; see above)")
    query.add_argument("--output", "-o", help="write to this file instead of stdout (needed for parquet); its folder "
                                              "must exist, outside the runs folder; - is stdout")
    query.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                       help="stop the query if it runs longer than this (exit 1; default: no limit; Ctrl+C stops it "
                            "at once, exit 130)")
    add_runs_dir(query)

    trace = sub.add_parser("trace", help="every step and checkpoint that trained one example",
                           description="Every step an example trained at, and the first checkpoint that includes it.")
    key = trace.add_mutually_exclusive_group(required=True)
    key.add_argument("--example-id", help="the example's id")
    key.add_argument("--line", type=int, help="the example's 0-based row in its data file")
    trace.add_argument("--run", help="only this run id")
    trace.add_argument("--format", choices=FORMATS[:3], default="table", help="output format (default: table)")
    add_runs_dir(trace)

    evaluate = sub.add_parser("eval", help="multiple-choice accuracy of a run's checkpoints, per example",
                              description="Score checkpoints on a held-out split; results join the evals view.")
    evaluate.add_argument("run", help="the run folder")
    evaluate.add_argument("--checkpoints", default="all", help="all (default), last, final, or steps like 76,100")
    evaluate.add_argument("--split", help="split to score (default: the run's eval.split, validation)")
    evaluate.add_argument("--limit", type=int, help="score only the first N rows")
    evaluate.add_argument("--batch-size", type=int, help="examples per forward pass")
    evaluate.add_argument("--scoring", choices=("label", "text"), help="choice letters (default) or choice texts")

    export = sub.add_parser("export", help="every checkpoint as a PEFT adapter folder, with a manifest",
                            description="Write each checkpoint of a run as a PEFT adapter folder (adapter_config.json, "
                                        "adapter_model.safetensors) under OUT, with OUT/manifest.parquet: step, "
                                        "folder, stage, lr, the step's example ids and lines (NULL for an untracked "
                                        "run). OUT appears complete or not at all.")
    export.add_argument("run", help="the run folder")
    export.add_argument("--adapters", required=True, metavar="OUT", help="the folder to write (new, or empty)")
    export.add_argument("--steps", help="a range like 76..125 (the checkpoints in it), steps like 76,100 (each must "
                                        "have a checkpoint), or both; default: every checkpoint")
    export.add_argument("--flat", action="store_true",
                        help="also write each checkpoint's LoRA tensors as one float32 vector, OUT/flat/<checkpoint>"
                             ".safetensors, in the order and shapes of OUT/flat/layout.json (sorted by PEFT name)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")

    influence = sub.add_parser("influence", help="training examples that helped or hurt test examples (TracIn)",
                               description=INFLUENCE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    influence.add_argument("run", help="the run folder")
    influence.add_argument("--example-id", action="append", metavar="ID", help="a test example (repeatable; default: "
                                                                              "the split's first --limit rows)")
    influence.add_argument("--split", default="validation", help="the test examples' split (default: validation)")
    influence.add_argument("--limit", type=int, help="without --example-id: only the split's first N rows")
    influence.add_argument("--method", choices=("tracin", "tracin-cp"), default="tracin",
                           help="tracin (default): per step over the tail; tracin-cp: over checkpoints")
    influence.add_argument("--checkpoints", default="all", help="tracin-cp: all (default), last, or steps like 76,100")
    influence.add_argument("--project-dim", type=int, metavar="K",
                           help="project gradients to K dimensions (seeded Gaussian): bounded memory, approximate")
    influence.add_argument("--batch-size", type=int, default=8, help="examples per batched gradient (default 8)")
    influence.add_argument("--top", type=int, default=20, help="training examples listed each way (default 20)")
    influence.add_argument("--format", choices=FORMATS[:3], default="table",
                           help="table (default: the top helpful and harmful), or every score as csv/json")

    imports = sub.add_parser("import-legacy", help="convert traditional-script experiment folders into run folders",
                             description="Convert legacy run folders (logs/batch_tracking_<dataset>.jsonl, JSON "
                                         "mappings, Trainer checkpoints) into run folders; the source is only read.")
    imports.add_argument("paths", nargs="+", metavar="PATH", help="a legacy run folder, or a folder of them")
    imports.add_argument("--runs-dir", default="runs", help="where the run folders go (default: runs)")
    imports.add_argument("--force", action="store_true", help="import again a folder imported before (a second copy)")

    runs = sub.add_parser("runs", help="one line per run: id, dataset, steps, checkpoints, status",
                          description="List the runs under --runs-dir.")
    runs.add_argument("--format", choices=FORMATS[:3], default="table", help="output format (default: table)")
    add_runs_dir(runs)

    compare = sub.add_parser("compare", help="runs side by side: config, metrics, evals, data order, examples",
                             description=COMPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the first is the reference), folders "
                                                                "of runs, or globs")
    compare.add_argument("--format", choices=FORMATS[:3], default="table",
                         help="table (default), csv (needs one --section) or json (JSON Lines, a section key each)")
    compare.add_argument("--section", action="append", choices=COMPARE_SECTIONS,
                         help="only this table (repeatable; default: all)")
    compare.add_argument("--top", type=int, default=20, help="forgetting: examples per run to list (default 20)")
    compare.add_argument("--output", "-o", help="write to this file instead of stdout")

    report = sub.add_parser("report", help="one self-contained HTML report of one or more runs",
                            description="Write one HTML file (plotly inlined: opens offline, links to nothing outside "
                                        "it): curves, evals, cartography, forgetting, tracking cost, config "
                                        "differences; several runs overlaid.")
    report.add_argument("runs", nargs="*", metavar="RUN", help="run folders, folders of runs, or globs")
    report.add_argument("--study", action="append", metavar="DIR",
                        help="a sweep's folder (runs/sweeps/<study>): its trials, then their runs (repeatable)")
    report.add_argument("--output", "-o", default="report.html",
                        help="the HTML file (default: report.html; - for stdout)")
    report.add_argument("--title", help="the report's title (default: the run ids)")
    add_sweep(sub)
    return parser


COMPARE_DESCRIPTION = """Compare runs against the first (the reference), from the query views:
  runs        status, steps, checkpoints of each run
  config      the config keys that differ (values as JSON text, one column per run)
  metrics     train/loss, grad_norm, lr, accuracy at the same steps, one column per run
  evals       accuracy per checkpoint (and final_model), per split and scoring
  data_order  same examples in the same order? the first step where the runs diverge
  examples    examples correct at the last evaluated checkpoint in one run and wrong in the other
  forgetting  examples whose forgetting-event counts differ most (--top per run)"""


INFLUENCE_DESCRIPTION = """Influence of each training example on test examples, from the run's checkpoints:
  tracin     sum over the stage-2 steps t whose batch held the training example of
             lr_t * grad L(train; w_t-1) . grad L(test; w_t-1), w_t-1 the checkpoint before step t
             (a step without that checkpoint is reported and skipped)
  tracin-cp  sum over the chosen checkpoints c of lr_c * grad L(train; w_c) . grad L(test; w_c), every training example
Gradients of training's per-example loss, LoRA parameters only. Scores go to tracking/influence/ (the influence
view); a computation stopped part-way continues where it stopped when run again with the same arguments."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _fail(message: str, code: int) -> int:
    print(f"loratrace: error: {message}", file=sys.stderr)
    return code


def _emit(table, fmt: str, output: str | None, protected=()) -> None:
    """Print or write a result (an Arrow table, or a DataFrame) in one of FORMATS; see formats.py. `protected`: the
    runs the command read, which `output` must stay out of."""
    import pyarrow as pa

    from loratrace.query import formats
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    formats.write(table, fmt, output, protected)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr: never the source line that raised it, never on stdout."""
    text = str(message).strip()
    print(f"loratrace: warning: {text.splitlines()[0] if text else category.__name__}", file=sys.stderr)


def _open(runs_dir: str):
    import warnings

    from loratrace.query.store import open_runs

    warnings.showwarning = _warning_line
    return open_runs(runs_dir, read_only=True)


def cmd_train(args: argparse.Namespace) -> int:
    from loratrace.config import ConfigError

    overrides = list(args.overrides)
    if args.track_batches:
        overrides.append("tracking.enabled=true")
    if args.runs_dir:
        overrides.append(f"runs_dir={args.runs_dir}")
    if args.resume_from_checkpoint and args.dataset:
        raise ConfigError("--dataset cannot be combined with --resume-from-checkpoint")
    with storage.staging():  # a run on object storage is staged in a scratch folder until the command ends
        return _train_runs(args, overrides)


def _train_runs(args: argparse.Namespace, overrides: list[str]) -> int:
    from loratrace.config import load_config

    if args.resume_from_checkpoint and storage.is_remote(args.resume_from_checkpoint):
        from loratrace.recipe import stage_remote_checkpoint

        storage.check_location(args.resume_from_checkpoint)
        args.resume_from_checkpoint = str(stage_remote_checkpoint(args.resume_from_checkpoint))
    if args.resume_from_checkpoint and Path(args.resume_from_checkpoint).is_dir():  # a Trainer checkpoint-N/ folder
        from loratrace.legacy.resume import checkpoint_to_resume

        args.resume_from_checkpoint = str(checkpoint_to_resume(Path(args.resume_from_checkpoint), args.config,
                                                               overrides))
    if args.resume_from_checkpoint and not args.config:
        from loratrace.recipe import resume_run_dir

        args.config = str(resume_run_dir(Path(args.resume_from_checkpoint)) / "config.yaml")
    names = args.dataset or [None]
    configs = [load_config(args.config, overrides + ([f"data.dataset={n}"] if n else [])) for n in names]
    from loratrace.recipe import train

    for cfg in configs:
        train(cfg, resume_from=args.resume_from_checkpoint)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from loratrace.query.formats import check_output

    # bytes that are not UTF-8 kept as surrogates (as in argv), for the library to refuse in one line naming them
    sql = sys.stdin.buffer.read().decode("utf-8", "surrogateescape") if args.sql == "-" else args.sql
    if args.format == "parquet" and not args.output:
        return _fail("--format parquet needs --output FILE", 2)
    check_output(args.output, [args.runs_dir])  # before the query runs: nothing is half done
    with _open(args.runs_dir) as db:
        table = db.fetch_table(sql, params=args.param or None, timeout=args.timeout)
    _emit(table, args.format, args.output, [args.runs_dir])
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    with _open(args.runs_dir) as db:
        table = db.trace_table(example_id=args.example_id, line=args.line, run_id=args.run)
    if args.format != "table":
        _emit(table, args.format, None)
        return 0
    rows = table.to_pylist()
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        mine = [r for r in rows if r["run_id"] == run_id]
        first = next(r for r in mine if r["first"])
        where = (f"checkpoint-step {first['checkpoint_step']} ({first['checkpoint_path']})"
                 if first["checkpoint_step"] is not None else "no checkpoint yet")
        print(f"{run_id}: {first['example_id']} (line {first['line']}) trained at {len(mine)} step(s); "
              f"first included in {where}")
    columns = ["run_id", "step", "epoch", "loss", "p_gold", "correct", "checkpoint_step", "first"]
    _emit(table.select(columns), "table", None)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loratrace.evaluate import evaluate_run

    overrides = [f"eval.{key}={value}" for key, value in (("split", args.split), ("limit", args.limit),
                                                          ("batch_size", args.batch_size), ("scoring", args.scoring))
                 if value is not None]
    summary = evaluate_run(args.run, args.checkpoints, overrides)
    _emit(summary, "table", None)
    best = summary.loc[summary.accuracy.idxmax()]
    print(f"best: {best.checkpoint} (step {int(best.checkpoint_step)}), accuracy {best.accuracy:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import warnings

    from loratrace.export import MANIFEST_FILE, export_adapters

    warnings.showwarning = _warning_line
    out = storage.local_form(args.adapters)
    manifest = export_adapters(args.run, out, steps=args.steps, flat=args.flat, overwrite=args.overwrite)
    steps = list(manifest.step)
    print(f"exported {len(steps)} adapter(s), steps {steps[0]}..{steps[-1]}, to {out}  "
          f"manifest {Path(out) / MANIFEST_FILE}" + (f"  flat vectors {Path(out) / 'flat'}/" if args.flat else ""))
    return 0


def cmd_influence(args: argparse.Namespace) -> int:
    from loratrace.attribution.tracin import compute, top_examples
    from loratrace.config import ConfigError

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    result = compute(args.run, args.example_id, args.split, args.limit, args.method, args.checkpoints,
                     args.project_dim, batch_size=args.batch_size)
    if args.format != "table":
        _emit(result.frame, args.format, None)
        return 0
    tests = list(dict.fromkeys(result.frame.test_example_id))
    what = (f"{tests[0]} ({args.split}): {' '.join(result.texts[tests[0]].split())}" if len(tests) == 1 else
            f"{len(tests)} {args.split} examples (scores summed over them)")
    print(f"{args.method} over {len(result.terms)} {'step' if args.method == 'tracin' else 'checkpoint'}(s) "
          f"(steps {result.terms[0].step}..{result.terms[-1].step}); {what}")
    for title, table in zip(("helpful", "harmful"), top_examples(result, args.top)):
        print(f"\n{title}")
        if table.num_rows:
            _emit(table, "table", None)
        else:
            print("(none)")
    return 0


def cmd_import_legacy(args: argparse.Namespace) -> int:
    from loratrace.errors import LoratraceError
    from loratrace.legacy.importer import find_legacy_runs, import_legacy, read_legacy_run, runs_folder, summary
    from loratrace.query.formats import check_apart

    runs_folder(args.runs_dir)  # before the sources are looked at
    check_apart(args.runs_dir, args.paths, "--runs-dir")  # run folders written into a source would change it
    folders = find_legacy_runs(args.paths)
    for folder in folders:  # every source's files checked before the first import writes anything
        read_legacy_run(folder)
    imported: list[str] = []
    for folder in folders:
        try:
            report = import_legacy(folder, args.runs_dir, force=args.force)
        except LoratraceError:  # that one left nothing; say which ones stay imported, then its one error line
            if imported:
                print(f"imported {len(imported)} of {len(folders)} before {folder} failed (kept): "
                      + ", ".join(imported))
            raise
        print(summary(report))
        imported.append(report["run_dir"])
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from loratrace.query.store import StoreError

    with _open(args.runs_dir) as db:
        table = db.fetch_table("SELECT run_id, dataset, steps, missing_steps, checkpoints, last_checkpoint_step, "
                               "status FROM runs ORDER BY run_id")
    if table.num_rows == 0:
        raise StoreError(f"no runs under {args.runs_dir}")
    _emit(table, args.format, None)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from loratrace.config import ConfigError
    from loratrace.query import formats
    from loratrace.report.compare import compare

    names = list(dict.fromkeys(args.section or COMPARE_SECTIONS))
    if args.format == "csv" and len(names) != 1:
        raise ConfigError("--format csv writes one table: name it with --section (e.g. --section config)")
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    formats.check_output(args.output, args.runs)
    sections = compare(args.runs, top=args.top).sections()
    tables = {name: pa.Table.from_pandas(sections[name], preserve_index=False) for name in names}
    if args.format == "csv":
        text = formats.render_csv(tables[names[0]])
    elif args.format == "json":
        text = "".join(formats.render_json(table.add_column(0, "section", pa.array([name] * table.num_rows,
                                                                                      pa.string())))
                       for name, table in tables.items())
    else:
        text = "".join(f"== {name} ==\n" + (formats.render_table(table) if table.num_rows else "(none)\n") + "\n"
                       for name, table in tables.items())
    formats.write_text(text, args.output, args.runs)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from loratrace.query.formats import check_output, is_stdout
    from loratrace.report.runs import write_report
    from loratrace.runs.find import study_folders

    if not args.runs and not args.study:
        from loratrace.config import ConfigError

        raise ConfigError("name run folders (loratrace report runs/) or a sweep (--study runs/sweeps/<study>)")
    check_output(args.output, [*args.runs, *study_folders(args.study or [])])
    path = write_report(args.runs, args.output, title=args.title, studies=args.study)
    if not is_stdout(args.output):  # `-o -`: stdout holds the page alone
        print(f"report  {path}  ({path.stat().st_size / 1e6:.1f} MB, opens offline)")
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "eval": cmd_eval, "query": cmd_query, "trace": cmd_trace,
            "runs": cmd_runs, "compare": cmd_compare, "report": cmd_report, "export": cmd_export,
            "influence": cmd_influence,
            "import-legacy": cmd_import_legacy}


def main(argv: list[str] | None = None) -> int:
    from loratrace.errors import LoratraceError, first_line

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `loratrace`: what it can do, not an error
        parser.print_help()
        return 0
    import warnings

    warnings.showwarning = _warning_line  # a run or part skipped (compare, report, ...) is one line too
    try:
        return COMMANDS[args.command](args)
    except LoratraceError as exc:
        return _fail(first_line(exc), exc.exit_code)
    except KeyboardInterrupt:  # Ctrl+C outside training (loading, exporting); training stops cleanly by itself
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`loratrace compare` and `report`: runs side by side, as tables or one HTML file."""

from __future__ import annotations

import argparse

from loratrace.cli.common import FORMATS
from loratrace.config import ConfigError
from loratrace.query import formats
from loratrace.report import SECTIONS as COMPARE_SECTIONS
from loratrace.report import SUMMARY_SECTIONS
from loratrace.runs.find import study_folders

COMPARE_DESCRIPTION = """Compare runs against the first (the reference), from the query views.

Without --section, a summary that fits a screen: each run's status, steps, duration, final and lowest training loss,
best and last eval accuracy +/- stderr; the config keys that differ; eval accuracy per checkpoint with its stderr
(condensed to 10 checkpoints) and whether the best evals differ by more than the noise (1.96 combined stderr);
where the data order diverges; the examples that flip. --format json/csv: those tables whole.

Sections (--section NAME, repeatable: that table whole):
  runs        status, steps, checkpoints, duration, final/lowest loss, best and last eval accuracy of each run
  config      the config keys that differ (values as JSON text, one column per run)
  metrics     train/loss, grad_norm, lr, accuracy at every step, one column per run (also --steps)
  evals       accuracy per checkpoint (and final_model), per split and scoring; `<run> stderr` columns
  data_order  same examples in the same order? the first step where the runs diverge
  examples    examples correct at the last evaluated checkpoint in one run and wrong in the other
  forgetting  examples whose forgetting-event counts differ most (--top per run)"""


def add_compare(sub) -> None:
    compare = sub.add_parser("compare", help="runs side by side: config, final/best metrics, evals +/- stderr, data "
                                             "order, example flips",
                             description=COMPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the first is the reference), folders "
                                                                "of runs, or globs")
    compare.add_argument("--format", choices=FORMATS[:3], default="table",
                         help="table (default), csv (needs one --section) or json (JSON Lines, a section key each)")
    compare.add_argument("--section", action="append", choices=COMPARE_SECTIONS,
                         help="only this table, whole (repeatable; default: the summary)")
    compare.add_argument("--steps", action="store_true", help="add the per-step metrics (--section metrics)")
    compare.add_argument("--top", type=int, default=20, help="forgetting: examples per run to list (default 20)")
    compare.add_argument("--output", "-o", help="write to this file instead of stdout")


def add_report(sub) -> None:
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


def cmd_compare(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from loratrace.report.compare import compare  # pandas and plotly only when this command runs

    summary = not args.section
    names = list(dict.fromkeys([*(args.section or SUMMARY_SECTIONS), *(["metrics"] if args.steps else [])]))
    if args.format == "csv" and (summary or len(names) != 1):
        raise ConfigError("--format csv writes one table: name it with --section (e.g. --section config)")
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    formats.check_output(args.output, args.runs)
    comparison = compare(args.runs, top=args.top)
    sections = comparison.sections()
    tables = {name: pa.Table.from_pandas(sections[name], preserve_index=False) for name in names}
    if summary and args.format == "table":
        from loratrace.report.summary import summary_text  # pandas only when this command runs

        text = summary_text(comparison) + ("".join(f"\n== {name} ==\n" + _table_text(tables[name])
                                                   for name in names if name not in SUMMARY_SECTIONS))
    elif args.format == "csv":
        text = formats.render_csv(tables[names[0]])
    elif args.format == "json":
        text = "".join(formats.render_json(table.add_column(0, "section", pa.array([name] * table.num_rows,
                                                                                      pa.string())))
                       for name, table in tables.items())
    else:
        text = "".join(f"== {name} ==\n" + _table_text(table) + "\n" for name, table in tables.items())
    formats.write_text(text, args.output, args.runs)
    return 0


def _table_text(table) -> str:
    return formats.render_table(table) if table.num_rows else "(none)\n"


def cmd_report(args: argparse.Namespace) -> int:
    from loratrace.report.runs import write_report  # pandas and plotly only when this command runs

    if not args.runs and not args.study:

        raise ConfigError("name run folders (loratrace report runs/) or a sweep (--study runs/sweeps/<study>)")
    formats.check_output(args.output, [*args.runs, *study_folders(args.study or [])])
    path = write_report(args.runs, args.output, title=args.title, studies=args.study)
    if not formats.is_stdout(args.output):  # `-o -`: stdout holds the page alone
        print(f"report  {path}  ({path.stat().st_size / 1e6:.1f} MB, opens offline)")
    return 0

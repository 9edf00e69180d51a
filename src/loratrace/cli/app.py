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
    loratrace verify RUN [--from STEP] [--steps K] [--tolerance X] [--format table|json]
    loratrace replay RUN --from STEP (--drop ID ... | --drop-file FILE | --keep-only FILE) [--steps K]

Errors a user can cause (`LoratraceError`) end in one line on stderr: exit 2 for a bad config, data set, model or
checkpoint (before any work starts), exit 1 for a query or lookup that cannot be answered. `query`, `trace` and
`runs` never import torch; `compare` and `report` read the same views (with pandas, and plotly for the report).
"""

from __future__ import annotations

import argparse

from loratrace import __version__
from loratrace.cli import evaluate, export, query, report, sweep, train, verify
from loratrace.cli.common import fail, warning_line
from loratrace.errors import LoratraceError, first_line

COMMANDS = {"train": train.cmd_train, "sweep": sweep.cmd_sweep, "eval": evaluate.cmd_eval, "query": query.cmd_query,
            "trace": query.cmd_trace, "runs": query.cmd_runs, "compare": report.cmd_compare,
            "report": report.cmd_report, "export": export.cmd_export, "influence": evaluate.cmd_influence,
            "import-legacy": export.cmd_import_legacy, "verify": verify.cmd_verify,
            "replay": verify.cmd_replay}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loratrace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"loratrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (train.add_train, query.add_query, query.add_trace, evaluate.add_eval, export.add_export,
                evaluate.add_influence, export.add_import_legacy, query.add_runs, report.add_compare,
                report.add_report, sweep.add_sweep, verify.add_verify,
                verify.add_replay):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `loratrace`: what it can do, not an error
        parser.print_help()
        return 0
    import warnings

    warnings.showwarning = warning_line  # a run or part skipped (compare, report, ...) is one line too
    try:
        return COMMANDS[args.command](args)
    except LoratraceError as exc:
        return fail(first_line(exc), exc.exit_code)
    except KeyboardInterrupt:  # Ctrl+C outside training (loading, exporting); training stops cleanly by itself
        return fail("interrupted", 130)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

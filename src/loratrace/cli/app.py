"""The `loratrace` command: it parses and prints; the library does the work.

    loratrace train [--config F] [key=value ...] [--track-batches] [--resume-from-checkpoint CKPT] [--dataset D ...]
                    [--name NAME] [--tag T ...] [--print-config] [--progress auto|bar|lines|none]
    loratrace query "SELECT ..." [-p VALUE ...] [--format table|csv|json|parquet] [--output FILE] [--runs-dir DIR]
                    [--timeout SECONDS]
    loratrace trace --example-id ID | --line N [--run RUN_ID]
    loratrace eval RUN [--checkpoints SELECTION|final] [--split S] [--limit N]
    loratrace influence RUN [--example-id ID ...] [--split S] [--limit N] [--method tracin|tracin-cp]
                        [--checkpoints SELECTION] [--top N]
    loratrace runs [--tag T ...] [--format table|csv|json]
    loratrace compare RUN RUN... [--format table|csv|json] [--section NAME ...] [--steps] [--top N] [--output FILE]
    loratrace report RUN... -o report.html
    loratrace export RUN --adapters OUT [--checkpoints SELECTION] [--flat] [--overwrite]
    loratrace import-legacy PATH... [--runs-dir DIR] [--force]
    loratrace sweep [--config F] [key=value ...] --param 'key=uniform(a,b)' ... [--trials N] [--objective O] [--jobs N]
    loratrace sweep --resume runs/sweeps/<study> [--jobs N]
    loratrace config [--config F] [key=value ...] [--keys [--format text|table|csv|json]]
    loratrace tail [RUN] [--follow] [--format table|json] [-n N] [--poll SECONDS]
    loratrace verify RUN [--from STEP] [--steps K] [--tolerance X] [--format table|json]
    loratrace replay RUN --from STEP (--drop ID ... | --drop-file FILE | --keep-only FILE) [--steps K]

SELECTION, one syntax for eval, export and influence: all, last, steps like 76,100, a range like 76..125, or a mix.
Errors a user can cause (`LoratraceError`) end in one line on stderr: exit 2 for a bad config, data set, model or
checkpoint (before any work starts), exit 1 for a query or lookup that cannot be answered. `query`, `trace` and
`runs` never import torch; `compare` and `report` read the same views (with pandas, and plotly for the report).
"""

from __future__ import annotations

import argparse

from loratrace import __version__
from loratrace.cli import config, evaluate, export, query, report, sweep, tail, train, verify
from loratrace.cli.common import fail, warning_line
from loratrace.errors import LoratraceError, first_line

COMMANDS = {"train": train.cmd_train, "sweep": sweep.cmd_sweep, "eval": evaluate.cmd_eval, "query": query.cmd_query,
            "trace": query.cmd_trace, "runs": query.cmd_runs, "compare": report.cmd_compare,
            "report": report.cmd_report, "export": export.cmd_export, "influence": evaluate.cmd_influence,
            "import-legacy": export.cmd_import_legacy, "config": config.cmd_config, "tail": tail.cmd_tail,
            "verify": verify.cmd_verify, "replay": verify.cmd_replay}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loratrace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"loratrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (train.add_train, query.add_query, query.add_trace, evaluate.add_eval, export.add_export,
                evaluate.add_influence, export.add_import_legacy, query.add_runs, report.add_compare,
                report.add_report, sweep.add_sweep, config.add_config, tail.add_tail, verify.add_verify,
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

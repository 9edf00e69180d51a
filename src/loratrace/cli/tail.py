"""`loratrace tail`: a run's last steps, and with --follow each new step as it lands (query/tail.py)."""

from __future__ import annotations

import argparse
import sys
import warnings

from loratrace.cli.common import seconds, warning_line
from loratrace.query import formats
from loratrace.query.tail import tail_steps

MEMBERS_SHOWN = 3  # example ids on a table line before "+N"
HEADER = f"{'step':>6} {'stage':>5} {'loss':>10} {'grad_norm':>10} {'lr':>10} {'examples':>8}  members"


def add_tail(sub) -> None:
    tail = sub.add_parser("tail", help="a run's last steps; --follow: each new step as it lands",
                          description="Print the last steps of a run (step, stage, loss, grad-norm, lr, its examples) "
                                      "from its tracking parts; with --follow, each new step as its part lands, until "
                                      "the run stops running (or Ctrl+C). A run training now, a finished one, or one "
                                      "on s3://; the run needs batch tracking (tracking.flush_every_steps sets how "
                                      "often parts land).")
    tail.add_argument("run", metavar="RUN", nargs="?", default="runs",
                      help="a run folder (local or s3://); a folder of runs: its newest run (default: runs)")
    tail.add_argument("--follow", "-f", action="store_true",
                      help="keep printing each new step until run.json's status leaves running")
    tail.add_argument("--format", choices=("table", "json"), default="table",
                      help="table (default: one aligned line per step, the first example ids then +N) or json "
                           "(JSON Lines: every column, every example id)")
    tail.add_argument("-n", "--lines", type=count, default=10, metavar="N",
                      help="how many of the last steps to print first (default 10; 0: only new ones)")
    tail.add_argument("--poll", type=seconds, default=1.0, metavar="SECONDS",
                      help="with --follow: how often to look for new parts (default 1)")


def count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of steps, 0 or more, got {text!r}")
    return int(text)


def cmd_tail(args: argparse.Namespace) -> int:
    warnings.showwarning = warning_line
    notice = lambda line: print(f"loratrace: {line}", file=sys.stderr)  # noqa: E731
    steps = tail_steps(args.run, last=args.lines, follow=args.follow, poll_s=args.poll, notice=notice)
    for index, table in enumerate(steps):
        if args.format == "table" and index == 0:  # the first table (maybe empty) says the run was found
            sys.stdout.write(HEADER + "\n")
        if args.format == "json":
            text = formats.render_json(table)
        else:
            text = "".join(_line(row) + "\n" for row in table.drop_columns(["wall_time"]).to_pylist())
        sys.stdout.write(text)
        sys.stdout.flush()  # a pipe (| grep, a log file) sees each step as it lands
    return 0


def _line(row: dict) -> str:
    ids = row["example_ids"] or []
    members = ", ".join(ids[:MEMBERS_SHOWN]) + (f" +{len(ids) - MEMBERS_SHOWN}" if len(ids) > MEMBERS_SHOWN else "")
    return (f"{row['step']:>6} {row['stage']:>5} {_number(row['loss'], '.4f')} {_number(row['grad_norm'], '.4f')} "
            f"{_number(row['lr'], '.3g')} {row['examples']:>8}  {members}")


def _number(value: float | None, spec: str) -> str:
    return f"{'NULL' if value is None else format(value, spec):>10}"

"""What every command shares: output formats, the one-line error, warnings as one line, the read-only connection."""

from __future__ import annotations

import argparse
import sys
import warnings

import pyarrow as pa

from loratrace.query import formats
from loratrace.query.store import open_runs

FORMATS = ("table", "csv", "json", "parquet")


def add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="runs folder, one run folder, or a glob (default: runs)")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def fail(message: str, code: int) -> int:
    print(f"loratrace: error: {message}", file=sys.stderr)
    return code


def emit(table, fmt: str, output: str | None, protected=()) -> None:
    """Print or write a result (an Arrow table, or a DataFrame) in one of FORMATS; see formats.py. `protected`: the
    runs the command read, which `output` must stay out of."""
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    formats.write(table, fmt, output, protected)


def warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr: never the source line that raised it, never on stdout."""
    text = str(message).strip()
    print(f"loratrace: warning: {text.splitlines()[0] if text else category.__name__}", file=sys.stderr)


def open_read_only(runs_dir: str):
    warnings.showwarning = warning_line
    return open_runs(runs_dir, read_only=True)

"""Output formats of `loratrace query`, `trace` and `runs`: an Arrow table as table, csv, json or parquet, no pandas.

The three machine formats give back every value the views hold (lists with NULLs inside, lists of any length, NULL
scalars, microsecond timestamps, float32 and float64 values exactly, any string):
  parquet  the Arrow table as it is.
  json     JSON Lines: one JSON object per row, keys in column order. Floats in the shortest text that reads back as
           the same double (a float32 as its exact double value), NaN/Infinity/-Infinity as bare words (Python's json
           and DuckDB's read_json read them; strict JSON parsers do not); DECIMAL and HUGEINT as numbers with their
           exact digits (DuckDB's read_json given the column's type reads them exactly; a reader that parses numbers
           as doubles rounds them); timestamps ISO 8601 with microseconds and offset; INTERVAL as DuckDB's text
           (`14 months 3 days 04:05:06.000007`, which casts back); lists as arrays, structs and MAPs as objects, NULL
           as null at any depth; bytes as base64 text.
  csv      RFC 4180: a header row, a field quoted when it holds a comma, quote or line break, quotes doubled. NULL is
           an empty field, an empty string is "" (DuckDB: read_csv(..., allow_quoted_nulls = false); pandas reads both
           as missing, and needs keep_default_na=False, na_values=[""] to keep a text such as NULL or NA). Scalars as
           in json, unquoted (numbers, base64, times, intervals); lists, structs and MAPs are their JSON text as
           above (json.loads or a DuckDB cast through JSON reads them back).
  (DuckDB hands Arrow a UHUGEINT as decimal128(38, 0): store.py casts it to HUGEINT, so one of 2^127 or more is an
  error, not a wrong number.)
  table    for reading, not parsing: at most `TABLE_ROWS` rows (first and last half), cells cut at `TABLE_CELL` chars,
           floats to 6 significant digits, NULL as NULL. An empty result prints the header alone.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import glob
import json
import math
import os
import stat
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.errors import LoratraceError
from loratrace.runs import storage
from loratrace.runs.find import as_list, is_run_folder

FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROWS = 200
TABLE_CELL = 60


class OutputError(LoratraceError):
    """An output file that cannot be written (its folder is missing, say)."""

    exit_code = 1


class OutputRefused(OutputError):
    """An output that would write into, over or around what the command reads (a run folder, a folder of runs), or
    that is no file to write (a folder, a socket): refused before any work, nothing written."""

    exit_code = 2


# A folder with run.json or tracking/ was written by loratrace: a run folder, whether or not the command names it.
# (run_folders.is_run_folder also takes config.yaml alone, which many project folders hold: too wide for a guard.)
RUN_MARKERS = ("run.json", "tracking")


def is_stdout(output) -> bool:
    """No output file: stdout (`-o -`, `-o /dev/stdout` whatever stdout is redirected to, or no -o at all)."""
    return output is None or str(output) in ("", "-", "/dev/stdout")


def protected_folders(paths) -> list[Path]:
    """The folders an output must stay out of, for the inputs a command names (`paths`: run folders, folders of runs,
    globs, study folders): each one (symlinks and `..` resolved), and the folder that holds each run folder (a runs
    folder). URLs on object storage are no local folder to protect."""
    folders: list[Path] = []
    for item in as_list(paths if paths is not None else []):
        if item is None or storage.is_remote(item):
            continue
        text = str(storage.local_form(item))
        found = [Path(text)]
        if glob.has_magic(text):  # the folder the glob lists, and what it matches
            parts = Path(text).parts
            found = [Path(*parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))] or ["."])]
            found += [Path(m) for m in glob.glob(text)]
        for path in (p.resolve() for p in found):
            folders.append(path)
            if is_run_folder(path):
                folders.append(path.parent)
    return list(dict.fromkeys(folders))


def check_output(output, protected=(), flag: str = "--output", folder: bool = False) -> None:
    """Fail before any work when `output` cannot or must not be written: it equals, holds or lies inside a folder in
    `protected` (see `protected_folders`) or inside any run folder; it is a folder (a file output), or a folder of
    runs (`folder`: an output folder, replaced whole); its folder does not exist or cannot be made. A symbolic link is
    judged, and written, by its target; a character device or FIFO (/dev/null, a named pipe) is written through."""
    if is_stdout(output) and not folder:
        return
    target = check_apart(output, protected, flag)
    if folder:
        _check_output_folder(output, target, flag)
    else:
        _check_output_file(output, target, flag)


def check_apart(output, protected=(), flag: str = "--output") -> Path:
    """`output` resolved (symlinks and `..`), refused in one line when it equals, holds or lies inside a folder in
    `protected` (see `protected_folders`), or lies inside any run folder."""
    target = Path(output).resolve()
    for guarded in protected_folders(protected):
        relation = "is" if target == guarded else "lies inside" if guarded in target.parents else \
            "holds" if target in guarded.parents else None
        if relation:
            raise OutputRefused(f"{flag} {output}: {target} {relation} {guarded}, which this command reads; name a "
                                "path outside it")
    for ancestor in (target, *target.parents):
        if _written_by_loratrace(ancestor):
            raise OutputRefused(f"{flag} {output}: {target} {'is' if ancestor == target else 'lies inside'} the "
                                f"run folder {ancestor}; name a path outside it")
    return target


def _written_by_loratrace(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def _check_output_file(output, target: Path, flag: str) -> None:
    if not target.parent.is_dir():
        raise OutputError(f"{flag} {output}: folder {target.parent} does not exist")
    if Path(output).is_symlink() and not (target.exists() and _streams(os.stat(target).st_mode)):
        # Replacing the file a link leads to would change a file the command line never named (a config, a note):
        # refused, so nothing is replaced silently. A link to a device or a pipe (/dev/stdout) is written through.
        raise OutputRefused(f"{flag} {output}: a symbolic link to a file, which would be replaced through it; name the "
                            "file itself")
    if not os.path.lexists(target):
        return
    mode = os.stat(target).st_mode
    if stat.S_ISDIR(mode):
        raise OutputError(f"{flag} {output}: {target} is a folder; name a file")
    if not (stat.S_ISREG(mode) or _streams(mode)):
        raise OutputError(f"{flag} {output}: {target} is not a regular file, a character device or a FIFO")


def _streams(mode: int) -> bool:
    """A character device or a FIFO: written through, never replaced."""
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _check_output_folder(output, target: Path, flag: str) -> None:
    if target.is_dir() and any(child.is_dir() and is_run_folder(child) for child in target.iterdir()):
        raise OutputRefused(f"{flag} {output}: {target} holds run folders; name a path outside it")
    existing = next(p for p in target.parents if os.path.lexists(p))  # the folders below it are made
    if not existing.is_dir():
        raise OutputRefused(f"{flag} {output}: cannot make its folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputRefused(f"{flag} {output}: cannot make its folder: permission denied in {existing}")


def write(table: pa.Table, fmt: str, output: str | None = None, protected=()) -> None:
    """Write `table` in `fmt` to the file `output` (complete or not at all: a temporary name, then a rename), or to
    stdout (no output, or `-`). Column names must be distinct: a JSON object or a CSV reader keeps one of two
    same-named columns. `protected`: the inputs whose folders `output` must stay out of (`check_output`)."""
    check_output(output, protected)
    repeated = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
    if repeated:
        raise OutputError(f"the result has more than one column named {repeated[0]!r}: name them apart with AS "
                          "(e.g. SELECT b.step AS batch_step, c.step AS checkpoint_step ...)")
    if fmt == "parquet":
        if is_stdout(output):
            raise OutputError("--format parquet needs --output FILE")
        _write_file(Path(output), _parquet_bytes(table))
        return
    text = {"table": render_table, "csv": render_csv, "json": render_json}[fmt](table)
    if is_stdout(output):
        _to_stdout(text)
    else:
        _write_file(Path(output), text.encode())  # checked above


def write_text(text: str, output: str | None = None, protected=()) -> None:
    """Text to stdout (no output, or `-`), or to the file `output`, complete or not at all (`check_output`)."""
    if is_stdout(output):
        _to_stdout(text)
        return
    check_output(output, protected)
    _write_file(Path(output), text.encode())


def _to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _write_file(output: Path, data: bytes) -> None:
    """A character device or FIFO is opened and written (it has no contents to replace: /dev/null, a pipe a reader
    waits on); a file, by a symlink to it or by its name, is replaced whole (`_replace`), the symlink kept."""
    try:
        mode = os.stat(output).st_mode if os.path.exists(output) else stat.S_IFREG
        if _streams(mode):
            with open(output, "wb") as stream:
                stream.write(data)
            return
    except OSError as exc:
        raise OutputError(f"--output {output}: {exc.strerror or exc}") from None
    _replace(output.resolve(), data)


def _replace(target: Path, data: bytes) -> None:
    """`data` into `target` under a temporary name, then a rename: a reader sees the old file or the new one."""
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}-{target.name}.partial"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:  # a folder in the way, no permission, a full disk
        raise OutputError(f"--output {target}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------------- json and csv

def interval_text(value: pa.MonthDayNano) -> str:
    """An INTERVAL as DuckDB writes it and casts it back: `14 months -2 days 01:02:03.000004` (its own parts, not a
    length of time: a month has no fixed number of days). DuckDB's intervals hold microseconds."""
    seconds, micros = divmod(abs(value.nanoseconds) // 1000, 1_000_000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    sign = "-" if value.nanoseconds < 0 else ""
    return f"{value.months} months {value.days} days {sign}{hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}"


def jsonable(value):
    """A value of `Table.to_pylist()` as what the json format writes (see the module docstring); a Decimal stays one,
    for `json_text` to write as a number."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, pa.MonthDayNano):  # a tuple: before the lists
        return interval_text(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return f"PT{value.total_seconds():.6f}S"
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def json_text(value) -> str:
    """A `jsonable` value as JSON text. A Decimal (DECIMAL, and HUGEINT, which DuckDB hands Arrow as decimal128(38, 0))
    is a number written with its exact digits: json.dumps would need a float, which rounds past 2^53."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {json_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(json_text(v) for v in value) + "]"
    if isinstance(value, decimal.Decimal):
        return _decimal_text(value)
    return json.dumps(value, ensure_ascii=False)


def _decimal_text(value: decimal.Decimal) -> str:
    return format(value, "f")  # never an exponent: 0.0000000000, not 0E-10


def _holds_decimal(kind: pa.DataType) -> bool:
    """Whether a column of this type can hold a Decimal at any depth (then rows take `json_text`'s slower path)."""
    return pa.types.is_decimal(kind) or any(_holds_decimal(kind.field(i).type) for i in range(kind.num_fields))


def _rows(table: pa.Table):
    """Rows as dicts of Python values, a MAP as a dict. A time-zone-aware timestamp column is read as its UTC instant
    (pyarrow would import pandas to convert a time zone) and comes back as a UTC datetime."""
    aware = [f.name for f in table.schema if pa.types.is_timestamp(f.type) and f.type.tz]
    for name in aware:
        kind = table.schema.field(name).type
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.timestamp(kind.unit)))
    for batch in table.to_batches(max_chunksize=65536):
        for row in batch.to_pylist(maps_as_pydicts="strict"):  # a MAP's keys are distinct in DuckDB
            for name in aware:
                if row[name] is not None:
                    row[name] = row[name].replace(tzinfo=dt.timezone.utc)
            yield row


def render_json(table: pa.Table) -> str:
    if any(_holds_decimal(kind) for kind in table.schema.types):
        return "".join(json_text(jsonable(row)) + "\n" for row in _rows(table))
    return "".join(json.dumps(jsonable(row), ensure_ascii=False) + "\n" for row in _rows(table))


def _csv_field(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)) and not isinstance(value, pa.MonthDayNano):
        value = json_text(jsonable(value))
    elif isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, float):
        value = repr(value)  # the shortest text that reads back as the same double: a float32 as its exact double
    elif isinstance(value, decimal.Decimal):
        value = _decimal_text(value)
    elif not isinstance(value, str):
        value = str(jsonable(value))  # times, bytes (base64), intervals, ints
    if value == "" or any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def render_csv(table: pa.Table) -> str:
    lines = [",".join(_csv_field(name) for name in table.column_names)]
    lines += [",".join(_csv_field(v) for v in row.values()) for row in _rows(table)]
    return "\r\n".join(lines) + "\r\n"


# ---------------------------------------------------------------------------------------------- table

def _cell(value, nested: bool = False) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="microseconds" if value.microsecond else "seconds")
    if isinstance(value, decimal.Decimal):
        return _decimal_text(value)
    if isinstance(value, pa.MonthDayNano):
        return interval_text(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v, True) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_cell(v, True)}" for k, v in value.items()) + "}"
    text = str(value).replace("\n", "\\n")
    return repr(text) if nested and isinstance(value, str) else text


def render_table(table: pa.Table) -> str:
    """Columns padded to their widest cell, numbers right-aligned, no index; cut as the module docstring says."""
    names = table.column_names
    if table.num_rows > TABLE_ROWS:
        half = TABLE_ROWS // 2
        shown = [*_rows(table.slice(0, half)), None, *_rows(table.slice(table.num_rows - half))]
    else:
        shown = list(_rows(table))
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in table.schema.types]

    def cut(text: str) -> str:
        return text if len(text) <= TABLE_CELL else text[:TABLE_CELL - 3] + "..."

    cells = [[cut(_cell(row[n])) for n in names] if row is not None else ["..."] * len(names) for row in shown]
    widths = [max([len(name)] + [len(r[i]) for r in cells]) for i, name in enumerate(names)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, right in zip(values, widths, numeric)).rstrip() + "\n"

    text = line(names) + "".join(line(r) for r in cells)
    if table.num_rows > TABLE_ROWS:
        text += f"({table.num_rows:,} rows, {TABLE_ROWS} shown)\n"
    return text

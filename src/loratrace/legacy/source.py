"""Reading a legacy run folder (docs/LEGACY.md): its JSONL rows under its key names, its config through the legacy
key translation, each row's example ids by the issue's rules, and every quirk met on the way.

    legacy = read_legacy_run(Path("experiments/icoding/arc-challenge/icoding_20250720_143052_lora"))
    examples = resolve_ids(legacy, report)       # row["example_ids"], row["lines"]; report["example_ids"]
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from loratrace.config import Config, ConfigError, config_from_flat, flatten_keys, known_keys
from loratrace.data.datasets import load_split
from loratrace.errors import first_line
from loratrace.legacy.checkpoint import LegacyError
from loratrace.legacy.mappings import LegacyMappings, read_legacy_mappings
from loratrace.overrides import read_yaml_file, resolve_keys
from loratrace.runs import storage

ALIASES = {"global_step": "step", "indices": "sample_indices", "batch_indices": "sample_indices",
           "ids": "sample_ids", "example_ids": "sample_ids", "lr": "learning_rate", "time": "timestamp"}
"""Key aliases seen in legacy JSONL files -> the key docs/LEGACY.md names."""
FIELDS = ("step", "epoch", "batch_idx", "sample_indices", "line_numbers", "sample_ids", "loss", "learning_rate",
          "grad_norm", "timestamp")
JSON_COLUMNS = pa.schema([
    ("step", pa.int64()), ("epoch", pa.int64()), ("batch_idx", pa.int64()), ("sample_indices", pa.list_(pa.int64())),
    ("line_numbers", pa.list_(pa.int64())), ("sample_ids", pa.list_(pa.string())), ("loss", pa.float64()),
    ("learning_rate", pa.float64()), ("grad_norm", pa.float64()), ("timestamp", pa.string())])
"""FIELDS as pyarrow's JSON reader reads them: a line with a value of another JSON kind fails it."""
ROWS = pa.schema([*JSON_COLUMNS.remove(JSON_COLUMNS.get_field_index("timestamp")),
                  ("timestamp", pa.timestamp("us", tz="UTC")), ("_line", pa.int64())])
"""The JSONL as read (`read_jsonl`): FIELDS, the wall times parsed, and `_line`, the JSONL line of each row."""
SHOWN = 20  # out-of-range indices listed in the report; the rest are counted
FOLDER_NAME = re.compile(r"(?P<project>.+)_(?P<stamp>\d{8}_\d{6})_(?P<method>[A-Za-z0-9-]+)")


@dataclass
class LegacyRun:
    """What the legacy folder holds, read once: its config, its JSONL rows (`ROWS`, one per step in step order;
    `resolve_ids` adds `example_ids` and `lines`), and what was odd about them."""

    source: Path
    dataset: str
    cfg: Config
    table: pa.Table
    mappings: LegacyMappings
    quirks: dict[str, Any] = field(default_factory=dict)


def find_legacy_runs(paths: list[str | Path]) -> list[Path]:
    """Every legacy run folder at or below `paths` (a folder holding logs/batch_tracking_<dataset>.jsonl)."""
    found: list[Path] = []
    for given in paths:
        path = Path(storage.local_form(given))
        if not path.is_dir():
            raise LegacyError(f"{given} is not a folder; give a legacy run folder or a folder of them (on this "
                              "machine)")
        logs = sorted(path.glob("logs/batch_tracking_*.jsonl")) or sorted(path.rglob("logs/batch_tracking_*.jsonl"))
        if not logs:
            raise LegacyError(f"{given} is not a legacy run: no logs/batch_tracking_<dataset>.jsonl at or below it")
        found += [log.parent.parent for log in logs if log.parent.parent not in found]
    return found


# ---------------------------------------------------------------------------------------------- reading the source

def read_jsonl(path: Path, quirks: dict[str, Any]) -> pa.Table:
    """The JSONL's objects with docs/LEGACY.md's key names, one row per step in step order (`ROWS`; `_line`: the JSONL
    line). A last line cut short by a crash (no newline, not JSON) is dropped and reported; any other unreadable line,
    or a value of the wrong kind, is an error naming the line and the key as the file spells it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LegacyError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LegacyError(f"{path} line {line}: not UTF-8 text") from None
    table = _read_fast(data, quirks)
    return table if table is not None else _as_table(_read_lines(path, text, quirks))


def _read_lines(path: Path, text: str, quirks: dict[str, Any]) -> list[dict]:
    """The careful reader: line by line, each value checked, every oddity converted and reported or refused."""
    lines = text.split("\n")
    rows, aliases, missing = [], {}, {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if number == len(lines):  # the last line, with no newline after it: the crash cut it
                quirks["truncated_last_line"] = {"line": number, "text": line[:80]}
                continue
            raise LegacyError(f"{path} line {number}: not a JSON object ({exc}); fix or remove the line") from None
        renamed, spelled = {}, {}
        for key, value in item.items():
            if key in ALIASES and ALIASES[key] not in item:
                aliases[key] = ALIASES[key]
                spelled[ALIASES[key]] = key
                key = ALIASES[key]
            renamed[key] = value
        _check_values(renamed, f"{path} line {number}", spelled)
        if "sample_indices" not in renamed and renamed.get("line_numbers") is not None:
            # The script wrote line_numbers as row + 1 (docs/LEGACY.md); the rows come back by that rule, and say so.
            renamed["sample_indices"] = [n - 1 for n in renamed["line_numbers"]]
            if not all(map(_is_whole, renamed["sample_indices"])):  # -2**63: its row is past the 64-bit column
                key, value = spelled.get("line_numbers", "line_numbers"), json.dumps(renamed["line_numbers"])[:40]
                raise LegacyError(f"{path} line {number}: \"{key}\" is {value}, not a list of line numbers (row + 1, "
                                  "64-bit); fix or remove the line")
            quirks.setdefault("rows_from_line_numbers", {"rule": "row = line_number - 1", "jsonl_lines": []})
            quirks["rows_from_line_numbers"]["jsonl_lines"].append(number)
        if renamed.get("step") is None or renamed.get("sample_indices") is None:
            quirks.setdefault("unusable_lines", []).append(number)
            continue
        for name in FIELDS:
            if renamed.get(name) is None:
                missing[name] = missing.get(name, 0) + 1
        renamed["_line"] = number
        rows.append(renamed)
    if aliases:
        quirks["key_aliases"] = aliases
    if missing:
        quirks["missing_fields"] = missing  # field -> how many steps lack it (their column is null)
    return _one_row_per_step(rows, quirks)


def _as_table(rows: list[dict]) -> pa.Table:
    """The careful reader's rows as `ROWS` (an id written as a number is its text, as every id is)."""
    columns: dict[str, list] = {name: [row.get(name) for row in rows] for name in ROWS.names}
    columns["sample_ids"] = [None if ids is None else [str(i) for i in ids] for ids in columns["sample_ids"]]
    for name in ("loss", "learning_rate", "grad_norm"):
        columns[name] = [None if value is None else float(value) for value in columns[name]]
    return pa.Table.from_pydict(columns, schema=ROWS)


def _read_fast(data: bytes, quirks: dict[str, Any]) -> pa.Table | None:
    """The rows read by pyarrow's JSON reader when it can vouch for every line as `_read_lines` would; None when a
    line is blank, not an object, cut short, lacks a step or its indices, repeats a step, uses a key alias or holds a
    value of another kind or range than `_check_values` accepts: the careful reader then reports or refuses it in
    its own words."""
    try:
        table = pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=1 << 22),
                                  parse_options=pa_json.ParseOptions(explicit_schema=JSON_COLUMNS,
                                                                     unexpected_field_behavior="infer"))
    except (pa.ArrowException, ValueError):  # a line it cannot type, or one longer than a block (4 MiB)
        return None
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if table.num_rows == 0 or table.num_rows != lines or set(table.column_names) & set(ALIASES):
        return None  # a blank line (the JSONL's line numbers would shift) or a key alias
    table = table.select(list(FIELDS)).combine_chunks()
    if not _values_as_checked(table):
        return None
    try:
        stamps = _timestamps(table["timestamp"])
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    nulls = {name: table[name].is_null().to_numpy(zero_copy_only=False) for name in FIELDS}
    missing = sorted((int(is_null.argmax()), FIELDS.index(name), name) for name, is_null in nulls.items()
                     if is_null.any())  # in the order the careful reader meets them: first line, then field
    if missing:
        quirks["missing_fields"] = {name: int(nulls[name].sum()) for _, _, name in missing}
    table = table.set_column(FIELDS.index("timestamp"), "timestamp", stamps)
    table = table.append_column("_line", pa.array(np.arange(1, lines + 1)))
    return table if (np.diff(table["step"].to_numpy()) > 0).all() else table.take(pc.sort_indices(table["step"]))


def _values_as_checked(table: pa.Table) -> bool:
    """Whether every line is usable and every value is what `_check_values` accepts (pyarrow gave the types): a step
    from 1, each logged once, indices on every line, epoch and batch index in range, no null inside a list."""
    steps = table["step"]
    if steps.null_count or table["sample_indices"].null_count or pc.min(steps).as_py() < 1:
        return False
    for name, high in (("epoch", INT32), ("batch_idx", INT64)):
        low_high = pc.min_max(table[name]).as_py()
        if low_high["min"] is not None and (low_high["min"] < 0 or low_high["max"] >= high):
            return False
    if any(pc.list_flatten(table[name]).null_count for name in ("sample_indices", "line_numbers", "sample_ids")):
        return False
    return pc.count_distinct(steps).as_py() == len(steps)


def _timestamps(texts: pa.ChunkedArray) -> pa.ChunkedArray:
    """`timestamp` texts parsed by `_timestamp`, the careful reader's rule: the script's own form (ISO, seconds, no
    offset: UTC) all at once by pyarrow when writing each back gives its text (no day or second out of range was
    rolled over); any other text one by one."""
    kind, form = ROWS.field("timestamp").type, "%Y-%m-%dT%H:%M:%S"
    parsed = pc.strptime(texts, format=form, unit="s", error_is_null=True)
    same = pc.equal(pc.strftime(parsed, format=form), texts)
    if same.null_count == texts.null_count and pc.all(same).as_py() is not False:
        return parsed.cast(pa.timestamp("us")).cast(kind)
    return pa.chunked_array([pa.array([None if text is None else _timestamp(text) for text in texts.to_pylist()],
                                      kind)])


# the tracking columns' integer types (docs/ARCHITECTURE.md): a value past them cannot be stored
INT64, INT32 = 2**63, 2**31


def _is_whole(value: Any, low: int = -INT64, high: int = INT64) -> bool:
    """An integer (not a bool) in [low, high)."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_values(row: dict, where: str, spelled: dict[str, str]) -> None:
    """Each present value of the kind docs/LEGACY.md gives it, else a LegacyError naming `where` (file and line) and the
    key as the file spells it (`spelled`: docs/LEGACY.md's name -> the alias used): a value the script never writes
    cannot be converted without guessing. Null (or absent) is a missing field, not an error."""
    def refuse(name: str, wants: str) -> LegacyError:
        value = json.dumps(row[name], default=str)[:40]
        return LegacyError(f"{where}: \"{spelled.get(name, name)}\" is {value}, not {wants}; fix or remove the line")

    if row.get("step") is not None and not _is_whole(row["step"], 1):
        raise refuse("step", "an optimizer step (a whole number from 1)")
    for name, high in (("epoch", INT32), ("batch_idx", INT64)):
        if row.get(name) is not None and not _is_whole(row[name], 0, high):
            raise refuse(name, f"a whole number from 0 (below {high:,})")
    for name in ("loss", "learning_rate", "grad_norm"):
        if row.get(name) is not None and not _is_number(row[name]):
            raise refuse(name, "a number")
    for name in ("sample_indices", "line_numbers"):
        if row.get(name) is not None and not (isinstance(row[name], list) and all(map(_is_whole, row[name]))):
            raise refuse(name, "a list of whole numbers (64-bit)")
    ids = row.get("sample_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) or _is_whole(i) for i in ids)):
        raise refuse("sample_ids", "a list of ids")
    if row.get("timestamp") is not None:
        try:
            row["timestamp"] = _timestamp(row["timestamp"])
        except (TypeError, ValueError, OverflowError, OSError):
            raise refuse("timestamp", "ISO time text or epoch seconds") from None


def _timestamp(value: Any) -> dt.datetime:
    """`timestamp` (ISO text; without an offset it is read as UTC) or `time` (epoch seconds)."""
    if _is_number(value):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    if not isinstance(value, str):
        raise TypeError(value)
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _one_row_per_step(rows: list[dict], quirks: dict[str, Any]) -> list[dict]:
    """Rows by step; a step logged twice (a restart of the legacy script) keeps its last line, and is reported."""
    by_step: dict[int, dict] = {}
    for row in rows:
        if int(row["step"]) in by_step:
            quirks.setdefault("repeated_steps", []).append(int(row["step"]))
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def read_legacy_run(source: Path) -> LegacyRun:
    """The legacy folder's config and rows. Its config goes through the same legacy-key translation as `train`;
    keys loratrace does not know are dropped and reported."""
    logs = sorted(source.glob("logs/batch_tracking_*.jsonl"))
    if not logs:
        raise LegacyError(f"{source} is not a legacy run: no logs/batch_tracking_<dataset>.jsonl")
    dataset = logs[0].name[len("batch_tracking_"): -len(".jsonl")]
    quirks: dict[str, Any] = {}
    table = read_jsonl(logs[0], quirks)
    if not table.num_rows:
        raise LegacyError(f"{logs[0]}: no step recorded; nothing to import")
    mappings = read_legacy_mappings(source, dataset)  # checked now: a bad entry stops the import before any work
    flat: dict[str, Any] = {}
    config_path = source / "training_config.yaml"
    if config_path.is_file():
        flat = flatten_keys(read_yaml_file(config_path))
    else:
        quirks["no_training_config"] = "training_config.yaml missing: config.yaml holds loratrace's defaults"
    notes: list[str] = []
    resolved = resolve_keys([flat], notes.append)
    keys = known_keys()
    dropped = sorted(k for k in resolved if k not in keys)
    if dropped:
        quirks["config_keys_dropped"] = dropped
    resolved = {k: v for k, v in resolved.items() if k in keys}
    resolved.setdefault("data.dataset", dataset)
    resolved.setdefault("tracking.enabled", True)  # an imported run is a tracked run: its resumes continue tracking
    if resolved["data.dataset"] != dataset:
        quirks["dataset_names_differ"] = {"config": resolved["data.dataset"], "jsonl": dataset}
    match = FOLDER_NAME.fullmatch(source.name)
    if match:
        resolved.setdefault("method", match["method"])
    try:
        cfg = config_from_flat(resolved)
    except ConfigError as exc:
        raise LegacyError(f"{config_path}: {exc}") from None
    return LegacyRun(source, dataset, cfg, table, mappings, quirks)


# ---------------------------------------------------------------------------------------------- example ids

def resolve_ids(legacy: LegacyRun, report: dict[str, Any]) -> list[dict] | None:
    """Each row's example ids (`example_ids`) and 0-based rows (`lines`), columns added to `legacy.table`, by
    docs/LEGACY.md's rules in order: the JSONL's `sample_ids`; else the data set's id of that row, when it loads;
    else `<dataset>/train/<row>`. An index that is no row (negative, or past the data set's end) becomes a null line
    (and a null id unless `sample_ids` gives it): the batch keeps its length and order, nothing is made up, and the
    raw index is listed in the quirk `rows_out_of_range`. Returns the data set's examples (None when it did not
    load); `report["example_ids"]` says which rule served how many steps."""
    cfg = legacy.cfg
    examples, load_error = None, None
    try:
        examples = load_split(cfg.data.dataset, cfg.data.source, cfg.data.train_split, notice=lambda line: None)
    except Exception as exc:  # noqa: BLE001 - a data set that does not load only means positional ids
        load_error = first_line(exc)
    table = legacy.table
    indices = table["sample_indices"].combine_chunks()
    flat, lengths = pc.list_flatten(indices).to_numpy(), pc.list_value_length(indices).to_numpy()
    row_of = np.repeat(np.arange(len(lengths)), lengths)  # the row of each index
    known = flat >= 0 if examples is None else (flat >= 0) & (flat < len(examples))
    lines = pa.array(flat, mask=~known)
    ids, rules = _example_ids(table, lines, row_of, lengths, examples, cfg)
    ids_length_differs = rules.pop("ids_length_differs")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
    legacy.table = table.append_column("example_ids", pa.ListArray.from_arrays(offsets, ids)).append_column(
        "lines", pa.ListArray.from_arrays(offsets, lines))
    report["example_ids"] = {"rule_per_steps": {k: v for k, v in rules.items() if v},
                             "data_set": f"{cfg.data.dataset} ({cfg.data.source}, {cfg.data.train_split})",
                             **({"data_set_not_loaded": load_error} if load_error else {})}
    lines_differ = _lines_differ(table, flat, row_of, lengths)
    if lines_differ:
        legacy.quirks["line_numbers_disagree"] = {"steps": lines_differ, "kept": "sample_indices"}
    if ids_length_differs:
        legacy.quirks["sample_ids_length_differs"] = {"steps": ids_length_differs, "ids_from": "the rules after it"}
    out_of_range = np.flatnonzero(~known)
    if out_of_range.size:
        jsonl_lines, steps = table["_line"].to_numpy(), table["step"].to_numpy()
        legacy.quirks["rows_out_of_range"] = {
            "count": int(out_of_range.size), "rows": f"0..{len(examples) - 1}" if examples is not None else "0..",
            "kept_as": "null line",
            "first": [{"jsonl_line": int(jsonl_lines[row_of[i]]), "step": int(steps[row_of[i]]), "index": int(flat[i])}
                      for i in out_of_range[:SHOWN]]}
    return examples


def _example_ids(table: pa.Table, lines: pa.Array, row_of: np.ndarray, lengths: np.ndarray, examples,
                 cfg: Config) -> tuple[pa.Array, dict[str, int]]:
    """Every index's example id by the rules in order (`lines`: the rows, null where none), and how many steps each
    rule served (`ids_length_differs`: the steps whose `sample_ids` are of another length than their indices)."""
    given = table["sample_ids"].combine_chunks()
    has = given.is_valid().to_numpy(zero_copy_only=False)
    given_lengths = pc.list_value_length(given).fill_null(-1).to_numpy()
    paired = given_lengths == lengths
    rules = {"sample_ids": int(paired.sum()), "data set row": 0, "positional": 0,
             "ids_length_differs": int((has & ~paired).sum())}
    if paired.all():
        return pc.list_flatten(given), rules
    rules["data set row" if examples is not None else "positional"] = int((~paired).sum())
    if examples is not None:
        ids = pa.array([e.example_id for e in examples], pa.string()).take(lines)
    else:
        ids = pc.binary_join_element_wise(f"{cfg.data.dataset}/{cfg.data.train_split}/", lines.cast(pa.string()), "")
    given_rows = np.repeat(np.flatnonzero(has), given_lengths[has])  # the row of each given id
    return pc.replace_with_mask(ids, pa.array(paired[row_of]),
                                pc.list_flatten(given).filter(pa.array(paired[given_rows]))), rules


def _lines_differ(table: pa.Table, flat: np.ndarray, row_of: np.ndarray, lengths: np.ndarray) -> int:
    """How many steps give `line_numbers` that are not their indices + 1."""
    numbers = table["line_numbers"].combine_chunks()
    has = numbers.is_valid().to_numpy(zero_copy_only=False)
    numbers_lengths = pc.list_value_length(numbers).fill_null(-1).to_numpy()
    same = numbers_lengths == lengths
    value_rows = np.repeat(np.flatnonzero(has), numbers_lengths[has])
    mine, theirs = flat[same[row_of]], pc.list_flatten(numbers).to_numpy()[same[value_rows]]
    wrong = (mine == INT64 - 1) | (theirs != mine + 1)  # the largest index has no line number (mine + 1 wraps)
    return int((has & ~same).sum()) + len(np.unique(row_of[same[row_of]][wrong]))

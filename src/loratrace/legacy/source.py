"""Reading a legacy run folder (docs/LEGACY.md): its JSONL rows under its key names, its config through the legacy
key translation, each row's example ids by the issue's rules, and every quirk met on the way.

    legacy = read_legacy_run(Path("experiments/icoding/arc-challenge/icoding_20250720_143052_lora"))
    examples = resolve_ids(legacy, report)       # row["example_ids"], row["lines"]; report["example_ids"]
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
SHOWN = 20  # out-of-range indices listed in the report; the rest are counted
FOLDER_NAME = re.compile(r"(?P<project>.+)_(?P<stamp>\d{8}_\d{6})_(?P<method>[A-Za-z0-9-]+)")


@dataclass
class LegacyRun:
    """What the legacy folder holds, read once: its config, its JSONL rows, and what was odd about them."""

    source: Path
    dataset: str
    cfg: Config
    rows: list[dict]
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

def read_jsonl(path: Path, quirks: dict[str, Any]) -> list[dict]:
    """The JSONL's objects with docs/LEGACY.md's key names. A last line cut short by a crash (no newline, not JSON) is
    dropped and reported; any other unreadable line, or a value of the wrong kind, is an error naming the line and
    the key as the file spells it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LegacyError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LegacyError(f"{path} line {line}: not UTF-8 text") from None
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
    rows = read_jsonl(logs[0], quirks)
    if not rows:
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
    return LegacyRun(source, dataset, cfg, rows, mappings, quirks)


# ---------------------------------------------------------------------------------------------- example ids

def resolve_ids(legacy: LegacyRun, report: dict[str, Any]) -> list[dict] | None:
    """Each row's example ids (`example_ids`) and 0-based rows (`lines`), by docs/LEGACY.md's rules in order: the
    JSONL's
    `sample_ids`; else the data set's id of that row, when it loads; else `<dataset>/train/<row>`. An index that is
    no row (negative, or past the data set's end) becomes a null line (and a null id unless `sample_ids` gives it):
    the batch keeps its length and order, nothing is made up, and the raw index is listed in the quirk
    `rows_out_of_range`. Returns the data set's examples (None when it did not load); `report["example_ids"]` says
    which rule served how many steps."""
    cfg = legacy.cfg
    examples, load_error = None, None
    try:
        examples = load_split(cfg.data.dataset, cfg.data.source, cfg.data.train_split, notice=lambda line: None)
    except Exception as exc:  # noqa: BLE001 - a data set that does not load only means positional ids
        load_error = first_line(exc)
    rules = {"sample_ids": 0, "data set row": 0, "positional": 0}
    lines_differ, ids_length_differs = 0, 0
    out_of_range: list[dict] = []
    for row in legacy.rows:
        indices = row["sample_indices"]
        if row.get("line_numbers") is not None and [n - 1 for n in row["line_numbers"]] != indices:
            lines_differ += 1
        lines = [i if i >= 0 and (examples is None or i < len(examples)) else None for i in indices]
        out_of_range += [{"jsonl_line": row["_line"], "step": row["step"], "index": i}
                         for i, line in zip(indices, lines) if line is None]
        row["lines"] = lines
        ids = row.get("sample_ids")
        if ids is not None and len(ids) != len(indices):
            ids_length_differs += 1
        if ids is not None and len(ids) == len(indices):
            row["example_ids"] = [str(i) for i in ids]
            rules["sample_ids"] += 1
        elif examples is not None:
            row["example_ids"] = [None if r is None else examples[r].example_id for r in lines]
            rules["data set row"] += 1
        else:
            row["example_ids"] = [None if r is None else f"{cfg.data.dataset}/{cfg.data.train_split}/{r}"
                                  for r in lines]
            rules["positional"] += 1
    report["example_ids"] = {"rule_per_steps": {k: v for k, v in rules.items() if v},
                             "data_set": f"{cfg.data.dataset} ({cfg.data.source}, {cfg.data.train_split})",
                             **({"data_set_not_loaded": load_error} if load_error else {})}
    if lines_differ:
        legacy.quirks["line_numbers_disagree"] = {"steps": lines_differ, "kept": "sample_indices"}
    if ids_length_differs:
        legacy.quirks["sample_ids_length_differs"] = {"steps": ids_length_differs, "ids_from": "the rules after it"}
    if out_of_range:
        legacy.quirks["rows_out_of_range"] = {
            "count": len(out_of_range), "rows": f"0..{len(examples) - 1}" if examples is not None else "0..",
            "kept_as": "null line", "first": out_of_range[:SHOWN]}
    return examples

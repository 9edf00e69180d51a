"""The legacy mapping files (`checkpoint_mapping_<dataset>.json`, `line_checkpoint_mapping_<dataset>.json`) beside
loratrace's own mappings, recomputed from the imported rows: every disagreement listed, neither side corrected.

    legacy_maps = read_legacy_mappings(legacy_folder, "arc-challenge")     # checked before anything is written
    comparison, step_map = recompute_and_compare(run_dir / "tracking", run_id, legacy_maps, parts, batches)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loratrace.legacy.checkpoint import LegacyError
from loratrace.track.mappings import Mappings

SHOWN = 20  # disagreements listed in full; the rest are counted
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


@dataclass
class LegacyMappings:
    """The two legacy mapping files as read and checked: checkpoint name -> (its step, the steps it lists or None),
    line (1-based) -> (its steps or None, the step of its first checkpoint or None). None: the file is missing."""

    checkpoints: dict[str, tuple[int, list[int] | None]] | None
    lines: dict[int, tuple[list[int] | None, int | None]] | None

    def checkpoint_steps(self) -> set[int]:
        """The steps of the checkpoints the checkpoint mapping names (saved then, whether or not still on disk)."""
        return {step for step, _ in (self.checkpoints or {}).values()}


def read_legacy_mappings(source: Path, dataset: str) -> LegacyMappings:
    """Both mapping files of a legacy folder, each value of the kind docs/LEGACY.md shows; anything else is a
    LegacyError
    naming the file, the line and the key (the script never writes it: comparing with it would guess)."""
    logs = Path(source) / "logs"
    checkpoints = _read_json(logs / f"checkpoint_mapping_{dataset}.json", _checkpoint_entry)
    lines = _read_json(logs / f"line_checkpoint_mapping_{dataset}.json", _line_entry)
    return LegacyMappings(checkpoints, None if lines is None else {line: entry for (line, entry) in lines.values()})


def _read_json(path: Path, read_entry) -> dict | None:
    """{key: read_entry(key, value)} of a JSON object file; None when the file is missing."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise LegacyError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LegacyError(f"{path}: expected a JSON object of checkpoints or lines")
    try:
        return {key: read_entry(key, value) for key, value in data.items()}
    except _BadEntry as bad:  # where it is written is looked up for the one bad key only: a search per key is slow
        raise LegacyError(f"{_where(path, text, bad.key)}: {bad.what}") from None


class _BadEntry(Exception):
    """An entry of a mapping file that is not of the kind docs/LEGACY.md shows: `what` is wrong with `key`."""

    def __init__(self, key: str, what: str):
        super().__init__(what)
        self.key, self.what = key, what


def _where(path: Path, text: str, key: str) -> str:
    """`<file> line N key "K"`: the 1-based line where the key is written, for the one-line errors."""
    match = re.search(re.escape(json.dumps(key)) + r"\s*:", text)
    line = f" line {text.count(chr(10), 0, match.start()) + 1}" if match else ""
    return f"{path}{line} key {json.dumps(key)}"


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _steps(entry: dict, key: str) -> list[int] | None:
    """An entry's `steps`: a list of optimizer steps, or None when the entry does not list them (a missing field)."""
    steps = entry.get("steps")
    # each an int (a bool is not: its type is not int) from 1, checked by the set of types and the least, not one by
    # one in Python: a line mapping lists every step of every line
    if steps is not None and not (isinstance(steps, list) and set(map(type, steps)) <= {int}
                                  and min(steps, default=1) >= 1):
        raise _BadEntry(key, f"\"steps\" is {json.dumps(steps)[:40]}, not a list of steps (whole numbers from 1)")
    return None if steps is None else sorted(steps)


def _checkpoint_entry(name: str, entry: Any) -> tuple[int, list[int] | None]:
    if not isinstance(entry, dict):
        raise _BadEntry(name, f"is {json.dumps(entry)[:40]}, not an object with \"step\" and \"steps\"")
    step = entry.get("step")
    if step is None and (match := CHECKPOINT_NAME.fullmatch(name)):
        step = int(match.group(1))
    if not (_is_whole(step) and step >= 1):
        raise _BadEntry(name, f"no step (\"step\" is {json.dumps(step)[:40]} and the name is not checkpoint-<step>)")
    return step, _steps(entry, name)


def _line_entry(key: str, entry: Any) -> tuple[int, tuple[list[int] | None, int | None]]:
    if not (key.isascii() and key.isdigit() and int(key) >= 1):
        raise _BadEntry(key, "not a line number (the keys are 1-based lines of the source file)")
    if not isinstance(entry, dict):
        raise _BadEntry(key, f"is {json.dumps(entry)[:40]}, not an object with \"steps\" and \"first_checkpoint\"")
    first = entry.get("first_checkpoint")
    match = CHECKPOINT_NAME.fullmatch(first) if isinstance(first, str) else None
    if first is not None and match is None:
        raise _BadEntry(key, f"\"first_checkpoint\" is {json.dumps(first)[:40]}, not a checkpoint-<step> name")
    return int(key), (_steps(entry, key), int(match.group(1)) if match else None)


def recompute_and_compare(tracking: Path, run_id: str, legacy: LegacyMappings, parts: list[str],
                          batches: pa.Table) -> tuple[dict[str, Any], pa.Table]:
    """Write step_checkpoint/line_checkpoint.parquet from the imported rows, then compare them with the legacy files
    both ways: per checkpoint, the steps it adds; per line (1-based in the legacy file), its steps and first
    checkpoint; and what one side has that the other lacks. `batches`: the rows written to the batch `parts`, still
    in memory (not read back). Returns the comparison and the step_checkpoint table written."""
    recomputed = Mappings(tracking, run_id, {0: (0, None)})
    recomputed.add_written(parts, batches)
    step_map, line_map = recomputed.refresh()
    ours_steps, ours_lines = _steps_by_checkpoint(step_map), _lines(line_map)
    disagreements: list[str] = []
    if legacy.checkpoints is not None:
        disagreements += _compare_checkpoints(legacy.checkpoints, ours_steps)
    if legacy.lines is not None:
        disagreements += _compare_lines(legacy.lines, ours_lines)
    missing = [name for name, data in (("checkpoint_mapping", legacy.checkpoints), ("line_checkpoint_mapping",
                                                                                    legacy.lines)) if data is None]
    summary = ("recomputed; " + ("agree with the legacy files" if not disagreements
                                 else f"{len(disagreements)} disagreement(s) with the legacy files"))
    if missing:
        summary += f"; legacy {' and '.join(missing)} missing (nothing to compare)"
    return {"summary": summary, "disagreements": disagreements[:SHOWN],
            "disagreements_total": len(disagreements), "legacy_files_missing": missing}, step_map


def _steps_by_checkpoint(step_map: pa.Table) -> dict[int, list[int]]:
    """Checkpoint step -> the steps it is the first checkpoint of, in step order (a step without one: none)."""
    step_map = step_map.filter(pc.is_valid(step_map["checkpoint_step"]))
    if not step_map.num_rows:
        return {}
    checkpoints, steps = step_map["checkpoint_step"].to_numpy(), step_map["step"].to_numpy()
    order = np.lexsort((steps, checkpoints))
    checkpoints, steps = checkpoints[order], steps[order]
    starts = np.flatnonzero(np.append(True, checkpoints[1:] != checkpoints[:-1]))
    return dict(zip(checkpoints[starts].tolist(), (group.tolist() for group in np.split(steps, starts[1:]))))


def _lines(line_map: pa.Table) -> dict[int, dict]:
    """Line (1-based, as the legacy file counts) -> {"steps": its steps in order, each once, "first": the earliest
    first checkpoint} over every example id at that line; an index out of the data set's range (null line) has no
    line to compare (a quirk of its own)."""
    line_map = line_map.filter(pc.is_valid(line_map["line"]))
    if not line_map.num_rows:
        return {}
    lines = line_map["line"].to_numpy()
    counts = pc.list_value_length(line_map["steps"]).fill_null(0).to_numpy()
    all_lines, all_steps = np.repeat(lines, counts), pc.list_flatten(line_map["steps"]).to_numpy()
    if not (np.diff(lines) > 0).all():  # else one id per line: each list is its line's steps, in order, once
        order = np.lexsort((all_steps, all_lines))
        all_lines, all_steps = all_lines[order], all_steps[order]
        first = np.append(True, (all_lines[1:] != all_lines[:-1]) | (all_steps[1:] != all_steps[:-1]))
        all_lines, all_steps = all_lines[first], all_steps[first]
    starts = np.flatnonzero(np.append(True, all_lines[1:] != all_lines[:-1]))
    ours = {line + 1: {"steps": group.tolist(), "first": None}
            for line, group in zip(all_lines[starts].tolist(), np.split(all_steps, starts[1:]))}
    for line, checkpoint in zip(lines.tolist(), line_map["first_checkpoint_step"].to_pylist()):
        entry = ours.setdefault(line + 1, {"steps": [], "first": None})
        if checkpoint is not None and (entry["first"] is None or checkpoint < entry["first"]):
            entry["first"] = checkpoint
    return ours


def _compare_checkpoints(theirs: dict[str, tuple[int, list[int] | None]], ours: dict[int, list[int]]) -> list[str]:
    """Per checkpoint the legacy mapping names, its steps against the rows'; then each checkpoint the rows give
    steps to that the legacy mapping does not name."""
    found = []
    for name, (step, steps) in theirs.items():
        mine = ours.get(step, [])
        if steps is None:
            found.append(f"{name}: the legacy mapping lists no steps, the rows give {_span(mine)}")
        elif steps != mine:
            found.append(f"{name}: legacy mapping lists steps {_span(steps)}, the rows give {_span(mine)}")
    named = {step for step, _ in theirs.values()}
    for step in sorted(set(ours) - named):
        found.append(f"checkpoint-{step}: the rows give steps {_span(ours[step])}, absent from the legacy "
                     "checkpoint mapping")
    return found


def _compare_lines(theirs: dict[int, tuple[list[int] | None, int | None]], ours: dict[int, dict]) -> list[str]:
    """Per line the legacy line mapping names, its steps and first checkpoint against the rows'; then each line
    the rows train that the legacy mapping does not name."""
    found = []
    for line, (steps, first) in theirs.items():
        mine = ours.get(line)
        if mine is None:
            found.append(f"line {line}: in the legacy line mapping, never trained per the JSONL")
        elif steps is None:
            found.append(f"line {line}: the legacy line mapping lists no steps, the rows give {_span(mine['steps'])}")
        elif steps != mine["steps"]:
            found.append(f"line {line}: legacy steps {_span(steps)}, the rows give {_span(mine['steps'])}")
        elif first != mine["first"]:
            shown = "none" if first is None else f"checkpoint-{first}"
            given = "none" if mine["first"] is None else f"checkpoint-{mine['first']}"
            found.append(f"line {line}: legacy first checkpoint {shown}, the rows give {given}")
    for line in sorted(set(ours) - set(theirs)):
        found.append(f"line {line}: trained per the JSONL, absent from the legacy line mapping")
    return found


def _span(steps: list[int]) -> str:
    if len(steps) > 2 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}..{steps[-1]}"
    return str(steps)

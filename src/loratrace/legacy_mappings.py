"""The legacy mapping files (`checkpoint_mapping_<dataset>.json`, `line_checkpoint_mapping_<dataset>.json`) beside
loratrace's own mappings, recomputed from the imported rows: every disagreement listed, neither side corrected.

    comparison = recompute_and_compare(run_dir / "tracking", run_id, legacy_folder, "arc-challenge")
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from loratrace.legacy_checkpoint import LegacyError
from loratrace.mappings import Mappings

SHOWN = 20  # disagreements listed in full; the rest are counted


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LegacyError(f"{path}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LegacyError(f"{path}: expected a JSON object of checkpoints or lines")
    return data


def _step_of(name: str, entry: Any) -> int | None:
    if isinstance(entry, dict) and entry.get("step") is not None:
        return int(entry["step"])
    match = re.fullmatch(r"checkpoint-(\d+)", str(name))
    return int(match.group(1)) if match else None


def checkpoint_steps_named(source: Path, dataset: str) -> set[int]:
    """The steps of the checkpoints the legacy checkpoint mapping names (saved then, whether or not still on disk)."""
    mapping = _read_json(source / "logs" / f"checkpoint_mapping_{dataset}.json") or {}
    return {step for name, entry in mapping.items() if (step := _step_of(name, entry)) is not None}


def recompute_and_compare(tracking: Path, run_id: str, source: Path, dataset: str) -> dict[str, Any]:
    """Write step_checkpoint/line_checkpoint.parquet from the imported rows, then compare them with the legacy files:
    per checkpoint, the steps it adds; per line (1-based in the legacy file), its steps and first checkpoint."""
    Mappings(tracking, run_id, {0: (0, None)}).refresh()
    step_map = pq.read_table(tracking / "step_checkpoint.parquet").to_pylist()
    line_map = pq.read_table(tracking / "line_checkpoint.parquet").to_pylist()
    ours_steps: dict[int, list[int]] = {}
    for row in step_map:
        if row["checkpoint_step"] is not None:
            ours_steps.setdefault(row["checkpoint_step"], []).append(row["step"])
    ours_lines: dict[int, dict] = {}
    for row in line_map:
        entry = ours_lines.setdefault(row["line"] + 1, {"steps": set(), "first": None})
        entry["steps"] |= set(row["steps"])
        if row["first_checkpoint_step"] is not None and (entry["first"] is None
                                                          or row["first_checkpoint_step"] < entry["first"]):
            entry["first"] = row["first_checkpoint_step"]
    disagreements: list[str] = []
    legacy_checkpoints = _read_json(source / "logs" / f"checkpoint_mapping_{dataset}.json")
    if legacy_checkpoints is not None:
        for name, entry in legacy_checkpoints.items():
            step = _step_of(name, entry)
            theirs = sorted(int(s) for s in entry.get("steps", [])) if isinstance(entry, dict) else None
            mine = sorted(ours_steps.get(step, []))
            if theirs is not None and theirs != mine:
                disagreements.append(f"{name}: legacy mapping lists steps {_span(theirs)}, the rows give {_span(mine)}")
    legacy_lines = _read_json(source / "logs" / f"line_checkpoint_mapping_{dataset}.json")
    if legacy_lines is not None:
        for key, entry in legacy_lines.items():
            line = int(key)
            mine = ours_lines.get(line)
            theirs_steps = sorted(int(s) for s in entry.get("steps", []))
            theirs_first = _step_of(entry.get("first_checkpoint"), None) if entry.get("first_checkpoint") else None
            if mine is None:
                disagreements.append(f"line {line}: in the legacy line mapping, never trained per the JSONL")
            elif theirs_steps != sorted(mine["steps"]):
                disagreements.append(f"line {line}: legacy steps {_span(theirs_steps)}, the rows give "
                                     f"{_span(sorted(mine['steps']))}")
            elif theirs_first != mine["first"]:
                disagreements.append(f"line {line}: legacy first checkpoint {entry.get('first_checkpoint')}, the "
                                     f"rows give checkpoint-{mine['first']}")
        for line in sorted(set(ours_lines) - {int(k) for k in legacy_lines}):
            disagreements.append(f"line {line}: trained per the JSONL, absent from the legacy line mapping")
    missing = [name for name, data in (("checkpoint_mapping", legacy_checkpoints), ("line_checkpoint_mapping",
                                                                                    legacy_lines)) if data is None]
    summary = ("recomputed; " + ("agree with the legacy files" if not disagreements
                                 else f"{len(disagreements)} disagreement(s) with the legacy files"))
    if missing:
        summary += f"; legacy {' and '.join(missing)} missing (nothing to compare)"
    return {"summary": summary, "disagreements": disagreements[:SHOWN],
            "disagreements_total": len(disagreements), "legacy_files_missing": missing}


def _span(steps: list[int]) -> str:
    if len(steps) > 2 and steps == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}..{steps[-1]}"
    return str(steps)

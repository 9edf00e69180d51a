"""`loratrace import-legacy`: the "traditional" script's experiment folders (JSONL batch tracking, JSON mappings,
Hugging Face Trainer checkpoints) as normal loratrace run folders (LEGACY.md).

    report = import_legacy("experiments/icoding/arc-challenge/icoding_20250720_143052_lora", runs_dir="runs")
    for folder in find_legacy_runs(["experiments/icoding"]): ...

The source is only read. Each run is built under a hidden temporary name in the runs folder and renamed when
complete, so a failed import leaves nothing. What the legacy files do not hold is null, never guessed; every quirk
met (missing fields, key aliases, a cut-short last line, a deleted checkpoint, mappings that disagree) is listed in
the run's `import_report.json`. Importing a folder already imported reports that run and writes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from loratrace import legacy_mappings, runs, schema
from loratrace.checkpoints import checkpoint_name
from loratrace.config import (
    Config,
    ConfigError,
    config_from_flat,
    flatten_keys,
    known_keys,
    read_yaml_file,
    resolve_keys,
    save_config,
)
from loratrace.legacy_checkpoint import (
    LegacyError,
    LoaderPosition,
    StateNotCarried,
    convert_trainer_checkpoint,
    is_trainer_checkpoint,
    trainable_shapes,
    write_checkpoint,
)
from loratrace.step_outputs import stage_of

ALIASES = {"global_step": "step", "indices": "sample_indices", "batch_indices": "sample_indices",
           "ids": "sample_ids", "example_ids": "sample_ids", "lr": "learning_rate", "time": "timestamp"}
"""Key aliases seen in legacy JSONL files -> the key LEGACY.md names."""
FIELDS = ("step", "epoch", "batch_idx", "sample_indices", "line_numbers", "sample_ids", "loss", "learning_rate",
          "grad_norm", "timestamp")
FOLDER_NAME = re.compile(r"(?P<project>.+)_(?P<stamp>\d{8}_\d{6})_(?P<method>[A-Za-z0-9-]+)")
PART_ROWS = 50_000  # batches rows per Parquet part
REPORT_FILE = "import_report.json"


@dataclass
class LegacyRun:
    """What the legacy folder holds, read once: its config, its JSONL rows, and what was odd about them."""

    source: Path
    dataset: str
    cfg: Config
    rows: list[dict]
    quirks: dict[str, Any] = field(default_factory=dict)


def find_legacy_runs(paths: list[str | Path]) -> list[Path]:
    """Every legacy run folder at or below `paths` (a folder holding logs/batch_tracking_<dataset>.jsonl)."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise LegacyError(f"{path} is not a folder; give a legacy run folder or a folder of them")
        logs = sorted(path.glob("logs/batch_tracking_*.jsonl")) or sorted(path.rglob("logs/batch_tracking_*.jsonl"))
        if not logs:
            raise LegacyError(f"{path} is not a legacy run: no logs/batch_tracking_<dataset>.jsonl at or below it")
        found += [log.parent.parent for log in logs if log.parent.parent not in found]
    return found


# ---------------------------------------------------------------------------------------------- reading the source

def read_jsonl(path: Path, quirks: dict[str, Any]) -> list[dict]:
    """The JSONL's objects with LEGACY.md's key names. A last line cut short by a crash (no newline, not JSON) is
    dropped and reported; any other unreadable line is an error naming it."""
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
        renamed = {}
        for key, value in item.items():
            if key in ALIASES and ALIASES[key] not in item:
                aliases[key] = ALIASES[key]
                key = ALIASES[key]
            renamed[key] = value
        if "sample_indices" not in renamed and "line_numbers" in renamed:
            renamed["sample_indices"] = [n - 1 for n in renamed["line_numbers"]]
            quirks.setdefault("rows_from_line_numbers", 0)
            quirks["rows_from_line_numbers"] += 1
        if "step" not in renamed or "sample_indices" not in renamed:
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
    return LegacyRun(source, dataset, cfg, rows, quirks)


# ---------------------------------------------------------------------------------------------- example ids

def resolve_ids(legacy: LegacyRun, report: dict[str, Any]) -> list[dict] | None:
    """Each row's example ids (`example_ids`) and 0-based rows (`lines`), by LEGACY.md's rules in order: the JSONL's
    `sample_ids`; else the data set's id of that row, when it loads; else `<dataset>/train/<row>`. Returns the data
    set's examples (None when it did not load); `report["example_ids"]` says which rule served how many steps."""
    from loratrace.data import load_split

    cfg = legacy.cfg
    examples, load_error = None, None
    try:
        examples = load_split(cfg.data.dataset, cfg.data.source, cfg.data.train_split, notice=lambda line: None)
    except Exception as exc:  # noqa: BLE001 - a data set that does not load only means positional ids
        load_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    rules = {"sample_ids": 0, "data set row": 0, "positional": 0}
    lines_differ = 0
    for row in legacy.rows:
        rows = [int(i) for i in row["sample_indices"]]
        if row.get("line_numbers") is not None and [n - 1 for n in row["line_numbers"]] != rows:
            lines_differ += 1
        row["lines"] = rows
        if row.get("sample_ids") is not None and len(row["sample_ids"]) == len(rows):
            row["example_ids"] = [str(i) for i in row["sample_ids"]]
            rules["sample_ids"] += 1
        elif examples is not None and all(0 <= r < len(examples) for r in rows):
            row["example_ids"] = [examples[r].example_id for r in rows]
            rules["data set row"] += 1
        else:
            row["example_ids"] = [f"{cfg.data.dataset}/{cfg.data.train_split}/{r}" for r in rows]
            rules["positional"] += 1
    report["example_ids"] = {"rule_per_steps": {k: v for k, v in rules.items() if v},
                             "data_set": f"{cfg.data.dataset} ({cfg.data.source}, {cfg.data.train_split})",
                             **({"data_set_not_loaded": load_error} if load_error else {})}
    if lines_differ:
        legacy.quirks["line_numbers_disagree"] = {"steps": lines_differ, "kept": "sample_indices"}
    return examples


# ---------------------------------------------------------------------------------------------- tracking parts

def _timestamp(value: Any) -> dt.datetime | None:
    """`timestamp` (ISO text; without an offset it is read as UTC) or `time` (epoch seconds); None if neither."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def batches_rows(legacy: LegacyRun, run_id: str) -> list[dict]:
    stage1 = legacy.cfg.training.stage1_steps
    return [{
        "run_id": run_id, "attempt": 0, "step": int(row["step"]), "micro_batch": 0, "rank": 0,
        "epoch": None if row.get("epoch") is None else int(row["epoch"]),
        "batch_idx": None if row.get("batch_idx") is None else int(row["batch_idx"]),
        "stage": stage_of(int(row["step"]), stage1), "example_ids": row["example_ids"], "lines": row["lines"],
        "losses": None, "p_gold": None, "correct": None, "loss": _float(row.get("loss")),
        "grad_norm": _float(row.get("grad_norm")), "lr": _float(row.get("learning_rate")), "n_tokens": None,
        "n_target_tokens": None, "wall_time": _timestamp(row.get("timestamp")),
    } for row in legacy.rows]


def examples_rows(legacy: LegacyRun, run_id: str, examples) -> list[dict]:
    """The data set's examples when it loaded (prompts, gold; token counts are not known here: null), else one row
    per example the JSONL names, with what it says (id, row)."""
    cfg = legacy.cfg
    base = {"run_id": run_id, "split": cfg.data.train_split, "dataset": cfg.data.dataset}
    if examples is not None:
        return [{**base, "example_id": e.example_id, "line": e.line, "gold": e.gold_label, "n_choices": len(e.choices),
                 "n_target_tokens": None, "prompt_sha256": e.prompt_sha256, "prompt": e.prompt} for e in examples]
    seen: dict[tuple[str, int], None] = {}
    for row in legacy.rows:
        seen.update(dict.fromkeys(zip(row["example_ids"], row["lines"])))
    return [{**base, "example_id": i, "line": line, "gold": None, "n_choices": None, "n_target_tokens": None,
             "prompt_sha256": None, "prompt": None} for i, line in sorted(seen, key=lambda key: key[1])]


def write_tracking(tracking: Path, run_id: str, legacy: LegacyRun, examples, checkpoint_rows: list[dict]) -> None:
    rows = batches_rows(legacy, run_id)
    for part, start in enumerate(range(0, len(rows), PART_ROWS)):
        schema.write_atomic(pa.Table.from_pylist(rows[start: start + PART_ROWS], schema=schema.BATCHES),
                            tracking / "batches" / schema.batches_part_name(0, 0, part))
    schema.write_atomic(pa.Table.from_pylist(examples_rows(legacy, run_id, examples), schema=schema.EXAMPLES),
                        tracking / schema.EXAMPLES_FILE)
    started = next((r["wall_time"] for r in rows if r["wall_time"] is not None), None)
    attempt = {"run_id": run_id, "attempt": 0, "parent_attempt": None, "started_at": started, "resumed_from": None,
               "resumed_step": 0, "world_size": 1, "host": None}
    schema.write_atomic(pa.Table.from_pylist([attempt], schema=schema.ATTEMPTS),
                        tracking / "attempts" / schema.attempts_part_name(0))
    for row in checkpoint_rows:
        schema.write_atomic(pa.Table.from_pylist([row], schema=schema.CHECKPOINTS),
                            tracking / "checkpoints" / schema.checkpoints_part_name(0, row["step"]))


# ---------------------------------------------------------------------------------------------- checkpoints

def loader_position(rows: list[dict], step: int, n_examples: int | None, batch_size: int) -> LoaderPosition:
    """Where the legacy data order stands after `step`: the rest of that step's epoch is the JSONL's later batches
    of the same epoch, then the epoch's rows not trained at all (per the JSONL), in row order, in batches."""
    at = next((r for r in rows if int(r["step"]) == step), None)
    if at is None or at.get("epoch") is None or at.get("batch_idx") is None:
        return LoaderPosition()
    epoch = int(at["epoch"])
    in_epoch = [r for r in rows if r.get("epoch") is not None and int(r["epoch"]) == epoch]
    later = [list(r["lines"]) for r in in_epoch if int(r["step"]) > step]
    if n_examples is not None:
        trained = {line for r in in_epoch for line in r["lines"]}
        rest = [line for line in range(n_examples) if line not in trained]
        later += [rest[i: i + batch_size] for i in range(0, len(rest), batch_size)]
    return LoaderPosition(epoch=epoch, batch_in_epoch=int(at["batch_idx"]), batches=later)


def convert_checkpoints(legacy: LegacyRun, run_dir: Path, run_id: str, examples, report: dict[str, Any]) -> list[dict]:
    """Each `checkpoints/checkpoint-N/` as `checkpoints/checkpoint-step-NNN.ckpt`; a checkpoint the legacy mapping
    names but that is gone keeps its row (bytes null), like a file a `ModelCheckpoint` deleted."""
    folders = {int(p.name.split("-")[1]): p for p in (legacy.source / "checkpoints").glob("checkpoint-*")
               if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()}
    named = legacy_mappings.checkpoint_steps_named(legacy.source, legacy.dataset)
    shapes = trainable_shapes(legacy.cfg) if folders else {}
    rows, converted, not_converted = [], [], {}
    for step in sorted(set(folders) | named):
        name = checkpoint_name(step)
        row = {"run_id": run_id, "attempt": 0, "step": step, "path": f"checkpoints/{name}", "bytes": None,
               "created_at": None}
        folder = folders.get(step)
        if folder is None:
            not_converted[f"checkpoint-{step}"] = "named in the checkpoint mapping, folder deleted"
        elif not is_trainer_checkpoint(folder):
            not_converted[f"checkpoint-{step}"] = "no adapter weights in the folder"
        else:
            position = loader_position(legacy.rows, step, len(examples) if examples else None,
                                       legacy.cfg.training.batch_size)
            try:
                state = convert_trainer_checkpoint(folder, legacy.cfg, shapes, position, tracked_run_id=run_id)
            except StateNotCarried as exc:
                not_converted[f"checkpoint-{step}"] = str(exc)
                rows.append(row)
                continue
            row["bytes"] = write_checkpoint(state, run_dir / "checkpoints" / name)
            row["created_at"] = dt.datetime.fromtimestamp(folder.stat().st_mtime, dt.timezone.utc)
            converted.append(name)
        rows.append(row)
    report["checkpoints"] = {"converted": converted, **({"not_converted": not_converted} if not_converted else {})}
    return rows


# ---------------------------------------------------------------------------------------------- the import

def already_imported(runs_dir: Path, source: Path) -> Path | None:
    for info_path in sorted(Path(runs_dir).glob("*/run.json")):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("imported") and info.get("imported_from") == str(source):
            return info_path.parent
    return None


def run_name(legacy: LegacyRun) -> str:
    """`<dataset>_<method>_<YYYYMMDD_HHMMSS>` from the legacy folder's own name and timestamp."""
    match = FOLDER_NAME.fullmatch(legacy.source.name)
    stamp = match["stamp"] if match else re.sub(r"[^A-Za-z0-9_-]", "_", legacy.source.name)
    return f"{legacy.cfg.data.dataset}_{legacy.cfg.method}_{stamp}"


def import_legacy(source: str | Path, runs_dir: str | Path = "runs", force: bool = False) -> dict[str, Any]:
    """Convert one legacy run folder; returns its report (`run_dir`, `existing` when it was imported before)."""
    source = Path(source).resolve()
    runs_dir = Path(runs_dir)
    existing = already_imported(runs_dir, source)
    if existing is not None and not force:
        return {"source": str(source), "run_dir": str(existing), "existing": True}
    legacy = read_legacy_run(source)
    legacy.cfg.runs_dir = str(runs_dir)  # its config.yaml resumes into the folder it was imported to
    final = _free_name(runs_dir / run_name(legacy))
    # Built one level down (`runs/.importing/<token>/<name>`), where listing the runs folder does not find it.
    scratch = runs_dir / ".importing" / uuid.uuid4().hex[:12]
    building = scratch / final.name
    building.mkdir(parents=True)
    try:
        report = _build(legacy, building, final.name)
        if final.exists():
            raise LegacyError(f"{final} appeared while importing; import again")
        building.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()  # only when no other import is under way
    report["run_dir"] = str(final)
    return report


def _free_name(wanted: Path) -> Path:
    """The first free name (`_2`, `_3`, ... as `new_run_dir` does)."""
    candidate, n = wanted, 1
    while candidate.exists():
        n += 1
        candidate = wanted.with_name(f"{wanted.name}_{n}")
    return candidate


def _build(legacy: LegacyRun, run_dir: Path, run_id: str) -> dict[str, Any]:
    """Everything of the run folder, written into `run_dir` (the temporary name); the run id is the final name."""
    cfg = legacy.cfg
    report: dict[str, Any] = {"source": str(legacy.source), "run_id": run_id, "steps": len(legacy.rows)}
    examples = resolve_ids(legacy, report)
    checkpoint_rows = convert_checkpoints(legacy, run_dir, run_id, examples, report)
    tracking = run_dir / "tracking"
    write_tracking(tracking, run_id, legacy, examples, checkpoint_rows)
    report["mappings"] = legacy_mappings.recompute_and_compare(tracking, run_id, legacy.source, legacy.dataset)
    from loratrace.samples_index import write_samples_index  # `trace`'s index, as the end of a run writes it

    write_samples_index(run_dir)
    models = legacy.source / "models"
    if is_trainer_checkpoint(models):
        shutil.copytree(models, run_dir / "final_adapter")
        report["final_adapter"] = "copied from models/"
    else:
        legacy.quirks["no_final_adapter"] = "models/ holds no adapter: no final_adapter/"
    report["quirks"] = legacy.quirks
    save_config(cfg, run_dir / "config.yaml")
    created = FOLDER_NAME.fullmatch(legacy.source.name)
    info = {"run_id": run_id, "dataset": cfg.data.dataset, "method": cfg.method,
            "created_at": (dt.datetime.strptime(created["stamp"], "%Y%m%d_%H%M%S").isoformat() if created else None),
            "status": "completed" if "no_final_adapter" not in legacy.quirks else "interrupted",
            "imported": True, "imported_from": str(legacy.source), "imported_at": runs.utc_now().isoformat(),
            "versions": runs.versions(), "base_model": cfg.model.name, "steps": max(r["step"] for r in legacy.rows),
            "checkpoints": len(report["checkpoints"]["converted"]),
            "attempts": [{"started_at": None, "resumed_from": None, "status": "imported"}]}
    runs.write_run_json(run_dir, info)
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def summary(report: dict[str, Any]) -> str:
    """One screen: where the run went, what was converted, what was missing, what disagreed."""
    if report.get("existing"):
        return f"{report['source']}: already imported as {report['run_dir']} (nothing written; --force for a copy)"
    lines = [f"{report['source']}", f"  -> {report['run_dir']}   {report['steps']} steps"]
    rules = ", ".join(f"{k}: {v} steps" for k, v in report["example_ids"]["rule_per_steps"].items())
    lines.append(f"  example ids   {rules}")
    checkpoints = report["checkpoints"]
    lines.append(f"  checkpoints   {len(checkpoints['converted'])} converted")
    for name, why in checkpoints.get("not_converted", {}).items():
        lines.append(f"                {name}: {why}")
    mappings = report["mappings"]
    lines.append(f"  mappings      {mappings['summary']}")
    for name, value in report["quirks"].items():
        text = json.dumps(value, default=str)
        lines.append(f"  quirk         {name}: {text[:90]}{'...' if len(text) > 90 else ''}")
    return "\n".join(lines)

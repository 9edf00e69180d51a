"""`loratrace import-legacy`: the "traditional" script's experiment folders (JSONL batch tracking, JSON mappings,
Hugging Face Trainer checkpoints) as normal loratrace run folders (docs/LEGACY.md).

    report = import_legacy("experiments/icoding/arc-challenge/icoding_20250720_143052_lora", runs_dir="runs")
    for folder in find_legacy_runs(["experiments/icoding"]): ...

The source is only read (legacy_source.py). Each run is built under `runs/.importing/<token>/` and renamed into the
runs folder when complete, so a failed import leaves nothing. What the legacy files do not hold is null, never
guessed; every quirk met (missing fields, key aliases, a cut-short last line, a deleted checkpoint, mappings that
disagree) is listed in the run's `import_report.json`. Importing a folder already imported reports that run and
writes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loratrace.config import save_config
from loratrace.legacy import mappings
from loratrace.legacy.checkpoint import (
    LegacyError,
    LoaderPosition,
    StateNotCarried,
    convert_trainer_checkpoint,
    is_trainer_checkpoint,
    trainable_shapes,
    write_checkpoint,
)
from loratrace.legacy.source import (  # noqa: F401 - find_legacy_runs: the command's other half, from here
    FOLDER_NAME,
    LegacyRun,
    find_legacy_runs,
    read_legacy_run,
    resolve_ids,
)
from loratrace.query.index import index_rows, write_samples_index
from loratrace.runs import folder as run_folder
from loratrace.runs import processes, storage
from loratrace.track import schema
from loratrace.training.checkpoints import checkpoint_name

PART_ROWS = 50_000  # batches rows per Parquet part
REPORT_FILE = "import_report.json"


# ---------------------------------------------------------------------------------------------- tracking parts

def batches_table(legacy: LegacyRun, run_id: str) -> pa.Table:
    """The batches rows of the JSONL's steps (after `resolve_ids`): what the legacy script did not log is null."""
    table, stage1 = legacy.table, legacy.cfg.training.stage1_steps
    n = table.num_rows
    steps = table["step"].combine_chunks()

    def constant(value, kind: pa.DataType) -> pa.Array:
        return pa.array([value], kind).take(np.zeros(n, np.int64))

    # track.step_outputs.stage_of: 1 up to stage1, then 2; always 1 without stages
    stage = np.ones(n, np.int8) if stage1 is None else np.where(steps.to_numpy() <= stage1, 1, 2)
    columns = {"run_id": constant(run_id, pa.string()), "attempt": constant(0, pa.int32()), "step": steps,
               "micro_batch": constant(0, pa.int32()), "rank": constant(0, pa.int32()),
               "epoch": table["epoch"], "batch_idx": table["batch_idx"], "stage": pa.array(stage, pa.int8()),
               "example_ids": table["example_ids"], "lines": table["lines"], "loss": table["loss"],
               "grad_norm": table["grad_norm"], "lr": table["learning_rate"], "wall_time": table["timestamp"]}
    return pa.Table.from_arrays([columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                                 for f in schema.BATCHES], schema=schema.BATCHES)


def examples_rows(legacy: LegacyRun, run_id: str, examples) -> list[dict]:
    """The data set's examples when it loaded (prompts, gold; token counts are not known here: null), else one row
    per example the JSONL names, with what it says (id, row)."""
    cfg = legacy.cfg
    base = {"run_id": run_id, "split": cfg.data.train_split, "dataset": cfg.data.dataset}
    if examples is not None:
        return [{**base, "example_id": e.example_id, "line": e.line, "gold": e.gold_label, "n_choices": len(e.choices),
                 "n_target_tokens": None, "prompt_sha256": e.prompt_sha256, "prompt": e.prompt} for e in examples]
    pairs = pa.table({"example_id": pc.list_flatten(legacy.table["example_ids"]),
                      "line": pc.list_flatten(legacy.table["lines"])}).drop_null()  # a null line: no example
    ids = pc.dictionary_encode(pairs["example_id"].combine_chunks())
    keys = np.stack([pairs["line"].to_numpy(), ids.indices.to_numpy()], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    first = np.sort(first)  # each (id, line) where the JSONL first names it; then by line, ties in that order
    first = first[np.argsort(keys[first, 0], kind="stable")]
    return [{**base, "example_id": i, "line": line, "gold": None, "n_choices": None, "n_target_tokens": None,
             "prompt_sha256": None, "prompt": None}
            for i, line in zip(pairs["example_id"].take(first).to_pylist(), pairs["line"].take(first).to_pylist())]


def write_tracking(tracking: Path, run_id: str, legacy: LegacyRun, examples,
                   checkpoint_rows: list[dict]) -> tuple[pa.Table, list[str]]:
    """Every tracking part of the run; returns the batches rows and the names of their parts."""
    batches = batches_table(legacy, run_id)
    names = [schema.batches_part_name(0, 0, part) for part in range(-(-batches.num_rows // PART_ROWS))]
    for name, start in zip(names, range(0, batches.num_rows, PART_ROWS)):
        schema.write_atomic(batches.slice(start, PART_ROWS), tracking / "batches" / name)
    schema.write_atomic(pa.Table.from_pylist(examples_rows(legacy, run_id, examples), schema=schema.EXAMPLES),
                        tracking / schema.EXAMPLES_FILE)
    started = pc.drop_null(batches["wall_time"])[0].as_py() if batches["wall_time"].null_count < len(batches) else None
    attempt = {"run_id": run_id, "attempt": 0, "parent_attempt": None, "started_at": started, "resumed_from": None,
               "resumed_step": 0, "world_size": 1, "host": None}
    schema.write_atomic(pa.Table.from_pylist([attempt], schema=schema.ATTEMPTS),
                        tracking / "attempts" / schema.attempts_part_name(0))
    for row in checkpoint_rows:
        schema.write_atomic(pa.Table.from_pylist([row], schema=schema.CHECKPOINTS),
                            tracking / "checkpoints" / schema.checkpoints_part_name(0, row["step"]))
    return batches, names


# ---------------------------------------------------------------------------------------------- checkpoints

def loader_position(rows: list[dict], step: int, n_examples: int | None, batch_size: int) -> LoaderPosition:
    """Where the legacy data order stands after `step`: the rest of that step's epoch is the JSONL's later batches
    of the same epoch, then the epoch's rows not trained at all (per the JSONL), in row order, in batches."""
    at = next((r for r in rows if int(r["step"]) == step), None)
    if at is None or at.get("epoch") is None or at.get("batch_idx") is None:
        return LoaderPosition()
    epoch = int(at["epoch"])
    in_epoch = [r for r in rows if r.get("epoch") is not None and int(r["epoch"]) == epoch]
    later = [known for r in in_epoch if int(r["step"]) > step
             if (known := [line for line in r["lines"] if line is not None])]  # a null line: no row to train
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
    named = legacy.mappings.checkpoint_steps()
    shapes = trainable_shapes(legacy.cfg) if folders else {}
    # the steps as loader_position reads them, only when there is a checkpoint to convert: a long run has many
    jsonl_rows = legacy.table.select(["step", "epoch", "batch_idx", "lines"]).to_pylist() if folders else []
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
            position = loader_position(jsonl_rows, step, len(examples) if examples else None,
                                       legacy.cfg.training.batch_size)
            try:
                state = convert_trainer_checkpoint(folder, legacy.cfg, shapes, position, tracked_run_id=run_id)
            except StateNotCarried as exc:
                not_converted[f"checkpoint-{step}"] = str(exc)
                rows.append(row)
                continue
            if "rng_states" not in state:  # a multi-process run's rng_state_<rank>.pth, or none at all
                report.setdefault("checkpoints_without_rng", []).append(f"checkpoint-{step}")
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
        if isinstance(info, dict) and info.get("imported") and info.get("imported_from") == str(source):
            return info_path.parent
    return None


LOCAL_RUNS_ONLY = ("import-legacy writes to a folder on this machine: import, then copy the run folders there "
                   "(e.g. aws s3 sync runs/ URL)")
STAGING = ".importing"  # runs/.importing/<token>/<name>: a run being built, where listing the runs folder does not look
OWNER_FILE = "owner.json"  # in runs/.importing/<token>/: the pid and host of the import building there


def runs_folder(runs_dir: str | Path) -> Path:
    """--runs-dir as a local folder (it need not exist yet); a file there, or a URL, is one line."""
    path = storage.local_folder(runs_dir, LOCAL_RUNS_ONLY)
    if path.exists() and not path.is_dir():
        raise LegacyError(f"--runs-dir {runs_dir} is a file, not a folder: give the folder the runs go to")
    return path


def run_name(legacy: LegacyRun) -> str:
    """`<dataset>_<method>_<YYYYMMDD_HHMMSS>` from the legacy folder's own name and timestamp."""
    match = FOLDER_NAME.fullmatch(legacy.source.name)
    stamp = match["stamp"] if match else re.sub(r"[^A-Za-z0-9_-]", "_", legacy.source.name)
    return f"{legacy.cfg.data.dataset}_{legacy.cfg.method}_{stamp}"


def import_legacy(source: str | Path, runs_dir: str | Path = "runs", force: bool = False) -> dict[str, Any]:
    """Convert one legacy run folder; returns its report (`run_dir`, `existing` when it was imported before).
    Staging folders of earlier imports that were killed on this host are removed first (`abandoned_removed`)."""
    source = Path(storage.local_form(source)).resolve()
    runs_dir = runs_folder(runs_dir)
    existing = already_imported(runs_dir, source)
    legacy = read_legacy_run(source) if existing is None or force else None  # a bad source fails before any change
    abandoned = remove_abandoned_imports(runs_dir)
    removed = {"abandoned_removed": [str(path) for path in abandoned]} if abandoned else {}
    if legacy is None:
        return {"source": str(source), "run_dir": str(existing), "existing": True, **removed}
    legacy.cfg.runs_dir = str(runs_dir)  # its config.yaml resumes into the folder it was imported to
    final = _free_name(runs_dir / run_name(legacy))
    created = _first_missing(runs_dir)
    scratch = _stage(runs_dir)
    building, done = scratch / final.name, False
    try:
        building.mkdir()
        report = _build(legacy, building, final.name)
        if final.exists():
            raise LegacyError(f"{final} appeared while importing; import again")
        building.rename(final)
        done = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()  # only when no other import is under way
        if not done:
            _remove_empty(runs_dir, created)  # a failed import leaves no runs folder it made
    return {**report, "run_dir": str(final), **removed}


def _stage(runs_dir: Path) -> Path:
    """A new `runs/.importing/<token>/` holding owner.json (processes.this_process: host, pid, start time): a later
    import removes the folder only once that process is gone, so a killed import's leftovers go and a running
    import's stay."""
    scratch = runs_dir / STAGING / uuid.uuid4().hex[:12]
    try:
        scratch.mkdir(parents=True)
        (scratch / OWNER_FILE).write_text(json.dumps(processes.this_process()) + "\n")
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise LegacyError(f"{runs_dir}: cannot write the run there ({exc.strerror}); give --runs-dir a folder you "
                          "can write") from None
    return scratch


def remove_abandoned_imports(runs_dir: Path) -> list[Path]:
    """Remove the staging folders whose owner.json names a process of this host that is no longer running (an
    import that was killed). A folder of a live process, of another host, or without owner.json is never touched:
    nothing proves it abandoned."""
    staging = runs_dir / STAGING
    if not staging.is_dir():
        return []
    removed = []
    for scratch in sorted(staging.iterdir()):
        try:
            owner = json.loads((scratch / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and processes.on_this_host(owner) and not processes.alive(owner):
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    with contextlib.suppress(OSError):
        staging.rmdir()
    return removed


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None: it exists)."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _remove_empty(runs_dir: Path, created: Path | None) -> None:
    """The folders from `runs_dir` up to `created` (those this import made), when empty."""
    if created is None:
        return
    for folder in [runs_dir, *runs_dir.parents]:
        with contextlib.suppress(OSError):
            folder.rmdir()
        if folder == created:
            return


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
    report: dict[str, Any] = {"source": str(legacy.source), "run_id": run_id, "steps": legacy.table.num_rows}
    examples = resolve_ids(legacy, report)
    checkpoint_rows = convert_checkpoints(legacy, run_dir, run_id, examples, report)
    tracking = run_dir / "tracking"
    batches, parts = write_tracking(tracking, run_id, legacy, examples, checkpoint_rows)
    report["mappings"], step_map = mappings.recompute_and_compare(tracking, run_id, legacy.mappings, parts, batches)
    # the rows are in memory: the index is computed from them, not from the parts by DuckDB (the same rows)
    write_samples_index(run_dir, index_rows(batches, step_map))
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
            "imported": True, "imported_from": str(legacy.source), "imported_at": run_folder.utc_now().isoformat(),
            "versions": run_folder.versions(), "base_model": cfg.model.name,
            "steps": pc.max(legacy.table["step"]).as_py(),
            "checkpoints": len(report["checkpoints"]["converted"]),
            "attempts": [{"started_at": None, "resumed_from": None, "status": "imported"}]}
    run_folder.write_run_json(run_dir, info)
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _abandoned_lines(report: dict[str, Any]) -> list[str]:
    return [f"  removed       {path} (left by an import that was killed)"
            for path in report.get("abandoned_removed", [])]


def summary(report: dict[str, Any]) -> str:
    """One screen: where the run went, what was converted, what was missing, what disagreed."""
    if report.get("existing"):
        return "\n".join([f"{report['source']}: already imported as {report['run_dir']} (nothing written; --force "
                          "for a copy)", *_abandoned_lines(report)])
    lines = [f"{report['source']}", f"  -> {report['run_dir']}   {report['steps']} steps"]
    lines += _abandoned_lines(report)
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

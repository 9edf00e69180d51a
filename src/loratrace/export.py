"""A run's LoRA weights as PEFT adapters: final_adapter/ and final_model/ at the end of training, and `export`, every
checkpoint (or a chosen few) as an adapter folder with a manifest, for attribution and parameter-generation work.

    PeftModel.from_pretrained(base, "runs/x/final_adapter")       # base: the hub model, or runs/x/base_model
    AutoModelForCausalLM.from_pretrained("runs/x/final_model")
    loratrace export runs/x --adapters out/adapters --checkpoints 76..125 --flat
    export_adapters("runs/x", "out/adapters", steps="76..125", flat=True)      # the same -> the manifest DataFrame
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from loratrace.config import load_config
from loratrace.errors import LoratraceError
from loratrace.query.formats import check_output
from loratrace.query.store import open_runs
from loratrace.runs import storage
from loratrace.runs.find import read_run_folder
from loratrace.track.schema import write_atomic
from loratrace.track.step_outputs import stage_of
from loratrace.training.checkpoints import check_run_checkpoints, select_checkpoints
from loratrace.training.model import load_lora_weights, load_run_model

MANIFEST_FILE = "manifest.parquet"
FLAT_DIR = "flat"
FLAT_LAYOUT = "layout.json"
FLAT_KEY = "lora"  # the one tensor of a flat file
FLAT_ORDER = "PEFT parameter names (the keys of adapter_model.safetensors) in plain string order; each tensor row-major"
MANIFEST = pa.schema([  # a row per exported checkpoint; example_ids, lines, lr NULL where nothing recorded them
    ("run_id", pa.string()), ("step", pa.int64()), ("folder", pa.string()), ("flat", pa.string()),
    ("checkpoint_file", pa.string()), ("stage", pa.int8()), ("lr", pa.float64()),
    ("example_ids", pa.list_(pa.string())), ("lines", pa.list_(pa.int64())),
])


class ExportError(LoratraceError):
    """A run or output folder that `export` cannot use (a checkpoint selection naming none: CheckpointError)."""


def save_base_model(model, tokenizer, directory: Path) -> None:
    """The tiny preset has no hub home: its base is saved in the run so the adapter can be applied to it."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def export_adapter(peft_model, tokenizer, directory: Path, base_path: Path | None = None) -> None:
    """`base_path`: where the base model lives when it has no hub id (the tiny preset's `base_model/`), recorded as
    `base_model_name_or_path` so `AutoPeftModelForCausalLM.from_pretrained(directory)` finds it."""
    if base_path is not None:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = str(Path(base_path).resolve())
    peft_model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def export_merged(peft_model, tokenizer, directory: Path) -> None:
    """Merge in place (the run is over; a copy would double memory for large models) and save."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


# ------------------------------------------------------------------------------------------ every checkpoint

def export_adapters(run_dir: str | Path, out: str | Path, steps: str | None = None, flat: bool = False,
                    overwrite: bool = False, progress: bool = True):
    """Write each chosen checkpoint of `run_dir` as a PEFT adapter folder under `out`, with `manifest.parquet` (and
    with `flat`, one float32 vector per checkpoint under `flat/`); returns the manifest as a DataFrame.

    `steps`: None for every checkpoint, or a selection in the syntax of eval and influence (training/selection.py):
    "last", "76,100" (each must exist), "76..125" (the checkpoints in that range), or a mix. Everything is checked
    before anything is written; the folder appears complete or not at all."""
    run_dir = storage.local_folder(run_dir, "export reads a run folder on this machine: copy the run here first "
                                            "(e.g. aws s3 sync URL runs/NAME), then export that folder")
    out = storage.local_folder(out, "export writes adapters to a folder on this machine: export there, then copy it to "
                                    "object storage (e.g. aws s3 sync OUT URL)")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run folder (no config.yaml)")
    check_output(out, [run_dir], "--adapters", folder=True)  # never into, over or around the run it reads
    check_output_folder(out, overwrite)
    info, _ = read_run_folder(run_dir)  # a damaged run.json, config.yaml or tracking/ is one line, before any work
    chosen = select_checkpoints(run_dir, "all" if steps is None else steps, "export")
    check_run_checkpoints(run_dir, info.get("run_id"), chosen)  # readable and this run's, before the bar starts

    from peft.utils import get_peft_model_state_dict
    from tqdm.auto import tqdm

    cfg = load_config(run_dir / "config.yaml")
    recorded = recorded_steps(run_dir, [step for step, _ in chosen])
    base = str((run_dir / "base_model").resolve()) if cfg.model.name == "tiny" else cfg.model.name
    rows, layout = [], None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*is deprecated.*")  # PEFT's own call
        peft_model, _ = load_run_model(cfg, run_dir)
        peft_model.eval()
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base  # what AutoPeftModelForCausalLM.from_pretrained(folder) loads
        with staged_folder(out) as staging:
            for step, path in tqdm(chosen, desc="export", disable=not progress):
                load_lora_weights(peft_model, path)
                folder = path.name.removesuffix(".ckpt")
                peft_model.save_pretrained(staging / folder, safe_serialization=True)
                flat_file = None
                if flat:
                    tensors = get_peft_model_state_dict(peft_model)
                    layout = layout or flat_layout(tensors)
                    flat_file = f"{FLAT_DIR}/{folder}.safetensors"
                    write_flat(tensors, layout, staging / flat_file, step)
                rows.append(manifest_row(run_dir, cfg, step, path, folder, flat_file, recorded.get(step)))
            if layout is not None:
                (staging / FLAT_DIR / FLAT_LAYOUT).write_text(json.dumps(layout, indent=1) + "\n")
            table = write_manifest(rows, staging / MANIFEST_FILE, base)
    return table.to_pandas()


def check_output_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose a new folder, or pass --overwrite to replace it")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` to write into, renamed to `out` when the block ends without error (replacing what
    was there); on any error or interrupt it is removed, and so are parent folders made for it."""
    out = out.resolve()  # `.` or `..` has no name to put a sibling beside
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    tag = uuid.uuid4().hex[:8]
    staging, old = out.parent / f".{out.name}.partial-{tag}", out.parent / f".{out.name}.replaced-{tag}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:  # a file in the way, no permission, a full disk: what was made goes again
        _remove_empty(made)
        raise ExportError(f"{out}: cannot make its folder ({exc.strerror or exc})") from None
    try:
        yield staging
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, old)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, out)  # rename(2) replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        raise


def _remove_empty(made: list[Path]) -> None:
    for folder in made:  # innermost first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def recorded_steps(run_dir: Path, steps: list[int]) -> dict[int, dict]:
    """What the tracker recorded for each step (stage, lr, the batch's example ids and lines across micro-batches and
    ranks, in that order), from the `batches` view; empty for an untracked run."""
    if not (run_dir / "tracking" / "batches").is_dir():
        return {}
    sql = """SELECT step, any_value(stage) AS stage, max(lr) AS lr,
                    flatten(list(example_ids ORDER BY micro_batch, rank)) AS example_ids,
                    flatten(list(lines ORDER BY micro_batch, rank)) AS lines
             FROM batches WHERE list_contains(?::BIGINT[], step) GROUP BY step"""
    with open_runs(run_dir, read_only=True) as db:
        rows = db.fetch_table(sql, params=[steps]).to_pylist()
    return {row.pop("step"): row for row in rows}


def manifest_row(run_dir: Path, cfg, step: int, path: Path, folder: str, flat_file: str | None,
                 recorded: dict | None) -> dict:
    """Untracked steps: example ids, lines and lr NULL (nothing recorded them); the stage by the recipe's rule."""
    recorded = recorded or {"stage": stage_of(step, cfg.training.stage1_steps), "lr": None, "example_ids": None,
                            "lines": None}
    return {"run_id": run_dir.resolve().name, "step": step, "folder": folder, "flat": flat_file,
            "checkpoint_file": str(path.resolve()), **recorded}


def write_manifest(rows: list[dict], path: Path, base: str) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=MANIFEST).replace_schema_metadata({b"loratrace.base_model": base})
    write_atomic(table, path)
    return table


# --------------------------------------------------------------------------------------------- flat vectors

def flat_layout(tensors: dict) -> dict:
    """Where each LoRA tensor sits in the flat vector: sorted by PEFT name, each flattened row-major."""
    parameters, offset = [], 0
    for name in sorted(tensors):
        numel = tensors[name].numel()
        parameters.append({"name": name, "shape": list(tensors[name].shape), "offset": offset, "numel": numel})
        offset += numel
    return {"dtype": "float32", "key": FLAT_KEY, "order": FLAT_ORDER, "numel": offset, "parameters": parameters}


def write_flat(tensors: dict, layout: dict, path: Path, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    if sorted(tensors) != [p["name"] for p in layout["parameters"]]:
        raise ExportError(f"checkpoint step {step}: its LoRA tensors differ from the first checkpoint's")
    vector = torch.cat([tensors[p["name"]].detach().reshape(-1).float().cpu() for p in layout["parameters"]])
    path.parent.mkdir(exist_ok=True)
    save_file({FLAT_KEY: vector}, path, metadata={"step": str(step), "layout": FLAT_LAYOUT})


def read_flat(path: str | Path) -> dict:
    """A flat file back as {PEFT name: tensor}, by the `layout.json` beside it (what adapter_model.safetensors holds,
    in float32)."""
    from safetensors.torch import load_file

    path = Path(path)
    layout = json.loads((path.parent / FLAT_LAYOUT).read_text())
    vector = load_file(path)[layout["key"]]
    return {p["name"]: vector[p["offset"]: p["offset"] + p["numel"]].reshape(p["shape"]) for p in layout["parameters"]}

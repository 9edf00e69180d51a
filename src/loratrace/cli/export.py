"""`loratrace export` (checkpoints as PEFT adapters) and `import-legacy` (the old script's folders as run folders)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from loratrace.cli.common import warning_line
from loratrace.errors import LoratraceError
from loratrace.query.formats import check_apart
from loratrace.runs import storage
from loratrace.training.selection import CHECKPOINT_SELECTION, FINAL_IS_EVAL_ONLY


def add_export(sub) -> None:
    export = sub.add_parser("export", help="every checkpoint as a PEFT adapter folder, with a manifest",
                            description="Write each checkpoint of a run as a PEFT adapter folder (adapter_config.json, "
                                        "adapter_model.safetensors) under OUT, with OUT/manifest.parquet: step, "
                                        "folder, stage, lr, the step's example ids and lines (NULL for an untracked "
                                        "run). OUT appears complete or not at all.")
    export.add_argument("run", help="the run folder")
    export.add_argument("--adapters", required=True, metavar="OUT", help="the folder to write (new, or empty)")
    export.add_argument("--checkpoints", "--steps", dest="checkpoints", metavar="SELECTION",
                        help=f"which checkpoints: {CHECKPOINT_SELECTION} (default: all; {FINAL_IS_EVAL_ONLY}); "
                             "--steps is the older name of this option")
    export.add_argument("--flat", action="store_true",
                        help="also write each checkpoint's LoRA tensors as one float32 vector, OUT/flat/<checkpoint>"
                             ".safetensors, in the order and shapes of OUT/flat/layout.json (sorted by PEFT name)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")


def add_import_legacy(sub) -> None:
    imports = sub.add_parser("import-legacy", help="convert traditional-script experiment folders into run folders",
                             description="Convert legacy run folders (logs/batch_tracking_<dataset>.jsonl, JSON "
                                         "mappings, Trainer checkpoints) into run folders; the source is only read.")
    imports.add_argument("paths", nargs="+", metavar="PATH", help="a legacy run folder, or a folder of them")
    imports.add_argument("--runs-dir", default="runs", help="where the run folders go (default: runs)")
    imports.add_argument("--force", action="store_true", help="import again a folder imported before (a second copy)")


def cmd_export(args: argparse.Namespace) -> int:
    # here, not at the top: query, trace and runs load this module, without torch
    from loratrace.export import MANIFEST_FILE, export_adapters

    warnings.showwarning = warning_line
    out = storage.local_form(args.adapters)
    manifest = export_adapters(args.run, out, steps=args.checkpoints, flat=args.flat, overwrite=args.overwrite)
    steps = list(manifest.step)
    print(f"exported {len(steps)} adapter(s), steps {steps[0]}..{steps[-1]}, to {out}  "
          f"manifest {Path(out) / MANIFEST_FILE}" + (f"  flat vectors {Path(out) / 'flat'}/" if args.flat else ""))
    return 0


def cmd_import_legacy(args: argparse.Namespace) -> int:
    # here, not at the top: query, trace and runs load this module, without torch
    from loratrace.legacy import importer

    importer.runs_folder(args.runs_dir)  # before the sources are looked at
    check_apart(args.runs_dir, args.paths, "--runs-dir")  # run folders written into a source would change it
    folders = importer.find_legacy_runs(args.paths)
    for folder in folders:  # every source's files checked before the first import writes anything
        importer.read_legacy_run(folder)
    imported: list[str] = []
    for folder in folders:
        try:
            report = importer.import_legacy(folder, args.runs_dir, force=args.force)
        except LoratraceError:  # that one left nothing; say which ones stay imported, then its one error line
            if imported:
                print(f"imported {len(imported)} of {len(folders)} before {folder} failed (kept): "
                      + ", ".join(imported))
            raise
        print(importer.summary(report))
        imported.append(report["run_dir"])
    return 0

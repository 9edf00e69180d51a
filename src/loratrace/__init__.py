"""loratrace: LoRA fine-tuning on PyTorch Lightning that records exactly which examples trained which checkpoint.

    import loratrace
    run_dir = loratrace.train(loratrace.load_config("configs/tiny.yaml", ["training.max_steps=20"]))
    loratrace.train(resume_from=f"{run_dir}/checkpoints/checkpoint-step-020.ckpt", overrides=["training.max_steps=24"])
    db = loratrace.open_runs(run_dir)
    db.trace(db.sql("SELECT example_id FROM samples LIMIT 1").df().example_id[0])
    loratrace.compare([run_dir, other_run_dir]).data_order     # DataFrames: config, metrics, evals, examples, ...
    loratrace.write_report([run_dir, other_run_dir], "report.html")
    loratrace.export_adapters(run_dir, "out/adapters", flat=True)  # a PEFT adapter per checkpoint + manifest.parquet
    loratrace.sweep(loratrace.load_config("configs/tiny.yaml"), ["lora.r=choice(4,8)"], trials=4)   # an Optuna study
    loratrace.influence(run_dir, example_ids=["LTSYN_VAL_0007"])  # DataFrame: each training example's TracIn score
    loratrace.verify(run_dir)                  # DataFrame: each re-executed step and checkpoint against the record
    loratrace.replay(run_dir, 100, drop=["LTSYN_TRA_0001"])  # a new run folder: trained again without that example

Names are imported on first use, so `loratrace query` starts without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "train": "loratrace.recipe",
    "load_config": "loratrace.config",
    "Config": "loratrace.config",
    "open_runs": "loratrace.query.store",
    "BatchTracker": "loratrace.track.tracker",
    "compare": "loratrace.report.compare",
    "write_report": "loratrace.report.runs",
    "export_adapters": "loratrace.export",
    "sweep": "loratrace.sweeps.run",
    "resume_sweep": "loratrace.sweeps.run",
    "influence": "loratrace.attribution.tracin",
    "verify": "loratrace.proof.verify",
    "replay": "loratrace.proof.replay",
    "replays": "loratrace.proof.replay",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loratrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API, though none of it is imported yet (what `dir(loratrace)` and tab completion show)."""
    return sorted([*_EXPORTS, "__version__"])


__all__ = ["BatchTracker", "Config", "compare", "export_adapters", "influence", "load_config", "open_runs", "replay",
           "replays", "resume_sweep", "sweep", "train", "verify", "write_report"]

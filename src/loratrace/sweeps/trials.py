"""A sweep trial's measures and records: the objective (its value at each checkpoint and at the end) and the
`trials.parquet` snapshot the `trials` view reads. (The reporter that feeds them to Optuna is sweep_workers.py's.)

    objective = Objective("eval_accuracy", "maximize", checkpoint="best")
    value, step = objective.final(run_dir, cfg)           # the value told to Optuna, the checkpoint it comes from
    write_trials(study_dir, "my-study", study.get_trials(), objective)
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.config import Config
from loratrace.errors import ConfigError
from loratrace.runs import folder
from loratrace.track import schema
from loratrace.training.checkpoints import checkpoint_files

OBJECTIVES = {"eval_accuracy": "maximize", "final_loss": "minimize"}  # objective -> its natural direction


@dataclass(frozen=True)
class Objective:
    """`eval_accuracy`: accuracy on `eval.split` (scored at every checkpoint, as `eval.every_checkpoint=true` does) of
    the best or the last checkpoint. `final_loss`: the last update's training loss (run.json's final_loss). The
    intermediate values the pruner sees are the same measure at each checkpoint."""

    name: str
    direction: str
    checkpoint: str = "best"  # eval_accuracy: best or last

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ConfigError(f"--objective {self.name}: use one of {', '.join(OBJECTIVES)}")
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"--direction {self.direction}: use maximize or minimize")
        if self.checkpoint not in ("best", "last"):
            raise ConfigError(f"--checkpoint {self.checkpoint}: use best or last")

    def prepare(self, cfg: Config) -> Config:
        """The config every trial starts from: eval_accuracy scores each checkpoint as it is written."""
        if self.name == "eval_accuracy":
            cfg.eval.every_checkpoint = True
        return cfg

    def intermediate(self, run_dir: Path, cfg: Config, update_loss: float | None, step: int) -> float | None:
        """The measure at the checkpoint of `step`: `update_loss` is that update's training loss."""
        if self.name == "final_loss":
            return update_loss
        return checkpoint_accuracies(run_dir, cfg, step=step).get(step)

    def final(self, run_dir: Path, cfg: Config) -> tuple[float | None, int | None]:
        """The trial's value and the checkpoint step it comes from."""
        if self.name == "final_loss":
            info = folder.read_run_json(run_dir)
            return info.get("final_loss"), info.get("steps")
        accuracies = checkpoint_accuracies(run_dir, cfg)
        if not accuracies:
            return None, None
        if self.checkpoint == "last":
            step = max(accuracies)
        else:  # ties: the earliest checkpoint
            pick = max if self.direction == "maximize" else min
            step = pick(sorted(accuracies), key=lambda s: accuracies[s])
        return accuracies[step], step


def checkpoint_accuracies(run_dir: Path, cfg: Config, step: int | None = None) -> dict[int, float]:
    """Accuracy per checkpoint step on the config's eval split and scoring, as the `evals` view holds it: the latest
    evaluation of each checkpoint file, only checkpoints of the run's effective lineage. With `step`, only the
    checkpoint just written at that step (its parts alone are read)."""
    pattern = f"s{step:09d}-*.parquet" if step is not None else "s*.parquet"  # schema.evals_part_name
    parts = sorted((Path(run_dir) / "tracking" / "evals").glob(pattern))
    if not parts:
        return {}
    table = pq.read_table(parts, columns=["checkpoint_step", "checkpoint_path", "split", "scoring", "example_id",
                                          "correct", "evaluated_at"])
    latest: dict[tuple, tuple] = {}
    for row in table.to_pylist():
        if row["split"] != cfg.eval.split or row["scoring"] != cfg.eval.scoring or \
                row["checkpoint_path"] == "final_model":
            continue
        key = (row["checkpoint_path"], row["example_id"])
        if key not in latest or latest[key][0] <= row["evaluated_at"]:
            latest[key] = (row["evaluated_at"], row["checkpoint_step"], row["correct"])
    kept = {step} if step is not None else {kept for kept, _ in checkpoint_files(run_dir)}
    scores: dict[int, list[bool]] = {}
    for _, scored, correct in latest.values():
        if scored in kept:
            scores.setdefault(scored, []).append(bool(correct))
    return {scored: sum(values) / len(values) for scored, values in sorted(scores.items())}


def nested(params: dict) -> dict:
    """{"lora.r": 8} -> {"lora": {"r": 8}}, the shape of config.yaml."""
    tree: dict = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def trial_rows(study_name: str, trials, objective: Objective) -> list[dict]:
    """`trials.parquet` rows from Optuna's frozen trials."""
    rows = []
    for t in trials:
        rows.append({
            "study": study_name, "trial": t.number, "state": t.state.name.lower(),
            "params": json.dumps(nested(t.params), sort_keys=True), "objective": t.value if t.values else None,
            "objective_name": objective.name, "direction": objective.direction,
            "intermediate_values": [{"step": int(step), "value": float(value)}
                                    for step, value in sorted(t.intermediate_values.items())],
            "run_id": t.user_attrs.get("run_id"), "run_dir": t.user_attrs.get("run_dir"),
            "retry_of": t.system_attrs.get("failed_trial"),
            "started_at": _utc(t.datetime_start), "completed_at": _utc(t.datetime_complete),
        })
    return rows


def write_trials(study_dir: Path, study_name: str, trials, objective: Objective) -> Path:
    """The study's trials as `trials.parquet` (atomic: a reader sees the old snapshot or the new one)."""
    path = Path(study_dir) / schema.TRIALS_FILE
    table = pa.Table.from_pylist(trial_rows(study_name, trials, objective), schema=schema.TRIALS)
    schema.write_atomic(table, path)
    return path


def _utc(when: dt.datetime | None) -> dt.datetime | None:
    """Optuna's datetimes are naive local time."""
    return when.astimezone(dt.timezone.utc) if when is not None else None


def is_number(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))

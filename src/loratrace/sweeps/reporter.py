"""TrialReporter: a sweep trial inside its run. A Lightning callback (it names study and trial in run.json once the
run folder exists) and a checkpoint listener (it reports the objective's measure at each checkpoint to Optuna and
stops training when the pruner says so).

    reporter = TrialReporter(trial, objective, "my-study", cfg)
    train(cfg, progress=False, callbacks=[reporter], checkpoint_listeners=[reporter])
    reporter.pruned_step            # None, or the checkpoint step the pruner stopped the trial at

Not optuna-integration's PyTorchLightningPruningCallback: that one reports a validation metric per epoch from
`on_validation_end`, and loratrace's runs have no validation loop; their measure is taken per checkpoint (step).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from typing_extensions import override

from loratrace.config import Config
from loratrace.runs import folder
from loratrace.sweeps.trials import Objective
from loratrace.track.step_outputs import micro_batch_loss
from loratrace.training.checkpoints import UpdateBoundary


class TrialReporter(UpdateBoundary):
    """A trial inside its run: names study and trial in run.json once the folder exists, reports the objective's
    measure at every checkpoint (`trial.report`), and stops training when Optuna's pruner says so (`should_prune`),
    never at the last step. A Lightning callback (set-up) and a checkpoint listener (the values)."""

    def __init__(self, trial, objective: Objective, study: str, cfg: Config, on_run_dir=None):
        self.trial, self.objective, self.study, self.cfg = trial, objective, study, cfg
        self.on_run_dir = on_run_dir  # called with the run folder once it exists (the sweep's snapshot)
        self.run_dir: Path | None = None
        self.pruned_step: int | None = None
        self._sums: tuple | None = None  # this update's (loss x answer tokens, answer tokens) over micro-batches
        self._update_loss: tuple | None = None  # the last finished update's sums: its loss, read at its checkpoint

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or self.run_dir is not None:
            return
        self.run_dir = Path(trainer.default_root_dir).resolve()
        info = folder.read_run_json(self.run_dir)
        info.update(study=self.study, trial=self.trial.number)
        info["trials"] = [*info.get("trials", []), self.trial.number]  # a continued trial keeps its first one too
        folder.write_run_json(self.run_dir, info)
        self.trial.set_user_attr("run_id", self.run_dir.name)
        self.trial.set_user_attr("run_dir", str(self.run_dir))
        if self.on_run_dir is not None:
            self.on_run_dir(self.run_dir)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        """The update's loss as the tracker weighs it (per answer token), kept on the device until a checkpoint
        reads it. Runs before the checkpoint writer's hook (Lightning calls Checkpoint callbacks last)."""
        if not isinstance(outputs, dict) or "n_target" not in outputs:
            return
        tokens = outputs["n_target"].sum()
        weighted = micro_batch_loss(outputs, trainer) * tokens
        sums = self._sums
        self._sums = (weighted, tokens) if sums is None else (sums[0] + weighted, sums[1] + tokens)
        if self.update_finished(trainer):
            self._update_loss, self._sums = self._sums, None

    def checkpoint_saving(self, trainer: L.Trainer, step: int) -> None:
        """Nothing to hand over: the values are read once the checkpoint (and its scores) are written."""

    def checkpoint_saved(self, trainer: L.Trainer, step: int, path: str, size: int) -> None:
        if self.run_dir is None:
            return
        loss = float(self._update_loss[0] / self._update_loss[1].clamp(min=1)) if self._update_loss else None
        value = self.objective.intermediate(self.run_dir, self.cfg, loss, step)
        if value is None:
            return
        self.trial.report(float(value), step)
        if step < self.cfg.training.max_steps and self.trial.should_prune():
            self.pruned_step = step
            trainer.should_stop = True  # the recipe records an early stop; the sweep then marks the run pruned

"""The recipe, top to bottom: config -> data -> model -> Trainer(callbacks) -> fit -> export.

    run_dir = train(load_config("configs/tiny.yaml", ["training.max_steps=20"]))
    train(resume_from="runs/x/checkpoints/checkpoint-step-090.ckpt")   # continues the same run, as it recorded it
    train(resume_from="s3://bucket/runs/x/checkpoints/checkpoint-step-090.ckpt", overrides=["training.max_steps=200"])
    train("configs/arc-challenge.yaml", resume_from="hf-output/checkpoint-500")   # a Hugging Face Trainer checkpoint

`train` resolves what a resume continues from exactly as `loratrace train --resume-from-checkpoint` does (the command
is this call): a checkpoint on object storage is staged in a local copy of its run, a Trainer `checkpoint-N/` folder
becomes a `.ckpt` (legacy/resume.py), and without a config the run's own config.yaml is read.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from loratrace.config import Config, ConfigError, load_config
from loratrace.data.datasets import load_split
from loratrace.data.loader import CommonsenseData
from loratrace.evaluate import CheckpointEvaluator, Evaluator
from loratrace.export import export_adapter, export_merged, save_base_model
from loratrace.legacy import resume as legacy_resume
from loratrace.query.index import index_samples
from loratrace.runs import folder, storage
from loratrace.track.tracker import BatchTracker
from loratrace.training.checkpoints import (
    StepCheckpoint,
    checkpoint_steps,
    weights_only_steps,
)
from loratrace.training.ending import RunEnding
from loratrace.training.interrupt import StopOnSignal
from loratrace.training.launch import folder_for_children, identify, shared_run_dir
from loratrace.training.loggers import (
    EvalTables,
    build_loggers,
    check_loggers,
    finish_loggers,
    logger_summary,
    quiet_loggers,
)
from loratrace.training.model import add_lora, load_base, load_lora_weights, load_run_model, trainable_parameter_count
from loratrace.training.module import LoRAModule
from loratrace.training.progress import progress_callbacks, progress_mode
from loratrace.training.resume import resume_run_dir, validate_resume


def _example_rows(cfg: Config, examples, datamodule) -> list[dict]:
    return [{"example_id": e.example_id, "line": e.line, "split": cfg.data.train_split, "dataset": cfg.data.dataset,
             "gold": e.gold_label, "n_choices": len(e.choices), "n_target_tokens": enc.n_target_tokens,
             "prompt_sha256": e.prompt_sha256, "prompt": e.prompt} for e, enc in zip(examples, datamodule.encoded)]


def train(cfg: Config | str | Path | None = None, resume_from: str | Path | None = None, overrides: Sequence[str] = (),
          progress: bool = True, callbacks: list | None = None, checkpoint_listeners: list | None = None) -> Path | str:
    """Train one run; returns its folder (its URL for a runs_dir on object storage). Everything that can fail on user
    input fails before the folder exists (or, for a resume, before anything in it changes).

    `cfg`: a Config, or a YAML file loaded with `overrides` (dotted `key=value`, as on the command line); None reads
    the resumed run's config.yaml (with `overrides`) when `resume_from` is given, else the embedded default.
    `resume_from`: a run's `checkpoint-step-NNN.ckpt` (a local path or a URL on object storage: the run continues in
    place), or a Hugging Face Trainer `checkpoint-N/` folder (a legacy run's is imported first; any other needs
    `cfg`). `callbacks` are added to loratrace's own (tracker, checkpoints, progress bar), e.g. a profiler or a
    timer; `checkpoint_listeners` (checkpoints.CheckpointListener) hear of each checkpoint after the tracker and
    evaluator (a sweep's trial reports its intermediate values there).
    """
    with quiet_libraries(), storage.staging(), contextlib.ExitStack() as held:  # held: the run's training lock
        cfg, checkpoint = resolve_run(cfg, resume_from, overrides)
        return storage.public(_train(cfg, checkpoint, progress, callbacks, checkpoint_listeners, held))


def resolve_run(cfg: Config | str | Path | None, resume_from: str | Path | None = None,
                overrides: Sequence[str] = ()) -> tuple[Config, Path | None]:
    """The config a `train` call runs and the local `.ckpt` it resumes from (None: a new run), as `train` takes them.
    A remote checkpoint is staged (inside `storage.staging()`: the copy goes when it ends)."""
    if isinstance(cfg, Config) and overrides:
        raise TypeError("overrides apply to a config file or a resumed run's config.yaml; set them on the Config")
    checkpoint = None
    if resume_from:
        if storage.is_remote(resume_from):  # a run on object storage resumes in a local copy
            storage.check_location(str(resume_from))  # no credentials, no bucket: one line before any work
            resume_from = stage_remote_checkpoint(str(resume_from))
        checkpoint = Path(resume_from)
        if checkpoint.is_dir():  # a Trainer checkpoint-N/ folder: the .ckpt it becomes
            checkpoint = legacy_resume.checkpoint_to_resume(checkpoint, cfg, list(overrides))
    if isinstance(cfg, Config):
        return cfg, checkpoint
    if cfg is None and checkpoint is not None:  # the run as it recorded itself
        cfg = resume_run_dir(checkpoint) / "config.yaml"
    return load_config(cfg, list(overrides)), checkpoint


def _train(cfg: Config, checkpoint: Path | None, progress: bool, callbacks: list | None,
           checkpoint_listeners: list | None, held: contextlib.ExitStack) -> Path:
    storage.check_location(cfg.runs_dir)  # no credentials, no bucket: one line before any work
    existing = resume_run_dir(checkpoint) if checkpoint else None
    L.seed_everything(cfg.training.seed, verbose=False)

    # data and model: all user errors surface here, before anything is written
    model, tokenizer = load_base(cfg.model)
    examples = load_split(cfg.data.dataset, cfg.data.source, cfg.data.train_split, cfg.data.limit)
    datamodule = CommonsenseData(examples, tokenizer, cfg.data.max_length, cfg.training.batch_size,
                                 cfg.training.seed, cfg.data.num_workers)
    evaluator = Evaluator(cfg, tokenizer) if cfg.eval.every_checkpoint else None  # its split, checked now
    launch = identify(cfg)  # accelerator, devices, nodes, strategy, precision: checked now, on every rank
    # The tiny preset has no hub home: its base goes into the run folder (rank 0), copied before LoRA wraps it.
    keep_base = launch.rank == 0 and cfg.model.name == "tiny" and not (existing and (existing / "base_model").exists())
    base_copy = copy.deepcopy(model) if keep_base else None
    peft_model = add_lora(model, cfg.lora, cfg.training.seed)
    module = LoRAModule(peft_model, cfg.training)
    module.train()  # as the HF Trainer does: from_pretrained returns a model in eval mode (dropout off)
    resumed_step = validate_resume(checkpoint, module, cfg, launch.world_size) if checkpoint else 0
    check_loggers(cfg)  # a logger that cannot start is one line now, not a crash once training is under way

    # run folder: rank 0 makes it (or reopens the resumed run's) and writes run.json and config.yaml; all ranks learn it
    # (a second launch on the same run is refused here, at its first write, by the lock the first one holds)
    def make_run_dir() -> Path:
        made = existing or folder.new_run_dir(cfg)
        held.enter_context(folder.training_lock(made))
        folder.start_run(made, cfg, str(storage.public(checkpoint)) if checkpoint else None,
                       resumed_step if checkpoint else None)
        return made

    run_dir = shared_run_dir(launch, make_run_dir)
    ending = RunEnding(run_dir, launch.rank == 0, resumed_step, checkpoint)
    try:  # from here on the run folder is this launch's: however it ends, run.json says so, once (`finally`)
        if base_copy is not None:
            save_base_model(base_copy, tokenizer, run_dir / "base_model")
            storage.publish_tree(run_dir / "base_model")
            base_copy = None
        trainer, step_checkpoint = _trainer(cfg, run_dir, resumed_step, _example_rows(cfg, examples, datamodule),
                                            evaluator, progress, callbacks, checkpoint_listeners, ending)
        with folder_for_children(run_dir, launch):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None)
        if trainer.global_step < cfg.training.max_steps:  # a callback stopped it early (a Timer, say): resumable
            ending.status = "interrupted"  # like a signal
        elif trainer.is_global_zero:  # the run's end: `trace`'s index, the exports, the loggers' artifacts
            _complete(cfg, run_dir, module, tokenizer, step_checkpoint.last_saved, ending)
    except BaseException as error:
        told = ending.failed(error)  # RunInterrupted (a signal) or DiskFull in its place, or None
        if told is None:
            raise
        raise told from None
    finally:
        ending.close()
    if progress and ending.status == "completed":
        print_summary(cfg, run_dir, ending.steps, ending.facts["final_loss"], ending.written,
                      ending.tracking_cost, ending.facts.get("non_finite_loss_at_step"))
    return run_dir


def _complete(cfg: Config, run_dir: Path, module: LoRAModule, tokenizer, last_saved: Path | None,
              ending: RunEnding) -> None:
    """Rank 0 after a fit to max_steps: the samples index, final_adapter/ and final_model/, MLflow's artifacts."""
    index_s = index_samples(run_dir) if ending.tracker is not None else 0.0
    peft_model = module.model
    if isinstance(ending.trainer.strategy, FSDPStrategy):  # each rank holds a shard: the last checkpoint has them whole
        peft_model = unsharded_model(cfg, run_dir, last_saved)
    trainable = trainable_parameter_count(peft_model)  # before merging folds the adapters away
    if cfg.export.adapter:
        base_path = run_dir / "base_model" if cfg.model.name == "tiny" else None
        export_adapter(peft_model, tokenizer, run_dir / "final_adapter", base_path)
    if cfg.export.merged_model:
        export_merged(peft_model, tokenizer, run_dir / "final_model")
    finish_loggers(ending.trainer.loggers, cfg, run_dir, ending.trainer.global_step, module.last_metrics)
    ending.complete(module.last_metrics.get("train/loss"), trainable, cfg.export.adapter or cfg.export.merged_model,
                    index_s)


def _trainer(cfg: Config, run_dir: Path, resumed_step: int, examples: list[dict], evaluator: Evaluator | None,
             progress: bool, callbacks: list | None, checkpoint_listeners: list | None,
             ending: RunEnding) -> tuple[L.Trainer, StepCheckpoint]:
    """Lightning's Trainer with loratrace's callbacks (tracker, checkpoints, signal stop, non-finite loss, progress
    bar) before the caller's; `ending` is told of the tracker, the stop and the trainer as they exist."""
    t = cfg.training
    own_callbacks: list = []
    if cfg.tracking.enabled:
        ending.tracker = BatchTracker(run_dir / "tracking", run_id=run_dir.name,
                                      flush_every_steps=cfg.tracking.flush_every_steps, examples=examples,
                                      stage1_steps=t.stage1_steps)
        own_callbacks.append(ending.tracker)
    listeners = [ending.tracker] if ending.tracker is not None else []  # told of every checkpoint: rows, then scores
    if evaluator is not None:
        listeners += [CheckpointEvaluator(evaluator, run_dir), EvalTables(run_dir)]  # EvalTables: to MLflow
    listeners += list(checkpoint_listeners or [])
    steps = checkpoint_steps(t.max_steps, t.stage1_steps, cfg.checkpoint)
    step_checkpoint = StepCheckpoint(run_dir / "checkpoints", steps, listeners,
                                     weights_only_steps(steps, t.stage1_steps, t.max_steps, cfg.checkpoint),
                                     run_id=run_dir.name)
    ending.stop = StopOnSignal(step_checkpoint)
    shown = progress_mode(cfg.logging.progress, progress)  # bar, lines or none on stderr
    own_callbacks += [step_checkpoint, ending.stop, ending.non_finite]
    own_callbacks += progress_callbacks(shown, cfg.logging.progress_every_n_steps)
    ending.trainer = L.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.max_grad_norm or None, gradient_clip_algorithm="norm", precision=t.precision,
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        logger=build_loggers(cfg, run_dir, resumed_step) or False,
        callbacks=own_callbacks + list(callbacks or []), enable_checkpointing=True,
        enable_progress_bar=shown == "bar",
        enable_model_summary=False, default_root_dir=str(run_dir), log_every_n_steps=t.log_every_n_steps,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    return ending.trainer, step_checkpoint


def unsharded_model(cfg: Config, run_dir: Path, checkpoint: Path):
    """The PEFT model with `checkpoint`'s LoRA tensors, on rank 0 after an FSDP fit, whose own parameters are this
    rank's shards: FSDP's full state dict gathered them, whole, into every checkpoint (the last step always has one)."""
    peft_model = load_run_model(cfg, run_dir)[0]
    load_lora_weights(peft_model, checkpoint)
    return peft_model


def stage_remote_checkpoint(url: str) -> Path:
    """A checkpoint of a run on object storage, as a file in a local copy of that run (storage.stage_run): the resume
    writes there, and what it writes is published back."""
    run_url, _, name = url.rstrip("/").rpartition("/checkpoints/")
    if not run_url or "/" in name:
        raise ConfigError(f"{url} is not inside a run's checkpoints/ folder")
    return storage.stage_run(run_url) / "checkpoints" / name


@contextlib.contextmanager
def quiet_libraries():
    """While training: Lightning's hardware lines and tips, deprecation notices from the libraries' own calls, and
    SwanLab's banner say nothing a loratrace user can act on; the summary says where everything went."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    swanlab_console = None
    try:
        from swanlab.sdk.internal.pkg import console as swanlab_console  # private: guarded below
        was_quiet, swanlab_console.c.quiet = swanlab_console.c.quiet, True
    except (ImportError, AttributeError):
        swanlab_console = None
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" for a one-file adapter
    try:
        with warnings.catch_warnings(), quiet_loggers():
            for message in (".*does not have many workers.*", ".*is_gradient_checkpointing.*is deprecated.*",
                            ".*isinstance\\(treespec, LeafSpec\\).*"):
                warnings.filterwarnings("ignore", message)
            yield
    finally:
        rank_zero.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()
        if swanlab_console is not None:
            swanlab_console.c.quiet = was_quiet


def print_summary(cfg: Config, run_dir: Path, steps: int, final_loss: float | None, written: list[str],
                  tracking_cost: dict | None = None, non_finite_at: int | None = None) -> None:
    shown = storage.public(run_dir)  # a run on object storage: its URL, not the scratch folder
    lines = [
        "",
        f"run          {shown}",
        f"steps        {steps}" + (f"   final loss {final_loss:.4f}" if final_loss is not None else "")
        + (f"   (the loss was not finite from step {non_finite_at} on: diverged)" if non_finite_at else ""),
        f"checkpoints  {len(written)}" + (f"  ({written[0]} .. {written[-1]})" if written else ""),
    ]
    if cfg.tracking.enabled:
        lines.append(f"tracking     {shown}/tracking   (loratrace query / loratrace trace)")
        if tracking_cost:
            c = tracking_cost
            lines.append(f"             cost {c['training_thread_share']:.1%} of training time on its thread, "
                         f"{c['background_share']:.1%} more CPU on the writer's; {c['end_s']:.1f} s at the end")
    if cfg.logging.tensorboard:
        lines.append(f"tensorboard  tensorboard --logdir {shown}/tensorboard_logs")
    swanlab_dir = f"{shown}/swanlab_logs"
    swanlab = {  # what shows the run in the mode it was written in: offline files cannot be watched, only synced
        "local": f"swanlab watch {swanlab_dir}   (SwanLab's dashboard; needs swanlab[dashboard])",
        "offline": f"swanlab sync {swanlab_dir}/run-*   (uploads after swanlab login; for a local dashboard train "
                   f"with logging.swanlab_mode=local)",
        "cloud": f"project {cfg.logging.project} on SwanLab cloud (the run's link is printed above)",
    }.get(cfg.logging.swanlab_mode)
    if cfg.logging.swanlab and swanlab:
        lines.append(f"swanlab      {swanlab}")
    lines.append(f"model        {shown}/final_model  adapter {shown}/final_adapter")
    lines += logger_summary(cfg, run_dir)
    print("\n".join(lines), file=sys.stdout)

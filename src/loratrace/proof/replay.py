"""`loratrace replay`: train a run again from one of its checkpoints, fed its recorded order with examples left out.

    loratrace replay runs/<run> --from 100 --drop LTSYN_TRA_0001 --drop LTSYN_TRA_0002
    replay("runs/<run>", 100, drop=["LTSYN_TRA_0001"])                 # -> the new run folder
    replays("runs/<run>", 100, [set(), {"LTSYN_TRA_0001"}, ...])       # several, the base model loaded once

A replay is a new run folder next to the original: the same config, started from the checkpoint at the step (its
LoRA tensors, optimizer, scheduler, loader position and RNG: a resume's restore), fed the original's effective
micro-batches in their recorded order less the dropped examples (each affected micro-batch simply smaller, never
refilled; one emptied entirely still makes its update, from no examples). It is tracked and checkpointed like any run
(no loggers, no exports); run.json says `replay_of: {run, step, dropped, ...}`. Its tracking holds the original's
effective rows up to the step as attempt 0 and the replayed steps as attempt 1, so it reads as a whole run (a step
whose every micro-batch was emptied has no row). A replay that drops nothing is `verify`'s re-execution: identical to
the original.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq

from loratrace.proof.engine import Engine
from loratrace.proof.record import MicroBatch, ProofError, RunCheckpoint, recorded_micro_batches, run_checkpoints
from loratrace.query.index import index_samples
from loratrace.runs import folder, storage
from loratrace.runs.folder import utc_now
from loratrace.track import schema
from loratrace.track.lineage import is_effective, lineage_ranges, read_parts
from loratrace.track.tracker import BatchTracker
from loratrace.training.checkpoints import StepCheckpoint, checkpoint_steps, weights_only_steps


@dataclasses.dataclass
class Plan:
    """Where a replay starts and ends, and what it is fed before any drop."""

    start: RunCheckpoint
    end: int
    batches: list[MicroBatch]  # the recorded micro-batches of steps start+1 .. end


def plan(engine, from_step: int, steps: int | None) -> Plan:
    """From the full checkpoint at `from_step`, `steps` updates (default: to the last recorded step)."""
    checkpoints = {c.step: c for c in run_checkpoints(engine.run_dir)}
    start = checkpoints.get(from_step)
    if start is None:
        full = ", ".join(str(s) for s, c in sorted(checkpoints.items()) if c.full) or "none"
        raise ProofError(f"{engine.run_dir} has no checkpoint at step {from_step} (full checkpoints: {full})")
    if not start.full:
        raise ProofError(f"{start.path.name} holds the LoRA weights only (checkpoint.tail=weights): a replay starts at "
                         "a full checkpoint")
    batches = recorded_micro_batches(engine.run_dir)
    last = batches[-1].step
    if steps is not None and steps < 1:
        raise ProofError(f"--steps must be at least 1, got {steps}")
    end = last if steps is None else from_step + steps
    if end > last or end <= from_step:
        raise ProofError(f"the run's record ends at step {last}: nothing to replay from step {from_step}"
                         + (f" for {steps} steps" if steps is not None else ""))
    chosen = [b for b in batches if from_step < b.step <= end]
    gaps = sorted(set(range(from_step + 1, end + 1)) - {b.step for b in chosen})
    if gaps:
        raise ProofError(f"{engine.run_dir} has no recorded batches for step {gaps[0]}: nothing to replay it from")
    return Plan(start, end, chosen)


def check_ids(engine, ids: Iterable[str], what: str) -> set[str]:
    """The ids, each one an example of the run's training data (else one line naming it, with the closest)."""
    ids = set(ids)
    for example_id in sorted(ids):
        if example_id not in engine.index:
            close = difflib.get_close_matches(example_id, list(engine.index), n=1)
            raise ProofError(f"{what}: no training example {example_id!r}" + (f" (closest: {close[0]})" if close
                                                                                else ""))
    return ids


def fed_without(engine, batches: list[MicroBatch], dropped: set[str]) -> dict[tuple[int, int], list[int]]:
    """The recorded micro-batches less `dropped`, as the loader's example positions."""
    return engine.indices({(b.epoch, b.batch_idx): [i for i in b.example_ids if i not in dropped] for b in batches})


def replays(run: str | Path, from_step: int, drop_sets: list[Iterable[str]], steps: int | None = None,
            engine=None) -> list[Path]:
    """One replay per drop set, in order, the config, data and base model loaded once; returns the new folders."""

    run_dir = storage.local_folder(run, "replay reads and writes run folders on this machine: copy the run here first")
    engine = engine or Engine(run_dir)
    chosen = plan(engine, from_step, steps)
    sets = [check_ids(engine, ids, "--drop") for ids in drop_sets]
    return [_replay_one(engine, chosen, dropped) for dropped in sets]


def replay(run: str | Path, from_step: int, drop: Iterable[str] = (), keep_only: Iterable[str] | None = None,
           steps: int | None = None, engine=None) -> Path:
    """One replay: `drop` left out, or with `keep_only` everything but those left out of the replayed steps."""

    run_dir = storage.local_folder(run, "replay reads and writes run folders on this machine: copy the run here first")
    engine = engine or Engine(run_dir)
    if keep_only is not None:
        kept = check_ids(engine, keep_only, "--keep-only")
        fed = {i for b in plan(engine, from_step, steps).batches for i in b.example_ids}
        drop = fed - kept
    return replays(run_dir, from_step, [drop], steps, engine)[0]


def _replay_one(engine, chosen: Plan, dropped: set[str]) -> Path:
    cfg = dataclasses.replace(engine.cfg, runs_dir=str(engine.run_dir.parent))
    t, first = cfg.training, chosen.start.step
    removed = sum(i in dropped for b in chosen.batches for i in b.example_ids)
    with contextlib.ExitStack() as held:
        made = folder.new_run_dir(cfg)
        held.enter_context(folder.training_lock(made))
        folder.start_run(made, cfg, None)
        _mark_replay(made, engine, chosen, dropped, removed)
        if (engine.run_dir / "base_model").is_dir():  # the tiny preset's base: eval, export and influence read it
            shutil.copytree(engine.run_dir / "base_model", made / "base_model")
        _copy_history(engine.run_dir, made, first)
        tracker = BatchTracker(made / "tracking", run_id=made.name, flush_every_steps=cfg.tracking.flush_every_steps,
                               examples=_example_rows(engine.run_dir), stage1_steps=t.stage1_steps)
        tracker.parent_attempt = 0  # the copied history: the replay's launch continues it from `first`
        steps = sorted({s for s in checkpoint_steps(t.max_steps, t.stage1_steps, cfg.checkpoint)
                        if first < s <= chosen.end} | {chosen.end})
        weights_only = weights_only_steps(steps, t.stage1_steps, t.max_steps, cfg.checkpoint) - {chosen.end}
        saver = StepCheckpoint(made / "checkpoints", steps, [tracker], weights_only, run_id=made.name)
        try:
            trainer = engine.fit(chosen.start.path, chosen.end, fed_without(engine, chosen.batches, dropped),
                                 [tracker, saver], root_dir=made)
            index_samples(made)
        except BaseException:
            with contextlib.suppress(OSError):
                folder.finish_run(made, "failed")
            raise
        folder.finish_run(made, "completed", {"tracking_cost": tracker.cost()}, steps=trainer.global_step,
                          final_loss=trainer.lightning_module.last_metrics.get("train/loss"),
                          checkpoints=len(steps))
    return made


def _mark_replay(made: Path, engine, chosen: Plan, dropped: set[str], removed: int) -> None:
    info = folder.read_run_json(made)
    info["replay_of"] = {
        "run": engine.info.get("run_id", engine.run_dir.name), "step": chosen.start.step,
        "checkpoint": chosen.start.path.relative_to(engine.run_dir).as_posix(), "end_step": chosen.end,
        "dropped": sorted(dropped), "removed_from_batches": removed,
        "batches": "the original's recorded micro-batches in their order, each holding a dropped example smaller by "
                   "it (never refilled)",
    }
    folder.write_run_json(made, info)


def _copy_history(run_dir: Path, made: Path, first: int) -> None:
    """The original's effective rows of steps 1..`first` as the replay's attempt 0 (its own launch is attempt 1, resumed
    at `first`): the replay reads as a whole run whose data order differs from the original's exactly by the drops."""
    import pyarrow as pa

    tracking = run_dir / "tracking"
    ranges = lineage_ranges(tracking)
    rows = [dict(row, run_id=made.name, attempt=0)
            for row in read_parts(tracking / "batches", schema.BATCHES).to_pylist()
            if row["step"] <= first and is_effective(ranges, row["attempt"], row["step"])]
    history = made / "tracking"
    schema.write_atomic(pa.Table.from_pylist(rows, schema=schema.BATCHES),
                        history / "batches" / schema.batches_part_name(0, 0, 0))
    attempt = {"run_id": made.name, "attempt": 0, "parent_attempt": None, "started_at": utc_now(),
               "resumed_from": None, "resumed_step": 0, "world_size": 1, "host": None}
    schema.write_atomic(pa.Table.from_pylist([attempt], schema=schema.ATTEMPTS),
                        history / "attempts" / schema.attempts_part_name(0))


def _example_rows(run_dir: Path) -> list[dict] | None:
    """The original's examples.parquet rows (without its run id), for the replay's own."""
    path = run_dir / "tracking" / schema.EXAMPLES_FILE
    if not path.is_file():
        return None
    table = pq.read_table(path)
    return table.drop_columns(["run_id"]).to_pylist() if "run_id" in table.column_names else table.to_pylist()

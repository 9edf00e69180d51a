"""`loratrace verify`: re-execute a run's recorded training between its checkpoints and compare with the record.

    loratrace verify runs/<run>                          # from each full checkpoint up to the next full one
    loratrace verify runs/<run> --from 100 --steps 5
    frame = verify("runs/<run>")                         # DataFrame: one row per step, one per later checkpoint

A span starts at a full checkpoint (LoRA tensors, optimizer, scheduler, loop, loader and RNG state) and is re-executed
with exactly the recorded micro-batches of the effective lineage (`engine.Engine`). Each step's loss, grad-norm, lr
and per-example losses are compared with the recorded row, and each later checkpoint's LoRA tensors (full or
weights-only) with the live ones after its step. On the CPU the comparison is exact (a resume reproduces the
weights bit for bit); on a GPU differences up to `engine.GPU_TOLERANCE` pass (deterministic algorithms on). In the
spirit of Proof-of-Learning (Jia et al., 2021): every span is checked from its own checkpoint, so a forged
checkpoint or a forged row fails at its own step.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loratrace.errors import LoratraceError
from loratrace.proof.engine import Capture, Engine
from loratrace.proof.record import (
    MicroBatch,
    ProofError,
    RunCheckpoint,
    recorded_micro_batches,
    run_checkpoints,
    steps_text,
)
from loratrace.runs import storage
from loratrace.training.checkpoints import foreign_writer, read_checkpoint


class VerificationFailed(LoratraceError):
    """The re-execution differs from the record (exit 1): the message names the first step and what differs."""

    exit_code = 1


@dataclass
class Span:
    start: RunCheckpoint
    end: int  # last step re-executed


COLUMNS = ["from_step", "step", "kind", "checkpoint", "loss_recorded", "loss_replayed", "grad_norm_recorded",
           "grad_norm_replayed", "lr_recorded", "lr_replayed", "losses_max_diff", "max_abs_diff", "equal", "differs"]


def verify(run: str | Path, from_step: int | None = None, steps: int | None = None,
           tolerance: float | None = None, engine=None):
    """The per-step comparison as a DataFrame (`COLUMNS`): a `step` row per re-executed step, a `checkpoint` row per
    checkpoint a span reaches; `equal` says whether it matched the record within `tolerance` (default: 0 on the CPU,
    `GPU_TOLERANCE` on a GPU). `summary(frame)` gives the one line the command prints."""
    import pandas as pd

    run_dir = storage.local_folder(run, "verify re-executes a run on this machine: copy the run here first")
    for name, value in (("--from", from_step), ("--steps", steps)):
        if value is not None and value < 1:
            raise ProofError(f"{name} must be at least 1, got {value}")
    if tolerance is not None and not tolerance >= 0:
        raise ProofError(f"--tolerance must be 0 or more, got {tolerance}")
    engine = engine or Engine(run_dir)
    batches = recorded_micro_batches(run_dir)
    checkpoints = run_checkpoints(run_dir)
    spans = plan(checkpoints, batches[-1].step, from_step, steps, run_dir)
    tolerance = engine.tolerance if tolerance is None else tolerance
    rows = []
    with tempfile.TemporaryDirectory(prefix="loratrace-verify-") as scratch:  # nothing is written into the run
        for span in spans:
            rows += _verify_span(engine, span, batches, checkpoints, tolerance, Path(scratch))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs.update(tolerance=tolerance, spans=[(s.start.step, s.end) for s in spans],
                       starts=len(spans), device="GPU" if engine.gpu else "CPU")
    return frame


def plan(checkpoints: list[RunCheckpoint], last_step: int, from_step: int | None, steps: int | None,
         run_dir: Path) -> list[Span]:
    """The spans to re-execute: from `from_step`'s checkpoint (which must be full), else from each full checkpoint
    before the last recorded step; `steps` long, else up to the next full checkpoint (else the last recorded step)."""
    by_step = {c.step: c for c in checkpoints}
    if from_step is not None:
        start = by_step.get(from_step)
        if start is None:
            known = ", ".join(str(c.step) for c in checkpoints if c.full) or "none"
            raise ProofError(f"{run_dir} has no checkpoint at step {from_step} (full checkpoints: {known})")
        if not start.full:
            full = [c.step for c in checkpoints if c.full and c.step < last_step]
            nearest = min(full, key=lambda s: (abs(s - from_step), s)) if full else None
            raise ProofError(f"{start.path.name} holds the LoRA weights only (checkpoint.tail=weights): a verified "
                             f"span starts at a full checkpoint" + (f", e.g. --from {nearest}" if nearest else ""))
        if start.step >= last_step:
            raise ProofError(f"step {from_step} is the last recorded step of {run_dir}: nothing to re-execute after it")
        starts = [start]
    else:
        starts = [c for c in checkpoints if c.full and c.step < last_step]
    if not starts or starts[0].step >= last_step:
        raise ProofError(f"{run_dir} has no full checkpoint before its last recorded step {last_step}: nothing to "
                         "re-execute")
    spans = []
    for start in starts:
        if steps is not None:
            end = start.step + steps
            if end > last_step:
                raise ProofError(f"--steps {steps} from step {start.step} goes past the last recorded step "
                                 f"{last_step}")
        else:
            later = [c.step for c in checkpoints if c.full and c.step > start.step]
            end = later[0] if later else max([last_step] + [c.step for c in checkpoints if c.step <= last_step])
        spans.append(Span(start, end))
    return spans


def _verify_span(engine, span: Span, batches: list[MicroBatch], checkpoints: list[RunCheckpoint],
                 tolerance: float, scratch: Path) -> list[dict]:

    first, start = span.start.step, span.start
    problem = _checkpoint_problem(engine, start)
    if problem:
        return [_checkpoint_row(first, start, None, False, problem)]
    recorded = [b for b in batches if first < b.step <= span.end]
    gaps = sorted(set(range(first + 1, span.end + 1)) - {b.step for b in recorded})
    if gaps:
        return [_step_row(first, gaps[0], [], [], tolerance, f"no recorded batches for step {gaps[0]}")]
    try:
        fed = engine.indices({(b.epoch, b.batch_idx): b.example_ids for b in recorded})
    except ValueError as exc:
        step = next(b.step for b in recorded if str(exc.args[0]) in b.example_ids)
        return [_step_row(first, step, [], [], tolerance, f"example {exc.args[0]} is not in the training data")]
    ends = [c for c in checkpoints if first < c.step <= span.end]
    capture = Capture({c.step for c in ends})
    engine.fit(start.path, span.end, fed, [capture], root_dir=scratch)
    rows = []
    for step in range(first + 1, span.end + 1):
        rows.append(_step_row(first, step, [b for b in recorded if b.step == step],
                              [r for r in capture.rows if r["step"] == step], tolerance))
        for checkpoint in (c for c in ends if c.step == step):
            rows.append(_compare_weights(engine, first, checkpoint, capture.weights.get(step), tolerance))
    return rows


def _checkpoint_problem(engine, checkpoint: RunCheckpoint) -> str | None:
    """Why a checkpoint file cannot be this run's at its step: another run wrote it, or it holds another step."""

    state = read_checkpoint(checkpoint.path)
    writer = foreign_writer(state, engine.run_dir, engine.info.get("run_id"))
    if writer is not None:
        return f"{checkpoint.path.name} was written by run {writer}"
    held = int(state.get("global_step", -1))
    if held != checkpoint.step:
        return f"{checkpoint.path.name} holds the state after step {held}, not {checkpoint.step}"
    return None


def _same(a: float | None, b: float | None, tolerance: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tolerance


def _diff(a: float | None, b: float | None) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return 0.0 if _same(a, b, 0.0) else math.inf
    return abs(a - b)


def _step_row(first: int, step: int, recorded: list[MicroBatch], replayed: list[dict], tolerance: float,
              problem: str | None = None) -> dict:
    row = {"from_step": first, "step": step, "kind": "step", "checkpoint": None}
    if problem is None and len(recorded) != len(replayed):
        problem = f"{len(replayed)} micro-batch(es) re-executed, {len(recorded)} recorded"
    if problem is not None:
        return {**row, "max_abs_diff": math.inf, "equal": False, "differs": problem}
    differs, largest, losses_diff = [], 0.0, 0.0
    for then, now in zip(recorded, replayed):
        pairs = [("loss", then.loss, now["loss"]), ("lr", then.lr, now["lr"])]
        if then.grad_norm is not None or now["grad_norm"] is not None:
            pairs.append(("grad_norm", then.grad_norm, now["grad_norm"]))
        for name, a, b in pairs:
            largest = max(largest, _diff(a, b))
            if not _same(a, b, tolerance) and name not in differs:
                differs.append(name)
        a, b = then.losses or [], now["losses"]
        losses_diff = max(losses_diff, max(map(_diff, a, b), default=0.0) if len(a) == len(b) else math.inf)
    if losses_diff > tolerance:
        differs.append("per-example losses")
    largest = max(largest, losses_diff)
    last_then, last_now = recorded[-1], replayed[-1]
    mean = (lambda values: sum(values) / len(values) if all(v is not None for v in values) else None)  # noqa: E731
    return {**row, "loss_recorded": mean([b.loss for b in recorded]), "loss_replayed": mean([r["loss"] for r in
                                                                                             replayed]),
            "grad_norm_recorded": last_then.grad_norm, "grad_norm_replayed": last_now["grad_norm"],
            "lr_recorded": last_then.lr, "lr_replayed": last_now["lr"], "losses_max_diff": losses_diff,
            "max_abs_diff": largest, "equal": not differs, "differs": _describe(differs, recorded, replayed)}


def _describe(differs: list[str], recorded: list[MicroBatch], replayed: list[dict]) -> str:
    if not differs:
        return ""
    then, now = recorded[-1], replayed[-1]
    shown = {"loss": (then.loss, now["loss"]), "lr": (then.lr, now["lr"]),
             "grad_norm": (then.grad_norm, now["grad_norm"])}
    parts = [f"{name} recorded {shown[name][0]!r}, re-executed {shown[name][1]!r}" if name in shown else name
             for name in differs]
    return "; ".join(parts)


def _checkpoint_row(first: int, checkpoint: RunCheckpoint, largest: float | None, equal: bool, differs: str) -> dict:
    return {"from_step": first, "step": checkpoint.step, "kind": "checkpoint", "checkpoint": checkpoint.path.name,
            "max_abs_diff": math.inf if largest is None else largest, "equal": equal, "differs": differs}


def _compare_weights(engine, first: int, checkpoint: RunCheckpoint, live: dict | None, tolerance: float) -> dict:
    problem = _checkpoint_problem(engine, checkpoint)
    if problem or live is None:
        return _checkpoint_row(first, checkpoint, None, False, problem or "no weights after the step")
    saved = read_checkpoint(checkpoint.path).get("state_dict", {})
    if set(saved) != set(live):
        odd = sorted(set(saved) ^ set(live))[0]
        return _checkpoint_row(first, checkpoint, None, False, f"LoRA tensor {odd} is in one of the two only")
    largest, first_differing = 0.0, None
    for key in sorted(saved):
        a, b = saved[key], live[key]
        if a.shape != b.shape:
            return _checkpoint_row(first, checkpoint, None, False, f"LoRA tensor {key} has another shape")
        gap = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        same = bool((a == b).all()) if tolerance == 0 else gap <= tolerance
        largest = max(largest, gap)
        if not same and first_differing is None:
            first_differing = key
    differs = f"LoRA tensors differ (first: {first_differing})" if first_differing else ""
    return _checkpoint_row(first, checkpoint, largest, first_differing is None, differs)


def summary(frame) -> tuple[bool, str]:
    """(identical, the one line): "verified steps 10-16 from 7 checkpoints: identical", or the first step that
    differs and what differs."""
    bad = frame[~frame.equal]
    if len(bad):
        first = bad.sort_values(["step", "from_step"], kind="stable").iloc[0]
        what = f"{first.checkpoint}: {first.differs}" if first.kind == "checkpoint" else first.differs
        return False, (f"step {int(first.step)} differs from the record (re-executed from step "
                       f"{int(first.from_step)}): {what}")
    steps = frame[frame.kind == "step"].step
    tolerance = frame.attrs.get("tolerance", 0.0)
    verdict = "identical" if tolerance == 0 else (
        f"within {tolerance:g} on the {frame.attrs.get('device', 'GPU')} (largest difference "
        f"{frame.max_abs_diff.max():.3g})")
    starts = frame.attrs.get("starts", frame.from_step.nunique())
    return True, (f"verified {steps_text(int(steps.min()), int(steps.max()))} from {starts} checkpoint"
                  f"{'s' if starts != 1 else ''}: {verdict}")

"""`loratrace verify` and `replay`: re-executing a run's recorded training (docs/ARCHITECTURE.md, "Proving and
testing the record")."""

from __future__ import annotations

import argparse
import sys

from loratrace.cli.common import emit
from loratrace.config import ConfigError
from loratrace.proof.record import steps_text

VERIFY_DESCRIPTION = """Re-execute the recorded training from a full checkpoint, fed exactly the recorded micro-batches
of the effective lineage, and compare with the record: each step's loss, grad-norm, lr and per-example losses, and
the LoRA tensors of each later checkpoint (full or weights-only). Bit for bit on the CPU; on a GPU within a stated
tolerance (deterministic algorithms on). Exit 0 with one line when everything matches, 1 naming the first step that
differs and what differs. Writes nothing."""


def add_verify(sub) -> None:
    verify = sub.add_parser("verify", help="re-execute the recorded training and compare it with the record",
                            description=VERIFY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("run", help="the run folder")
    verify.add_argument("--from", dest="from_step", type=int, metavar="STEP",
                        help="start at this full checkpoint's step (default: every full checkpoint)")
    verify.add_argument("--steps", type=int, metavar="K",
                        help="re-execute K steps from each start (default: up to the next full checkpoint)")
    verify.add_argument("--tolerance", type=float, metavar="X",
                        help="largest absolute difference accepted (default: 0 on the CPU, 1e-4 on a GPU)")
    verify.add_argument("--format", choices=("table", "json"), default="table",
                        help="table (default) or json: the per-step comparison (json on stdout, the verdict on stderr)")


def cmd_verify(args: argparse.Namespace) -> int:
    from loratrace.proof.verify import VerificationFailed, summary, verify  # torch only when this command runs

    frame = verify(args.run, args.from_step, args.steps, args.tolerance)
    identical, line = summary(frame)
    emit(frame, args.format, None)
    if not identical:
        raise VerificationFailed(line)
    print(line, file=sys.stdout if args.format == "table" else sys.stderr)
    return 0


REPLAY_DESCRIPTION = """Train a run again from its checkpoint at STEP, fed its recorded order with the named examples
removed (each affected micro-batch simply smaller), into a new run folder next to it: the same config, tracked and
checkpointed like any run, run.json saying replay_of: {run, step, dropped}. A replay that drops nothing is identical
to the original. Files hold one example id a line."""


def add_replay(sub) -> None:
    replay = sub.add_parser("replay", help="train a run again from a checkpoint with examples left out",
                            description=REPLAY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    replay.add_argument("run", help="the run folder")
    replay.add_argument("--from", dest="from_step", type=int, required=True, metavar="STEP",
                        help="start at this full checkpoint's step")
    what = replay.add_mutually_exclusive_group(required=True)
    what.add_argument("--drop", action="append", metavar="ID", help="leave out this training example (repeatable)")
    what.add_argument("--drop-file", metavar="FILE", help="leave out the example ids in FILE")
    what.add_argument("--keep-only", metavar="FILE", help="leave out every example of the replayed steps not in FILE")
    replay.add_argument("--steps", type=int, metavar="K", help="replay K steps (default: to the last recorded step)")


def _ids(path: str) -> list[str]:
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def cmd_replay(args: argparse.Namespace) -> int:
    import json

    from loratrace.proof.replay import replay  # torch only when this command runs

    drop = args.drop or (_ids(args.drop_file) if args.drop_file else [])
    keep = _ids(args.keep_only) if args.keep_only else None
    made = replay(args.run, args.from_step, drop, keep, args.steps)
    info = json.loads((made / "run.json").read_text())["replay_of"]
    print(f"replayed {steps_text(info['step'] + 1, info['end_step'])} of {info['run']} from {info['checkpoint']} "
          f"without {len(info['dropped'])} example(s) ({info['removed_from_batches']} removed from its batches): "
          f"{made}")
    return 0


def add_validate_options(influence) -> None:
    """`influence --validate` and its options (the influence parser is cli/evaluate.py's)."""
    influence.add_argument("--validate", action="store_true",
                           help="judge the method(s) against retraining: replay the tail without random subsets of its "
                                "examples and report the LDS (linear datamodeling score) with a random baseline; "
                                "results join the validations view")
    influence.add_argument("--subsets", type=int, default=10, metavar="M",
                           help="--validate: subsets dropped, one replay each (default 10)")
    influence.add_argument("--fraction", type=float, default=0.5, metavar="F",
                           help="--validate: share of the tail's training examples each subset drops (default 0.5)")
    influence.add_argument("--seed", type=int, default=0, help="--validate: seed of the subsets and random scores")
    influence.add_argument("--loo", type=int, default=0, metavar="K",
                           help="--validate: also leave out alone each test example's K most helpful and K most "
                                "harmful training examples (one replay each) and print predicted vs actual loss "
                                "change; rows join the leave_one_out view")


def cmd_validate(args: argparse.Namespace) -> int:
    from loratrace.attribution.validate import validate  # torch only when this command runs

    frame = validate(args.run, args.method, args.subsets, args.fraction, args.seed, args.split, args.example_id,
                     args.limit if args.limit is not None else 20, args.project_dim, args.batch_size, loo=args.loo)
    emit(frame, args.format if args.format != "table" else "table", None)
    if "loo" in frame.attrs and args.format == "table":  # json: the LDS rows; the leave-one-out ones are in the view
        print(f"\n== leave-one-out: {args.loo} most helpful and harmful per test example ==")
        emit(frame.attrs["loo"][["method", "test_example_id", "kind", "rank", "train_example_id",
                                 "predicted_change", "actual_change"]], "table", None)
    first = frame.iloc[0]
    print(f"LDS over {int(first.subsets)} replays of steps {int(first.from_step) + 1}-{int(first.to_step)} without "
          f"{first.fraction:g} of the tail's examples each, {int(first.tests)} {args.split} example(s); random "
          f"scores: {frame[frame.method == 'random'].lds.iloc[0]:.3f}", file=sys.stdout if args.format == "table"
          else sys.stderr)
    return 0

"""`loratrace verify` and `replay`: re-executing a run's recorded training (docs/ARCHITECTURE.md, "Proving and
testing the record")."""

from __future__ import annotations

import argparse
import sys

from loratrace.cli.common import emit

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

"""The one checkpoint selection syntax of `eval --checkpoints`, `export --checkpoints` and `influence --checkpoints`.

    all               every checkpoint (the default)
    last              the latest checkpoint
    76,100            those steps, each of which must have a checkpoint
    76..125           the checkpoints in that range (at least one)
    1..50,100,last    a mix
    final             eval only: the merged final_model/ folder (not a checkpoint file)

Without torch, so the CLI's help texts share `CHECKPOINT_SELECTION`; `training.checkpoints.select_checkpoints`
applies a selection to a run's checkpoint files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loratrace.errors import CheckpointError
from loratrace.track.schema import step_spans

CHECKPOINT_SELECTION = "all, last, steps like 76,100, a range like 76..125, or a mix like 1..50,100"
FINAL_IS_EVAL_ONLY = "final (the merged final_model/) is eval's only"


@dataclass(frozen=True)
class Selection:
    keyword: str | None = None  # "all" or "final": stands alone
    steps: frozenset[int] = frozenset()
    ranges: tuple[tuple[int, int], ...] = ()
    last: bool = False


def parse_selection(text: str, option: str = "--checkpoints") -> Selection:
    """`text` in the selection syntax; a malformed one is one CheckpointError line naming the syntax."""
    text = str(text).strip()
    if text in ("all", "final"):
        return Selection(keyword=text)
    steps, ranges, last = set(), [], False
    for item in (part.strip() for part in text.split(",")):
        if item == "last":
            last = True
            continue
        low, dots, high = item.partition("..")
        try:
            bounds = (int(low), int(high)) if dots else (int(item), int(item))
        except ValueError:
            raise CheckpointError(f"{option} {text!r}: use {CHECKPOINT_SELECTION}") from None
        if bounds[0] > bounds[1]:
            raise CheckpointError(f"{option} {item}: the range is empty (write the lower step first: "
                                  f"{bounds[1]}..{bounds[0]})")
        if dots:
            ranges.append(bounds)
        else:
            steps.add(bounds[0])
    return Selection(steps=frozenset(steps), ranges=tuple(ranges), last=last)


def choose(found: Sequence[tuple[int, Path]], text: str, where: Path, verb: str, final: bool = False,
           option: str = "--checkpoints") -> list[tuple[int, Path]]:
    """The (step, file) pairs of `found` (a run's checkpoints by step) that `text` selects; `final` allows the
    keyword final (it selects no file: the caller scores final_model/). A step without a checkpoint, a range holding
    none, or a run with none is one CheckpointError line naming what there is."""
    selection = parse_selection(text, option)
    if selection.keyword == "final":
        if not final:
            raise CheckpointError(f"{option} final: {FINAL_IS_EVAL_ONLY}; use last (the latest checkpoint), or "
                                  f"{CHECKPOINT_SELECTION}")
        return []
    if not found:
        raise CheckpointError(f"{where} has no checkpoints to {verb}")
    if selection.keyword == "all":
        return list(found)
    have = f"its {len(found)} checkpoint(s): steps {steps_text([step for step, _ in found])}"
    wanted = set(selection.steps) | ({found[-1][0]} if selection.last else set())
    if missing := sorted(wanted - {step for step, _ in found}):
        raise CheckpointError(f"{where} has no checkpoint at step {missing[0]} ({have})")
    for low, high in selection.ranges:
        if not any(low <= step <= high for step, _ in found):
            raise CheckpointError(f"{where} has no checkpoint in steps {low}..{high} ({have})")
    return [(step, path) for step, path in found
            if step in wanted or any(low <= step <= high for low, high in selection.ranges)]


def steps_text(steps: list[int]) -> str:
    """Sorted steps in the selection syntax: [2, 3, 4, 5, 9] -> "2..5,9" (so a message's list can be pasted back)."""
    return ",".join(str(low) if low == high else f"{low}..{high}" for low, high in step_spans(steps))

"""`loratrace influence --validate --loo K`: leave-one-out retraining of the examples a method ranks highest.

For each test example, the K training examples of the tail a method scores most helpful and the K it scores most
harmful are each left out alone: `replay` trains the tail again without that one example (from the tail's first full
checkpoint to the run's last checkpoint, the base model loaded once for all), and the test example's loss there is
compared with the run's own. The method predicts the change (its score: positive, helpful, so leaving it out should
raise the loss); `actual_change` is the replay's loss minus the run's. An example ranked for several test examples is
replayed once. Rows go to `tracking/loo/` (the `leave_one_out` view), one part per method and computation.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from loratrace.attribution.tracin import write_part
from loratrace.proof.replay import fed_without
from loratrace.runs.folder import utc_now
from loratrace.track import schema


def ranked(scores: np.ndarray, tail: list[str], k: int) -> list[list[tuple[str, str, int, float]]]:
    """Per test example (a column of `scores`, (tail, tests)): (train id, helpful|harmful, rank, score) of its K
    highest and K lowest scores, highest first; an example in both lists counts as helpful only."""
    out = []
    for column in scores.T:
        order = np.argsort(-column, kind="stable")
        picked = [(tail[i], "helpful", r + 1, float(column[i])) for r, i in enumerate(order[:k])]
        taken = {i for i in order[:k]}
        picked += [(tail[i], "harmful", r + 1, float(column[i])) for r, i in enumerate(order[::-1][:k])
                   if i not in taken]
        out.append(picked)
    return out


def leave_one_out(engine, truth, method: str, project_dim, scores: np.ndarray, k: int,
                  losses_now: Callable[[], np.ndarray], cache: dict, progress: bool = True) -> pa.Table:
    """One method's leave-one-out rows (written to tracking/loo/ too). `truth`: validate.Truth (its plan, tests and
    the run's own losses); `losses_now`: the test examples' losses under the engine's weights now; `cache`: the loss
    changes of examples already replayed (by train id), shared between methods."""
    from tqdm.auto import tqdm

    picks = ranked(scores, truth.tail, k)
    todo = [i for i in dict.fromkeys(p[0] for test in picks for p in test) if i not in cache]
    chosen = truth.chosen
    with tempfile.TemporaryDirectory(prefix="loratrace-loo-") as scratch:
        for train_id in tqdm(todo, desc=f"leave-one-out ({method})", disable=not progress, file=sys.stderr,
                             dynamic_ncols=True):
            engine.fit(chosen.start.path, chosen.end, fed_without(engine, chosen.batches, {train_id}), [],
                       root_dir=Path(scratch))
            cache[train_id] = losses_now() - truth.base
    rows = [{"test_example_id": test_id, "test_line": line, "train_example_id": train_id, "kind": kind,
             "rank": rank, "predicted_change": score, "actual_change": float(cache[train_id][j])}
            for j, (test_id, line) in enumerate(zip(truth.test_ids, truth.test_lines))
            for train_id, kind, rank, score in picks[j]]
    return _write(engine, truth, method, project_dim, k, rows)


def _write(engine, truth, method: str, project_dim, k: int, rows: list[dict]) -> pa.Table:
    n = len(rows)
    key = hashlib.sha256(json.dumps([method, truth.split, truth.test_ids, k, project_dim, truth.start,
                                     truth.end]).encode()).hexdigest()[:8]
    columns = {name: [row[name] for row in rows] for name in rows[0]} if rows else {}
    table = pa.table({
        "run_id": [engine.run_dir.name] * n, "method": [method] * n, "project_dim": [project_dim] * n,
        "test_split": [truth.split] * n, **{name: columns.get(name, []) for name in (
            "test_example_id", "test_line", "train_example_id", "kind", "rank", "predicted_change",
            "actual_change")},
        "from_step": [truth.start] * n, "to_step": [truth.end] * n, "computed_at": [utc_now()] * n,
    }, schema=schema.LEAVE_ONE_OUT)
    path = engine.run_dir / "tracking" / "loo" / schema.loo_part_name(method, key)
    write_part(table, path)
    return table

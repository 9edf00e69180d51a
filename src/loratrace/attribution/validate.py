"""`loratrace influence --validate`: attribution judged against real retraining on the user's own run.

    loratrace influence runs/<run> --validate --subsets 10 --fraction 0.5 --method tracin --method tracin-cp
    validate("runs/<run>", methods=["tracin"], subsets=10)      # -> DataFrame, one row per method (and "random")

The linear datamodeling score of TRAK (Park et al., 2023), with dattri's (2024) retraining as the ground truth: M
subsets of the tail's training examples (each a seeded random fraction F of the examples its micro-batches held) are
dropped by `replay` from the tail's first full checkpoint up to the run's last checkpoint. For each test example the
actual change of its loss there (the replay's minus the run's own checkpoint's, training's per-example loss without
dropout) is compared with the method's prediction: the sum of its scores (positive: helpful) over the dropped
examples, since leaving out helpful examples should raise the loss. The LDS is the mean over test examples of the
Spearman correlation between predicted and actual changes across the subsets, with a bootstrap interval over the test
examples; a random-scores baseline (seeded Gaussian scores) is scored the same way. Nothing is tuned to the test
examples. Rows go to `tracking/validations/` (the `validations` view), one part per method and computation.
`loo=K` adds leave-one-out replays of each test example's K most helpful and K most harmful examples (attribution/
loo.py): the DataFrame's `attrs["loo"]` holds their rows.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from loratrace.attribution.loo import leave_one_out
from loratrace.attribution.tracin import METHODS, InfluenceError, compute, write_part
from loratrace.data.datasets import load_split
from loratrace.data.encoding import collate, encode, padding_token_id
from loratrace.proof.engine import Engine
from loratrace.proof.record import run_checkpoints
from loratrace.proof.replay import fed_without, plan
from loratrace.runs import storage
from loratrace.runs.folder import utc_now
from loratrace.track import schema
from loratrace.training.model import load_lora_weights
from loratrace.training.module import answer_statistics

BOOTSTRAP = 1000


def validate(run: str | Path, methods: list[str] | None = None, subsets: int = 10, fraction: float = 0.5,
             seed: int = 0, split: str = "validation", example_ids: list[str] | None = None, limit: int | None = 20,
             project_dim: int | None = None, batch_size: int = 8, progress: bool = True, engine=None, loo: int = 0):
    """The LDS of each method and of random scores: a DataFrame with method, project_dim, tests, subsets, fraction,
    from_step, to_step, lds, lds_low, lds_high (95% bootstrap interval); with `loo` K > 0, `attrs["loo"]`: the
    leave-one-out rows (schema.LEAVE_ONE_OUT's columns) of every method."""
    import pandas as pd

    methods = list(dict.fromkeys(methods or METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InfluenceError(f"--method {bad[0]!r}: use one of {', '.join(METHODS)}")
    if subsets < 3:
        raise InfluenceError(f"--subsets must be at least 3 (a rank correlation over fewer says nothing), got "
                             f"{subsets}")
    if not 0 < fraction < 1:
        raise InfluenceError(f"--fraction must lie between 0 and 1, got {fraction}")
    if loo < 0:
        raise InfluenceError(f"--loo must be at least 1 (or left out), got {loo}")
    run_dir = storage.local_folder(run, "influence --validate replays a run on this machine: copy the run here first")
    engine = engine or Engine(run_dir)
    truth = ground_truth(engine, subsets, fraction, seed, split, example_ids, limit, progress)
    rows, loo_parts, replayed = [], [], {}
    for method in methods:
        frame = compute(run_dir, truth.test_ids, split, None, method, "all", project_dim, batch_size=batch_size,
                        progress=progress).frame
        scores = frame.pivot_table(index="train_example_id", columns="test_example_id", values="score",
                                   aggfunc="sum").reindex(index=truth.tail, columns=truth.test_ids).fillna(0.0)
        rows.append(_score(engine, truth, method, project_dim, scores.to_numpy()))
        if loo:
            loo_parts.append(leave_one_out(engine, truth, method, project_dim, scores.to_numpy(), loo,
                                           lambda: _losses(engine, truth.encoded), replayed, progress))
    random = np.random.default_rng(seed).standard_normal((len(truth.tail), len(truth.test_ids)))
    rows.append(_score(engine, truth, "random", None, random))
    frame = pd.DataFrame(rows)
    if loo_parts:
        frame.attrs["loo"] = pa.concat_tables(loo_parts).to_pandas()
    return frame


class Truth:
    """The retraining: which tail examples each subset dropped, and each test example's actual loss change."""

    def __init__(self, tail, test_ids, test_lines, masks, actual, start, end, fraction, seed, split):
        self.tail, self.test_ids, self.test_lines = tail, test_ids, test_lines
        self.masks, self.actual = masks, actual  # (subsets, tail) bool; (subsets, tests) float
        self.start, self.end, self.fraction, self.seed, self.split = start, end, fraction, seed, split
        self.chosen, self.encoded, self.base = None, None, None  # the replays' plan, the tests encoded, their losses


def ground_truth(engine, subsets: int, fraction: float, seed: int, split: str, example_ids, limit, progress) -> Truth:
    import tempfile

    from tqdm.auto import tqdm

    t = engine.cfg.training
    checkpoints = run_checkpoints(engine.run_dir)
    starts = [c for c in checkpoints if c.full and c.step >= t.stage1_steps and c.step < checkpoints[-1].step]
    if not starts:
        raise InfluenceError(f"{engine.run_dir} has no full checkpoint at the start of its tail (stage 2) with a later "
                             "checkpoint: nothing to replay")
    chosen = plan(engine, starts[0].step, checkpoints[-1].step - starts[0].step)
    tail = list(dict.fromkeys(i for b in chosen.batches for i in b.example_ids))
    tests = _tests(engine, split, example_ids, limit)
    test_encoded = _encode(engine, tests)
    load_lora_weights(engine.model, checkpoints[-1].path)
    base = _losses(engine, test_encoded)
    rng = np.random.default_rng(seed)
    size = max(1, round(fraction * len(tail)))
    masks = np.zeros((subsets, len(tail)), dtype=bool)
    actual = np.zeros((subsets, len(tests)))
    with tempfile.TemporaryDirectory(prefix="loratrace-validate-") as scratch:
        for m in tqdm(range(subsets), desc="replays", disable=not progress, file=sys.stderr, dynamic_ncols=True):
            masks[m, rng.choice(len(tail), size, replace=False)] = True
            dropped = {i for i, drop in zip(tail, masks[m]) if drop}
            engine.fit(chosen.start.path, chosen.end, fed_without(engine, chosen.batches, dropped), [],
                       root_dir=Path(scratch))
            actual[m] = _losses(engine, test_encoded) - base
    truth = Truth(tail, [e.example_id for e in tests], [e.line for e in tests], masks, actual, chosen.start.step,
                  chosen.end, fraction, seed, split)
    truth.chosen, truth.encoded, truth.base = chosen, test_encoded, base
    return truth


def _tests(engine, split: str, example_ids, limit):
    data = engine.cfg.data
    tests = load_split(data.dataset, data.source, split, None if example_ids else limit, notice=lambda line: None)
    if example_ids:
        by_id = {e.example_id: e for e in tests}
        missing = [i for i in example_ids if i not in by_id]
        if missing:
            raise InfluenceError(f"no example {missing[0]!r} in the {split} split")
        tests = [by_id[i] for i in dict.fromkeys(example_ids)]
    return tests


def _encode(engine, tests):
    return encode(tests, engine.tokenizer, engine.cfg.data.max_length)


def _losses(engine, encoded, batch: int = 32) -> np.ndarray:
    """Training's per-example loss of each test example under the model's weights now, without dropout."""
    import torch

    model, pad_id, out = engine.model, padding_token_id(engine.tokenizer), []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch):
                chunk = collate(encoded[start: start + batch], pad_id)
                chunk = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in chunk.items()}
                logits = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]).logits
                out += answer_statistics(logits, chunk)["losses"].double().cpu().tolist()
    finally:
        model.train(was_training)
    return np.array(out)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    import pandas as pd

    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _score(engine, truth: Truth, method: str, project_dim: int | None, scores: np.ndarray) -> dict:
    """One method's LDS from its (tail, tests) scores; its per-test-example rows written to tracking/validations/."""
    predicted = truth.masks.astype(float) @ scores  # (subsets, tests): the scores summed over each dropped set
    per_test = np.array([spearman(predicted[:, j], truth.actual[:, j]) for j in range(len(truth.test_ids))])
    lds, low, high = _interval(per_test, truth.seed)
    _write(engine, truth, method, project_dim, per_test, (lds, low, high))
    return {"method": method, "project_dim": project_dim, "tests": len(truth.test_ids), "subsets": len(truth.masks),
            "fraction": truth.fraction, "from_step": truth.start, "to_step": truth.end, "lds": lds,
            "lds_low": low, "lds_high": high}


def _interval(per_test: np.ndarray, seed: int) -> tuple[float, float, float]:
    """The mean over test examples (those whose correlation is defined) and its 95% bootstrap interval."""
    values = per_test[~np.isnan(per_test)]
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _write(engine, truth: Truth, method: str, project_dim, per_test, summary) -> None:
    n = len(truth.test_ids)
    lds, low, high = summary
    key = hashlib.sha256(json.dumps([method, truth.split, truth.test_ids, len(truth.masks), truth.fraction,
                                     truth.seed, project_dim, truth.start, truth.end]).encode()).hexdigest()[:8]
    run_id = engine.run_dir.name
    table = pa.table({
        "run_id": [run_id] * n, "method": [method] * n, "project_dim": [project_dim] * n,
        "test_split": [truth.split] * n, "test_example_id": truth.test_ids, "test_line": truth.test_lines,
        "subsets": [len(truth.masks)] * n, "fraction": [truth.fraction] * n, "seed": [truth.seed] * n,
        "from_step": [truth.start] * n, "to_step": [truth.end] * n, "spearman": per_test.tolist(),
        "lds": [lds] * n, "lds_low": [low] * n, "lds_high": [high] * n, "computed_at": [utc_now()] * n,
    }, schema=schema.VALIDATIONS)
    path = engine.run_dir / "tracking" / "validations" / schema.validations_part_name(method, key)
    write_part(table, path)

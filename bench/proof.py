"""verify, replay and influence --validate on the default job: `python -m bench.proof [--quick] [--run RUN]`.

  verify      seconds per re-executed step (`loratrace.verify` over every span of the tail, the base model loaded
              once, not counted) / the training's own seconds per tail step (median gap between the tracked rows'
              wall times): the goal is ~1x, a re-executed step is one training step plus a Trainer's restore
  replay      tail steps per second of `replays` with nothing dropped (three in one process, the base model loaded
              once), and seconds per replay of the whole tail
  LDS         `influence --validate` of tracin, tracin-cp and random scores: --subsets 10 --fraction 0.5, the first
              20 validation examples, seed 0 (nothing chosen after seeing a result); each `--project-dim K` adds the
              same methods with their gradients projected to K dimensions (the same seed: the same subsets)

Trains the default job (tracked) unless `--run` names one; `--quick` uses a 16-update tiny run and 3 subsets
instead (a smoke test of the harness, not a figure). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _train(quick: bool, runs_dir: Path) -> Path:
    import loratrace

    extra = ["training.batch_size=8", "training.max_steps=16", "training.stage1_steps=8"] if quick else []
    cfg = loratrace.load_config(None, ["tracking.enabled=true", "logging.swanlab=false", f"runs_dir={runs_dir}",
                                       *extra])
    return loratrace.train(cfg, progress=False)


def _training_step_s(run: Path, first: int) -> float:
    """The training's own seconds per tail step: the median gap between consecutive steps' wall times."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run / "tracking" / "batches", columns=["step", "wall_time"]).to_pylist()
    times = {r["step"]: r["wall_time"] for r in rows}
    gaps = [(times[s] - times[s - 1]).total_seconds() for s in sorted(times) if s > first + 1 and s - 1 in times]
    return statistics.median(gaps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 16-update tiny run, 3 subsets: a smoke test")
    parser.add_argument("--run", help="an existing tracked run to measure (default: train the default job)")
    parser.add_argument("--method", action="append", choices=("tracin", "tracin-cp"),
                        help="methods whose LDS is measured (default both; tracin-cp takes every training example's "
                             "gradient at every checkpoint: the longest part)")
    parser.add_argument("--project-dim", type=int, action="append", default=[], metavar="K",
                        help="also measure the methods with gradients projected to K dimensions (repeatable)")
    args = parser.parse_args(argv)
    import pandas as pd

    from loratrace.attribution.validate import validate
    from loratrace.proof.engine import Engine
    from loratrace.proof.replay import replays
    from loratrace.proof.verify import summary, verify

    with tempfile.TemporaryDirectory(prefix="bench-proof-") as scratch:
        run = Path(args.run) if args.run else _train(args.quick, Path(scratch) / "runs")
        started = time.perf_counter()
        engine = Engine(run)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        frame = verify(run, engine=engine)
        verify_s = time.perf_counter() - started
        identical, line = summary(frame)
        steps = int((frame.kind == "step").sum())
        first = int(frame.from_step.min())
        train_step = _training_step_s(run, first)
        started = time.perf_counter()
        made = replays(run, first, [[], [], []], engine=engine)
        replay_s = (time.perf_counter() - started) / len(made)
        tail = frame.step.max() - first
        lds = pd.concat([validate(run, args.method, subsets=3 if args.quick else 10, limit=5 if args.quick else 20,
                                  project_dim=k, progress=False, engine=engine)
                         for k in [None, *args.project_dim]], ignore_index=True).drop_duplicates(
            subset=["method", "project_dim"])  # each call scores random too: once is enough
    rows = [
        ("model loaded once (verify, replay and validate share it)", f"{load_s:.1f} s", ""),
        (f"verify: {line}", f"{verify_s:.1f} s for {steps} step(s)", ""),
        ("verify per step / training step (tail median)", f"{verify_s / steps * 1000:.0f} ms / "
                                                          f"{train_step * 1000:.0f} ms",
         f"{verify_s / steps / train_step:.2f}x"),
        (f"replay of the tail ({tail} steps), nothing dropped, mean of 3 in one process", f"{replay_s:.1f} s",
         f"{tail / replay_s:.1f} steps/s"),
    ]
    for r in lds.itertuples():
        projected = "" if r.project_dim is None or r.project_dim != r.project_dim else f" k={int(r.project_dim)}"
        rows.append((f"LDS {r.method}{projected}: {r.tests} tests, {r.subsets} subsets of {r.fraction:g}, "
                     f"steps {r.from_step + 1}-{r.to_step}",
                     f"{r.lds:.3f}", f"95% CI {r.lds_low:.3f} to {r.lds_high:.3f}"))
    print("| figure | measured | ratio / interval |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())

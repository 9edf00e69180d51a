"""Tracking overhead per rank, 2 processes against 1: `python -m bench.launchers [--steps N] [--repeats N]`.

Every arm is a real `torchrun --standalone --nproc_per_node P` launch of loratrace's recipe on the tiny preset (gloo,
CPU, batch 8 per rank): P = 1 or 2, tracking off or on, interleaved (1-off, 1-on, 2-off, 2-on, ...). Each rank times
its own updates after `SKIP` warm-up ones (`bench.arms.StepTimer`) and, tracked, reads its own tracker's accounting
(`BatchTracker.cost()`: hook time on the training thread, writer CPU); `python -m bench.launchers --rank-worker`
is that worker. Prints a Markdown table per rank: update time tracked / untracked (median over repeats), and the
tracker's accounted share of the untracked update.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(out: Path, overrides: list[str]) -> None:
    """One rank of one arm: train, then write this rank's timing to `out/rank{r}.json`."""
    import lightning as L

    import loratrace
    from bench.arms import QUIET, StepTimer
    from loratrace.config import load_config
    from loratrace.track.tracker import BatchTracker

    cfg = load_config(None, [*QUIET, *overrides])
    timer = StepTimer(cfg.training.max_steps, cuda=False)

    class Report(L.Callback):
        def on_train_end(self, trainer, pl_module):
            tracker = next((c for c in trainer.callbacks if isinstance(c, BatchTracker)), None)
            facts = {"rank": trainer.global_rank, "world_size": trainer.world_size, **timer.clock.result(),
                     "cost": tracker.cost() if tracker is not None else None}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))

    loratrace.train(cfg, progress=False, callbacks=[timer, Report()])


def launch(processes: int, tracked: bool, steps: int, runs_dir: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    overrides = [f"runs_dir={runs_dir}", "training.accelerator=cpu", f"training.devices={processes}",
                 "training.batch_size=8", f"training.max_steps={steps}", f"training.stage1_steps={steps // 2}",
                 f"tracking.enabled={str(tracked).lower()}", "tracking.flush_every_steps=10"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "bench.launchers", "--rank-worker", str(out), *overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench.launchers: {processes} process(es), tracking {tracked}: exit {result.returncode}\n"
                         + result.stderr[-3000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.launchers", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="updates per launch (the first few are not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="launches of each arm")
    parser.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.rank_worker:
        worker(args.rank_worker, overrides)
        return
    arms: dict[tuple[int, bool], list[list[dict]]] = {(p, t): [] for p in (1, 2) for t in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for (processes, tracked), results in arms.items():
                out = Path(tmp) / f"{processes}-{tracked}-{repeat}"
                results.append(launch(processes, tracked, args.steps, Path(tmp) / "runs", out))
    print(table(arms, args.steps, args.repeats))


def table(arms: dict, steps: int, repeats: int) -> str:
    rows = []
    for processes in (1, 2):
        for rank in range(processes):
            off = statistics.median(r[rank]["step_s"] for r in arms[(processes, False)]) * 1e3
            on = statistics.median(r[rank]["step_s"] for r in arms[(processes, True)]) * 1e3
            costs = [r[rank]["cost"] for r in arms[(processes, True)]]
            hooks = statistics.median(c["training_thread_s"] / c["updates"] for c in costs) * 1e3
            writer = statistics.median(c["background_cpu_s"] / c["updates"] for c in costs) * 1e3
            rows.append(f"| {processes} | {rank} | {on:.1f} ms / {off:.1f} ms | {on / off:.3f} | "
                        f"({hooks:.2f} + {writer:.2f} ms) / {off:.1f} ms | {1 + hooks / off:.3f}-"
                        f"{1 + (hooks + writer) / off:.3f} |")
    from bench.arms import SKIP

    header = (f"`python -m bench.launchers` on {platform.machine()} ({os.cpu_count()} cores), "
              f"python {platform.python_version()}; tiny preset, batch 8 per rank, gloo, {steps} updates "
              f"({steps - SKIP} timed), {repeats} launches of each arm, median")
    return "\n".join([header, "", "| processes | rank | update time tracked / untracked | ratio | tracker's "
                      "accounting: (hooks + writer CPU) per update / untracked update | accounted ratio |",
                      "|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()

"""Compare and report on two long runs: `python -m bench.reports [--steps 10000] [--batch 32] [--out DIR]`.

Writes two synthetic tracked runs (what the tracker would write: one batches part per 500 steps, examples, a checkpoint
per step of the last 50, every checkpoint scored on 500 examples, run.json with its tracking cost) that differ in seed
(their data order diverges at step 1) and learning rate, then times `loratrace.compare` and `loratrace.write_report`
over both and measures the report's size. Prints a Markdown table; bench/RESULTS.md holds the latest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa

import loratrace
from loratrace.config import load_config, save_config
from loratrace.track import schema

EXAMPLES = 2000   # distinct training examples: 10,000 steps x 32 = 160 epochs over them
EVAL_EXAMPLES = 500
STEPS_PER_PART = 500


def synthetic_run(runs_dir: Path, name: str, steps: int, batch: int, seed: int, lr: float) -> Path:
    run_dir = runs_dir / name
    tracking = run_dir / "tracking"
    (run_dir / "checkpoints").mkdir(parents=True)
    stage1 = max(steps - 50, 0)
    cfg = load_config(None, [f"training.seed={seed}", f"training.learning_rate_stage1={lr}",
                             f"training.max_steps={steps}", f"training.stage1_steps={stage1}",
                             f"training.batch_size={batch}", f"runs_dir={runs_dir}"])
    save_config(cfg, run_dir / "config.yaml")
    now = dt.datetime.now(dt.timezone.utc)
    cost = {"updates": steps, "train_wall_s": steps * 0.05, "training_thread_s": steps * 0.0005,
            "background_cpu_s": steps * 0.002, "end_s": 1.5, "training_thread_share": 0.01, "background_share": 0.04}
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": name, "dataset": "arc-challenge", "method": "lora", "created_at": now.isoformat(), "status":
        "completed", "steps": steps, "attempts": [{"started_at": now.isoformat(), "status": "completed",
                                                   "tracking_cost": cost}]}))
    rng = random.Random(seed)
    ids = [f"SYN_{i:05d}" for i in range(EXAMPLES)]
    schema.write_atomic(pa.Table.from_pylist([
        {"run_id": name, "example_id": e, "line": i, "split": "train", "dataset": "arc-challenge", "gold": "A",
         "n_choices": 4, "n_target_tokens": 1, "prompt_sha256": "0" * 64, "prompt": f"question {i}"}
        for i, e in enumerate(ids)], schema=schema.EXAMPLES), tracking / schema.EXAMPLES_FILE)
    schema.write_atomic(pa.Table.from_pylist([{"run_id": name, "attempt": 0, "parent_attempt": None,
                                               "started_at": now, "resumed_from": None, "resumed_step": 0,
                                               "world_size": 1, "host": platform.node()}], schema=schema.ATTEMPTS),
                        tracking / "attempts" / schema.attempts_part_name(0))
    order: list[int] = []
    rows = []
    for step in range(1, steps + 1):
        if len(order) < batch:
            epoch = list(range(EXAMPLES))
            rng.shuffle(epoch)
            order += epoch
        lines, order = order[:batch], order[batch:]
        p_gold = [min(1.0, rng.random() * step / steps + 0.25) for _ in lines]
        rows.append({"run_id": name, "attempt": 0, "step": step, "micro_batch": 0, "rank": 0,
                     "epoch": (step * batch) // EXAMPLES, "batch_idx": step - 1, "stage": 1 if step <= stage1 else 2,
                     "example_ids": [ids[i] for i in lines], "lines": lines,
                     "losses": [-float(p) for p in p_gold], "p_gold": p_gold, "correct": [p > 0.5 for p in p_gold],
                     "loss": 1.0 / step ** 0.3, "grad_norm": 1.0 + rng.random(), "lr": lr if step <= stage1 else lr / 2,
                     "n_tokens": batch * 100, "n_target_tokens": batch, "wall_time": now})
        if step % STEPS_PER_PART == 0 or step == steps:
            schema.write_atomic(pa.Table.from_pylist(rows, schema=schema.BATCHES),
                                tracking / "batches" / schema.batches_part_name(0, 0, step // STEPS_PER_PART))
            rows = []
    for step in range(stage1 + 1, steps + 1):
        path = f"checkpoints/checkpoint-step-{step:03d}.ckpt"
        schema.write_atomic(pa.Table.from_pylist([{"run_id": name, "attempt": 0, "step": step, "path": path,
                                                   "bytes": 100_000, "created_at": now}], schema=schema.CHECKPOINTS),
                            tracking / "checkpoints" / schema.checkpoints_part_name(0, step))
        evals = [{"run_id": name, "checkpoint_step": step, "checkpoint_path": path, "split": "validation",
                  "scoring": "label", "example_id": f"VAL_{i:04d}", "line": i, "gold": "A", "pred": "A",
                  "correct": rng.random() < 0.6, "p_gold": rng.random(), "choice_logliks": [-1.0, -2.0, -3.0, -4.0],
                  "evaluated_at": now} for i in range(EVAL_EXAMPLES)]
        schema.write_atomic(pa.Table.from_pylist(evals, schema=schema.EVALS),
                            tracking / "evals" / schema.evals_part_name(step, now, f"{step:08x}"[-8:]))
    return run_dir


def measure(steps: int, batch: int, out: Path) -> dict:
    runs_dir = out / "runs"
    a = synthetic_run(runs_dir, "bench_lora_A", steps, batch, seed=1, lr=1e-3)
    b = synthetic_run(runs_dir, "bench_lora_B", steps, batch, seed=2, lr=2e-3)
    started = time.perf_counter()
    comparison = loratrace.compare([a, b])
    compare_s = time.perf_counter() - started
    started = time.perf_counter()
    report = loratrace.write_report([a, b], out / "report.html")
    report_s = time.perf_counter() - started
    assert comparison.data_order.first_divergent_step.iloc[0] == 1
    return {"steps": steps, "batch": batch, "compare_s": compare_s, "report_s": report_s,
            "report_bytes": report.stat().st_size, "browser_s": browser_load(report)}


def browser_load(report: Path) -> float | None:
    """Seconds from opening the report in headless Chromium to every plot drawn (None: no Chromium or Playwright)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        started = time.perf_counter()
        page.goto(report.resolve().as_uri())
        page.wait_for_function("[...document.querySelectorAll('div.plot')].every(e => e.querySelector('.main-svg'))")
        elapsed = time.perf_counter() - started
        browser.close()
    return elapsed


def table(result: dict) -> str:
    rows = [("runs", f"2 synthetic runs, {result['steps']:,} steps x {result['batch']} examples each "
                     f"({2 * result['steps'] * result['batch']:,} sample rows)"),
            ("`loratrace.compare` (all sections)", f"{result['compare_s']:.2f} s"),
            ("`loratrace.write_report`", f"{result['report_s']:.2f} s"),
            ("report file size", f"{result['report_bytes']:,} B ({result['report_bytes'] / 1e6:.1f} MB)"),
            ("report opened in headless Chromium until every plot is drawn",
             f"{result['browser_s']:.2f} s" if result["browser_s"] is not None else "(no Chromium here)")]
    return "| figure | measured |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", help="keep the runs and report here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out) if args.out else Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        print(table(measure(args.steps, args.batch, out)), end="")


if __name__ == "__main__":
    main()

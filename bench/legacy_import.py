"""`import-legacy` at scale: `python -m bench.legacy_import [--steps 100000] [--batch 32]`.

Writes a synthetic legacy folder the way the traditional script laid it out (JSONL of `steps` lines x `batch`
examples over the bundled sample's 400 rows, both JSON mappings, a checkpoint every 2,000 steps named in the mapping;
no checkpoint folders: their conversion is per checkpoint, not per step), then measures side by side:

  import throughput   legacy steps per second through `import_legacy` (rows, examples, mappings recomputed and
                      cross-checked, trace's samples index), and the CPU seconds it took: on a shared machine the
                      wall time is inflated, the CPU time much less
  bytes               tracking/ Parquet (batches parts) vs the legacy JSONL
  trace               `open_runs(...).trace(id)` over the imported run vs `grep | jq` over the JSONL, same example
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

DATASET = "arc-challenge"
ROWS = 400  # the bundled sample's train split
SAVE_EVERY = 2_000


def write_synthetic_legacy(root: Path, steps: int, batch: int, seed: int = 0) -> Path:
    folder = root / "icoding" / DATASET / "icoding_20250720_143052_lora"
    (folder / "logs").mkdir(parents=True)
    config = {"model": {"model_name_or_path": "tiny"}, "data": {"dataset_name": DATASET, "source": "sample"},
              "training": {"per_device_train_batch_size": batch, "max_steps": steps, "stage1": {"steps": steps // 2}}}
    (folder / "training_config.yaml").write_text(yaml.safe_dump(config))
    rng = random.Random(seed)
    per_epoch = -(-ROWS // batch)
    lines: dict[int, list[int]] = {}
    saved = list(range(SAVE_EVERY, steps + 1, SAVE_EVERY)) or [steps]
    with open(folder / "logs" / f"batch_tracking_{DATASET}.jsonl", "w") as file:
        order: list[int] = []
        for step in range(1, steps + 1):
            position = (step - 1) % per_epoch
            if position == 0:
                order = rng.sample(range(ROWS), ROWS)
            rows = order[position * batch: (position + 1) * batch]
            for row in rows:
                lines.setdefault(row + 1, []).append(step)
            file.write(json.dumps({
                "step": step, "epoch": (step - 1) // per_epoch, "batch_idx": position, "sample_indices": rows,
                "line_numbers": [r + 1 for r in rows], "sample_ids": [f"LTSYN_TRA_{r:04d}" for r in rows],
                "loss": 2.0 - step / steps, "learning_rate": 1e-4, "grad_norm": 0.5 + rng.random(),
                "timestamp": f"2025-07-20T14:{(step // 60) % 60:02d}:{step % 60:02d}"}) + "\n")
    mapping = {f"checkpoint-{s}": {"step": s, "path": f"checkpoints/checkpoint-{s}",
                                   "steps": list(range((saved[i - 1] if i else 0) + 1, s + 1))}
               for i, s in enumerate(saved)}
    (folder / "logs" / f"checkpoint_mapping_{DATASET}.json").write_text(json.dumps(mapping))
    line_mapping = {}
    for line, trained in lines.items():
        first = next((s for s in saved if s >= trained[0]), None)
        line_mapping[str(line)] = {"first_checkpoint": f"checkpoint-{first}" if first else None, "steps": trained,
                                   "checkpoints": [f"checkpoint-{s}" for s in saved if first and s >= first]}
    (folder / "logs" / f"line_checkpoint_mapping_{DATASET}.json").write_text(json.dumps(line_mapping))
    return folder


def measure(steps: int, batch: int, work: Path) -> dict:
    import loratrace
    from loratrace.legacy.importer import import_legacy

    started = time.perf_counter()
    folder = write_synthetic_legacy(work / "experiments", steps, batch)
    written_s = time.perf_counter() - started
    jsonl = folder / "logs" / f"batch_tracking_{DATASET}.jsonl"
    started, cpu = time.perf_counter(), time.process_time()
    report = import_legacy(folder, work / "runs")
    import_s, import_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    run_dir = Path(report["run_dir"])
    parquet_bytes = sum(p.stat().st_size for p in (run_dir / "tracking" / "batches").glob("*.parquet"))
    target = "LTSYN_TRA_0017"
    with loratrace.open_runs(run_dir, read_only=True) as db:
        started = time.perf_counter()
        traced = db.trace(target)
        first_trace_s = time.perf_counter() - started
        trace_s = min(_timed(lambda: db.trace(target)) for _ in range(5))
    pipeline = f"grep -F '\"{target}\"' {jsonl} | jq -c '{{step, loss}}' > /dev/null"
    grep_s = min(_timed(lambda: subprocess.run(pipeline, shell=True, check=True)) for _ in range(3))
    return {"steps": steps, "batch": batch, "write_s": written_s, "import_s": import_s, "import_cpu_s": import_cpu_s,
            "steps_per_s": steps / import_s, "jsonl_bytes": jsonl.stat().st_size, "parquet_bytes": parquet_bytes,
            "trace_rows": len(traced), "first_trace_ms": first_trace_s * 1e3, "trace_ms": trace_s * 1e3,
            "grep_ms": grep_s * 1e3, "disagreements": report["mappings"]["disagreements_total"]}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def table(m: dict) -> str:
    rows = [
        (f"import throughput, {m['steps']:,} steps x {m['batch']} examples",
         f"{m['import_s']:.1f} s ({m['import_cpu_s']:.1f} s CPU)", f"{m['steps_per_s']:,.0f} steps/s"),
        ("tracking Parquet (batches) / legacy JSONL bytes", f"{m['parquet_bytes']:,} / {m['jsonl_bytes']:,}",
         f"{m['parquet_bytes'] / m['jsonl_bytes']:.3f}"),
        (f"grep | jq over the legacy JSONL / trace of the imported run ({m['trace_rows']:,} rows)",
         f"{m['grep_ms']:.0f} ms / {m['trace_ms']:.1f} ms (first {m['first_trace_ms']:.0f} ms)",
         f"{m['grep_ms'] / m['trace_ms']:.0f}x"),
    ]
    lines = ["| figure | measured | ratio |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        m = measure(args.steps, args.batch, Path(work))
    print(table(m))
    print(f"\n(synthetic folder written in {m['write_s']:.1f} s; mapping disagreements: {m['disagreements']}; load "
          f"average at the end: {' '.join(f'{load:.2f}' for load in os.getloadavg())})")


if __name__ == "__main__":
    main()

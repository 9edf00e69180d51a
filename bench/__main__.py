"""Side-by-side benchmarks: `python -m bench [--quick] [--out bench/out]`.

Each figure is a ratio of two arms measured in the same process run, arms interleaved so that machine drift hits
both. Prints a Markdown table; `bench/RESULTS.md` holds the latest one with the machine it ran on.

  tracking overhead   fit step time with tracking / without, tiny preset and a larger CPU model (goal <= 1.02)
  checkpoint bytes    .ckpt / (trainable parameters x 12 bytes) (goal <= 1.1, plus a constant for loop/RNG state)
  full vs LoRA ckpt   a full-model Lightning checkpoint / loratrace's, Qwen2.5-0.5B shape, random weights (>= 50x)
  seed tail           the 50 stage-2 checkpoints of the default job, total bytes
  trace latency       `trace` over 10M sample rows through the library (goal <= 100 ms), vs grep | jq (>= 50x)
  CLI start-up        `loratrace query "SELECT 1"` over the trace run, end to end (goal <= 0.5 s), vs a bare python
                      that imports what the query path needs (duckdb, pyarrow.parquet, yaml)
  evaluation          examples per second scored, batched vs one at a time
  vs HF Trainer       step time of a plain transformers.Trainer + PEFT script / loratrace's, tracked (>= 1.0)
  resume cost         start of a resume to its first new update, at step 10 vs 10,000 of one long epoch (~1), and
                      the same for the HF Trainer's resume, which skips the epoch's trained batches
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

import loratrace
from bench.arms import QUIET, accounted_overhead, accounted_row, fit_timing, hf_trainer, hf_trainer_timing
from loratrace.config import load_config


def tracking_overhead(runs_dir: Path, model: list[str], steps: int, repeats: int) -> dict:
    base = [f"training.max_steps={steps}", f"training.stage1_steps={steps // 2}", *model]
    arms, tracked = {"off": [], "on": []}, []
    for _ in range(repeats):  # interleaved: off, on, off, on ...
        for arm, tracking in (("off", ["tracking.enabled=false"]),
                              ("on", ["tracking.enabled=true", "tracking.flush_every_steps=10"])):
            timing = fit_timing(runs_dir, [*base, *tracking])
            arms[arm].append(timing["step_s"])
            if arm == "on":
                tracked.append(timing["run"])
    # Each tracked run against the untracked run just before it: drift of the machine between pairs cancels out.
    ratios = sorted(on / off for off, on in zip(arms["off"], arms["on"]))
    return {"off_ms": statistics.median(arms["off"]) * 1e3, "on_ms": statistics.median(arms["on"]) * 1e3,
            "ratio": statistics.median(ratios), "low": ratios[0], "high": ratios[-1], "pairs": len(ratios),
            "accounted": accounted_overhead(tracked, statistics.median(arms["off"]))}


def checkpoint_bytes(runs_dir: Path, steps: int) -> dict:
    cfg = load_config(None, ["logging.swanlab=false", f"runs_dir={runs_dir}", f"training.max_steps={steps}",
                             f"training.stage1_steps={max(0, steps - 50)}"])
    run = loratrace.train(cfg, progress=False)
    info = json.loads((run / "run.json").read_text())
    sizes = [p.stat().st_size for p in (run / "checkpoints").glob("*.ckpt")]
    return {"trainable": info["trainable_parameters"], "ckpt_bytes": max(sizes), "files": len(sizes),
            "tail_bytes": sum(sizes), "ratio": max(sizes) / (info["trainable_parameters"] * 12)}


def qwen_shape_ratio(lora_overrides: list[str]) -> dict:
    """Full-model checkpoint (all weights + the same optimizer state) vs loratrace's LoRA-only one, bf16 weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from loratrace.config import TrainingConfig
    from loratrace.training.model import SHAPES, add_lora
    from loratrace.training.module import LoRAModule

    shape = Qwen2Config(**SHAPES["qwen2.5-0.5b"][1])
    with torch.device("meta"):
        meta_model = Qwen2ForCausalLM(shape)
    full_weights = sum(p.numel() * 2 for p in meta_model.state_dict().values())  # bf16
    model = Qwen2ForCausalLM(shape).to(torch.bfloat16)
    lora = load_config(None, lora_overrides).lora
    module = LoRAModule(add_lora(model, lora, seed=0), TrainingConfig())
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    for p in trainable:  # materialize Adam's moments as a real step would
        p.grad = torch.zeros_like(p)
    optimizer.step()
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    lora_bytes = buffer.tell()
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if isinstance(t, torch.Tensor))
    return {"full_bytes": full_weights + optimizer_bytes, "lora_bytes": lora_bytes,
            "ratio": (full_weights + optimizer_bytes) / lora_bytes, "trainable": sum(p.numel() for p in trainable)}


def synthetic_run(root: Path, n_samples: int, batch_size: int = 32, n_examples: int = 100_000,
                  rows_per_part: int = 2_000) -> Path:
    """A tracked run of `n_samples` sample rows written with loratrace's own atomic part writer (arrays built
    vectorized: generating 10M Python objects would measure the generator, not the store)."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa

    from loratrace.track import schema
    run = root / "synthetic_lora_20250720_000000"
    tracking = run / "tracking"
    rng = np.random.default_rng(0)
    n_rows = n_samples // batch_size
    order = np.concatenate([rng.permutation(n_examples) for _ in range(-(-n_samples // n_examples))])[:n_samples]
    ids = pa.array([f"EX{i:06d}" for i in range(n_examples)])
    now = dt.datetime(2025, 7, 20, tzinfo=dt.timezone.utc)
    for part, start in enumerate(range(0, n_rows, rows_per_part)):
        rows = np.arange(start, min(n_rows, start + rows_per_part))
        flat = order[rows[0] * batch_size: (rows[-1] + 1) * batch_size]
        offsets = pa.array(np.arange(0, len(flat) + 1, batch_size, dtype=np.int32))
        n = len(rows)
        table = pa.table({
            "run_id": pa.array([run.name] * n), "attempt": pa.array(np.zeros(n, np.int32)),
            "step": pa.array(rows + 1), "micro_batch": pa.array(np.zeros(n, np.int32)),
            "rank": pa.array(np.zeros(n, np.int32)),
            "epoch": pa.array((rows * batch_size // n_examples).astype(np.int32)),
            "batch_idx": pa.array(rows), "stage": pa.array(np.ones(n, np.int8)),
            "example_ids": pa.ListArray.from_arrays(offsets, ids.take(pa.array(flat))),
            "lines": pa.ListArray.from_arrays(offsets, pa.array(flat.astype(np.int64))),
            "losses": pa.ListArray.from_arrays(offsets, pa.array(rng.random(len(flat), np.float32))),
            "p_gold": pa.ListArray.from_arrays(offsets, pa.array(rng.random(len(flat), np.float32))),
            "correct": pa.ListArray.from_arrays(offsets, pa.array(rng.random(len(flat)) > 0.5)),
            "loss": pa.array(rng.random(n, np.float32)), "grad_norm": pa.array(rng.random(n, np.float32)),
            "lr": pa.array(np.full(n, 1e-4)), "n_tokens": pa.array(np.full(n, 4096)),
            "n_target_tokens": pa.array(np.full(n, batch_size)),
            "wall_time": pa.array([now] * n, pa.timestamp("us", "UTC")),
        }).cast(schema.BATCHES)
        schema.write_atomic(table, tracking / "batches" / schema.batches_part_name(0, 0, part))
    steps = list(range(1000, n_rows + 1, 1000)) or [n_rows]
    schema.write_atomic(pa.Table.from_pylist(
        [{"run_id": run.name, "attempt": 0, "step": s, "path": f"checkpoints/checkpoint-step-{s:03d}.ckpt",
          "bytes": 1, "created_at": now} for s in steps], schema=schema.CHECKPOINTS),
        tracking / "checkpoints" / schema.checkpoints_part_name(0, steps[-1]))
    schema.write_atomic(pa.Table.from_pylist(
        [{"run_id": run.name, "attempt": 0, "parent_attempt": None, "started_at": now, "resumed_from": None,
          "resumed_step": 0, "world_size": 1, "host": "bench"}], schema=schema.ATTEMPTS),
        tracking / "attempts" / schema.attempts_part_name(0))
    known = {"run_id": pa.array([run.name] * n_examples), "example_id": ids,
             "line": pa.array(np.arange(n_examples, dtype=np.int64))}
    schema.write_atomic(pa.table([known.get(f.name, pa.nulls(n_examples, f.type)) for f in schema.EXAMPLES],
                                 schema=schema.EXAMPLES), tracking / schema.EXAMPLES_FILE)
    return run


def legacy_jsonl(run: Path, path: Path) -> None:
    """The same rows as the traditional script's batch_tracking JSONL, for grep/jq."""
    import pyarrow.parquet as pq

    with open(path, "w") as f:
        for part in sorted((run / "tracking" / "batches").glob("*.parquet")):
            table = pq.read_table(part, columns=["step", "epoch", "batch_idx", "example_ids", "lines", "loss", "lr"])
            for row in table.to_pylist():
                f.write(json.dumps({"step": row["step"], "epoch": row["epoch"], "batch_idx": row["batch_idx"],
                                    "sample_indices": row["lines"], "line_numbers": [x + 1 for x in row["lines"]],
                                    "sample_ids": row["example_ids"], "loss": row["loss"],
                                    "learning_rate": row["lr"]}) + "\n")


def _best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def trace_latency(root: Path, n_samples: int) -> dict:
    import subprocess

    from loratrace.query.index import write_samples_index
    from loratrace.query.store import open_runs

    run = synthetic_run(root, n_samples)
    start = time.perf_counter()
    write_samples_index(run)
    index_s = time.perf_counter() - start
    jsonl = root / "batch_tracking.jsonl"
    legacy_jsonl(run, jsonl)  # meanwhile the run's folders settle, as they have in any finished run
    target = "EX004242"
    pipeline = f"grep -F '\"{target}\"' {jsonl} | jq -c '{{step, loss}}' > /dev/null"
    grep_s = _best_of(lambda: subprocess.run(pipeline, shell=True, check=True), repeats=3)
    db = open_runs(run, read_only=True)
    start = time.perf_counter()
    frame = db.trace(target)  # the first call also lists the runs and finds their indexes
    first_s = time.perf_counter() - start
    trace_s = _best_of(lambda: db.trace(target))
    db.close()
    return {"samples": n_samples, "exposures": len(frame), "index_s": index_s, "trace_ms": trace_s * 1e3,
            "first_ms": first_s * 1e3, "grep_ms": grep_s * 1e3, "ratio": grep_s / trace_s,
            **cli_startup(run, repeats=5)}


def cli_startup(run: Path, repeats: int) -> dict:
    """Best of `repeats` wall times, arms interleaved: the CLI's `query "SELECT 1"` over `run`, and a bare python that
    only imports the modules the query path cannot do without (the floor)."""
    import subprocess
    import sys

    arms = {"cli": [sys.executable, "-m", "loratrace", "query", "SELECT 1", "--runs-dir", str(run)],
            "floor": [sys.executable, "-c", "import duckdb, pyarrow.parquet, yaml"]}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, command in arms.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    return {"cli_s": min(times["cli"]), "floor_s": min(times["floor"])}


def eval_throughput(runs_dir: Path, limit: int) -> dict:
    """Examples per second scored, batched (32) vs one at a time, same model and examples."""
    from loratrace.evaluate import Evaluator
    from loratrace.training.model import load_run_model

    cfg = load_config(None, ["logging.swanlab=false", f"runs_dir={runs_dir}", "training.max_steps=2",
                             "training.stage1_steps=1", f"eval.limit={limit}"])
    run = loratrace.train(cfg, progress=False)
    model, tokenizer = load_run_model(cfg, run)
    speeds = {}
    for batch_size in (32, 1, 32, 1):  # interleaved
        evaluator = Evaluator(cfg, tokenizer, cfg.eval.__class__(limit=limit, batch_size=batch_size))
        start = time.perf_counter()
        evaluator.score(model)
        speeds.setdefault(batch_size, []).append(limit / (time.perf_counter() - start))
    batched, single = max(speeds[32]), max(speeds[1])
    return {"batched": batched, "single": single, "ratio": batched / single}


def throughput_vs_baseline(runs_dir: Path, model: list[str], steps: int, repeats: int) -> dict:
    shared = [f"training.max_steps={steps}", f"training.stage1_steps={steps // 2}", *model]
    ours, theirs = [], []
    for _ in range(repeats):  # interleaved
        theirs.append(hf_trainer_timing(runs_dir, shared)["step_s"])
        ours.append(fit_timing(runs_dir, [*shared, "tracking.enabled=true"])["step_s"])
    return {"ours_ms": statistics.median(ours) * 1e3, "hf_ms": statistics.median(theirs) * 1e3,
            "ratio": statistics.median(theirs) / statistics.median(ours)}


# ---------------------------------------------------------------- resume cost

LONG_EPOCH = ["model.tiny_hidden_size=32", "model.tiny_layers=1", "data.max_length=64", "training.batch_size=1",
              *QUIET]


def long_epoch_data(root: Path, n_rows: int) -> Path:
    """A folder holding an ARC-format train split of `n_rows` rows (the bundled sample's questions, cycled under new
    ids), so that one epoch at batch size 1 is longer than the resume points measured."""
    from loratrace.data.datasets import SAMPLE_DIR

    folder = root / "long-epoch"
    folder.mkdir(exist_ok=True)
    sample = [json.loads(line) for line in (SAMPLE_DIR / "train.jsonl").read_text().splitlines()]
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n_rows):
            f.write(json.dumps({**sample[i % len(sample)], "id": f"LONG_{i:06d}"}) + "\n")
    return folder


class FirstStep(L.Callback):
    """The wall clock at the end of the first update of this launch."""

    def __init__(self):
        self.at: float | None = None
        self.step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.at is None:
            self.at, self.step = time.perf_counter(), trainer.global_step


def loratrace_resume(runs_dir: Path, data: Path, step: int) -> Callable[[], float]:
    """Train a tracked run to `step` (one checkpoint there); the returned call times `train(resume_from=...)` from
    the call to the end of the first new update: model and data set-up, checkpoint load, loader restore, tracker."""
    overrides = [f"runs_dir={runs_dir}", f"data.source={data}", "tracking.enabled=true", *LONG_EPOCH]
    cfg = load_config(None, [*overrides, f"training.max_steps={step}", f"training.stage1_steps={step}"])
    checkpoint = loratrace.train(cfg, progress=False) / "checkpoints" / f"checkpoint-step-{step:03d}.ckpt"
    resume_cfg = load_config(None, [*overrides, f"training.max_steps={step + 2}", f"training.stage1_steps={step}"])

    def resume() -> float:
        first = FirstStep()
        start = time.perf_counter()
        loratrace.train(resume_cfg, resume_from=checkpoint, progress=False, callbacks=[first])
        if first.step != step + 1:
            raise RuntimeError(f"resumed at step {step} but the first new update was {first.step}")
        return first.at - start

    return resume


def hf_resume(runs_dir: Path, data: Path, step: int) -> Callable[[], float]:
    """The same with a plain `transformers.Trainer` + PEFT script (`bench.arms.hf_trainer`): train to `step` and save
    a Trainer checkpoint; the returned call times a fresh script (model, data, Trainer) from its start to the end of
    the first new update after `trainer.train(resume_from_checkpoint=...)`, which skips the epoch's first `step`
    batches."""
    from transformers import TrainerCallback

    output = runs_dir / f"hf-resume-{step}"
    marks: list[tuple[float, int]] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), state.global_step))
            control.should_save = state.global_step == step

    def script(max_steps: int, checkpoint: str | None) -> None:
        cfg = load_config(None, [f"data.source={data}", *LONG_EPOCH, f"training.max_steps={max_steps}",
                                 f"training.stage1_steps={max_steps}"])
        hf_trainer(cfg, output, Marks()).train(resume_from_checkpoint=checkpoint)

    script(step, None)

    def resume() -> float:
        marks.clear()
        start = time.perf_counter()
        script(step + 2, str(output / f"checkpoint-{step}"))
        if marks[0][1] != step + 1:
            raise RuntimeError(f"the Trainer resumed at step {step} but its first new update was {marks[0][1]}")
        return marks[0][0] - start

    return resume


def resume_cost(runs_dir: Path, early: int, late: int, repeats: int) -> dict:
    """Seconds from a resume's start to its first new update, at `early` and `late` steps of one long epoch."""
    data = long_epoch_data(runs_dir, late + 500)
    arms = {"ours_early": loratrace_resume(runs_dir, data, early), "ours_late": loratrace_resume(runs_dir, data, late),
            "hf_early": hf_resume(runs_dir, data, early), "hf_late": hf_resume(runs_dir, data, late)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved
        for name, resume in arms.items():
            times[name].append(resume())
    return {"early": early, "late": late, **{name: statistics.median(t) for name, t in times.items()}}

def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps the harness from rotting")
    args = parser.parse_args()
    steps, repeats = (12, 1) if args.quick else (80, 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp)
        for name, model in [("tiny preset (h64, 2 layers)", ["model.tiny_hidden_size=64"]),
                            ("larger CPU model (h512, 6 layers)", ["model.tiny_hidden_size=512", "model.tiny_layers=6",
                                                                   "training.batch_size=16"])]:
            if args.quick and "larger" in name:
                continue
            r = tracking_overhead(runs_dir, model, steps, repeats * (2 if "tiny" in name else 1))
            rows.append((f"tracking overhead, {name}: median of {r['pairs']} paired ratios (range)",
                         f"{r['on_ms']:.1f} ms / {r['off_ms']:.1f} ms",
                         f"{r['ratio']:.3f} ({r['low']:.3f}-{r['high']:.3f})", "<= 1.02"))
            rows.append(accounted_row(name.split(" (")[0], r["accounted"]))
        larger = ["model.tiny_hidden_size=512", "model.tiny_layers=6", "training.batch_size=16"]
        b = throughput_vs_baseline(runs_dir, [] if args.quick else larger, steps, min(repeats, 3))
        rows.append(("throughput: loratrace (tracked) / HF Trainer + PEFT, same model, data, batch, steps",
                     f"{b['ours_ms']:.1f} ms / {b['hf_ms']:.1f} ms per step", f"{b['ratio']:.2f}", ">= 1.0"))
        c = checkpoint_bytes(runs_dir, 16 if args.quick else 125)
        rows.append(("checkpoint / (trainable x 12 B), tiny", f"{c['ckpt_bytes']:,} B / {c['trainable'] * 12:,} B",
                     f"{c['ratio']:.2f}", "<= 1.1 + constant"))
        rows.append(("seed tail: stage-2 checkpoints, total", f"{c['files']} files, {c['tail_bytes']:,} B", "", ""))
        t = trace_latency(runs_dir, 200_000 if args.quick else 10_000_000)
        rows.append((f"trace over {t['samples']:,} sample rows (library, index built in {t['index_s']:.1f} s)",
                     f"{t['trace_ms']:.1f} ms for {t['exposures']} exposures (first call {t['first_ms']:.0f} ms)", "",
                     "<= 100 ms"))
        rows.append(("grep | jq over the legacy JSONL / trace", f"{t['grep_ms']:.0f} ms / {t['trace_ms']:.1f} ms",
                     f"{t['ratio']:.0f}x", ">= 50x"))
        rows.append((f"CLI start-up: `loratrace query 'SELECT 1'` over the {t['samples']:,}-sample run / python "
                     "importing duckdb + pyarrow + yaml", f"{t['cli_s'] * 1e3:.0f} ms / {t['floor_s'] * 1e3:.0f} ms",
                     f"{t['cli_s'] / t['floor_s']:.2f}", "<= 500 ms"))
        r = resume_cost(runs_dir, 10, 200 if args.quick else 10_000, 1 if args.quick else 3)
        rows.append((f"resume: start to first new update, at step {r['late']:,} / at step {r['early']} of one epoch",
                     f"{r['ours_late']:.2f} s / {r['ours_early']:.2f} s", f"{r['ours_late'] / r['ours_early']:.2f}",
                     "~1"))
        rows.append((f"resume, HF Trainer + PEFT (skips batches): at step {r['late']:,} / at step {r['early']}",
                     f"{r['hf_late']:.2f} s / {r['hf_early']:.2f} s", f"{r['hf_late'] / r['hf_early']:.2f}", ""))
        rows.append((f"resume at step {r['late']:,}: HF Trainer / loratrace",
                     f"{r['hf_late']:.2f} s / {r['ours_late']:.2f} s", f"{r['hf_late'] / r['ours_late']:.2f}", ""))
        e = eval_throughput(runs_dir, 32 if args.quick else 100)
        rows.append(("evaluation, tiny preset: batched (32) / one by one",
                     f"{e['batched']:.0f} / {e['single']:.0f} examples/s", f"{e['ratio']:.1f}x", ""))
    if not args.quick:
        for label, lora in (("default LoRA, r=8 on q/k/v/o", []),
                            ("configs/arc-challenge.yaml's LoRA, r=16 on all 7 linear layers",
                             ["lora.r=16", "lora.alpha=32", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,"
                              "gate_proj,up_proj,down_proj]"])):
            q = qwen_shape_ratio(lora)
            rows.append((f"full-model ckpt / loratrace ckpt, Qwen2.5-0.5B shape, {label}",
                         f"{q['full_bytes']:,} B / {q['lora_bytes']:,} B", f"{q['ratio']:.0f}x", ">= 50x"))
            rows.append((f"loratrace ckpt / (trainable x 12 B), Qwen2.5-0.5B shape, {label}",
                         f"{q['lora_bytes']:,} B / {q['trainable'] * 12:,} B",
                         f"{q['lora_bytes'] / (q['trainable'] * 12):.3f}", "<= 1.1"))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print("| figure | measured | ratio | goal |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

"""GPU figures on a Qwen2.5-0.5B-shaped model in bf16: `bench/gpu.sh OUT_DIR` (which runs `python -m bench.gpu`).

  1  tracking overhead   update time with tracking / without                                     (goal <= 1.02)
  2  checkpoint bytes    .ckpt / (trainable x 12 B); a full-model checkpoint of the run / loratrace's .ckpt (>= 50x)
  5  vs HF Trainer       update time of transformers.Trainer + PEFT (bf16 autocast) / loratrace's, tracked (>= 1.0)
     tokens/s and model FLOP utilisation (MFU) of every arm

Arms alternate (off, on, hf, off, on, hf, ...); each trains `--steps` updates, the second half saving a checkpoint
after every update as the seed did. Weights are random (built from the shape offline), the tokenizer is the tiny
preset's, the data the bundled sample. `--device cpu --quick` runs the same code at a tiny size (the smoke test).

MFU counts the FLOPs the recipe needs, whatever an arm spends: per padded token 4 x the decoder's matmul
parameters (forward, and the backward to activations: the base is frozen, LoRA's own weight gradients are
negligible), 12 x layers x hidden x length for attention, and the LM head's 4 x parameters at the two positions
per example the loss reads (the answer's position and its target). Peak: dense bf16 of the GPU (`--peak-tflops`).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import lightning as L
import torch

from bench.arms import accounted_overhead, accounted_row, fit_timing, hf_trainer_timing
from loratrace.config import load_config

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
                    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific first
        if key in name:
            return value
    return None


def recipe_flops(cfg, timing: dict) -> float:
    """FLOPs the counted updates need (see the module docstring), from the model's shape."""
    from loratrace.training.model import build_tiny_model

    with torch.device("meta"):
        model = build_tiny_model(cfg.model, vocab_size=1024)
    c = model.config
    head = c.vocab_size * c.hidden_size
    body = sum(m.weight.numel() for name, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear))
    examples = timing["steps"] * cfg.training.batch_size * cfg.training.accumulate_grad_batches
    return (4 * body * timing["padded"] + 12 * c.num_hidden_layers * c.hidden_size * timing["attention"]
            + 4 * head * 2 * examples)


class FullCheckpoint(L.Callback):
    """Writes, at the end of training, what a full-model Lightning checkpoint of the run would hold: every weight
    (the frozen base included) and the optimizer state."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save({"state_dict": pl_module.state_dict(),
                    "optimizer_states": [o.state_dict() for o in trainer.optimizers]}, self.path)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for results.md and results.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: keeps the script from rotting")
    parser.add_argument("--steps", type=int, default=None, help="updates per arm (default 60, quick 12)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each arm (default 3, quick 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, if not known")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench.gpu: no CUDA device visible (torch.cuda.is_available() is False); "
                       "use --device cpu --quick for the smoke run\n")
    steps = args.steps or (12 if args.quick else 60)
    repeats = args.repeats or (1 if args.quick else 3)
    model = ["model.tiny_hidden_size=64"] if args.quick else ["model.tiny_shape=qwen2.5-0.5b"]
    precision = ["model.dtype=bfloat16", "training.precision=bf16-mixed"]  # on CPU too: the smoke run checks it
    shared = [*model, *precision, f"training.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
              f"training.batch_size={args.batch_size}", f"training.max_steps={steps}",
              f"training.stage1_steps={steps // 2}"]
    cfg = load_config(None, shared)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if args.device == "cuda" else None)
    args.out.mkdir(parents=True, exist_ok=True)

    arms: dict[str, list[dict]] = {"off": [], "on": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp)
        full = FullCheckpoint(runs_dir / "full.ckpt")
        for repeat in range(repeats):  # interleaved; the table is rewritten after each round, so a run cut short
            arms["off"].append(fit_timing(runs_dir, [*shared, "tracking.enabled=false"]))  # still leaves one
            extra = [full] if repeat == 0 else []
            arms["on"].append(fit_timing(runs_dir, [*shared, "tracking.enabled=true"], callbacks=extra))
            arms["hf"].append(hf_trainer_timing(runs_dir, shared))
            if repeat == 0:
                run = arms["on"][0]["run"]
                sizes = {"trainable": json.loads((run / "run.json").read_text())["trainable_parameters"],
                         "ckpt_bytes": max(p.stat().st_size for p in (run / "checkpoints").glob("*.ckpt")),
                         "full_bytes": full.path.stat().st_size}
                full.path.unlink()
            setting = (f"{'tiny preset' if args.quick else 'Qwen2.5-0.5B shape'}, batch {args.batch_size}, {steps} "
                       f"updates ({steps // 2} checkpointed), {repeat + 1} of {repeats} runs of each arm, median")
            report(args.out, cfg, arms, sizes, device_name, peak, setting)


def report(out: Path, cfg, arms: dict[str, list[dict]], sizes: dict, device_name: str, peak: float | None,
           setting: str) -> None:
    """Write results.md and results.json, and print the table."""

    def summary(name: str) -> dict:
        chosen = sorted(arms[name], key=lambda t: t["step_s"])[len(arms[name]) // 2]  # the median run
        flops = recipe_flops(cfg, chosen) / chosen["seconds"]
        return {"step_ms": chosen["step_s"] * 1e3, "tokens_s": chosen["tokens"] / chosen["seconds"],
                "tflops": flops / 1e12, "mfu": flops / (peak * 1e12) if peak else None}

    s = {name: summary(name) for name in arms}
    accounted = accounted_overhead([t["run"] for t in arms["on"]], s["off"]["step_ms"] / 1e3)
    ckpt, full_bytes, trainable = sizes["ckpt_bytes"], sizes["full_bytes"], sizes["trainable"]
    rows = [
        ("tracking overhead: update time tracked / untracked",
         f"{s['on']['step_ms']:.1f} ms / {s['off']['step_ms']:.1f} ms",
         f"{s['on']['step_ms'] / s['off']['step_ms']:.3f}", "<= 1.02"),
        accounted_row("Qwen2.5-0.5B shape" if cfg.model.tiny_shape != "none" else "tiny preset", accounted),
        (".ckpt / (trainable x 12 B)", f"{ckpt:,} B / {trainable * 12:,} B", f"{ckpt / (trainable * 12):.2f}",
         "<= 1.1"),
        ("full-model checkpoint / loratrace .ckpt", f"{full_bytes:,} B / {ckpt:,} B", f"{full_bytes / ckpt:.0f}x",
         ">= 50x"),
        ("throughput: loratrace (tracked) / HF Trainer + PEFT", f"{s['on']['step_ms']:.1f} ms / "
         f"{s['hf']['step_ms']:.1f} ms per update", f"{s['hf']['step_ms'] / s['on']['step_ms']:.2f}", ">= 1.0"),
    ]
    for name, label in (("off", "loratrace, untracked"), ("on", "loratrace, tracked"), ("hf", "HF Trainer + PEFT")):
        mfu = f"{s[name]['mfu']:.1%}" if s[name]["mfu"] is not None else "n/a (peak unknown: --peak-tflops)"
        rows.append((f"{label}: tokens/s, model TFLOP/s, MFU", f"{s[name]['tokens_s']:,.0f} tokens/s, "
                     f"{s[name]['tflops']:.3g} TFLOP/s", mfu, ""))
    header = (f"`bench/gpu.sh` on {device_name}" + (f" (peak {peak:g} TFLOP/s bf16 dense)" if peak else "")
              + f"; torch {torch.__version__}, python {platform.python_version()}; {setting}")
    table = "\n".join([header, "", "| figure | measured | ratio | goal |", "|---|---|---|---|",
                       *("| " + " | ".join(row) + " |" for row in rows)])
    (out / "results.md").write_text(table + "\n")
    facts = {"device": device_name, "peak_tflops": peak, "setting": setting, "arms": s,
             "accounted_overhead": accounted, **sizes}
    (out / "results.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(table, flush=True)

if __name__ == "__main__":
    main()

"""1-GPU FSDP smoke run: `python -m bench.fsdp_smoke --out OUT` (bench/gpu.sh runs it before the figures).

Trains the tiny preset, tracked, with `training.strategy=fsdp` on one CUDA device and checks what FSDP could break:

  1  every checkpoint holds the LoRA tensors only, whole (FSDP's full state dict, gathered on rank 0), and one AdamW
     state per LoRA tensor of the same shape
  2  a resume from a middle checkpoint ends in the same LoRA tensors as the uninterrupted run
  3  final_adapter/ holds the last checkpoint's tensors (exported from them: FSDP's own parameters are shards)
  4  `loratrace eval` scores the last checkpoint

Lightning runs FSDP on CUDA only; `--device cpu` runs the same checks under `ddp` (one process), which keeps the
script from rotting on a machine without a GPU. Writes OUT/fsdp_smoke.md; exits 1 naming the first check that failed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import traceback
from pathlib import Path

import torch

import loratrace
from loratrace.config import load_config

STEPS = ["training.max_steps=6", "training.stage1_steps=3", "training.batch_size=8", "lora.dropout=0.0"]
QUIET = ["logging.swanlab=false", "logging.tensorboard=false", "export.merged_model=false", "tracking.enabled=true"]


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def check(results: list[str], name: str, ok: bool, detail: str) -> None:
    results.append(f"| {name} | {'ok' if ok else 'FAILED'} | {detail} |")
    if not ok:
        raise AssertionError(f"{name}: {detail}")


def run_checks(runs_dir: Path, overrides: list[str], results: list[str]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from loratrace.evaluate import evaluate_run
    from loratrace.training.model import add_lora, load_base

    cfg = load_config(None, [*QUIET, *STEPS, f"runs_dir={runs_dir}", *overrides])
    run = loratrace.train(cfg, progress=False)
    checkpoints = run / "checkpoints"
    last = lora_tensors(checkpoints / "checkpoint-step-006.ckpt")
    reference = add_lora(load_base(cfg.model)[0], cfg.lora, cfg.training.seed)
    trainable = {f"model.{name}": p.shape for name, p in reference.named_parameters() if p.requires_grad}
    shapes = {name: tuple(t.shape) for name, t in last.items()}
    check(results, "1 checkpoint = LoRA tensors, whole", shapes == {k: tuple(v) for k, v in trainable.items()},
          f"{len(shapes)} tensors saved, {len(trainable)} trainable, of the model's shapes")
    optimizer = torch.load(checkpoints / "checkpoint-step-006.ckpt", map_location="cpu",
                           weights_only=True)["optimizer_states"][0]["state"]
    moments = sorted(tuple(s["exp_avg"].shape) for s in optimizer.values())
    check(results, "1 optimizer state = one AdamW state per LoRA tensor",
          moments == sorted(tuple(v) for v in trainable.values()), f"{len(moments)} states")

    resumed = loratrace.train(cfg, resume_from=checkpoints / "checkpoint-step-004.ckpt", progress=False)
    again = lora_tensors(resumed / "checkpoints" / "checkpoint-step-006.ckpt")
    differences = torch.cat([(again[k].float() - last[k].float()).abs().flatten() for k in last])
    apart = (differences > 1e-5).float().mean().item()  # CUDA kernels may add in another order: a few, not many
    check(results, "2 resume from step 4 = uninterrupted at step 6", resumed == run and apart <= 1e-3,
          f"largest difference {differences.max().item():.2e}, {apart:.3%} of values apart by more than 1e-5")

    adapter = load_file(run / "final_adapter" / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(load_base(cfg.model)[0], run / "final_adapter")
    exported = {f"model.{k}": v for k, v in model.state_dict().items() if "lora_" in k}
    same = exported.keys() == again.keys() and all(torch.equal(exported[k].cpu(), again[k].cpu()) for k in again)
    check(results, "3 final_adapter = last checkpoint", same and len(adapter) == len(again),
          f"{len(adapter)} adapter tensors")

    scores = evaluate_run(run, "last", ["eval.limit=32"], progress=False)
    accuracy = float(scores.accuracy.iloc[-1]) if len(scores) else -1.0
    check(results, "4 loratrace eval reads the checkpoint", 0.0 <= accuracy <= 1.0,
          f"accuracy {accuracy:.3f} on 32 validation questions")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fsdp_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench.fsdp_smoke: no CUDA device visible; use --device cpu for the smoke run\n")
    strategy = "fsdp" if args.device == "cuda" else "ddp"
    overrides = [f"training.strategy={strategy}", "training.devices=1",
                 f"training.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    results: list[str] = []
    failed = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_checks(Path(tmp), overrides, results)
        except AssertionError as exc:
            failed = str(exc)
        except Exception as exc:  # noqa: BLE001 - a crash under the strategy is the smoke run's finding
            traceback.print_exc()
            failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    table = "\n".join([f"`bench/fsdp_smoke.py` on {device}, training.strategy={strategy}, torch {torch.__version__}",
                       "", "| check | result | detail |", "|---|---|---|", *results])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp_smoke.md").write_text(table + "\n")
    print(table, flush=True)
    if failed:
        print(f"bench.fsdp_smoke: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

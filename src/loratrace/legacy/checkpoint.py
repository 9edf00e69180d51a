"""A Hugging Face Trainer `checkpoint-N/` folder (PEFT adapter, optimizer.pt, scheduler.pt, rng_state.pth,
trainer_state.json) as a loratrace `.ckpt` that plain `loratrace train --resume-from-checkpoint` continues from.

    state = convert_trainer_checkpoint(folder, cfg, run_id="arc-challenge_lora_20250720_143052", position=...)
    write_checkpoint(state, run_dir / "checkpoints" / checkpoint_name(state["global_step"]))

What a Lightning `.ckpt` of loratrace holds (`LoRAModule.on_save_checkpoint`): the trainable tensors under `model.`,
AdamW's state as one parameter group, the LambdaLR position, the fit loop's counters with the `EpochLoader`'s place,
the RNG, and the tracker's attempt. What a Trainer folder cannot give (an optimizer that is not AdamW, LoRA tensors
of other shapes) is one `LegacyError` line: never a silent restart from scratch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratrace.config import Config
from loratrace.errors import LoratraceError, first_line
from loratrace.training.model import add_lora, load_base

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}


class LegacyError(LoratraceError):
    """A legacy folder or Trainer checkpoint that cannot be converted as asked."""


class StateNotCarried(LegacyError):
    """A Trainer checkpoint whose training state loratrace cannot continue (an optimizer that is not AdamW, ...): the
    import reports it and converts the rest; a resume from it stops with this line."""


def is_trainer_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in ADAPTER_FILES)


def checkpoint_step(folder: Path) -> int:
    """N of `checkpoint-N/`, else trainer_state.json's global_step."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(folder).name)
    if match:
        return int(match.group(1))
    step = _trainer_state(Path(folder)).get("global_step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
        raise LegacyError(f"{folder}: neither named checkpoint-<step> nor holding trainer_state.json's global_step "
                          "(a whole number from 1)")
    return step


@dataclass
class LoaderPosition:
    """Where the data order stands after step N: the legacy epoch, the batch index of step N in it, and the batches
    (rows of the training split) that finish that epoch. `batches` empty: the epoch is unknown or complete."""

    epoch: int = 0
    batch_in_epoch: int = -1
    batches: list[list[int]] = field(default_factory=list)


def _trainer_state(folder: Path) -> dict:
    path = folder / "trainer_state.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LegacyError(f"{path}: not readable JSON ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise LegacyError(f"{path}: expected a JSON object (the Trainer's state)")
    return state


def _load(path: Path) -> Any:
    """A torch file of the Trainer, loaded without running pickled code (numpy's RNG arrays allowed)."""
    np_core = getattr(np, "_core", None) or np.core
    allowed = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        first = first_line(exc)
        raise LegacyError(f"{path}: not a readable torch file ({first})") from None


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors under loratrace's state_dict names (`model.` + PEFT's module path with the adapter
    name `default`, as `LoRAModule` holds them)."""
    folder = Path(folder)
    if (folder / ADAPTER_FILES[0]).is_file():
        from safetensors.torch import load_file

        try:
            weights = load_file(folder / ADAPTER_FILES[0])
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise LegacyError(f"{folder / ADAPTER_FILES[0]}: not a readable safetensors file ({exc})") from None
    elif (folder / ADAPTER_FILES[1]).is_file():
        weights = _load(folder / ADAPTER_FILES[1])
    else:
        raise LegacyError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    renamed = {}
    for key, tensor in weights.items():
        name = re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)",
                      r".\1.default\2", key)
        renamed[f"model.{name}"] = tensor
    return renamed


def _adamw_state(folder: Path, trainable: list[str]) -> dict:
    """optimizer.pt as loratrace's one-group AdamW state; `trainable`: the model's trainable names, in the order
    its optimizer takes them (the Trainer's groups hold them in the same order, split by weight decay)."""
    optimizer = _load(folder / "optimizer.pt")
    groups = optimizer.get("param_groups", []) if isinstance(optimizer, dict) else []
    state = optimizer.get("state", {}) if isinstance(optimizer, dict) else {}
    foreign = sorted({key for per_param in state.values() for key in per_param} - ADAM_STATE)
    if not groups or foreign or any("betas" not in g for g in groups) or \
            any(g.get("decoupled_weight_decay") is False and g.get("weight_decay") for g in groups):
        what = f"its state has {', '.join(foreign)}" if foreign else "its parameter groups are not AdamW's"
        raise StateNotCarried(f"{folder / 'optimizer.pt'} is not AdamW state ({what}); loratrace trains with AdamW "
                              "and cannot carry this optimizer over")
    ordered = [index for group in groups for index in group["params"]]
    if len(ordered) != len(trainable):
        raise LegacyError(f"{folder / 'optimizer.pt'} holds {len(ordered)} parameters, the configured model trains "
                          f"{len(trainable)} (lora.r or lora.target_modules differ)")
    used = [g for g in groups if g["params"]]
    hyper = {k: v for k, v in used[0].items() if k != "params"}
    differing = [k for g in used[1:] for k, v in g.items() if k != "params" and v != hyper.get(k)]
    if differing:
        raise StateNotCarried(f"{folder / 'optimizer.pt'}: its parameter groups differ in {differing[0]}; "
                              "loratrace's optimizer has one group")
    hyper["fused"] = None  # loratrace's AdamW is not fused; the moments carry over as they are
    return {"state": {position: state[index] for position, index in enumerate(ordered) if index in state},
            "param_groups": [{**hyper, "params": list(range(len(ordered)))}]}


def _scheduler_state(folder: Path, step: int, lr_stage1: float) -> dict:
    """LambdaLR's position (loratrace recomputes the factor from its own schedule: `learning_rate_at`)."""
    saved = _load(folder / "scheduler.pt") if (folder / "scheduler.pt").is_file() else {}
    try:
        last_lr = saved.get("_last_lr") or [None]
        return {"base_lrs": [lr_stage1], "last_epoch": int(saved.get("last_epoch", step)),
                "_step_count": int(saved.get("_step_count", step + 1)), "_is_initial": False,
                "_get_lr_called_within_step": False, "_last_lr": [last_lr[0]], "lr_lambdas": [None]}
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):  # not a scheduler's state_dict
        raise LegacyError(f"{folder / 'scheduler.pt'}: not a learning-rate scheduler's state") from None


def _rng_states(folder: Path) -> dict | None:
    """rng_state.pth as `loratrace.training.module.rng_state()` holds it; None when the folder has none."""
    path = folder / "rng_state.pth"
    if not path.is_file():
        return None
    saved = _load(path)
    try:
        kind, key, pos, has_gauss, cached = saved["numpy"]
        state = {"torch": saved["cpu"], "python": saved["python"],
                 "numpy": (kind, torch.from_numpy(np.asarray(key).astype(np.int64)), int(pos), int(has_gauss),
                           float(cached))}
    except (KeyError, TypeError, ValueError, IndexError):  # a file of the right name, not the Trainer's content
        raise LegacyError(f"{path}: not the Trainer's RNG state (cpu, python and numpy generators)") from None
    if "cuda" in saved:
        cuda = saved["cuda"]
        state["cuda"] = cuda if isinstance(cuda, list) else [cuda]
    return state


def _fit_loop(step: int, position: LoaderPosition, loader: dict) -> dict:
    """The fit loop's counters as Lightning saves them in `on_train_batch_end` of update `step` (accumulation 1). The
    `current` (this epoch's) counters are all 0 when the position in the epoch is unknown: a fresh epoch."""
    done_in_epoch = position.batch_in_epoch + 1

    def batches(total: int, current: int) -> dict:
        return {"total": {"ready": total, "completed": total - 1, "started": total, "processed": total},
                "current": {"ready": current, "completed": max(current - 1, 0), "started": current,
                            "processed": current},
                "is_last_batch": False}

    def two(total: int, current: int) -> dict:
        return {"total": {"ready": total, "completed": total}, "current": {"ready": current, "completed": current}}

    def three(total: int, current: int) -> dict:
        return {"total": {"ready": total, "completed": total, "started": total},
                "current": {"ready": current, "completed": current, "started": current}}

    epoch = position.epoch
    nothing = dict.fromkeys(("ready", "completed", "started", "processed"), 0)  # no validation runs
    return {
        "state_dict": {"combined_loader": [loader]},
        "epoch_loop.state_dict": {"_batches_that_stepped": step - 1},
        "epoch_loop.batch_progress": batches(step, done_in_epoch),
        "epoch_loop.scheduler_progress": two(step, done_in_epoch),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {
            "optimizer": {"step": two(step, done_in_epoch), "zero_grad": three(step, done_in_epoch)}},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": two(0, 0),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {"total": dict(nothing), "current": dict(nothing),
                                               "is_last_batch": False},
        "epoch_progress": {"total": {"ready": epoch + 1, "completed": epoch, "started": epoch + 1, "processed": epoch},
                           "current": {"ready": epoch + 1, "completed": epoch, "started": epoch + 1,
                                       "processed": epoch}},
    }


def convert_trainer_checkpoint(folder: Path, cfg: Config, trainable: dict[str, tuple], position: LoaderPosition,
                               tracked_run_id: str | None = None) -> dict:
    """The `.ckpt` dict for Trainer checkpoint `folder`. `trainable`: the configured model's trainable tensor names
    under `model.` -> shapes (`trainable_shapes`); `tracked_run_id`: the imported run whose attempt 0 the checkpoint
    continues (None: no tracking history)."""
    import lightning

    folder = Path(folder)
    if not is_trainer_checkpoint(folder):
        raise LegacyError(f"{folder}: not a Trainer checkpoint folder (no adapter_model.safetensors or .bin)")
    if not (folder / "optimizer.pt").is_file():
        raise StateNotCarried(f"{folder}: no optimizer.pt; a resume needs the optimizer's state")
    step = checkpoint_step(folder)
    weights = adapter_weights(folder)
    missing = sorted(set(trainable) - set(weights))
    if missing:
        raise LegacyError(f"{folder}: the adapter lacks {missing[0]} (lora.r or lora.target_modules differ)")
    for name, shape in trainable.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise LegacyError(f"{folder}: LoRA tensor {name} has shape {tuple(weights[name].shape)}, the configured "
                              f"base expects {tuple(shape)} (lora.r or model.name differ)")
    loader = {"epoch": position.epoch, "offset": position.batch_in_epoch + 1, "seed": cfg.training.seed,
              "world_size": 1}
    if position.batches:
        loader["legacy"] = {"epoch": position.epoch, "start": position.batch_in_epoch + 1,
                            "batches": position.batches}
    state = {
        "epoch": position.epoch, "global_step": step, "pytorch-lightning_version": lightning.__version__,
        "state_dict": {name: weights[name] for name in trainable},
        "loops": {"fit_loop": _fit_loop(step, position, loader)},
        "callbacks": ({f"BatchTracker[{tracked_run_id}]": {"attempt": 0, "run_id": tracked_run_id}}
                      if tracked_run_id else {}),
        "optimizer_states": [_adamw_state(folder, list(trainable))],
        "lr_schedulers": [_scheduler_state(folder, step, cfg.training.learning_rate_stage1)],
        "legacy_source": str(folder.resolve()),
    }
    rng = _rng_states(folder)
    if rng is not None:
        state["rng_states"] = rng
    return state


def write_checkpoint(state: dict, path: Path) -> int:
    """torch.save under a temporary name, then rename: the file appears whole or not at all. Returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def trainable_shapes(cfg: Config) -> dict[str, tuple]:
    """The configured model's trainable tensor names under `model.` -> shape, in its optimizer's order (builds the
    model)."""
    import warnings

    with warnings.catch_warnings():  # PEFT's own deprecated call: nothing a user can act on (as while training)
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*is deprecated.*")
        model, _ = load_base(cfg.model)
        peft_model = add_lora(model, cfg.lora, cfg.training.seed)
    return {f"model.{name}": tuple(p.shape) for name, p in peft_model.named_parameters() if p.requires_grad}

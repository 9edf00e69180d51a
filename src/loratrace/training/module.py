"""The LightningModule: one forward pass gives the training loss, each example's loss, p(gold) and correctness.

Checkpoints hold only what changes: the trainable (LoRA) tensors, optimizer, scheduler, loop and RNG state. The
frozen base model is named in the config and rebuilt on load, never copied into a `.ckpt`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from typing_extensions import override

from loratrace.config import TrainingConfig
from loratrace.errors import CheckpointError
from loratrace.track.step_outputs import HostValues, StepOutputs, gradient_norm
from loratrace.training.checkpoints import is_weights_only


def learning_rate_at(step: int, t: TrainingConfig) -> float:
    """Learning rate applied by update `step` (1-based): stage 1 up to `stage1_steps`, then stage 2.

    Inside each stage: linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at the stage's end.
    """
    if step <= t.stage1_steps:
        peak, position, length = t.learning_rate_stage1, step - 1, t.stage1_steps
    else:
        peak, position, length = t.learning_rate_stage2, step - 1 - t.stage1_steps, t.max_steps - t.stage1_steps
    if position < t.warmup_steps:
        return peak * (position + 1) / (t.warmup_steps + 1)
    if t.schedule == "cosine":
        span = max(1, length - t.warmup_steps)
        return peak * 0.5 * (1 + math.cos(math.pi * (position - t.warmup_steps) / span))
    return peak


def rng_state() -> dict[str, Any]:
    # numpy's key array travels as a tensor: Lightning loads checkpoints with `weights_only=True`.
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def answer_statistics(logits_at: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example answer-token loss, p(gold among the choice labels) and correctness, from one forward.

    `logits_at` is the forward's full logits (batch, seq, vocab), or a function giving the logits at given (rows,
    positions) only: training needs them at each target token and at each answer position, a few per example.
    """
    if isinstance(logits_at, torch.Tensor):
        full = logits_at
        logits_at = lambda rows, positions: full[rows, positions]  # noqa: E731
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    rows, positions = mask.nonzero(as_tuple=True)  # logits at t predict the token at t + 1
    size = labels.shape[0]
    answer_rows = torch.arange(size, device=labels.device)
    logits = logits_at(torch.cat([rows, answer_rows]), torch.cat([positions, batch["answer_pos"]])).float()
    token_loss = F.cross_entropy(logits[: len(rows)], labels[rows, positions], reduction="none")
    n_target = mask.sum(dim=1)
    losses = torch.zeros(size, device=token_loss.device).index_add(0, rows, token_loss) / n_target.clamp(min=1)
    p_gold, correct = gold_probability(choice_scores(logits[len(rows):], batch["choice_ids"]), batch["gold"])
    loss = token_loss.sum() / n_target.sum().clamp(min=1)  # token-weighted mean over the micro-batch
    return {"loss": loss, "losses": losses, "p_gold": p_gold, "correct": correct, "n_target": n_target}


def choice_scores(answer_logits: torch.Tensor, choice_ids: torch.Tensor) -> torch.Tensor:
    """(batch, choices): each choice label's score at the answer position, -inf for padding choices (id < 0).
    Logits or log-probabilities alike: `gold_probability` depends only on their differences."""
    return answer_logits.gather(1, choice_ids.clamp(min=0)).masked_fill(choice_ids < 0, float("-inf"))


def gold_probability(scores: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p(gold among the choice labels), a softmax over the choices' scores, and whether gold scored highest: the one
    rule behind training's `p_gold`/`correct` and evaluation's."""
    probs = scores.softmax(dim=1)
    return probs.gather(1, gold.unsqueeze(1)).squeeze(1), probs.argmax(dim=1) == gold


PLAIN_HEAD = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma"}
"""Model types whose logits are exactly `lm_head(decoder(...).last_hidden_state)` (no soft-capping or scaling)."""


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, lm_head) of a (PEFT-wrapped) causal LM of a `PLAIN_HEAD` type, else None (use the full forward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_HEAD:
        return None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def lora_mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """Why LoRA `weights` (a checkpoint's trainable tensors) cannot go into `model`, or None if they fit."""
    own = model.state_dict()
    for key, tensor in weights.items():
        if key not in own:
            return f"tensor {key} has no place in this model (lora.target_modules differ)"
        if own[key].shape != tensor.shape:
            return (f"tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)} "
                    "(lora.r or the base model differ)")
    missing = sorted({n for n, p in model.named_parameters() if p.requires_grad} - set(weights))
    if missing:
        return f"lacks LoRA weight {missing[0]} (lora.r or lora.target_modules differ from the run that wrote it)"
    return None


class LoRAModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, training: TrainingConfig):
        super().__init__()
        self.model = model
        self.training_config = training
        self.strict_loading = False  # checkpoints hold the trainable tensors only
        self._rng_to_restore: dict[str, Any] | None = None
        self.grad_norm: torch.Tensor | None = None
        self._update_sums: dict[str, torch.Tensor] = {}  # this update's, summed over its micro-batches
        self._update_examples = 0
        self._update_lr: float | None = None
        self._pending_metrics: tuple[int, HostValues, int, dict[str, float]] | None = None  # logged an update late
        self.last_metrics: dict[str, float] = {}
        self._plain_head = decoder_and_head(model)

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def answer_logits(self, batch: dict[str, Any]) -> torch.Tensor | Callable:
        """What `answer_statistics` needs. For a plain-head model, the LM head runs only at the target and answer
        positions, a few per example, not at every token (on a large vocabulary the head is a good share of the
        model's FLOPs: bench/RESULTS.md)."""
        if self._plain_head is None:
            return self(batch["input_ids"], batch["attention_mask"])
        decoder, head = self._plain_head
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        return lambda rows, positions: head(hidden[rows, positions])

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutputs:
        stats = answer_statistics(self.answer_logits(batch), batch)
        size = batch["input_ids"].shape[0]
        if self.trainer.progress_bar_callback is not None:  # reading it back syncs with the GPU: only for a bar
            self.log("loss", stats["loss"], prog_bar=True, logger=False, batch_size=size)
        n_target = stats["n_target"].sum()
        for name, value in (("loss_x_target", stats["loss"].detach() * n_target), ("target", n_target),
                            ("correct", stats["correct"].sum())):
            self._update_sums[name] = self._update_sums[name] + value if name in self._update_sums else value
        self._update_examples += size
        # Small per-example vectors for the tracker, detached: they cost one transfer, not a second forward.
        return {
            "loss": stats["loss"],
            "losses": stats["losses"].detach(),
            "p_gold": stats["p_gold"].detach(),
            "correct": stats["correct"].detach(),
            "n_tokens": batch["attention_mask"].sum().detach(),
            "n_target": stats["n_target"].detach(),
        }

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: Lightning calls this hook first. Kept as a tensor; the tracker moves it to the CPU.
        self.grad_norm = gradient_norm(self.model.parameters())
        self._update_lr = float(optimizer.param_groups[0]["lr"])

    @override
    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if not isinstance(self.trainer.strategy, FSDPStrategy):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # Lightning refuses norm clipping under FSDP: each rank holds a shard of the gradients, so only the wrapped
        # root can take their global norm. Its clip_grad_norm_ does (every rank), and returns the norm before clipping,
        # which is the grad-norm to record: the one taken above saw this rank's shard only.
        self.grad_norm = self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val or math.inf).detach()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._update_lr is None:  # a micro-batch that did not finish an update
            return
        # Scalars go to the loggers at step s = updates done, like the tracking rows. (Lightning's own `self.log`
        # would stamp them with the count before the update: s - 1.) They are read an update late (`HostValues`).
        self._log_pending_metrics()
        step = self.global_step
        if step % self.training_config.log_every_n_steps == 0 or step == self.trainer.max_steps:
            numbers = HostValues({**self._update_sums, "grad_norm": self.grad_norm})
            known = {"train/lr": self._update_lr, "train/epoch": float(batch.get("epoch", self.current_epoch))}
            self._pending_metrics = (step, numbers, self._update_examples, known)
        self._update_sums, self._update_examples, self._update_lr = {}, 0, None

    @override
    def on_train_end(self) -> None:
        self._log_pending_metrics()

    def _log_pending_metrics(self) -> None:
        if self._pending_metrics is None:
            return
        (step, numbers, examples, known), self._pending_metrics = self._pending_metrics, None
        sums = {name: values[0] for name, values in numbers.values().items()}
        self.last_metrics = {"train/loss": sums["loss_x_target"] / max(sums["target"], 1),
                             "train/accuracy": sums["correct"] / max(examples, 1), "train/grad_norm": sums["grad_norm"],
                             **known}
        for logger in self.loggers:
            logger.log_metrics(self.last_metrics, step=step)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # RNG is put back right before the first batch after a resume: anything that ran between loading the
        # checkpoint and this point (loader set-up, sanity checks) cannot shift dropout masks.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    @override
    def configure_optimizers(self):
        t = self.training_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate_stage1, weight_decay=t.weight_decay)
        # LambdaLR's factor at scheduler step k is for update k+1.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: learning_rate_at(k + 1, t) / t.learning_rate_stage1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if is_weights_only(checkpoint):  # checkpoint.tail=weights: no resume state (on every rank alike)
            return
        checkpoint["rng_states"] = rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank saves (Lightning calls this hook on all of them; rank 0 writes the file), and each rank's
            # dropout stream has moved by its own batches' shapes: keep them all, rank r's at index r.
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, checkpoint["rng_states"])
            checkpoint["rng_states_per_rank"] = per_rank

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # FSDP's strategy has loaded the tensors (and taken them out of `checkpoint`) before this hook: the file was
        # checked by `validate_resume` before fit, and this module's own tensors may be shards by now.
        problem = lora_mismatch(self, checkpoint["state_dict"]) if "state_dict" in checkpoint else None
        if problem:
            raise CheckpointError(f"checkpoint {problem}")
        per_rank = checkpoint.get("rng_states_per_rank")
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if per_rank and rank < len(per_rank):
            self._rng_to_restore = per_rank[rank]
        else:  # one process, or more ranks than the run that saved it had
            self._rng_to_restore = checkpoint.get("rng_states")

"""The "traditional" script, as the tests' witness: a real `transformers.Trainer` + PEFT run on the tiny preset whose
callback writes the legacy folder docs/LEGACY.md describes (JSONL batch tracking, the two JSON mappings, `checkpoint-N/`
folders and `models/`, with `training_config.yaml` in the seed's nested keys).

    folder = write_legacy_run(tmp / "experiments")     # -> experiments/icoding/arc-challenge/icoding_<stamp>_lora
    trainer = legacy_trainer(folder / "resumed", ...); trainer.train(resume_from_checkpoint=folder / "checkpoints/...")
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments

from loratrace.config import LoraConfig, ModelConfig, TrainingConfig
from loratrace.data.datasets import load_split
from loratrace.data.encoding import collate, encode, padding_token_id
from loratrace.training.model import add_lora, load_base
from loratrace.training.module import learning_rate_at

DATASET = "arc-challenge"
STAMP = "20250720_143052"
BATCH, STEPS, STAGE1, SAVE_FROM, SEED = 4, 12, 8, 8, 42
LR1, LR2 = 1e-3, 5e-4

LEGACY_CONFIG = {
    "model": {"model_name_or_path": "tiny"},
    "lora": {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "data": {"dataset_name": DATASET, "source": "sample", "max_seq_length": 256},
    "training": {"per_device_train_batch_size": BATCH, "max_steps": STEPS, "seed": SEED, "max_grad_norm": 1.0,
                 "stage1": {"steps": STAGE1, "learning_rate": LR1},
                 "stage2": {"steps": STEPS - STAGE1, "learning_rate": LR2}},
}


def schedule_config() -> TrainingConfig:
    return TrainingConfig(batch_size=BATCH, max_steps=STEPS, stage1_steps=STAGE1, learning_rate_stage1=LR1,
                          learning_rate_stage2=LR2, seed=SEED)


class LegacyDataset(torch.utils.data.Dataset):
    def __init__(self, encoded):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, row):
        return self.encoded[row]


class LegacyCollator:
    """The model's inputs, plus each example's row for the tracking callback."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        batch = collate(items, self.pad_id)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": batch["labels"], "row": batch["line"]}


class TwoStageTrainer(Trainer):
    """The script's Trainer: the seed's two-stage schedule, and the rows/loss/lr of each update kept for the log."""

    def create_scheduler(self, num_training_steps, optimizer=None):
        t = schedule_config()
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda k: learning_rate_at(k + 1, t) / LR1)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.batch_rows = inputs.pop("row").tolist()
        self.batch_lr = self.optimizer.param_groups[0]["lr"]
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.batch_loss = float((loss[0] if return_outputs else loss).detach())
        return loss


class LegacyTracking(TrainerCallback):
    """What the traditional script wrote: one JSONL line per update, the two mappings at every save."""

    def __init__(self, trainer: TwoStageTrainer, folder: Path, ids: list[str], steps_per_epoch: int):
        self.trainer, self.folder, self.ids, self.steps_per_epoch = trainer, folder, ids, steps_per_epoch
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.trained: dict[int, list[int]] = {}  # step -> rows
        self.saved: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step >= SAVE_FROM
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "grad_norm" not in (logs or {}):
            return
        step, rows = state.global_step, self.trainer.batch_rows
        self.trained[step] = rows
        line = {"step": step, "epoch": (step - 1) // self.steps_per_epoch,
                "batch_idx": (step - 1) % self.steps_per_epoch, "sample_indices": rows,
                "line_numbers": [r + 1 for r in rows], "sample_ids": [self.ids[r] for r in rows],
                "loss": self.trainer.batch_loss, "learning_rate": self.trainer.batch_lr,
                "grad_norm": logs["grad_norm"], "timestamp": dt.datetime.now().isoformat(timespec="seconds")}
        with open(self.logs / f"batch_tracking_{DATASET}.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        since = self.saved[-1] if self.saved else 0
        self.saved.append(step)
        mapping = {f"checkpoint-{s}": {"step": s, "path": f"checkpoints/checkpoint-{s}",
                                       "steps": list(range((self.saved[i - 1] if i else 0) + 1, s + 1))}
                   for i, s in enumerate(self.saved)}
        assert mapping[f"checkpoint-{step}"]["steps"][0] == since + 1
        lines: dict[str, dict] = {}
        for trained_step, rows in sorted(self.trained.items()):
            for row in rows:
                entry = lines.setdefault(str(row + 1), {"steps": []})
                entry["steps"].append(trained_step)
        for entry in lines.values():
            first = next(s for s in self.saved if s >= entry["steps"][0])
            entry["first_checkpoint"] = f"checkpoint-{first}"
            entry["checkpoints"] = [f"checkpoint-{s}" for s in self.saved if s >= first]
        (self.logs / f"checkpoint_mapping_{DATASET}.json").write_text(json.dumps(mapping, indent=1))
        (self.logs / f"line_checkpoint_mapping_{DATASET}.json").write_text(json.dumps(lines, indent=1))


def legacy_trainer(output_dir: Path, max_steps: int = STEPS, dropout: float = 0.05):
    """(trainer, ids): the script's Trainer on the tiny preset and the bundled sample, fresh LoRA weights."""
    model, tokenizer = load_base(ModelConfig())
    examples = load_split(DATASET, "sample", "train", notice=lambda line: None)
    encoded = encode(examples, tokenizer, 256)
    lora = LEGACY_CONFIG["lora"]  # what training_config.yaml says the script trained with
    peft_model = add_lora(model, LoraConfig(r=lora["lora_r"], alpha=lora["lora_alpha"], dropout=dropout), SEED)
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, max_steps=max_steps, learning_rate=LR1,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="steps", save_steps=10_000,
        report_to=[], seed=SEED, use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, logging_strategy="steps",
    )
    trainer = TwoStageTrainer(model=peft_model, args=args, train_dataset=LegacyDataset(encoded),
                              data_collator=LegacyCollator(padding_token_id(tokenizer)))
    return trainer, [e.example_id for e in examples], tokenizer


def write_legacy_run(root: Path, project: str = "icoding") -> Path:
    """Train the traditional way and leave its folder as the script did; returns the run folder."""
    folder = Path(root) / project / DATASET / f"{project}_{STAMP}_lora"
    folder.mkdir(parents=True)
    (folder / "training_config.yaml").write_text(yaml.safe_dump(LEGACY_CONFIG, sort_keys=False))
    trainer, ids, tokenizer = legacy_trainer(folder / "checkpoints")
    steps_per_epoch = len(ids) // BATCH
    trainer.add_callback(LegacyTracking(trainer, folder, ids, steps_per_epoch))
    trainer.train()
    trainer.model.save_pretrained(folder / "models")
    tokenizer.save_pretrained(folder / "models")
    return folder

"""Multiple-choice accuracy of a run's checkpoints, per example, written like tracking data (`tracking/evals/`).

Scored the way lm-evaluation-harness scores these sets: for each example the log-likelihood of every choice,
prediction = the most likely; batched, no generation, deterministic.

    loratrace eval runs/<run>                                   # every checkpoint, validation split
    loratrace eval runs/<run> --checkpoints last --split test --limit 500
    evaluate_run("runs/<run>", checkpoints="all")               # the same, as a library call -> summary DataFrame

`scoring="label"` scores each choice's letter after the lettered prompt (one forward per example, the same
quantity training's p_gold uses); `scoring="text"` scores each choice's text after the prompt, length-normalised
per token (one forward per choice).
"""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pyarrow as pa
import torch

from loratrace.config import Config, EvalConfig, load_config
from loratrace.data.datasets import LETTERS, load_split
from loratrace.data.encoding import Encoded, collate, encode, padding_token_id
from loratrace.errors import LoratraceError
from loratrace.query.accuracy import stderr
from loratrace.runs import storage
from loratrace.runs.find import read_run_folder
from loratrace.runs.folder import final_export, utc_now
from loratrace.track import schema
from loratrace.training.checkpoints import check_run_checkpoints, select_checkpoints
from loratrace.training.loggers import log_accuracies_after_training
from loratrace.training.model import load_lora_weights, load_run_model
from loratrace.training.module import choice_scores, gold_probability, rng_state, set_rng_state


class EvalError(LoratraceError):
    """A run the user asked to evaluate that cannot be: no run folder, no final_model/ (the model and checkpoints
    raise their own errors: ModelError, CheckpointError; the split, DataError)."""


@dataclass
class Scored:
    logliks: list[list[float]]
    preds: list[int]
    p_gold: list[float]


@torch.no_grad()
def score_labels(model, encoded: list[Encoded], pad_id: int, batch_size: int, device) -> Scored:
    """Log-likelihood of each choice letter at the answer position (full-vocabulary softmax)."""
    out = Scored([], [], [])
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start: start + batch_size], pad_id)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        logits = model(**inputs).logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        answer = logits[rows, batch["answer_pos"].to(device)].float().log_softmax(dim=-1)
        logliks = choice_scores(answer, batch["choice_ids"].to(device)).cpu()
        for row, n in zip(logliks, (len(e.choice_token_ids) for e in encoded[start: start + batch_size])):
            values = row[:n]
            out.logliks.append(values.tolist())
            out.preds.append(int(values.argmax()))
        out.p_gold += gold_probability(logliks, batch["gold"])[0].tolist()
    return out


@torch.no_grad()
def score_texts(model, tokenizer, examples, max_length: int, batch_size: int, device) -> Scored:
    """Mean log-likelihood per token of each choice's text after the prompt."""
    pairs = []  # (example index, prompt ids, continuation ids)
    for index, example in enumerate(examples):
        prompt = tokenizer.encode(example.prompt, add_special_tokens=False)
        for text in example.choices:
            continuation = tokenizer.encode(" " + str(text).strip(), add_special_tokens=False)[: max_length // 2]
            room = max_length - len(continuation)
            pairs.append((index, prompt[max(0, len(prompt) - room):], continuation))
    scores: list[float] = []
    pad_id = padding_token_id(tokenizer)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        width = max(len(p) + len(c) for _, p, c in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, (_, prompt, continuation) in enumerate(chunk):
            ids = prompt + continuation
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        logprobs = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for i, (_, prompt, continuation) in enumerate(chunk):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
            targets = torch.tensor(continuation, device=logprobs.device)
            scores.append(float(logprobs[i, positions.to(logprobs.device), targets].mean()))
    out, cursor = Scored([], [], []), 0
    for example in examples:
        values = torch.tensor(scores[cursor: cursor + len(example.choices)])
        cursor += len(example.choices)
        out.logliks.append(values.tolist())
        out.preds.append(int(values.argmax()))
        out.p_gold.append(float(values.softmax(0)[example.gold]))
    return out


class Evaluator:
    """Scores one split with whatever weights the model holds now; writes one part per checkpoint evaluated."""

    def __init__(self, cfg: Config, tokenizer, settings: EvalConfig | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.settings = settings or cfg.eval
        self.examples = load_split(cfg.data.dataset, cfg.data.source, self.settings.split, self.settings.limit)
        self.encoded = encode(self.examples, tokenizer, cfg.data.max_length)

    def score(self, model) -> Scored:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            if self.settings.scoring == "text":
                return score_texts(model, self.tokenizer, self.examples, self.cfg.data.max_length,
                                   self.settings.batch_size, device)
            return score_labels(model, self.encoded, padding_token_id(self.tokenizer), self.settings.batch_size, device)
        finally:
            model.train(was_training)

    def evaluate(self, model, run_dir: Path, checkpoint_step: int, checkpoint_path: str) -> float:
        """Score, write `tracking/evals/<part>.parquet`, return the accuracy."""
        scored = self.score(model)
        now = utc_now()
        rows = [{
            "run_id": run_dir.name, "checkpoint_step": checkpoint_step, "checkpoint_path": checkpoint_path,
            "split": self.settings.split, "scoring": self.settings.scoring, "example_id": e.example_id,
            "line": e.line, "gold": e.gold_label, "pred": LETTERS[pred], "correct": pred == e.gold,
            "p_gold": p_gold, "choice_logliks": logliks, "evaluated_at": now,
        } for e, pred, p_gold, logliks in zip(self.examples, scored.preds, scored.p_gold, scored.logliks)]
        name = schema.evals_part_name(checkpoint_step, now, uuid.uuid4().hex[:8])
        schema.write_atomic(pa.Table.from_pylist(rows, schema=schema.EVALS), run_dir / "tracking" / "evals" / name)
        return sum(r["correct"] for r in rows) / len(rows)


class CheckpointEvaluator:
    """`eval.every_checkpoint=true`: score each checkpoint with the live weights once StepCheckpoint has written it
    (a `CheckpointListener`: `StepCheckpoint(..., listeners=[CheckpointEvaluator(evaluator, run_dir)])`)."""

    def __init__(self, evaluator: Evaluator, run_dir: Path):
        self.evaluator, self.run_dir = evaluator, Path(run_dir)

    def checkpoint_saving(self, trainer: L.Trainer, step: int) -> None:
        """Nothing to hand over: evaluation reads the checkpoint's weights after it is written."""

    def checkpoint_saved(self, trainer: L.Trainer, step: int, path: str, size: int) -> None:
        if not trainer.is_global_zero:
            return
        state = rng_state()  # scoring draws nothing, but training's randomness must not depend on that
        accuracy = self.evaluator.evaluate(trainer.lightning_module.model, self.run_dir, step, path)
        set_rng_state(state)
        for logger in trainer.loggers:
            logger.log_metrics({accuracy_tag(self.evaluator.settings): accuracy}, step=step)


# ---------------------------------------------------------------------------------------------- after training

def evaluate_run(run_dir: str | Path, checkpoints: str = "all", overrides: list[str] | tuple = (),
                 progress: bool = True):
    """Evaluate checkpoints of a finished (or stopped) run; returns a DataFrame: checkpoint_step, checkpoint,
    accuracy, stderr (query/accuracy.py), examples, delta (from the row before). A run on object storage is evaluated
    in a local copy, and its new evaluation parts and logs are published back. `checkpoints`: the selection syntax
    of training/selection.py (all, last, 76,100, 76..125, a mix), or final."""
    with warnings.catch_warnings():  # the libraries' deprecation notices are for their callers' developers, not users
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _evaluate_somewhere(run_dir, str(checkpoints).strip(), overrides, progress)


def _evaluate_somewhere(run_dir: str | Path, checkpoints: str, overrides, progress: bool):
    if not storage.is_remote(run_dir):
        return _evaluate_run(Path(storage.local_form(run_dir)), checkpoints, overrides, progress)
    with storage.staging():
        leave_out = tuple(p for p in storage.NOT_STAGED if not (checkpoints == "final" and p == "final_model/"))
        local = storage.stage_run(str(run_dir), leave_out)
        frame = _evaluate_run(local, checkpoints, overrides, progress)
        storage.publish_tree(local)
    return frame


def _evaluate_run(run_dir: Path, checkpoints: str, overrides, progress: bool):
    import pandas as pd
    from tqdm.auto import tqdm

    if not (run_dir / "config.yaml").is_file():
        raise EvalError(f"{run_dir} is not a run folder (no config.yaml)")
    info, _ = read_run_folder(run_dir)  # a damaged run.json, config.yaml or tracking/ is one line, before any work
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    chosen = select_checkpoints(run_dir, checkpoints, "evaluate", final=True)
    check_run_checkpoints(run_dir, info.get("run_id"), chosen)  # one line now, before the model loads and the bar
    final = run_dir / "final_model"
    if checkpoints == "final" and not final.is_dir():
        raise EvalError(f"{run_dir} has no final_model/")
    final_step = _final_model_step(run_dir, info, cfg) if checkpoints == "final" else None
    peft_model, tokenizer = load_run_model(cfg, run_dir)
    evaluator = Evaluator(cfg, tokenizer)
    results = []
    for step, path in tqdm(chosen, desc="checkpoints", disable=not progress):
        load_lora_weights(peft_model, path)
        accuracy = evaluator.evaluate(peft_model, run_dir, step, path.relative_to(run_dir).as_posix())
        results.append((step, path.relative_to(run_dir).as_posix(), accuracy))
    if checkpoints == "final":
        from transformers import AutoModelForCausalLM

        accuracy = evaluator.evaluate(AutoModelForCausalLM.from_pretrained(final), run_dir, final_step, "final_model")
        results.append((final_step, "final_model", accuracy))
    examples = len(evaluator.examples)
    if results:
        tags = [accuracy_tag(evaluator.settings, final_model=what == "final_model") for _, what, _ in results]
        log_accuracies_after_training(cfg, run_dir, [
            point for tag, (step, _, accuracy) in zip(tags, results)
            for point in ((tag, step, accuracy), (f"{tag}_stderr", step, stderr(accuracy, examples)))
            if point[2] is not None])
    frame = pd.DataFrame(results, columns=["checkpoint_step", "checkpoint", "accuracy"])
    frame["stderr"] = [stderr(accuracy, examples) for accuracy in frame.accuracy]
    frame["examples"] = examples
    frame["delta"] = frame.accuracy.diff()
    return frame


def _final_model_step(run_dir: Path, info: dict, cfg: Config) -> int:
    """The step final_model/ was exported at; one line when a later attempt abandoned it (runs.final_export)."""
    step, problem = final_export(info)
    if problem:
        raise EvalError(f"{run_dir}: {problem}")
    return step if step is not None else cfg.training.max_steps


def accuracy_tag(settings: EvalConfig, final_model: bool = False) -> str:
    """The logged name of an accuracy: one per split and scoring, final_model's apart (it shares the last step)."""
    return (f"eval/{settings.split}_accuracy" + ("" if settings.scoring == "label" else f"_{settings.scoring}")
            + ("_final_model" if final_model else ""))

"""`loratrace influence`: which training examples helped or hurt a test example, by TracIn over a run's checkpoints.

    loratrace influence runs/<run> --example-id LTSYN_VAL_0007 --split validation --top 20
    loratrace influence runs/<run> --split validation --limit 200 --method tracin-cp
    influence("runs/<run>", example_ids=["LTSYN_VAL_0007"])        # -> DataFrame, one row per (test, train) example

`tracin` (Pruthi et al. 2020, the ideal form, over the stage-2 tail): for a test example z' and a training example z,
the sum over the tail steps t whose batch held z of lr_t * grad L(z; w_{t-1}) . grad L(z'; w_{t-1}), with the
members and lr_t read from the tracked batches (effective lineage) and w_{t-1} the checkpoint written just before
step t. A step whose preceding checkpoint is missing is reported and skipped, never approximated. An example no tail
batch held scores exactly 0. `tracin-cp`: the sum over chosen checkpoints c of lr_c * grad . grad for every training
example, lr_c the rate of the update that produced c. L is training's per-example loss (gradients.py), without
dropout; the 1/batch factor, AdamW's preconditioning and clipping are not in the score (as in the issue's formula).

Results go to `tracking/influence/`, one part per step (tracin) or checkpoint (tracin-cp) of one computation (method,
test examples, projection), written atomically: a killed computation, run again, does only what has no part yet.
Each part records what it was computed from (the checkpoint file's size and mtime, the lr, the step's effective
members): a part whose source has since changed (a resume rewrote the checkpoint or the step) is computed again.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from loratrace.attribution.gradients import ExampleGradients, Projection
from loratrace.config import Config, load_config
from loratrace.data.datasets import Example, load_split
from loratrace.data.encoding import encode, padding_token_id
from loratrace.errors import LoratraceError, first_line
from loratrace.runs import storage
from loratrace.runs.find import read_run_folder
from loratrace.runs.folder import utc_now
from loratrace.track import schema
from loratrace.track.lineage import is_effective, lineage_ranges, read_parts
from loratrace.training.checkpoints import check_run_checkpoints, checkpoint_files, select_checkpoints
from loratrace.training.model import load_lora_weights, load_run_model
from loratrace.training.module import learning_rate_at

METHODS = ("tracin", "tracin-cp")


class InfluenceError(LoratraceError):
    """An influence computation the user asked for that cannot be done (run, method, example, checkpoints)."""


@dataclass
class Term:
    """One part's work: the gradients at one checkpoint, dotted for the given training examples."""

    step: int  # tracin: the training step; tracin-cp: the checkpoint's step
    checkpoint_step: int
    checkpoint: Path
    lr: float
    members: list[tuple[str, int]] | None  # tracin: the step's (example_id, line); tracin-cp: None = every one
    attempt: int | None = None  # tracin: the attempt whose tracked rows of the step are effective


def _stderr(line: str) -> None:
    print(f"loratrace: {line}", file=sys.stderr)


def influence(run_dir: str | Path, example_ids: list[str] | None = None, split: str = "validation",
              limit: int | None = None, method: str = "tracin", checkpoints: str = "all",
              project_dim: int | None = None, project_seed: int = 0, batch_size: int = 8, progress: bool = True,
              notice: Callable[[str], None] | None = None):
    """Influence of every training example on each test example (`example_ids` of `split`, else its first `limit`
    rows, else all): a DataFrame with run_id, method, test_split, test_example_id, test_line, train_example_id,
    train_line, score (the sum over steps or checkpoints), terms (how many), sorted by test example then score."""
    return compute(run_dir, example_ids, split, limit, method, checkpoints, project_dim, project_seed, batch_size,
                   progress, notice).frame


@dataclass
class Result:
    frame: object  # pandas DataFrame
    texts: dict[str, str]  # example id -> prompt, of the training and test examples
    terms: list[Term]
    skipped: list[int]


def compute(run_dir: str | Path, example_ids: list[str] | None = None, split: str = "validation",
            limit: int | None = None, method: str = "tracin", checkpoints: str = "all", project_dim: int | None = None,
            project_seed: int = 0, batch_size: int = 8, progress: bool = True,
            notice: Callable[[str], None] | None = None) -> Result:
    """`influence`, plus what the CLI prints: the examples' texts, the steps or checkpoints used and skipped."""
    notice = notice or _stderr
    run_dir = storage.local_folder(run_dir, "influence reads and writes a run folder on this machine: copy the run "
                                            "here first (e.g. aws s3 sync URL runs/NAME)")
    _check_arguments(run_dir, method, checkpoints, limit, project_dim, batch_size)
    info, _ = read_run_folder(run_dir)  # a damaged run.json, config.yaml or tracking/ is one line, before any work
    cfg = load_config(run_dir / "config.yaml", notice=lambda line: None)
    data = cfg.data
    train = load_split(data.dataset, data.source, data.train_split, data.limit, notice=lambda line: None)
    tests = load_split(data.dataset, data.source, split, None if example_ids else limit, notice=lambda line: None)
    _check_training_data(run_dir, train)
    if example_ids:
        tests = _select(tests, example_ids, split)
    if method == "tracin":
        terms, skipped = tracin_terms(run_dir)
        if skipped:
            notice(f"tracin: skipped {len(skipped)} tail step(s) whose preceding checkpoint is missing: "
                   f"{_steps_text(skipped)}")
    else:
        terms, skipped = tracin_cp_terms(run_dir, checkpoints, cfg), []
    check_run_checkpoints(run_dir, info.get("run_id"), [(t.checkpoint_step, t.checkpoint) for t in terms])
    key = computation_key(method, split, [(e.example_id, e.line) for e in tests], project_dim, project_seed)
    job = Computation(run_dir, cfg, method, split, key, tuple(tests), tuple(train), project_dim, project_seed,
                      batch_size, progress)
    todo = [t for t in terms if not _is_current(job.part(t), t, run_dir)]
    if todo:
        _run_terms(job, todo)
    table = pa.concat_tables([pq.read_table(job.part(t), schema=schema.INFLUENCE) for t in terms])
    frame = _summed(table, run_dir.name, method, split, tests, train)
    texts = {e.example_id: e.prompt for e in (*train, *tests)}
    return Result(frame, texts, terms, skipped)


def _check_arguments(run_dir: Path, method: str, checkpoints: str, limit: int | None, project_dim: int | None,
                     batch_size: int) -> None:
    """The arguments that need no file read, each wrong one one line, before anything is loaded."""
    if method not in METHODS:
        raise InfluenceError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if not (run_dir / "config.yaml").is_file():
        raise InfluenceError(f"{run_dir} is not a run folder (no config.yaml)")
    for name, value in (("--limit", limit), ("--project-dim", project_dim), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise InfluenceError(f"{name} must be at least 1, got {value}")
    if method == "tracin" and checkpoints != "all":
        raise InfluenceError("--checkpoints applies to --method tracin-cp (tracin uses the checkpoint before each "
                             "tail step)")


@dataclass(frozen=True)
class Computation:
    """What one influence computation is: the run, the method and test examples (named by `key`), the projection,
    how it runs. Every part it writes is `part(term)`."""

    run_dir: Path
    cfg: Config
    method: str
    split: str
    key: str  # computation_key: the parts' names
    tests: tuple[Example, ...]
    train: tuple[Example, ...]
    project_dim: int | None
    project_seed: int
    batch_size: int
    progress: bool

    def part(self, term: Term) -> Path:
        return self.run_dir / "tracking" / "influence" / schema.influence_part_name(self.method, self.key, term.step)


def _run_terms(job: Computation, todo: list[Term]) -> None:
    """Load the base model once; per term swap the checkpoint's LoRA tensors in, take the test and training
    gradients, write the term's part."""
    from tqdm.auto import tqdm

    with warnings.catch_warnings():  # PEFT reads a property transformers deprecated: nothing a user can act on
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*")
        model, tokenizer = load_run_model(job.cfg, job.run_dir)
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    projection = Projection(job.project_dim, job.project_seed, size) if job.project_dim else None
    computer = ExampleGradients(model, padding_token_id(tokenizer), job.batch_size, projection)
    test_encoded = encode(list(job.tests), tokenizer, job.cfg.data.max_length)
    train_encoded = encode(list(job.train), tokenizer, job.cfg.data.max_length)
    position = {(e.example_id, e.line): i for i, e in enumerate(job.train)}
    for term in tqdm(todo, desc="checkpoints", disable=not job.progress, file=sys.stderr, dynamic_ncols=True):
        source = _source(term, job.run_dir)  # taken before the file is read: a rewrite meanwhile makes the part stale
        load_lora_weights(model, term.checkpoint)
        test_grads = computer.matrix(test_encoded).double()
        chosen = list(range(len(job.train))) if term.members is None else [position[m] for m in term.members]
        rows: dict[str, list] = {name: [] for name in ("test", "train", "score")}
        with torch.no_grad():
            for indices, grads in computer.gradients([train_encoded[i] for i in chosen]):
                scores = term.lr * (grads.double() @ test_grads.T)  # (train, test)
                for offset, train_index in enumerate(chosen[indices.start: indices.stop]):
                    rows["train"] += [train_index] * len(job.tests)
                    rows["test"] += range(len(job.tests))
                    rows["score"] += scores[offset].tolist()
        _write_part(job, term, rows, source)


def _write_part(job: Computation, term: Term, rows: dict[str, list], source: bytes) -> None:
    """One term's scores as its part: a row per (test, training) example, `source` in its metadata."""
    n, tests, train = len(rows["score"]), job.tests, job.train
    table = pa.table({
        "run_id": [job.run_dir.name] * n, "method": [job.method] * n, "test_split": [job.split] * n,
        "test_example_id": [tests[i].example_id for i in rows["test"]],
        "test_line": [tests[i].line for i in rows["test"]],
        "train_example_id": [train[i].example_id for i in rows["train"]],
        "train_line": [train[i].line for i in rows["train"]],
        "step": [term.step] * n, "checkpoint_step": [term.checkpoint_step] * n,
        "checkpoint_path": [term.checkpoint.relative_to(job.run_dir).as_posix()] * n, "lr": [term.lr] * n,
        "score": rows["score"], "project_dim": [job.project_dim] * n, "computed_at": [utc_now()] * n,
    }, schema=schema.INFLUENCE).replace_schema_metadata({SOURCE_KEY: source})
    write_part(table, job.part(term))



def write_part(table: pa.Table, path: Path) -> None:
    """A part under tracking/ (influence, validations, leave-one-out), written atomically; a disk that refuses it
    is one line."""
    try:
        schema.write_atomic(table, path)
    except OSError as exc:
        raise InfluenceError(f"cannot write {path}: {exc.strerror or exc}") from None


SOURCE_KEY = b"loratrace.influence_source"


def _source(term: Term, run_dir: Path) -> bytes:
    """What a part is computed from: the checkpoint file (path, size, mtime), the lr, the step's members and the
    attempt that tracked them (a resume that trained the step again makes its parts stale, as in the view)."""
    stat = term.checkpoint.stat()
    members = None if term.members is None else hashlib.sha256(json.dumps(term.members).encode()).hexdigest()
    return json.dumps({"checkpoint": term.checkpoint.relative_to(run_dir).as_posix(), "bytes": stat.st_size,
                       "mtime_ns": stat.st_mtime_ns, "lr": term.lr, "members": members,
                       "attempt": term.attempt}).encode()


def _is_current(part: Path, term: Term, run_dir: Path) -> bool:
    """The part exists and was computed from what the term is made of now (a rewritten checkpoint, a resume that
    changed the step's rows: computed again, the new part replacing the old under its name)."""
    if not part.exists():
        return False
    return (pq.read_schema(part).metadata or {}).get(SOURCE_KEY) == _source(term, run_dir)


def tracin_terms(run_dir: Path) -> tuple[list[Term], list[int]]:
    """The stage-2 steps with the checkpoint just before each (effective rows only), and the steps skipped for
    want of that checkpoint."""
    steps = _effective_steps(run_dir)
    tail = {step: info for step, info in steps.items() if info["stage"] == 2}
    if not tail:
        raise InfluenceError(f"{run_dir} has no tracked stage-2 (tail) steps; train with --track-batches, or use "
                             "--method tracin-cp")
    files = dict(checkpoint_files(run_dir))
    terms = [Term(step, step - 1, files[step - 1], info["lr"], info["members"], info["attempt"])
             for step, info in sorted(tail.items()) if step - 1 in files]
    skipped = sorted(step for step in tail if step - 1 not in files)
    if not terms:
        raise InfluenceError(f"no tail step of {run_dir} has its preceding checkpoint (steps {_steps_text(skipped)}); "
                             "use --method tracin-cp")
    return terms, skipped


def tracin_cp_terms(run_dir: Path, which: str, cfg) -> list[Term]:
    """The chosen checkpoints, each with the lr of the update that produced it (the tracked rows', else the
    config's schedule)."""
    chosen = select_checkpoints(run_dir, which, "use")
    steps = _effective_steps(run_dir) if (run_dir / "tracking" / "batches").is_dir() else {}
    return [Term(step, step, path, steps[step]["lr"] if step in steps else learning_rate_at(step, cfg.training), None)
            for step, path in chosen]


def _effective_steps(run_dir: Path) -> dict[int, dict]:
    """step -> {lr, stage, attempt, members: [(example_id, line)] in batch order, each once}, from the effective
    rows."""
    tracking = run_dir / "tracking"
    columns = ["attempt", "step", "micro_batch", "rank", "stage", "example_ids", "lines", "lr"]
    rows = read_parts(tracking / "batches", schema.BATCHES).select(columns).to_pylist()
    ranges = lineage_ranges(tracking)
    steps: dict[int, dict] = {}
    for row in sorted(rows, key=lambda r: (r["step"], r["micro_batch"], r["rank"])):
        if not is_effective(ranges, row["attempt"], row["step"]):
            continue
        info = steps.setdefault(row["step"], {"lr": row["lr"], "stage": row["stage"], "attempt": row["attempt"],
                                              "members": {}})
        info["members"].update(dict.fromkeys(zip(row["example_ids"], row["lines"])))
    for info in steps.values():
        info["members"] = list(info["members"])
    return steps


def _check_training_data(run_dir: Path, train) -> None:
    """The training split loaded now must be the one the run recorded (examples.parquet), prompt for prompt."""
    recorded = run_dir / "tracking" / schema.EXAMPLES_FILE
    if not recorded.is_file():
        return
    try:
        table = pq.read_table(recorded, columns=["example_id", "line", "prompt_sha256"])
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise InfluenceError(f"{recorded}: not a readable examples file ({first_line(exc)}); restore it from a "
                             "backup") from None
    then = set(zip(*(table[c].to_pylist() for c in ("example_id", "line", "prompt_sha256"))))
    now = {(e.example_id, e.line, e.prompt_sha256) for e in train}
    if then != now:
        changed = sorted(then ^ now)[0]
        raise InfluenceError(f"the training data differs from what {run_dir.name} recorded (example {changed[0]}, line "
                             f"{changed[1]}); restore it to compute influence")


def _select(tests, example_ids: list[str], split: str):
    by_id = {e.example_id: e for e in tests}
    for example_id in example_ids:
        if example_id not in by_id:
            close = difflib.get_close_matches(example_id, list(by_id), n=1)
            hint = f" (closest: {close[0]})" if close else ""
            raise InfluenceError(f"no example {example_id!r} in the {split} split{hint}")
    return [by_id[i] for i in dict.fromkeys(example_ids)]


def computation_key(method: str, split: str, tests: list[tuple[str, int]], project_dim: int | None,
                    project_seed: int) -> str:
    """8 hex digits naming a computation; the parts of a rerun with the same arguments have the same names."""
    text = json.dumps([method, split, tests, project_dim, project_seed if project_dim else None])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _summed(table: pa.Table, run_id: str, method: str, split: str, tests, train):
    """One row per (test, training) example: the score summed over the terms, and how many there were. Every
    training example is listed: one no term reached scores 0."""
    import pandas as pd

    parts = table.select(["test_example_id", "train_example_id", "train_line", "score"]).to_pandas()
    summed = parts.groupby(["test_example_id", "train_example_id", "train_line"], sort=False).score.agg(
        score="sum", terms="count").reset_index()
    grid = pd.DataFrame([(t.example_id, t.line, e.example_id, e.line) for t in tests for e in train],
                        columns=["test_example_id", "test_line", "train_example_id", "train_line"])
    frame = grid.merge(summed, how="left", on=["test_example_id", "train_example_id", "train_line"])
    frame["score"] = frame.score.fillna(0.0)
    frame["terms"] = frame.terms.fillna(0).astype("int64")
    frame.insert(0, "run_id", run_id)
    frame.insert(1, "method", method)
    frame.insert(2, "test_split", split)
    order = {t.example_id: i for i, t in enumerate(tests)}
    frame = frame.sort_values(["test_example_id", "score"], key=lambda c: c.map(order) if c.name ==
                              "test_example_id" else -c, kind="stable")
    return frame.reset_index(drop=True)


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:10])) + (f" ... ({len(steps)} in all)" if len(steps) > 10 else "")


def top_examples(result: Result, top: int) -> tuple[pa.Table, pa.Table]:
    """(helpful, harmful): the `top` training examples with the highest and the lowest score, summed over the test
    examples, with their text on one line."""
    frame = result.frame.groupby(["train_example_id", "train_line"], sort=False).agg(
        score=("score", "sum"), terms=("terms", "max")).reset_index()
    frame["text"] = [" ".join(result.texts.get(i, "").split()) for i in frame.train_example_id]
    helpful = frame[frame.score > 0].sort_values("score", ascending=False, kind="stable").head(top)
    harmful = frame[frame.score < 0].sort_values("score", kind="stable").head(top)
    return (pa.Table.from_pandas(helpful, preserve_index=False), pa.Table.from_pandas(harmful, preserve_index=False))

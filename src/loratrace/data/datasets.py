"""The eight data sets: where their rows come from, how each set's row becomes a lettered prompt, one split loaded.

Token ids and batches are in `encoding.py`, the stateful epoch loader in `loader.py`.

Every example keeps `example_id` (the data set's own id, else `<dataset>/<split>/<row>`) and `line` (0-based row in
its source split) from loading to the batch, so the tracker can say exactly which rows trained a step.

    rows = load_split("arc-challenge", "sample", "train")     # list[Example], formatted to lettered choices
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratrace.errors import LoratraceError, first_line

LETTERS = "ABCDEFGHIJ"
SAMPLE_DIR = Path(__file__).parents[1] / "sample" / "arc_sample"


class DataError(LoratraceError):
    """A data source or row the user pointed at that cannot be used."""


@dataclass(frozen=True)
class Example:
    example_id: str
    line: int
    prompt: str
    choices: list[str]
    gold: int  # index into choices

    @property
    def gold_label(self) -> str:
        return LETTERS[self.gold]

    @property
    def prompt_sha256(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()


# ---------------------------------------------------------------- formatters: raw row -> (id, question, choices, gold)

def _need(row: dict, *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise ValueError(f"missing field {missing[0]!r}")
    return [row[k] for k in keys]


def _kind(value: Any) -> str:
    """How a value that should be text reads in an error: `null`, `a number (3)`, `a mapping`, ..."""
    if value is None:
        return "null"
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    names = {dict: "a mapping", str: "a string", list: "a list"}
    return names.get(type(value), f"a {type(value).__name__}")


def _text(value: Any, what: str) -> str:
    """`value` if it is text: a number, null or mapping where a question or choice belongs would make a silently odd
    prompt (`Question: nan`) or a crash later."""
    if not isinstance(value, str):
        raise ValueError(f"{what} is {_kind(value)}, expected text")
    return value


def _texts(values: Any, what: str) -> list[str]:
    """A list of texts (a string is not split into its letters)."""
    if not isinstance(values, list):
        raise ValueError(f"{what} is {_kind(values)}, expected a list")
    return [_text(value, f"{what}[{index}]") for index, value in enumerate(values)]


def _arc_choices(choices: Any) -> tuple[list[str], list[str]]:
    """(texts, labels) from either ARC layout: a list of {text, label} (the original AI2 JSONL), or {text: [...],
    label: [...]} (the hub's)."""
    if isinstance(choices, list):
        for index, choice in enumerate(choices):
            if not isinstance(choice, dict):
                raise ValueError(f"choices[{index}] is {_kind(choice)}, expected a mapping with text and label")
        texts = [_text(choice.get("text"), f"choices[{index}].text") for index, choice in enumerate(choices)]
        labels = [choice.get("label") for choice in choices]
    elif isinstance(choices, dict):
        texts, labels = _texts(choices.get("text"), "choices.text"), choices.get("label")
        if not isinstance(labels, list):
            raise ValueError(f"choices.label is {_kind(labels)}, expected a list")
    else:
        raise ValueError(f"choices is {_kind(choices)}, expected a list or a mapping of text and label lists")
    for index, label in enumerate(labels):
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise ValueError(f"choice label {index} is {_kind(label)}, expected a letter or number")
    return texts, [str(label) for label in labels]


def _arc(row: dict) -> tuple[str | None, str, list[str], int]:
    question, answer = _need(row, "question", "answerKey")
    if isinstance(question, dict):  # the original AI2 ARC JSONL: {"question": {"stem": ..., "choices": [...]}}
        choices, question = question.get("choices"), question.get("stem")
        if choices is None:
            raise ValueError("missing field 'question.choices'")
        question = _text(question, "question.stem")
    else:
        (choices,) = _need(row, "choices")
        question = _text(question, "question")
    texts, labels = _arc_choices(choices)
    if not texts:
        raise ValueError("empty choices")
    if len(labels) != len(texts):
        raise ValueError(f"{len(labels)} choice labels for {len(texts)} choice texts")
    if len(set(labels)) != len(labels):
        raise ValueError(f"repeated choice labels {labels}")
    if str(answer) not in labels:
        raise ValueError(f"answer key {answer!r} is not among the labels {labels}")
    return row.get("id"), question, texts, labels.index(str(answer))


def _openbookqa(row: dict) -> tuple[str | None, str, list[str], int]:
    return _arc({**row, "question": row.get("question_stem", row.get("question"))})


def _boolq(row: dict) -> tuple[str | None, str, list[str], int]:
    question, passage, answer = _need(row, "question", "passage", "answer")
    question, passage = _text(question, "question"), _text(passage, "passage")
    return None, f"{passage}\n{question}?", ["no", "yes"], int(bool(answer))


def _piqa(row: dict) -> tuple[str | None, str, list[str], int]:
    goal, sol1, sol2, label = _need(row, "goal", "sol1", "sol2", "label")
    goal, sol1, sol2 = _text(goal, "goal"), _text(sol1, "sol1"), _text(sol2, "sol2")
    if int(label) not in (0, 1):
        raise ValueError(f"label {label!r} is not 0 or 1")
    return None, goal, [sol1, sol2], int(label)


def _hellaswag(row: dict) -> tuple[str | None, str, list[str], int]:
    ctx, endings, label = _need(row, "ctx", "endings", "label")
    ctx, endings = _text(ctx, "ctx"), _texts(endings, "endings")
    if not endings:
        raise ValueError("empty choices")
    if str(label) not in [str(i) for i in range(len(endings))]:
        raise ValueError(f"label {label!r} is not an index of the endings")
    ident = row.get("ind")
    return (None if ident is None else str(ident)), f"{ctx} ...", list(endings), int(label)


def _winogrande(row: dict) -> tuple[str | None, str, list[str], int]:
    sentence, option1, option2, answer = _need(row, "sentence", "option1", "option2", "answer")
    sentence, option1, option2 = _text(sentence, "sentence"), _text(option1, "option1"), _text(option2, "option2")
    if str(answer) not in ("1", "2"):
        raise ValueError(f"answer {answer!r} is not 1 or 2")
    return None, f"Fill in the blank: {sentence}", [option1, option2], int(answer) - 1


def _siqa(row: dict) -> tuple[str | None, str, list[str], int]:
    context, question, a, b, c, label = _need(row, "context", "question", "answerA", "answerB", "answerC", "label")
    context, question = _text(context, "context"), _text(question, "question")
    a, b, c = _text(a, "answerA"), _text(b, "answerB"), _text(c, "answerC")
    if str(label).strip() not in ("1", "2", "3"):
        raise ValueError(f"label {label!r} is not 1, 2 or 3")
    return None, f"{context}\n{question}", [a, b, c], int(str(label).strip()) - 1


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_path: str
    hub_config: str | None
    formatter: Callable[[dict], tuple[str | None, str, list[str], int]]
    splits: tuple[str, ...] = ("train", "validation", "test")


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("arc-challenge", "allenai/ai2_arc", "ARC-Challenge", _arc),
        DatasetSpec("arc-easy", "allenai/ai2_arc", "ARC-Easy", _arc),
        DatasetSpec("boolq", "google/boolq", None, _boolq, ("train", "validation")),
        DatasetSpec("piqa", "ybisk/piqa", None, _piqa),
        DatasetSpec("hellaswag", "Rowan/hellaswag", None, _hellaswag),
        DatasetSpec("winogrande", "allenai/winogrande", "winogrande_xl", _winogrande),
        DatasetSpec("openbookqa", "allenai/openbookqa", "main", _openbookqa),
        DatasetSpec("siqa", "allenai/social_i_qa", None, _siqa, ("train", "validation")),
    ]
}


def format_prompt(question: str, choices: list[str]) -> str:
    """Question, lettered choices, then `Answer:`; the target is ` <letter>` (one token in common tokenizers)."""
    lines = [f"Question: {question.strip()}"]
    lines += [f"{LETTERS[i]}. {str(text).strip()}" for i, text in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


# ---------------------------------------------------------------- loading

def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
            if not text.strip():
                raise DataError(f"{path} line {number}: empty line")
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}, column {exc.colno}: not valid JSON "
                                f"({exc.msg.removesuffix(' at')})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object")
            rows.append(row)
    return rows


def _read_file(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    raise DataError(f"{path}: unsupported file type (use .jsonl or .parquet)")


def raw_rows(dataset: str, source: str, split: str) -> tuple[list[dict], str]:
    """Rows of one split in source order, and where they came from (for error messages)."""
    spec = REGISTRY[dataset]
    if source == "sample":
        if dataset not in ("arc-challenge", "arc-easy"):
            raise DataError(f"the bundled sample is in ARC's format; data.source=sample cannot serve {dataset}")
        path = SAMPLE_DIR / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"the bundled sample has no split {split!r} (it has train, validation, test)")
        return _read_jsonl(path), str(path)
    if source == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split=split)
        except ValueError as exc:
            raise DataError(f"{spec.hub_path}: no split {split!r} ({exc})") from None
        except Exception as exc:  # network, auth, missing repo: one line, not a traceback
            raise DataError(f"could not load {spec.hub_path} from the hub: {type(exc).__name__}: {exc}") from None
        return ds.to_list(), f"{spec.hub_path}:{split}"
    path = Path(source)
    if path.is_file():
        if split != "train":
            candidate = path.with_name(path.name.replace("train", split))
            if candidate == path or not candidate.is_file():
                raise DataError(f"{path}: a single file holds only the train split, not {split!r}")
            path = candidate
        return _read_file(path), str(path)
    if path.is_dir():
        for suffix in (".jsonl", ".parquet", ".json"):
            if (path / f"{split}{suffix}").is_file():
                return _read_file(path / f"{split}{suffix}"), str(path / f"{split}{suffix}")
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
            return ds.to_list(), f"{path}:{split}"
        raise DataError(f"{path}: no {split}.jsonl, {split}.parquet or save_to_disk data set in this folder")
    raise DataError(f"data.source {source!r} is not sample, hub, or an existing file or folder")


def load_split(dataset: str, source: str, split: str, limit: int | None = None, notice=None) -> list[Example]:
    """Formatted examples of one split; a malformed row is one DataError naming file and line (1-based, as an editor
    counts the JSONL's lines). An id that repeats an earlier row's is replaced by the row's positional id
    (`<dataset>/<split>/<row>`), with one `notice` line; a positional id that is another row's own id is refused."""
    spec = REGISTRY[dataset]
    rows, origin = raw_rows(dataset, source, split)
    if limit is not None:
        rows = rows[:limit]
    examples, seen, repeated = [], {}, []
    for line, row in enumerate(rows):
        try:
            ident, question, choices, gold = spec.formatter(row)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{origin} line {line + 1}: malformed {dataset} row: {exc}") from None
        if len(choices) > len(LETTERS):
            raise DataError(f"{origin} line {line + 1}: {len(choices)} choices, at most {len(LETTERS)} supported")
        example_id = str(ident) if ident not in (None, "") else f"{dataset}/{split}/{line}"
        if example_id in seen:  # ids must be unique for tracking; fall back to the positional id
            repeated.append((line, example_id, seen[example_id]))
            example_id = f"{dataset}/{split}/{line}"
        if example_id in seen:  # another row's own id is this row's positional one: `trace` would merge the two
            raise DataError(f"{origin} line {line + 1}: its example id {example_id!r} is also the id of line "
                            f"{seen[example_id] + 1}; give one of the two rows another id")
        seen[example_id] = line
        examples.append(Example(example_id, line, format_prompt(question, choices), list(choices), gold))
    if not examples:
        raise DataError(f"{origin}: split {split!r} has no rows")
    if repeated:
        line, example_id, earlier = repeated[0]
        (notice or _stderr)(f"note: {origin}: {len(repeated)} row(s) repeat an earlier row's id (line {line + 1} "
                            f"repeats {example_id!r} of line {earlier + 1}); each is tracked by its positional id "
                            f"{dataset}/{split}/<row>")
    return examples


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)

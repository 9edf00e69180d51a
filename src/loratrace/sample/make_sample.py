"""Writes the bundled synthetic sample in ARC's schema: `python -m loratrace.sample.make_sample`.

Every question is generated here from the facts in `knowledge.py` with a seeded random generator: nothing is copied
from a benchmark. A question names a group ("Which of these is a mammal?", "Which tool is used to measure mass?");
the right choice is a member, the others are members of other groups of the same family. The facts are the tiny
base's pre-training (`pretrain_tiny`), the questions are not: a fine-tune on the train split teaches the model to
answer with the letter of the choice it knows to be right, and the validation split checks that on other questions.
The output is committed, so the default run needs neither network nor this script.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from loratrace.sample.knowledge import bare, family

HERE = Path(__file__).parent / "arc_sample"
SPLITS = {"train": 400, "validation": 100, "test": 100}
SEED = 20250720


def _question(rng: random.Random) -> tuple[str, list[str], int]:
    kind = "tool" if rng.random() < 0.3 else "kind"
    groups = family(kind)
    asked = rng.choice(groups)
    n_choices = rng.choice([3, 4, 4, 4, 4, 5])  # ARC has a few 3- and 5-choice questions
    others = rng.sample([g for g in groups if g is not asked], n_choices - 1)
    texts = [bare(rng.choice(g.members)) for g in [asked, *others]]
    right = texts[0]
    rng.shuffle(texts)
    return asked.question, texts, texts.index(right)


def make_rows(split: str, count: int, seed: int = SEED) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for row in range(count):
        stem, texts, gold = _question(rng)
        numeric_labels = rng.random() < 0.08  # ARC labels some questions 1-4 instead of A-D
        labels = [str(i + 1) if numeric_labels else "ABCDE"[i] for i in range(len(texts))]
        rows.append({
            "id": f"LTSYN_{split[:3].upper()}_{row:04d}",
            "question": stem,
            "choices": {"text": texts, "label": labels},
            "answerKey": labels[gold],
        })
    return rows


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for split, count in SPLITS.items():
        with open(HERE / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in make_rows(split, count))


if __name__ == "__main__":
    main()

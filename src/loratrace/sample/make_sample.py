"""Writes the bundled synthetic sample in ARC's schema: `python -m loratrace.sample.make_sample`.

Every question is generated here from templates with seeded random numbers: nothing is copied from a
benchmark. The output is committed, so the default run needs neither network nor this script.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent / "arc_sample"
SPLITS = {"train": 400, "validation": 100, "test": 100}


def _choices(rng: random.Random, correct: int, spread: int) -> list[int]:
    options = {correct}
    while len(options) < 4:
        options.add(max(0, correct + rng.randint(-spread, spread)))
    values = sorted(options)
    rng.shuffle(values)
    return values


def _numeric(rng: random.Random) -> tuple[str, list[str], int]:
    kind = rng.randrange(4)
    if kind == 0:
        rows, per_row = rng.randint(2, 9), rng.randint(3, 12)
        stem = (f"A gardener plants {rows} rows with {per_row} bean seedlings in each row. "
                "How many seedlings are planted?")
        answer, unit = rows * per_row, "seedlings"
    elif kind == 1:
        distance, seconds = rng.randint(2, 20) * 5, rng.choice([2, 5, 10])
        stem = f"A toy cart rolls {distance} meters in {seconds} seconds at a steady pace. What is its speed?"
        answer, unit = distance // seconds, "meters per second"
    elif kind == 2:
        height, growth, weeks = rng.randint(4, 30), rng.randint(1, 6), rng.randint(2, 8)
        stem = (f"A sunflower is {height} cm tall and grows {growth} cm each week. "
                f"How tall is it after {weeks} more weeks?")
        answer, unit = height + growth * weeks, "cm"
    else:
        start, drop = rng.randint(20, 60), rng.randint(5, 18)
        stem = f"A cup of water at {start} degrees Celsius cools by {drop} degrees. What is its new temperature?"
        answer, unit = start - drop, "degrees Celsius"
    values = _choices(rng, answer, 9)
    return stem, [f"{value} {unit}" for value in values], values.index(answer)


FACTS = [
    ("Which process lets a green plant make sugar from light?", "photosynthesis",
     ["evaporation", "condensation", "erosion", "magnetism"]),
    ("What happens to a puddle on a hot sunny afternoon?", "the water evaporates",
     ["the water freezes", "the water turns to sand", "the puddle grows deeper", "the water becomes metal"]),
    ("Which tool is best for measuring the mass of a small rock?", "a balance",
     ["a thermometer", "a ruler", "a compass", "a stopwatch"]),
    ("Which object is attracted to a bar magnet?", "an iron nail",
     ["a glass marble", "a wooden spoon", "a rubber band", "a paper cup"]),
    ("What does a seed need first in order to sprout?", "water",
     ["snow", "moonlight", "salt", "plastic"]),
    ("Why do many birds fly south before winter in cold regions?", "to find food and warmer weather",
     ["to grow new beaks", "to lay eggs in snow", "to avoid the rain forest", "to change color"]),
    ("Which layer of a tree trunk carries water up from the roots?", "the sapwood",
     ["the leaves", "the flowers", "the seeds", "the fruit"]),
    ("A student rubs two hands together quickly. What do the hands feel?", "warmer",
     ["colder", "wetter", "heavier", "magnetic"]),
    ("Which change to an ice cube is a physical change?", "melting into water",
     ["burning into ash", "rusting", "digesting", "rotting"]),
    ("What is the main source of energy for most food chains?", "the Sun",
     ["the Moon", "the soil", "the ocean floor", "volcanoes"]),
    ("Which property of a metal spoon lets it get hot in soup?", "it conducts heat",
     ["it is shiny", "it is curved", "it has a handle", "it floats"]),
    ("A shadow is shortest at what time on a clear day?", "around noon",
     ["at sunrise", "at sunset", "at midnight", "in the early morning"]),
]


def _fact(rng: random.Random) -> tuple[str, list[str], int]:
    stem, right, wrong = rng.choice(FACTS)
    n_wrong = rng.choice([2, 3, 3, 3, 4])  # ARC has a few 3- and 5-choice questions
    texts = rng.sample(wrong, n_wrong) + [right]
    rng.shuffle(texts)
    return stem, texts, texts.index(right)


def make_rows(split: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for row in range(count):
        stem, texts, gold = (_numeric if rng.random() < 0.6 else _fact)(rng)
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
            f.writelines(json.dumps(row) + "\n" for row in make_rows(split, count, seed=20250720))


if __name__ == "__main__":
    main()

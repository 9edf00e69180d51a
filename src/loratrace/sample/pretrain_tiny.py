"""Pre-trains the `tiny` preset's base once, offline: `python -m loratrace.sample.pretrain_tiny` (1 thread; about 5
minutes on an idle core).

The corpus is generated here from the facts in `knowledge.py` with a fixed seed: plain statements ("A whale is a
mammal.", "To measure mass, use a balance.") and lettered or numbered lists followed by where an item is ("So whale
is item B."). It holds no question and no "Answer:": the bundled sample's questions are never seen (a test checks).
The base therefore knows the facts and has read lists, but has never answered a multiple-choice question (probed,
it completes "A whale is a" with " mammal" but finds an item's letter in a list only by elimination); the default
LoRA job teaches it to answer with the right letter, and the sample's validation split measures how well.

Writes `tiny_base/` beside this file: the Hugging Face model (Llama, the tiny preset's default shape) and its
byte-level BPE tokenizer, trained on the same corpus, plus `pretraining.json`: seed, corpus checksum, the loss
curve and the weights' checksum, which tests compare with what this script produces. `model.tiny_pretrained`
(on by default) loads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

from loratrace.config import ModelConfig
from loratrace.data.datasets import LETTERS
from loratrace.sample.knowledge import GROUPS, Group, article, bare
from loratrace.training.model import TINY_VOCAB, build_tiny_model

OUT = Path(__file__).parent / "tiny_base"
SEED = 1234
STEPS = 6000
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WARMUP_STEPS = 100
DOCUMENTS = 40_000
HIDDEN_SIZE, LAYERS = 128, 2  # = ModelConfig's tiny_hidden_size / tiny_layers defaults (a test checks)
RECORDED_LOSSES = 10  # the first losses, kept in pretraining.json so a test can re-run the start exactly


# ------------------------------------------------------------------------------------------------ corpus

def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _statement(rng: random.Random, group: Group, member: str) -> str:
    if group.family == "tool":
        templates = ["{m} measures {q}.", "To measure {q}, use {m}.", "{Q} is measured with {m}.",
                     "{m} is a tool that measures {q}."]
        return _capital(rng.choice(templates).format(m=member, q=group.name, Q=_capital(group.name)))
    templates = ["{m} is {a} {g}.", "{m} is one kind of {g}.", "One {g} is {m}.", "{m} is {a} {g}, like {o}."]
    other = rng.choice([m for m in group.members if m != member])
    return _capital(rng.choice(templates).format(m=member, a=article(group.name), g=group.name, o=other))


def _statements(rng: random.Random) -> str:
    facts = [(g, m) for g in GROUPS for m in g.members]
    return " ".join(_statement(rng, *rng.choice(facts)) for _ in range(rng.randint(3, 6)))


def _listing(rng: random.Random) -> str:
    groups = rng.sample(GROUPS, rng.randint(3, 5))  # one item per group, so "the bird" names one item
    items = [bare(rng.choice(g.members)) for g in groups]
    labels = "12345" if rng.random() < 0.25 else "ABCDE"
    lines = [rng.choice(["Items:", "On the shelf:", "The list:"])]
    lines += [f"{labels[i]}. {item}" for i, item in enumerate(items)]
    said = []
    for i in rng.sample(range(len(items)), len(items)):
        # lower case, as in the list: " owl" here is the very token of the list's line
        if rng.random() < 0.5:
            said.append(f"{items[i]} is item {labels[i]}")
        elif groups[i].family == "tool":
            said.append(f"the tool for {groups[i].name} is item {labels[i]}")
        else:
            said.append(f"the {groups[i].name} is item {labels[i]}")
    lines.append("So " + ", and ".join(said) + ".")
    return "\n".join(lines)


def corpus(seed: int = SEED, documents: int = DOCUMENTS) -> list[str]:
    """The pre-training documents: 20% statements of facts, 80% lists with where each item is."""
    rng = random.Random(seed)
    return [(_statements if rng.random() < 0.2 else _listing)(rng) for _ in range(documents)]


def corpus_sha256(documents: list[str]) -> str:
    return hashlib.sha256("\n\n".join(documents).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ training

def train_tokenizer(documents: list[str]):
    """Byte-level BPE on the corpus; the answer labels " A".." J" are single tokens (the sample's prompts use them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    labels = [" ".join(f"Question: Answer: {letter}" for letter in LETTERS)] * 200
    tokenizer.train_from_iterator(documents + labels, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="right")


def learning_rate(step: int, total: int) -> float:
    """Linear warm-up, then cosine to a tenth of the peak; the first steps do not depend on `total`."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(steps: int = STEPS, stop_after: int | None = None, seed: int = SEED, log=print):
    """(model, tokenizer, losses, documents): `stop_after` ends early with the same first steps as a full run."""
    import torch

    documents = corpus(seed)
    tokenizer = train_tokenizer(documents)
    encoded = [[tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
               for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]]
    model = build_tiny_model(ModelConfig(tiny_hidden_size=HIDDEN_SIZE, tiny_layers=LAYERS, tiny_seed=seed),
                             len(tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.01)
    order_rng = random.Random(seed + 1)
    order: list[int] = []
    losses = []
    for step in range(stop_after or steps):
        if len(order) < BATCH_SIZE:
            fresh = list(range(len(encoded)))
            order_rng.shuffle(fresh)
            order += fresh
        batch, order = [encoded[i] for i in order[:BATCH_SIZE]], order[BATCH_SIZE:]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps}  loss {sum(losses[-100:]) / 100:.4f}")
    return model.eval(), tokenizer, losses, documents


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write (default: the shipped tiny_base/)")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # faster for a model this small, and the recorded losses do not depend on the count
    started = time.perf_counter()
    model, tokenizer, losses, documents = pretrain(args.steps)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    record = {
        "script": "python -m loratrace.sample.pretrain_tiny", "seed": SEED, "steps": args.steps,
        "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "warmup_steps": WARMUP_STEPS,
        "hidden_size": HIDDEN_SIZE, "layers": LAYERS, "documents": len(documents),
        "corpus_sha256": corpus_sha256(documents), "first_losses": losses[:RECORDED_LOSSES],
        "loss_per_100_steps": [round(sum(losses[i: i + 100]) / len(losses[i: i + 100]), 4)
                               for i in range(0, len(losses), 100)],
        "seconds": round(seconds, 1), "torch": torch.__version__,
        "weights_sha256": file_sha256(args.out / "model.safetensors"),
        "tokenizer_sha256": file_sha256(args.out / "tokenizer.json"),
    }
    (args.out / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} in {seconds:.0f} s, final loss {record['loss_per_100_steps'][-1]}")


if __name__ == "__main__":
    main()

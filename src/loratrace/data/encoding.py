"""Prompts as model inputs: token ids with the answer at the end, the choice labels' tokens, padded batches.

    rows = load_split("arc-challenge", "sample", "train")     # datasets.py: list[Example]
    encoded = encode(rows, tokenizer, max_length=256)        # token ids, answer positions, choice label tokens
    batch = collate(encoded[:8], padding_token_id(tokenizer))   # tensors, plus the ids and lines the tracker records
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loratrace.data.datasets import LETTERS, DataError, Example


@dataclass(frozen=True)
class Encoded:
    example_id: str
    line: int
    input_ids: list[int]
    n_target_tokens: int  # the answer tokens at the end of input_ids
    choice_token_ids: list[int]  # first token of each choice label, in choice order
    gold: int


def label_token_ids(tokenizer, n_choices: int) -> list[int]:
    ids = []
    for letter in LETTERS[:n_choices]:
        tokens = tokenizer.encode(" " + letter, add_special_tokens=False)
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise DataError("the tokenizer maps two answer labels to the same first token; p_gold would be meaningless")
    return ids


def encode(examples: list[Example], tokenizer, max_length: int) -> list[Encoded]:
    """Prompt + ` <gold letter>` (+ EOS when the tokenizer has one); prompts too long are cut from the left."""
    label_ids = label_token_ids(tokenizer, max(len(e.choices) for e in examples))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    targets = {letter: tokenizer.encode(" " + letter, add_special_tokens=False) + eos
               for letter in {e.gold_label for e in examples}}  # a handful of labels, not one call per example
    out = []
    for example, prompt in zip(examples, prompts):
        target = targets[example.gold_label]
        room = max_length - len(target) - len(bos)
        prompt = bos + prompt[max(0, len(prompt) - room):]
        out.append(Encoded(example.example_id, example.line, prompt + target, len(target),
                           label_ids[: len(example.choices)], example.gold))
    return out


def padding_token_id(tokenizer) -> int:
    """The padding token (the EOS token for tokenizers that have none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors plus the ids and lines that the tracker needs."""
    width = max(len(e.input_ids) for e in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    answer_pos = torch.zeros(n, dtype=torch.long)
    max_choices = max(len(e.choice_token_ids) for e in batch)
    choice_ids = torch.full((n, max_choices), -1, dtype=torch.long)
    for i, e in enumerate(batch):
        length = len(e.input_ids)
        input_ids[i, :length] = torch.tensor(e.input_ids)
        attention[i, :length] = 1
        labels[i, length - e.n_target_tokens: length] = input_ids[i, length - e.n_target_tokens: length]
        answer_pos[i] = length - e.n_target_tokens - 1  # logits here predict the answer label
        choice_ids[i, : len(e.choice_token_ids)] = torch.tensor(e.choice_token_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "answer_pos": answer_pos,
        "choice_ids": choice_ids,
        "gold": torch.tensor([e.gold for e in batch], dtype=torch.long),
        "example_id": [e.example_id for e in batch],
        "line": torch.tensor([e.line for e in batch], dtype=torch.long),
    }

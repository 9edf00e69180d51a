import math

import pytest
import torch

from loratrace.config import TrainingConfig
from loratrace.track.step_outputs import stage_of
from loratrace.training.module import answer_statistics, learning_rate_at


def test_two_stage_constant_schedule():
    t = TrainingConfig(max_steps=125, stage1_steps=75, learning_rate_stage1=1e-4, learning_rate_stage2=2e-5)
    assert [learning_rate_at(s, t) for s in (1, 75, 76, 125)] == [1e-4, 1e-4, 2e-5, 2e-5]
    assert (stage_of(75, t.stage1_steps), stage_of(76, t.stage1_steps)) == (1, 2)


def test_warmup_and_cosine_inside_each_stage():
    t = TrainingConfig(max_steps=20, stage1_steps=10, learning_rate_stage1=1.0, learning_rate_stage2=0.5,
                       warmup_steps=1, schedule="cosine")
    assert learning_rate_at(1, t) == pytest.approx(0.5)  # warm-up step of stage 1
    assert learning_rate_at(2, t) == pytest.approx(1.0)
    assert learning_rate_at(11, t) == pytest.approx(0.25)  # stage 2 restarts its warm-up
    assert learning_rate_at(12, t) == pytest.approx(0.5)
    assert learning_rate_at(16, t) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))


def test_answer_statistics_match_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 7                       # example 0: one answer token at position 3
    labels[1, 2], labels[1, 3] = 4, 9       # example 1: two answer tokens
    batch = {"labels": labels, "answer_pos": torch.tensor([2, 1]), "choice_ids": torch.tensor([[7, 8, -1], [4, 5, 6]]),
             "gold": torch.tensor([0, 2])}
    stats = answer_statistics(logits, batch)
    lp = logits.log_softmax(-1)
    loss0 = -lp[0, 2, 7]
    loss1 = -(lp[1, 1, 4] + lp[1, 2, 9]) / 2
    assert torch.allclose(stats["losses"], torch.stack([loss0, loss1]))
    assert torch.allclose(stats["loss"], (loss0 + 2 * loss1) / 3)  # token-weighted
    p0 = logits[0, 2, [7, 8]].softmax(-1)[0]
    p1 = logits[1, 1, [4, 5, 6]].softmax(-1)[2]
    assert torch.allclose(stats["p_gold"], torch.stack([p0, p1]))
    assert stats["correct"].tolist() == [bool(p0 > 0.5), bool(p1 == logits[1, 1, [4, 5, 6]].softmax(-1).max())]


def test_plain_head_path_gives_the_full_forwards_statistics():
    from loratrace.config import LoraConfig, ModelConfig
    from loratrace.data.datasets import load_split
    from loratrace.data.encoding import collate, encode, padding_token_id
    from loratrace.training.model import add_lora, load_base
    from loratrace.training.module import LoRAModule

    for arch in ("llama", "qwen2"):
        base, tokenizer = load_base(ModelConfig(tiny_arch=arch))
        module = LoRAModule(add_lora(base, LoraConfig(), seed=0), TrainingConfig()).eval()
        assert module._plain_head is not None
        batch = collate(encode(load_split("arc-challenge", "sample", "train", limit=6), tokenizer, 256),
                        padding_token_id(tokenizer))
        with torch.no_grad():
            sparse = answer_statistics(module.answer_logits(batch), batch)
            full = answer_statistics(module(batch["input_ids"], batch["attention_mask"]), batch)
        for key in ("loss", "losses", "p_gold"):
            assert torch.allclose(sparse[key], full[key], atol=1e-5), key
        assert torch.equal(sparse["correct"], full["correct"])
        assert torch.equal(sparse["n_target"], batch["labels"][:, 1:].ne(-100).sum(1))

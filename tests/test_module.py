import math

import pytest
import torch

from loratrace.config import TrainingConfig
from loratrace.module import answer_statistics, learning_rate_at, stage_of


def test_two_stage_constant_schedule():
    t = TrainingConfig(max_steps=125, stage1_steps=75, learning_rate_stage1=1e-4, learning_rate_stage2=2e-5)
    assert [learning_rate_at(s, t) for s in (1, 75, 76, 125)] == [1e-4, 1e-4, 2e-5, 2e-5]
    assert (stage_of(75, t), stage_of(76, t)) == (1, 2)


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

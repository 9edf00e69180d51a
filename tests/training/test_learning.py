"""The embedded default job learns (issue #11), and the tiny base it starts from is honest: pre-trained by the script
in the repo, on a corpus that asks none of the sample's questions."""

import json
import shutil

import pytest
from safetensors.torch import load_file

import loratrace
from loratrace.data.datasets import load_split
from loratrace.evaluate import evaluate_run
from loratrace.sample import pretrain_tiny
from loratrace.training.model import PRETRAINED_DIR

SPLITS = ("train", "validation", "test")


def test_the_default_job_learns(default_run, tmp_path):
    with loratrace.open_runs(default_run) as db:
        per_epoch = db.sql("SELECT epoch, avg(p_gold) AS p_gold FROM samples GROUP BY epoch ORDER BY epoch").df()
    assert len(per_epoch) >= 9  # 125 updates x 32 examples over 400 rows
    assert 0.2 <= per_epoch.p_gold.iloc[0] <= 0.35  # chance is about 0.26 (3 to 5 choices)
    assert per_epoch.p_gold.iloc[-1] >= 0.5
    run = shutil.copytree(default_run, tmp_path / default_run.name)  # the shared run stays as trained
    accuracy = evaluate_run(run, checkpoints="last", progress=False).accuracy.iloc[-1]
    assert accuracy >= 0.4


def test_the_pretraining_corpus_asks_none_of_the_samples_questions():
    documents = pretrain_tiny.corpus()
    text = "\n\n".join(documents)
    assert "Question" not in text and "Answer" not in text and "?" not in text
    for split in SPLITS:
        for example in load_split("arc-challenge", "sample", split):
            question = example.prompt.split("\n", 1)[0].removeprefix("Question: ")
            assert question not in text, example.example_id


def test_the_shipped_base_is_what_the_script_makes():
    record = json.loads((PRETRAINED_DIR / "pretraining.json").read_text())
    assert pretrain_tiny.file_sha256(PRETRAINED_DIR / "model.safetensors") == record["weights_sha256"]
    assert pretrain_tiny.file_sha256(PRETRAINED_DIR / "tokenizer.json") == record["tokenizer_sha256"]
    assert record["seed"] == pretrain_tiny.SEED and record["steps"] == pretrain_tiny.STEPS
    # The script today makes the same corpus, tokenizer and first updates as the run that made the weights.
    model, tokenizer, losses, documents = pretrain_tiny.pretrain(stop_after=3, log=None)
    assert pretrain_tiny.corpus_sha256(documents) == record["corpus_sha256"]
    assert tokenizer.get_vocab() == loratrace.training.model.load_pretrained_tiny()[1].get_vocab()
    assert losses == pytest.approx(record["first_losses"][:3], rel=1e-4)
    shipped = load_file(PRETRAINED_DIR / "model.safetensors")
    assert set(shipped) == set(model.state_dict())
    assert record["loss_per_100_steps"][-1] < record["loss_per_100_steps"][0] / 3

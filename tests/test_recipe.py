"""The default job end to end, read back with the readers users use."""

import json

import pytest
import torch
from conftest import small_config
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

import loratrace
from loratrace.config import load_config


def test_default_job_writes_the_seed_layout(default_run):
    names = sorted(p.name for p in (default_run / "checkpoints").iterdir())
    assert names == [f"checkpoint-step-{s:03d}.ckpt" for s in range(76, 126)]
    for sub in ("config.yaml", "run.json", "tensorboard_logs", "swanlab_logs", "final_model", "final_adapter",
                "base_model", "tracking"):
        assert (default_run / sub).exists(), sub
    info = json.loads((default_run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 125 and info["run_id"] == default_run.name
    assert info["versions"]["torch"] and info["versions"]["lightning"]


def test_tensorboard_has_the_loss_at_every_step(default_run):
    events = EventAccumulator(str(default_run / "tensorboard_logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 126))
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lrs[1] == pytest.approx(3e-3) and lrs[125] == pytest.approx(3e-3)  # the embedded default's (issue #11)


def test_swanlab_wrote_its_offline_run(default_run):
    files = list((default_run / "swanlab_logs").rglob("*.swanlab"))
    assert files and files[0].stat().st_size > 0


def test_config_yaml_reloads_equal(default_run):
    cfg = load_config(default_run / "config.yaml")
    assert cfg == load_config(None, ["tracking.enabled=true", f"runs_dir={cfg.runs_dir}"])


def _logits(model, tokenizer):
    ids = tokenizer(["Question: Which tool measures mass?\nA. a balance\nB. a ruler\nAnswer:"],
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_final_model_and_adapter_give_the_trained_logits(default_run):
    tokenizer = AutoTokenizer.from_pretrained(default_run / "final_model")
    merged = AutoModelForCausalLM.from_pretrained(default_run / "final_model").eval()
    base = AutoModelForCausalLM.from_pretrained(default_run / "base_model")
    adapted = PeftModel.from_pretrained(base, default_run / "final_adapter").eval()
    # the trained LoRA weights, as the last checkpoint holds them
    state = torch.load(default_run / "checkpoints" / "checkpoint-step-125.ckpt", weights_only=True)["state_dict"]
    trained = {k.removeprefix("model."): v for k, v in state.items()}
    own = adapted.state_dict()
    for key, value in trained.items():
        match = key.replace(".default.weight", ".weight") if key not in own else key
        target = own.get(key, own.get(match))
        assert target is not None and torch.allclose(target, value), key
    assert torch.allclose(_logits(merged, tokenizer), _logits(adapted, tokenizer), atol=1e-5)
    untrained = AutoModelForCausalLM.from_pretrained(default_run / "base_model").eval()
    assert not torch.allclose(_logits(untrained, tokenizer), _logits(merged, tokenizer), atol=1e-5)


def test_checkpoint_holds_only_lora_and_is_small(default_run):
    ckpt = default_run / "checkpoints" / "checkpoint-step-100.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    trainable = sum(v.numel() for v in state["state_dict"].values())
    assert trainable == json.loads((default_run / "run.json").read_text())["trainable_parameters"]
    assert ckpt.stat().st_size <= 1.1 * trainable * 12 + 64_000  # weights + Adam moments, plus loop/RNG state
    assert "rng_states" in state and state["loops"]["fit_loop"]["state_dict"]["combined_loader"]


def test_resume_with_ckpt_path_ends_in_the_same_weights(tmp_path):
    cfg = small_config(tmp_path, "tracking.enabled=false")
    straight = loratrace.train(cfg, progress=False)
    resumed = loratrace.train(cfg, progress=False)
    loratrace.train(cfg, resume_from=resumed / "checkpoints" / "checkpoint-step-011.ckpt", progress=False)
    a = torch.load(straight / "checkpoints" / "checkpoint-step-016.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "checkpoint-step-016.ckpt", weights_only=True)
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key], b["state_dict"][key], atol=1e-6), key
    attempts = json.loads((resumed / "run.json").read_text())["attempts"]
    assert len(attempts) == 2 and attempts[1]["resumed_from"].endswith("checkpoint-step-011.ckpt")


def test_mismatched_lora_checkpoint_is_one_line_exit_2(tmp_path, small_run):
    from conftest import run_cli

    ckpt = small_run / "checkpoints" / "checkpoint-step-016.ckpt"
    result = run_cli("train", "--config", str(small_run / "config.yaml"), "lora.r=4", "--resume-from-checkpoint",
                     str(ckpt))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("loratrace: error: checkpoint tensor")

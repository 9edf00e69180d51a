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


@pytest.mark.slow
def test_default_job_writes_the_seed_layout(default_run):
    names = sorted(p.name for p in (default_run / "checkpoints").iterdir())
    assert names == [f"checkpoint-step-{s:03d}.ckpt" for s in range(76, 126)]
    for sub in ("config.yaml", "run.json", "tensorboard_logs", "swanlab_logs", "final_model", "final_adapter",
                "base_model", "tracking"):
        assert (default_run / sub).exists(), sub
    info = json.loads((default_run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 125 and info["run_id"] == default_run.name
    assert info["versions"]["torch"] and info["versions"]["lightning"]


@pytest.mark.slow
def test_tensorboard_has_the_loss_at_every_step(default_run):
    events = EventAccumulator(str(default_run / "tensorboard_logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 126))
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lrs[1] == pytest.approx(3e-3) and lrs[125] == pytest.approx(3e-3)  # the embedded default's (issue #11)


@pytest.mark.slow
def test_swanlab_wrote_its_offline_run(default_run):
    files = list((default_run / "swanlab_logs").rglob("*.swanlab"))
    assert files and files[0].stat().st_size > 0


@pytest.mark.slow
def test_config_yaml_reloads_equal(default_run):
    cfg = load_config(default_run / "config.yaml")
    assert cfg == load_config(None, ["tracking.enabled=true", f"runs_dir={cfg.runs_dir}"])


def _logits(model, tokenizer):
    ids = tokenizer(["Question: Which tool measures mass?\nA. a balance\nB. a ruler\nAnswer:"],
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
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


@pytest.mark.slow
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
    # TensorBoard shows each step once, as the batches view does: the first attempt's steps 12..16 are purged.
    events = EventAccumulator(str(resumed / "tensorboard_logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 17))


def _snapshot(run):
    """Every file of a run folder with its bytes' hash: a refused command must change none."""
    import hashlib

    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path):
    return loratrace.train(small_config(tmp_path, "training.max_steps=10", "training.stage1_steps=8"), progress=False)


def test_refused_resumes_change_nothing_and_the_run_still_resumes(finished_run):
    from conftest import run_cli

    checkpoints = finished_run / "checkpoints"
    truncated = checkpoints / "checkpoint-step-009.ckpt"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    before = _snapshot(finished_run)
    cases = [(["lora.r=4"], checkpoints / "checkpoint-step-010.ckpt", "checkpoint tensor"),
             ([], truncated, "not a readable checkpoint"),
             (["training.seed=7"], checkpoints / "checkpoint-step-010.ckpt",
              "made with training.seed=42, not 7"),
             (["training.strategy=foo"], checkpoints / "checkpoint-step-010.ckpt", "invalid strategy name")]
    for overrides, ckpt, message in cases:
        result = run_cli("train", "--config", str(finished_run / "config.yaml"), *overrides,
                         "--resume-from-checkpoint", str(ckpt))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("loratrace: error:") and message in last, last
        assert _snapshot(finished_run) == before, overrides
    info = json.loads((finished_run / "run.json").read_text())
    assert info["status"] == "completed" and len(info["attempts"]) == 1
    # the run is intact: a plain resume (longer, recorded as a config change) works
    cfg = load_config(finished_run / "config.yaml", ["training.max_steps=12"])
    loratrace.train(cfg, resume_from=checkpoints / "checkpoint-step-010.ckpt", progress=False)
    info = json.loads((finished_run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 12
    assert info["attempts"][1]["config_changes"] == {"training.max_steps": [10, 12]}


def test_resume_after_tracking_was_deleted_is_refused(finished_run):
    import shutil

    from conftest import run_cli

    shutil.rmtree(finished_run / "tracking")
    before = _snapshot(finished_run)
    ckpt = str(finished_run / "checkpoints" / "checkpoint-step-009.ckpt")
    result = run_cli("train", "--resume-from-checkpoint", ckpt)
    assert result.returncode == 2
    assert "are gone; resuming would record a false lineage" in result.stderr.strip().splitlines()[-1]
    assert _snapshot(finished_run) == before
    untracked = run_cli("train", "--resume-from-checkpoint", ckpt, "tracking.enabled=false")
    assert untracked.returncode == 0, untracked.stderr[-2000:]


def test_adapter_names_its_base_so_auto_peft_loads_it_offline(default_run):
    from peft import AutoPeftModelForCausalLM

    config = json.loads((default_run / "final_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((default_run / "base_model").resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(default_run / "final_adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(default_run / "final_model")
    merged = AutoModelForCausalLM.from_pretrained(default_run / "final_model").eval()
    assert torch.allclose(_logits(model, tokenizer), _logits(merged, tokenizer), atol=1e-5)


def test_a_cli_run_prints_progress_on_stderr_the_summary_on_stdout_and_no_noise(tmp_path):
    from conftest import ROOT, SMALL, run_cli

    overrides = [o for o in SMALL if not o.startswith("logging.swanlab")] + ["logging.swanlab_mode=offline",
                                                                                "training.max_steps=10"]
    result = run_cli("train", "--config", str(ROOT / "configs" / "tiny.yaml"), *overrides,
                     f"--runs-dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout.strip().splitlines()
    assert out[0].startswith("run ") and any(line.startswith("tracking ") for line in out)
    assert not any("Epoch" in line or "swanlab:" in line for line in out), out
    err = result.stderr
    for noise in ("weights_only", "Tip:", "GPU available", "TPU available", "Warning", "warn(", "swanlab:", ".py:"):
        assert noise not in err, (noise, err[-3000:])  # ".py:": a warning's source location
    # stderr is a pipe here, as under SLURM or CI: progress is plain lines (the bar's frames would pile up), on stderr
    progress = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["10/10"] and " loss " in progress[0], err[-3000:]
    assert "\r" not in err and "Epoch" not in err


def test_disabled_features_leave_no_empty_folders(tmp_path):
    cfg = small_config(tmp_path, "training.max_steps=3", "training.stage1_steps=2", "tracking.enabled=false",
                       "logging.tensorboard=false", "export.merged_model=false", "export.adapter=false")
    run = loratrace.train(cfg, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["base_model", "checkpoints", "config.yaml", "run.json"]


def test_version_and_bare_command():
    from conftest import run_cli

    from loratrace import __version__
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"loratrace {__version__}"
    bare = run_cli()
    assert bare.returncode == 0 and "usage: loratrace" in bare.stdout and "train" in bare.stdout


def test_a_tracked_resume_from_an_untracked_launchs_checkpoint_is_refused(finished_run):
    from loratrace.errors import CheckpointError

    ckpt = finished_run / "checkpoints" / "checkpoint-step-010.ckpt"
    untracked = load_config(finished_run / "config.yaml", ["tracking.enabled=false"])
    loratrace.train(untracked, resume_from=finished_run / "checkpoints" / "checkpoint-step-009.ckpt", progress=False)
    before = _snapshot(finished_run)
    with pytest.raises(CheckpointError, match="written by an untracked launch of a tracked run"):
        tracked = load_config(finished_run / "config.yaml", ["tracking.enabled=true"])  # config.yaml: the last launch's
        loratrace.train(tracked, resume_from=ckpt, progress=False)
    assert _snapshot(finished_run) == before


def test_eval_and_the_summary_leave_out_checkpoints_a_resume_abandoned(tmp_path):
    """Resumed from step 11 with max_steps=13: the first launch's files 14..16 stay on disk but belong to no lineage."""
    from loratrace.training.checkpoints import select_checkpoints

    run = loratrace.train(small_config(tmp_path), progress=False)
    shorter = load_config(run / "config.yaml", ["training.max_steps=13"])
    loratrace.train(shorter, resume_from=run / "checkpoints" / "checkpoint-step-011.ckpt", progress=False)
    assert (run / "checkpoints" / "checkpoint-step-016.ckpt").exists()
    assert [step for step, _ in select_checkpoints(run, "all", "evaluate")] == [9, 10, 11, 12, 13]
    assert [step for step, _ in select_checkpoints(run, "last", "evaluate")] == [13]
    assert json.loads((run / "run.json").read_text())["checkpoints"] == 5


@pytest.mark.slow
def test_the_library_resumes_as_the_command_does(small_run, tmp_path, capsys):
    """`loratrace.train(resume_from=CKPT, overrides=...)` with no config is `train --resume-from-checkpoint CKPT ...`:
    the run's own config.yaml, the same run folder, the same weights, attempts and batches (two copies of one run)."""
    import shutil

    from loratrace.cli import main

    copies = [shutil.copytree(small_run, tmp_path / side / small_run.name) for side in ("cli", "library")]
    checkpoint = "checkpoints/checkpoint-step-012.ckpt"
    assert main(["train", "--resume-from-checkpoint", str(copies[0] / checkpoint), "logging.tensorboard=false"]) == 0
    cli_out = capsys.readouterr().out
    assert loratrace.train(resume_from=copies[1] / checkpoint, overrides=["logging.tensorboard=false"]) == copies[1]
    library_out = capsys.readouterr().out
    timeless = [line for line in cli_out.replace(str(copies[0]), str(copies[1])).splitlines() if " cost " not in line]
    assert [line for line in library_out.splitlines() if " cost " not in line] == timeless  # the same summary

    infos = [json.loads((run / "run.json").read_text()) for run in copies]
    for info, run in zip(infos, copies):
        assert info["status"] == "completed" and info["steps"] == 16 and len(info["attempts"]) == 2
        resumed = info["attempts"][1]
        assert resumed["resumed_from"] == str(run / checkpoint) and resumed["resumed_step"] == 12
        assert resumed["config_changes"] == {"logging.tensorboard": [True, False]}
    final = [torch.load(run / "checkpoints" / "checkpoint-step-016.ckpt", weights_only=True)["state_dict"]
             for run in copies]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    rows = []
    for run in copies:
        with loratrace.open_runs(run, read_only=True) as db:
            rows.append(db.sql("SELECT attempt, step, example_ids FROM batches ORDER BY step").df())
    assert rows[0].step.tolist() == list(range(1, 17)) and rows[0].attempt.tolist() == [0] * 12 + [1] * 4
    assert rows[0].to_json() == rows[1].to_json()

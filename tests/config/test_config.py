import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from loratrace.config import Config, ConfigError, load_config, save_config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.training.stage1_steps <= cfg.training.max_steps


def test_default_config_is_the_seed_recipe():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg == Config()  # the file is the embedded default written out
    t = cfg.training
    # the seed's schedule; the learning rate and rank suit the tiny base (issue #11), the hub configs keep the seed's
    assert (t.max_steps, t.stage1_steps, t.batch_size, t.learning_rate_stage1) == (125, 75, 32, 3e-3)
    for name in ("arc-challenge.yaml", "arc-easy.yaml"):
        hub = load_config(ROOT / "configs" / name)
        assert (hub.training.learning_rate_stage1, hub.training.learning_rate_stage2, hub.lora.r) == (1e-4, 1e-4, 16)


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["training.max_steps=200", "training.learning_rate_stage2=5e-5",
                             "lora.target_modules=q_proj,v_proj", "data.limit=null", "tracking.enabled=true"])
    assert cfg.training.max_steps == 200
    assert cfg.training.learning_rate_stage2 == pytest.approx(5e-5)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.limit is None and cfg.tracking.enabled is True


def test_unknown_key_names_the_closest_known_key():
    message = r"unknown config key training.max_step \(did you mean training.max_steps\?\)"
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["training.max_step=3"])


@pytest.mark.parametrize("override, message", [
    ("training.batch_size=zero", "training.batch_size: expected an integer"),
    ("training.stage1_steps=500", "training.stage1_steps must be between 0 and training.max_steps"),
    ("training.learning_rate_stage1=-1", "training.learning_rate_stage1 must be in (0, 1000], got -1.0"),
    ("logging.swanlab_mode=online", "logging.swanlab_mode: 'online' is not one of"),
    ("data.dataset=mmlu", "data.dataset: unknown data set 'mmlu'"),
    ("tracking.enabled=maybe", "tracking.enabled: expected true or false"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_legacy_nested_keys_are_translated_with_a_notice(tmp_path):
    legacy = tmp_path / "training_config.yaml"
    legacy.write_text("model: tiny\ntraining:\n  per_device_train_batch_size: 16\n"
                      "  stage1: {steps: 40, learning_rate: 0.0002}\n  stage2: {steps: 10, learning_rate: 0.00005}\n")
    notices = []
    cfg = load_config(legacy, notice=notices.append)
    t = cfg.training
    assert (t.batch_size, t.stage1_steps, t.max_steps) == (16, 40, 50)
    assert (t.learning_rate_stage1, t.learning_rate_stage2) == (2e-4, 5e-5)
    assert any("training.per_device_train_batch_size read as training.batch_size" in n for n in notices)


def test_saved_config_reloads_equal(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["training.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("args, message", [
    (["training.max_step=3"], "unknown config key training.max_step (did you mean training.max_steps?)"),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["data.source=/no/such/file.jsonl"], "is not sample, hub, or an existing file or folder"),
    (["--resume-from-checkpoint", "runs/x/checkpoints/nope.ckpt"], "does not exist"),
    (["training.lr=0.1"], "did you mean training.learning_rate_stage1 or training.learning_rate_stage2?"),
    (["--config", str(ROOT / "configs" / "tiny.yaml"), "training.max_steps=8"],
     "got 12: set training.stage1_steps=4 (the default's share)"),
])
def test_cli_config_errors_are_one_line_exit_2_and_create_nothing(tmp_path, args, message):
    result = run_cli("train", f"--runs-dir={tmp_path / 'runs'}", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("loratrace: error")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not Path(tmp_path / "lightning_logs").exists()


def test_legacy_keys_translate_as_a_whole(tmp_path):
    """A stage-2 length given alone counts from the file's stage 1; a flat learning rate sets both stages."""
    base = tmp_path / "base.yaml"
    base.write_text("training:\n  stage1_steps: 40\n  max_steps: 60\n  learning_rate_stage2: 0.003\n")
    cfg = load_config(base, ["training.stage2.steps=30"], notice=lambda line: None)
    assert (cfg.training.stage1_steps, cfg.training.max_steps) == (40, 70)
    cfg = load_config(base, ["training.learning_rate=0.002"], notice=lambda line: None)
    assert (cfg.training.learning_rate_stage1, cfg.training.learning_rate_stage2) == (0.002, 0.002)
    # Within one source our own key is more specific than the legacy one; a later override still wins.
    both = tmp_path / "both.yaml"
    both.write_text("training:\n  learning_rate: 0.002\n  learning_rate_stage2: 0.0005\n  stage1: {steps: 10}\n"
                    "  stage2: {steps: 5}\n")
    cfg = load_config(both, notice=lambda line: None)
    assert (cfg.training.learning_rate_stage1, cfg.training.learning_rate_stage2) == (0.002, 0.0005)
    assert cfg.training.max_steps == 15
    assert load_config(both, ["training.stage1_steps=12"], notice=lambda line: None).training.max_steps == 17
    assert load_config(both, ["training.max_steps=40"], notice=lambda line: None).training.max_steps == 40


@pytest.mark.parametrize("override, message", [
    ("training.stage2.steps=abc", "training.stage2.steps: expected an integer, got 'abc'"),
])
def test_legacy_values_are_checked_like_ours(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], notice=lambda line: None)


def test_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: tiny\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml line 3: not UTF-8 text \(byte 0xe9\)"):
        load_config(path)
    result = run_cli("train", "--config", str(path), f"--runs-dir={tmp_path / 'runs'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("loratrace: error:")


@pytest.mark.parametrize("override, message", [
    ("training.learning_rate=inf", "training.learning_rate_stage1 must be a finite number, got inf"),
    ("training.learning_rate_stage2=.inf", "training.learning_rate_stage2 must be a finite number, got inf"),
    ("training.learning_rate_stage1=1e400", "training.learning_rate_stage1 must be a finite number, got inf"),
    ("training.learning_rate_stage1=1e300", "training.learning_rate_stage1 must be in (0, 1000], got 1e+300"),
    ("training.weight_decay=inf", "training.weight_decay must be a finite number, got inf"),
    ("training.max_grad_norm=nan", "training.max_grad_norm must be a finite number, got nan"),
    ("lora.dropout=-.inf", "lora.dropout must be a finite number, got -inf"),
    ("training.seed=-1", "training.seed must be in [0, 4294967295], got -1"),
    ("training.seed=99999999999999", "training.seed must be in [0, 4294967295], got 99999999999999"),
    ("model.tiny_seed=-3", "model.tiny_seed must be in [0, 4294967295], got -3"),
    ("lora.alpha=0", "lora.alpha must be in [1, 65536], got 0"),
    ("training.warmup_steps=-1", "training.warmup_steps must be in [0, 1000000000], got -1"),
    ("data.max_length=99999999999", "data.max_length must be in [8, 10000000], got 99999999999"),
    ("training.seed=1" + "0" * 400, "training.seed must be in [0, 4294967295], got 100000000000...(401 digits)"),
    ("training.weight_decay=1" + "0" * 400,
     "training.weight_decay must be a finite number, got an integer of 401 digits"),
])
def test_a_numeric_value_outside_its_bounds_is_one_line_naming_the_key(override, message):
    """Issues #21 and #27.5: infinite, overflowing and out-of-range numbers were accepted (or ended in numpy's
    traceback at seeding)."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(None, [override])


def test_a_yaml_infinity_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate_stage1: .inf\n")
    with pytest.raises(ConfigError, match="training.learning_rate_stage1 must be a finite number, got inf"):
        load_config(path)


def test_every_numeric_field_has_bounds():
    import typing

    from loratrace.config import BOUNDS, known_keys

    numeric = {key for key, hint in known_keys().items()
               if {int, float} & {hint, *typing.get_args(hint)}}
    assert numeric == set(BOUNDS)


@pytest.mark.parametrize("override, message", [
    ("method=../../../escaped", "method: '../../../escaped' cannot name a folder or file (it holds a path separator)"),
    ("method=a/b", "method: 'a/b' cannot name a folder or file (it holds a path separator)"),
    ("method=..", "method: '..' cannot name a folder or file (it is '..')"),
    ("method=", "method: '' cannot name a folder or file (it is empty)"),
    ("data.train_split=../train", "data.train_split: '../train' cannot name a folder or file"),
    ("eval.split=a\\b", "eval.split: 'a\\\\b' cannot name a folder or file (it holds a path separator)"),
])
def test_a_value_that_becomes_a_path_component_cannot_leave_its_folder(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(None, [override])


def test_train_with_an_escaping_method_writes_nothing_anywhere(tmp_path):
    """Issue #27.4: `method=../../../escaped` made a run folder outside the runs folder."""
    runs = tmp_path / "a" / "b" / "runs"
    result = run_cli("train", "method=../../../escaped", f"runs_dir={runs}", "training.max_steps=2",
                     "training.stage1_steps=1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("loratrace: error: method: '../../../escaped' cannot name a folder or file (it holds a "
                             "path separator)\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- issue #24

def test_a_short_run_scales_the_stage_boundary_unless_it_is_given():
    from loratrace.training.checkpoints import checkpoint_steps

    notices = []
    short = load_config(None, ["training.max_steps=30"], notice=notices.append).training
    assert (short.stage1_steps, short.max_steps) == (18, 30)  # the seed's 75 of 125
    assert notices == ["note: training.stage1_steps = 18 (75/125 of training.max_steps=30; set training.stage1_steps "
                       "to choose)"]
    cfg = load_config(None, ["training.max_steps=30"], notice=lambda line: None)
    assert checkpoint_steps(30, cfg.training.stage1_steps, cfg.checkpoint) == list(range(19, 31))  # the tail follows
    assert load_config(None, ["training.max_steps=200"], notice=lambda line: None).training.stage1_steps == 120
    assert load_config(None, ["training.max_steps=1"], notice=lambda line: None).training.stage1_steps == 0
    assert load_config(None, ["training.max_steps=30", "training.stage1_steps=25"]).training.stage1_steps == 25
    assert load_config(ROOT / "configs" / "tiny.yaml", ["training.max_steps=15"]).training.stage1_steps == 12


@pytest.mark.parametrize("args, message", [
    ([ROOT / "configs" / "default.yaml", ["training.max_steps=30"]],
     "training.stage1_steps must be between 0 and training.max_steps (30), got 75: set training.stage1_steps=18 "
     "(the default's share) or less"),
    ([None, ["training.max_steps=30", "training.stage1_steps=40"]], "set training.stage1_steps=18"),
])
def test_a_stage_boundary_given_past_the_run_names_the_fix(args, message):
    with pytest.raises(ConfigError) as error:
        load_config(*args)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("key, meant", [
    ("training.lr", "training.learning_rate_stage1 or training.learning_rate_stage2"),
    ("lr", "training.learning_rate_stage1 or training.learning_rate_stage2"),
    ("batch_size", "training.batch_size or eval.batch_size"),
    ("lora.rank", "lora.r"),
    ("training.epochs", "training.max_steps"),
    ("training.max_step", "training.max_steps"),
])
def test_a_mistyped_key_names_the_keys_meant(key, meant):
    with pytest.raises(ConfigError, match=rf"unknown config key {re.escape(key)} \(did you mean {meant}\?\)"):
        load_config(None, [f"{key}=1"])


def test_print_config_prints_what_a_run_would_use_and_writes_nothing(tmp_path):
    import yaml

    result = run_cli("train", "training.max_steps=30", "--track-batches", "--progress", "none", "--print-config",
                     f"--runs-dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["training"]["stage1_steps"] == 18 and printed["tracking"]["enabled"] is True
    assert printed["logging"]["progress"] == "none"
    assert list(tmp_path.iterdir()) == []  # no runs folder, no lightning_logs
    (tmp_path / "printed.yaml").write_text(result.stdout)
    expected = load_config(None, ["training.max_steps=30", "tracking.enabled=true", "logging.progress=none",
                                  f"runs_dir={tmp_path / 'runs'}"], notice=lambda line: None)
    assert load_config(tmp_path / "printed.yaml") == expected  # the printed YAML trains exactly that run
    same = run_cli("config", "training.max_steps=30", "tracking.enabled=true", "logging.progress=none",
                   f"runs_dir={tmp_path / 'runs'}")
    assert same.stdout == result.stdout
    two = run_cli("train", "--print-config", "--dataset", "arc-easy", "--dataset", "boolq")
    assert [d["data"]["dataset"] for d in yaml.safe_load_all(two.stdout)] == ["arc-easy", "boolq"]


def test_config_keys_lists_every_key_with_a_default_that_reads_back():
    from loratrace.config import known_keys

    result = run_cli("config", "--keys", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["key"] for row in rows] == list(known_keys())
    for row in rows:
        assert row["doc"] and row["type"], row
        key = row["key"]
        # the default, typed back as an override, gives the default config (max_steps also keeps stage 1 at 75)
        assert load_config(None, [f"{key}={row['default']}"], notice=lambda line: None) == Config(), key
    by_key = {row["key"]: row for row in rows}
    assert by_key["logging.progress"]["allowed"] == "auto, bar, lines, none"
    assert by_key["training.max_steps"]["allowed"] == "[1, 1000000000]"
    text = run_cli("config", "--keys").stdout
    assert "training.stage1_steps  (int, default 75)   [0, 1000000000]\n    Updates in stage 1;" in text


@pytest.mark.parametrize("override, message", [
    ('run.name="two\\nlines"', "run.name must be one line of at most 100 printable characters"),
    ("run.name=" + "x" * 101, "run.name must be one line of at most 100 printable characters"),
    ('run.tags=["a,b"]', "run.tags: 'a,b' must be 1 to 64 printable characters, no comma or edge spaces"),
    ('run.tags=[""]', "run.tags: '' must be 1 to 64 printable characters"),
    ("run.tags=[" + "t" * 65 + "]", "run.tags: 'tttttttttttttttttttttttttttttttttttttttt...' must be 1 to 64"),
])
def test_a_run_name_or_tag_that_cannot_show_in_one_cell_is_refused(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(None, [override])


def test_train_name_and_tags_are_kept_as_typed(tmp_path, monkeypatch):
    """`--name` and `--tag` are labels, never YAML: a name that looks like a mapping or a number stays text."""
    import loratrace.cli
    import loratrace.recipe

    calls = []
    monkeypatch.setattr(loratrace.recipe, "train", lambda cfg, resume_from=None: calls.append(cfg))
    assert loratrace.cli.main(["train", "--name", "lr: 1e-3", "--tag", "0.5", "--tag", "sweep A",
                               f"--runs-dir={tmp_path}"]) == 0
    assert (calls[0].run.name, calls[0].run.tags) == ("lr: 1e-3", ["0.5", "sweep A"])
    assert loratrace.cli.main(["train", f"--runs-dir={tmp_path}"]) == 0
    assert (calls[1].run.name, calls[1].run.tags) == ("", [])
    result = run_cli("train", "--tag", "a,b", f"--runs-dir={tmp_path / 'runs'}")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "loratrace: error: run.tags: 'a,b' must be 1 to 64 printable characters, no comma or edge spaces"]
    assert not (tmp_path / "runs").exists()

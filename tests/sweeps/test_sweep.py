"""loratrace sweep: trials are run folders, the trials view agrees with Optuna's own study, the pruner stops a bad
trial, a SIGKILLed sweep resumes without training a trial twice, two workers share a study, bad params are one line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import ROOT, run_cli

import loratrace
from loratrace.cli import main
from loratrace.config import load_config

# Six updates, a checkpoint after each (stage 1 too): the pruner can stop a trial at step 2 of 6. (Overrides go last,
# after the options, as with `loratrace train`.)
CONFIG = ["--config", str(ROOT / "configs" / "tiny.yaml")]
BASE = ["training.max_steps=6", "training.stage1_steps=2", "checkpoint.stage1_every_n_steps=1", "training.batch_size=4",
        "logging.swanlab=false", "logging.tensorboard=false", "export.merged_model=false"]
GOOD, ABSURD = 0.003, 1000.0


def load_study(study_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}")


def run_folders(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if (p / "run.json").exists())


def run_json(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """A 4-trial sweep minimizing the final loss: trial 0 a sound learning rate, trial 1 an absurd one (enqueued), the
    median pruner live after one complete trial."""
    root = tmp_path_factory.mktemp("sweep")
    result = run_cli("sweep", *CONFIG, "--param", "lora.r=choice(4,8)",
                     "--param", f"training.learning_rate_stage1=choice({GOOD},{ABSURD})", "--trials", "4",
                     "--objective", "final_loss", "--pruner", "median:n_startup_trials=1", "--study", "four",
                     "--enqueue", json.dumps({"training.learning_rate_stage1": GOOD}),
                     "--enqueue", json.dumps({"training.learning_rate_stage1": ABSURD}),
                     *BASE, f"runs_dir={root / 'runs'}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def trials_view(runs: Path) -> list[dict]:
    result = run_cli("query", "SELECT * FROM trials ORDER BY trial", "--format", "json", "--runs-dir", str(runs))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_four_trials_are_four_run_folders_and_the_view_agrees_with_optuna(four):
    root, result = four
    runs, study_dir = root / "runs", root / "runs" / "sweeps" / "four"
    assert sorted(p.name for p in study_dir.iterdir()) == [".lock", "study.db", "sweep.json", "trials.parquet"]
    study = load_study(study_dir)
    trials = study.get_trials()
    folders = run_folders(runs)
    assert len(trials) == len(folders) == 4
    rows = trials_view(runs)
    assert [r["trial"] for r in rows] == [t.number for t in trials] == [0, 1, 2, 3]
    by_run = {}
    for row, trial in zip(rows, trials):
        assert row["study"] == "four" and row["state"] == trial.state.name.lower()
        assert flat(json.loads(row["params"])) == trial.params
        assert row["objective"] == trial.value
        assert {(v["step"], v["value"]) for v in row["intermediate_values"]} == set(trial.intermediate_values.items())
        assert row["run_id"] == trial.user_attrs["run_id"] and Path(row["run_dir"]).name == row["run_id"]
        by_run[row["run_id"]] = (row, trial)
    assert sorted(by_run) == [p.name for p in folders]  # one run folder per trial, none shared
    for folder in folders:  # each a normal run folder: its config holds the sampled values, run.json names the trial
        row, trial = by_run[folder.name]
        info = run_json(folder)
        assert (info["study"], info["trial"]) == ("four", trial.number)
        cfg = load_config(folder / "config.yaml")
        assert (cfg.lora.r, cfg.training.learning_rate_stage1) == (trial.params["lora.r"],
                                                                    trial.params["training.learning_rate_stage1"])
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert info["status"] == "completed" and info["final_loss"] == pytest.approx(trial.value)
            assert trial.intermediate_values[6] == pytest.approx(trial.value)  # the last checkpoint's is the final
    with loratrace.open_runs(runs) as db:  # the runs view names study and trial too
        named = db.sql("SELECT run_id, study, trial FROM runs ORDER BY run_id").fetchall()
    assert named == [(f.name, "four", str(by_run[f.name][1].number)) for f in folders]
    complete = [r for r in rows if r["state"] == "complete"]
    best = min(complete, key=lambda r: r["objective"])
    assert best["trial"] == study.best_trial.number
    assert f"best         trial {best['trial']}: final_loss" in result.stdout
    assert f"run          {best['run_dir']}" in result.stdout


def test_pruner_stops_the_absurd_learning_rate_before_its_last_step(four):
    root, _ = four
    runs = root / "runs"
    rows = {r["trial"]: r for r in trials_view(runs)}
    assert rows[0]["state"] == "complete"
    absurd = rows[1]
    assert json.loads(absurd["params"])["training"]["learning_rate_stage1"] == ABSURD and absurd["state"] == "pruned"
    steps = [v["step"] for v in absurd["intermediate_values"]]
    assert max(steps) < 6
    info = run_json(absurd["run_dir"])
    assert info["status"] == "pruned" and info["pruned_step"] == max(steps) and info["steps"] == max(steps)
    with loratrace.open_runs(runs) as db:  # still queryable, joined to its run
        frame = db.sql("""SELECT t.trial, r.status, max(b.step) AS last_step
                          FROM trials t JOIN runs r USING (run_id) JOIN batches b USING (run_id)
                          GROUP BY ALL ORDER BY t.trial""").df()
    statuses = {"complete": "completed", "pruned": "pruned"}
    assert list(frame.status) == [statuses[rows[t]["state"]] for t in frame.trial]
    assert int(frame.set_index("trial").last_step[1]) == max(steps)


def test_report_study_has_the_trials_then_their_runs(four):
    root, _ = four
    study_dir = root / "runs" / "sweeps" / "four"
    result = run_cli("report", "--study", str(study_dir), "-o", str(root / "sweep.html"), cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    page = (root / "sweep.html").read_text()
    assert "<title>sweep four</title>" in page and "Sweep four: final_loss (minimize)" in page
    for plot in ("objective", "intermediate", "params"):
        assert f'id="plot-sweep-0-{plot}"' in page
    trials = load_study(study_dir).trials
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"best: trial {best.number}, final_loss {best.value:.6g}, run {best.user_attrs['run_id']}" in page
    assert all(page.count(t.user_attrs["run_id"]) >= 2 for t in trials)  # in the trials table and the runs' sections


def test_report_study_of_a_folder_without_a_sweep_is_one_line(tmp_path):
    result = run_cli("report", "--study", str(tmp_path), "-o", str(tmp_path / "r.html"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no sweep study in" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("param, message", [
    ("lora.rr=choice(4,8)", "unknown config key lora.rr (did you mean lora.r?)"),
    ("lora.r=choice(4,8", "expected key=loguniform(a,b)"),
    ("lora.r=int(8,4)", "the lower bound must be below the upper"),
    ("training.learning_rate_stage1=loguniform(0,1e-3)", "loguniform() needs bounds above 0"),
    ("lora.r=uniform(2,8)", "lora.r is not a number with decimals; use int(a,b)"),
    ("lora.dropout=uniform(0.0,1.5)", "lora.dropout must be in [0, 1)"),
    ("training.stage1_steps=int(0,10,step=4)", "not a whole number of steps"),
    ("lora.r=choice(4,eight)", "lora.r: expected an integer"),
])
def test_a_bad_param_is_one_line_exit_2_before_anything_is_written(param, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--param", param, "--trials", "2", f"runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("loratrace: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_a_bad_param_in_one_line(tmp_path):
    result = run_cli("sweep", "--param", "training.learning_rate_stage1=loguniform(1e-3)", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("loratrace: error: --param 'training.learning_rate_stage1=loguniform(1e-3)': "
                             "loguniform() takes two bounds\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigkill_during_a_trial_then_resume_finishes_without_training_a_trial_twice(tmp_path):
    """Objective eval_accuracy (best checkpoint): kill the sweep once trial 1 has a checkpoint; --resume marks it
    failed and continues its run folder from that checkpoint as a new trial with the same parameters."""
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "loratrace", "sweep", *CONFIG, "--param", "lora.r=choice(4,8,16)", "--trials", "2",
            "--study", "killed", "--pruner", "none", *BASE, "eval.limit=16", f"runs_dir={runs}"]
    sweep = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, victim = time.monotonic() + 600, None
    while victim is None and time.monotonic() < deadline and sweep.poll() is None:
        for folder in runs.glob("arc-challenge_*"):
            if (folder / "run.json").exists() and run_json(folder).get("trial") == 1 \
                    and list((folder / "checkpoints").glob("checkpoint-step-*.ckpt")):
                victim = folder
        time.sleep(0.02)
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    assert victim is not None, "trial 1 never wrote a checkpoint before the sweep ended"
    assert run_json(victim)["status"] == "running"  # as SIGKILL left it

    resumed = run_cli("sweep", "--resume", str(runs / "sweeps" / "killed"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = load_study(runs / "sweeps" / "killed")
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    retry = study.trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == study.trials[1].params
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["run_id"] for t in complete}) == len(complete) == 2
    info = run_json(victim)
    assert info["status"] == "completed" and info["trials"] == [1, 2]
    assert [a["status"] for a in info["attempts"]] == ["failed", "completed"]
    assert info["attempts"][1]["resumed_from"].endswith(".ckpt")
    assert sum(run_json(p)["status"] == "completed" for p in run_folders(runs)) == 2  # no run trained twice
    with loratrace.open_runs(runs) as db:
        twice = db.sql("SELECT run_id, step FROM batches GROUP BY ALL HAVING count(*) > 1").df()
        accuracy = db.sql("""SELECT run_id, checkpoint_step, avg(correct::INT) AS accuracy FROM evals
                             GROUP BY ALL""").df()
        rows = db.sql("SELECT trial, state, objective, run_id, retry_of FROM trials ORDER BY trial").df()
    assert twice.empty  # the continued run holds each step once (its killed attempt's extra rows are orphaned)
    for trial in complete:  # eval_accuracy of the best checkpoint, as the evals view has it
        best = accuracy[accuracy.run_id == trial.user_attrs["run_id"]].accuracy.max()
        assert trial.value == pytest.approx(best)
    assert list(rows.state) == ["complete", "fail", "complete"] and rows.retry_of[2] == 1
    assert rows.run_id[1] == rows.run_id[2] == victim.name

    # The README's "best trial right, worst trial wrong" query, as `loratrace query` runs it, against pandas
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "b.correct AND NOT w.correct" in line)
    query = line.split('"')[1]
    result = run_cli("query", query, "--format", "json", "--runs-dir", str(runs))
    assert result.returncode == 0, result.stderr
    evals = pd.concat(pd.read_parquet(p) for p in runs.glob("*/tracking/evals/*.parquet"))
    last = evals[evals.checkpoint_step == evals.groupby("run_id").checkpoint_step.transform("max")]
    best = min(complete, key=lambda t: (-t.value, t.user_attrs["run_id"])).user_attrs["run_id"]  # ties: by run id
    worst = min(complete, key=lambda t: (t.value, t.user_attrs["run_id"])).user_attrs["run_id"]
    right = set(last[(last.run_id == best) & last.correct].example_id)
    wrong = set(last[(last.run_id == worst) & ~last.correct].example_id)
    assert [json.loads(r)["example_id"] for r in result.stdout.splitlines()] == sorted(right & wrong)


@pytest.mark.slow
def test_two_jobs_share_one_study(tmp_path):
    runs = tmp_path / "runs"
    result = run_cli("sweep", *CONFIG, "--param", "lora.r=choice(4,8,16)", "--trials", "4", "--jobs", "2",
                     "--objective", "final_loss", "--study", "pair", *BASE, "training.max_steps=3",
                     "training.stage1_steps=1", f"runs_dir={runs}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = load_study(runs / "sweeps" / "pair").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers trained trials
    assert len({t.user_attrs["run_id"] for t in trials}) == 4 == len(run_folders(runs))
    assert sorted(run_json(p)["trial"] for p in run_folders(runs)) == [0, 1, 2, 3]


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def test_study_folder_that_is_not_a_study_is_refused_untouched(tmp_path, capsys, monkeypatch):
    """`--study DIR`: an existing, non-empty folder without sweep.json is not taken over; its files stay unchanged."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    (victim / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(victim)
    code = main(["sweep", "--study", str(victim), "--param", "lora.r=choice(4,8)", f"runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"--study {victim}" in err and "not a sweep" in err, err
    assert _tree(victim) == before and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_study_whose_storage_fails_removes_only_what_it_created(existing, tmp_path, capsys, monkeypatch):
    """A storage that cannot be opened: one line, exit 2; the study folder (and runs/sweeps/) go if this command made
    them, an empty folder given as --study stays, with nothing in it."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    study = tmp_path / "given" if existing else runs / "sweeps" / "s1"
    if existing:
        study.mkdir()
    code = main(["sweep", "--study", str(study) if existing else "s1", "--storage", "sqlite:////nonexistent/dir/x.db",
                 "--param", "lora.r=choice(4,8)", f"runs_dir={runs}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--storage sqlite:////nonexistent/dir/x.db" in err, err
    assert "Traceback" not in err
    if existing:
        assert study.is_dir() and list(study.iterdir()) == []
    else:
        assert not runs.exists()


def test_a_sweep_on_object_storage_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--param", "lora.r=choice(4,8)", "--runs-dir", "s3://bucket/runs"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "s3://bucket/runs" in err and "object storage" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_runs_dir_is_that_local_folder(tmp_path, monkeypatch):
    """`runs_dir=file:///abs/runs`: the study goes to /abs/runs/sweeps/NAME, not to a folder named `file:`."""
    from loratrace.sweeps.spec import plan_sweep

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir=file://{tmp_path / 'runs'}"])
    spec = plan_sweep(cfg, ["lora.r=choice(4,8)"], 2, study="s1")
    assert spec.study_dir == str(tmp_path / "runs" / "sweeps" / "s1")
    assert spec.base["runs_dir"] == str(tmp_path / "runs")
    assert list(tmp_path.iterdir()) == []


def test_report_study_with_no_trials_yet_says_so(tmp_path, capsys):
    from loratrace.sweeps.spec import create_study, plan_sweep

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path / 'runs'}"])
    create_study(plan_sweep(cfg, ["lora.r=choice(4,8)"], 2, study="empty"))  # the study exists, no trial started
    study_dir = tmp_path / "runs" / "sweeps" / "empty"
    code = main(["report", "--study", str(study_dir), "-o", str(tmp_path / "sweep.html")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    page = (tmp_path / "sweep.html").read_text()
    assert "<title>sweep empty</title>" in page and "no trials yet: run loratrace sweep" in page


def test_trials_0_is_refused_not_taken_for_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A storage that cannot open: taken for 10 trials, the sweep would fail there (not train) and name the storage
    code = main(["sweep", "--param", "lora.r=choice(4,8)", "--trials", "0", "--storage", "sqlite:////nonexistent/x.db",
                 f"runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err == "loratrace: error: --trials must be at least 1, got 0\n"
    assert list(tmp_path.iterdir()) == []


def _new_study(tmp_path: Path, name: str = "s1") -> Path:
    from loratrace.sweeps.spec import create_study, plan_sweep

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path / 'runs'}"])
    create_study(plan_sweep(cfg, ["lora.r=choice(4,8)"], 1, study=name))
    return tmp_path / "runs" / "sweeps" / name


@pytest.mark.slow
def test_resume_with_jobs_exits_non_zero_naming_the_worker_whose_trial_failed(tmp_path):
    """Each worker's trial fails before training (an eval split the data set lacks): `--resume --jobs 2` exits with the
    workers' code and names the first worker and its trial (it returned 0, dropping the workers' exit codes)."""
    from loratrace.sweeps.spec import create_study, plan_sweep

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path / 'runs'}", "eval.split=nosuch"])
    create_study(plan_sweep(cfg, ["lora.r=choice(4,8)"], 2, study="broken"))
    study_dir = tmp_path / "runs" / "sweeps" / "broken"
    result = run_cli("sweep", "--resume", str(study_dir), "--jobs", "2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("loratrace: error: ")]
    assert len(errors) == 3 and sum("nosuch" in line for line in errors[:2]) == 2, result.stderr[-3000:]
    trials = load_study(study_dir).trials
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    by_pid = {t.user_attrs["worker"]["pid"]: t.number for t in trials}
    last = errors[-1]
    worker, pid, trial = re.fullmatch(r"loratrace: error: sweep worker (\d) \(pid (\d+)\) exited with code 2 during "
                                      r"trial (\d) \(its error is above\); continue it with: loratrace sweep --resume "
                                      + re.escape(str(study_dir)), last).groups()
    assert by_pid[int(pid)] == int(trial) and worker in ("0", "1")
    assert result.stdout == ""  # no summary: the sweep did not end well


def test_sweep_json_paths_are_relative_so_a_copy_reads_its_own_study(tmp_path):
    from loratrace.sweeps.spec import read_spec

    study = _new_study(tmp_path)
    recorded = json.loads((study / "sweep.json").read_text())
    assert (recorded["study_dir"], recorded["storage"], recorded["base"]["runs_dir"]) == (
        ".", "sqlite:///study.db", os.path.join("..", ".."))
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(tmp_path / "runs"), str(copy)], check=True)
    spec = read_spec(copy / "sweeps" / "s1")
    assert (spec.study_dir, spec.storage, spec.base["runs_dir"]) == (
        str(copy / "sweeps" / "s1"), f"sqlite:///{copy / 'sweeps' / 's1' / 'study.db'}", str(copy))


def test_a_copied_study_whose_trials_ran_in_the_original_runs_is_refused(tmp_path, capsys):
    from loratrace.sweeps.workers import worker_identity

    study_dir = _new_study(tmp_path)
    study = load_study(study_dir)
    trial = study.ask()
    trial.set_user_attr("run_dir", str(tmp_path / "runs" / "trial0"))
    trial.set_user_attr("worker", worker_identity())
    study.tell(trial, 0.5)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(tmp_path / "runs"), str(copy)], check=True)
    before = _tree(tmp_path)
    code = main(["sweep", "--resume", str(copy / "sweeps" / "s1")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "moved or copied" in err and str(tmp_path / "runs") in err, err
    assert _tree(tmp_path) == before


def test_an_older_absolute_sweep_json_is_read_in_place_and_refused_when_moved(tmp_path, capsys):
    from loratrace.sweeps.spec import read_spec

    study = _new_study(tmp_path)
    recorded = json.loads((study / "sweep.json").read_text())
    absolute = {**recorded, "study_dir": str(study), "storage": f"sqlite:///{study / 'study.db'}",
                "base": {**recorded["base"], "runs_dir": str(tmp_path / "runs")}}
    (study / "sweep.json").write_text(json.dumps(absolute))
    assert read_spec(study).storage == absolute["storage"]
    moved = tmp_path / "moved"
    study.rename(moved)
    code = main(["sweep", "--resume", str(moved)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"the study was made in {study}" in err, err


def test_a_second_sweep_making_the_same_study_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """While one `sweep` makes the study (it holds the study folder's lock), another is refused and touches
    nothing; once sweep.json is written, another is told to --resume."""
    import fcntl

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "sweeps" / "s1"
    folder.mkdir(parents=True)
    args = ["sweep", "--study", "s1", "--param", "lora.r=choice(4,8)", f"runs_dir={tmp_path / 'runs'}"]
    with open(folder / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first sweep, making the study
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is being made by another loratrace sweep" in err, err
    assert [p.name for p in folder.iterdir()] == [".lock"]


def test_two_sweeps_racing_to_make_one_study_make_it_once(tmp_path):
    import threading

    from loratrace.errors import LoratraceError
    from loratrace.sweeps.spec import create_study, plan_sweep

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path / 'runs'}"])
    specs = [plan_sweep(cfg, ["lora.r=choice(4,8)"], 1, study="raced") for _ in range(2)]
    start, outcomes = threading.Barrier(2), []

    def make(spec) -> None:
        start.wait()
        try:
            create_study(spec)
            outcomes.append("made")
        except LoratraceError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=make, args=(spec,)) for spec in specs]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(outcomes)[0] == "made" and "--resume" in sorted(outcomes)[1], outcomes  # made, or just made
    assert len(load_study(tmp_path / "runs" / "sweeps" / "raced").trials) == 0


@pytest.mark.slow
def test_sigkill_of_a_sweep_with_jobs_ends_its_workers_and_resume_finishes(tmp_path):
    """The workers live in their own sessions: SIGKILL of `sweep --jobs 2` reaches them through the kernel
    (PR_SET_PDEATHSIG) as a SIGTERM; their trials are re-queued and `sweep --resume` finishes the study."""
    from loratrace.sweeps.workers import process_alive

    runs = tmp_path / "runs"
    study_dir = runs / "sweeps" / "orphans"
    args = [sys.executable, "-m", "loratrace", "sweep", *CONFIG, "--param", "lora.r=choice(4,8,16)", "--trials", "2",
            "--jobs", "2", "--objective", "final_loss", "--pruner", "none", "--study", "orphans", *BASE,
            "training.max_steps=100", "checkpoint.stage2_every_n_steps=10", f"runs_dir={runs}"]  # orphans would finish
    sweep = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers, deadline = [], time.monotonic() + 600
    while len(workers) < 2 and time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.5)
        if (study_dir / "sweep.json").exists():
            with contextlib.suppress(Exception):  # the workers may hold the database a moment
                workers = [t.user_attrs["worker"] for t in load_study(study_dir).trials
                           if t.state.name == "RUNNING" and "run_dir" in t.user_attrs]
    assert len(workers) == 2, "the two workers never trained at the same time"
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    deadline = time.monotonic() + 30
    while any(process_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_alive(w) for w in workers), "a worker outlived its sweep by 30 s"
    assert "COMPLETE" not in [t.state.name for t in load_study(study_dir).trials]  # stopped, not finished

    resumed = run_cli("sweep", "--resume", str(study_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    states = [t.state.name for t in load_study(study_dir).trials]
    assert states.count("COMPLETE") == 2 and set(states) <= {"COMPLETE", "FAIL"}

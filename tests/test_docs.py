"""Every README code block runs: its research queries, its Python, and its shell commands (in a scratch folder whose
runs/ holds real runs; a command that cannot run here is listed in NOT_RUN with why, and still parses)."""

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
from conftest import ROOT

import loratrace
from loratrace.config import load_config

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
QUERIES = [body for lang, body in BLOCKS if lang == "sql"]
PYTHON = [body for lang, body in BLOCKS if lang == "python"]
# plain blocks that list files: a run folder, an export folder, a sweep's folder, the repository
LISTINGS = ("runs/<dataset>_<method>_<YYYYMMDD_HHMMSS>/", "out/adapters/", "runs/sweeps/<study>/", "pyproject.toml")
SHELL_LINES = [line for lang, body in BLOCKS if lang == "" and not body.startswith(LISTINGS)
               for line in body.splitlines() if line.strip()]


def segments(line: str) -> list[str]:
    """The commands of one README line: its comment dropped (as bash does), split at `&&`."""
    return [part.strip() for part in re.sub(r"\s+#.*$", "", line).split("&&") if part.strip()]


COMMANDS = [command for line in SHELL_LINES for command in segments(line)]
LEGACY_FOLDER = ("needs a folder of the traditional script (not parsed either: its paths must exist): "
                 "tests/legacy/test_legacy.py imports and resumes one that tests/legacy_script.py writes with a real "
                 "Trainer")
LAUNCHED = ("4 processes of Qwen2.5-0.5B from the hub (and SLURM, or a second node): tests/training/test_launchers.py "
            "runs the same launches on the tiny preset with 2 CPU processes (torchrun one node and two, "
            "srun's variables)")
NOT_RUN = {  # README commands these tests do not run, and why (a `loratrace train` among them is still parsed)
    "python3 -m venv .venv": "makes the venv the tests already run in",
    ". .venv/bin/activate": "the tests' venv is already active",
    'pip install -e ".[dev]"': "installs from PyPI; the tests run against the installed package",
    "python -m pytest -q": "the test suite itself",
    "loratrace train --config configs/arc-challenge.yaml --track-batches training.batch_size=16":
        "Qwen2.5-0.5B and ARC-Challenge come from the Hugging Face hub: needs network",
    "torchrun --standalone --nproc_per_node 4 -m loratrace train --config configs/arc-challenge.yaml --track-batches "
    "training.devices=4": LAUNCHED,
    "torchrun --nnodes 2 --nproc_per_node 4 --node_rank 0 --master_addr node0 --master_port 29500 -m loratrace train "
    "--config configs/arc-challenge.yaml --track-batches training.devices=4 training.num_nodes=2": LAUNCHED,
    "srun --nodes 2 --ntasks-per-node 4 loratrace train --config configs/arc-challenge.yaml --track-batches "
    "training.devices=4 training.num_nodes=2": LAUNCHED,
    "torchrun --standalone --nproc_per_node 4 -m loratrace train --resume-from-checkpoint "
    "runs/<run>/checkpoints/checkpoint-step-100.ckpt": LAUNCHED,
    "loratrace train --config configs/arc-challenge.yaml --track-batches training.devices=4 training.strategy=fsdp":
        "Qwen2.5-0.5B from the hub on 4 GPUs; Lightning's FSDP needs CUDA: bench/fsdp_smoke.py (run by bench/gpu.sh) "
        "checks FSDP on one GPU",
    **{command: "needs an S3 server: tests/runs/test_storage.py starts moto's on 127.0.0.1 and runs each of these"
       for command in ("export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_ENDPOINT_URL=http://minio.lab:9000",
                       "loratrace train --track-batches --runs-dir s3://lab-bucket/loratrace/runs",
                       'loratrace query --runs-dir s3://lab-bucket/loratrace/runs "SELECT run_id, count(*) FROM '
                       'samples GROUP BY 1"',
                       "loratrace trace --runs-dir s3://lab-bucket/loratrace/runs --example-id LTSYN_TRA_0001",
                       "loratrace runs --runs-dir s3://lab-bucket/loratrace/runs")},
    "loratrace influence runs/<run> --split validation --limit 200 --method tracin-cp --project-dim 1024":
        "every training example (400) at every checkpoint for 200 test examples: many minutes on 2 cores; "
        "tests/attribution/test_influence.py checks tracin-cp, projection and the CLI on a small run",
    "swanlab watch runs/<run>/swanlab_logs":
        "a server that runs until stopped: tests/training/test_swanlab.py starts it and reads a local run's loss back",
    **{command: LEGACY_FOLDER for command in (
           "loratrace import-legacy experiments/icoding/arc-challenge/icoding_20250720_143052_lora",
           "loratrace import-legacy experiments/icoding/ --runs-dir runs",
           "loratrace train --resume-from-checkpoint "
           "experiments/icoding/arc-challenge/icoding_20250720_143052_lora/checkpoints/checkpoint-100",
           "loratrace train --resume-from-checkpoint path/to/hf-trainer-output/checkpoint-500 "
           "--config configs/arc-challenge.yaml")},
}
SWEEP = ("needs a sweep (minutes of trials): tests/sweeps/test_sweep.py runs sweeps of the tiny preset with fewer "
         "steps, kills and resumes one, runs two jobs, runs the README's trials query and reports on a study")
NOT_RUN.update({command: SWEEP for command in COMMANDS
                if command.startswith(("loratrace sweep", "loratrace report --study")) or "FROM trials" in command})
NOT_RUN["optuna-dashboard sqlite:///runs/sweeps/<study>/study.db"] = \
    "a server that runs until stopped, and not a dependency (pip install optuna-dashboard)"
DEFAULT_JOBS = {  # the embedded default job, 125 updates (~80 s each on 2 cores): run in the slow tests
    "loratrace train", "loratrace train --track-batches", "loratrace train --dataset arc-challenge --dataset arc-easy",
    "loratrace train eval.every_checkpoint=true",
}
RUN_HERE = list(dict.fromkeys(c for c in COMMANDS if c.startswith("loratrace ") and c not in NOT_RUN
                            and c not in DEFAULT_JOBS))
TRAIN = [c for c in COMMANDS if c.startswith("loratrace train") and NOT_RUN.get(c) != LEGACY_FOLDER
         and "--print-config" not in c]  # that one prints, it trains nothing: test_readme_command_runs checks it
EXPECT = {  # what each read command prints, beyond exit code 0
    "query": r"step", "trace": r"\w+ \(line \d+\) trained at [1-9]\d* step", "runs": r"completed",
    "eval": r"best: \S+\.ckpt \(step \d+\), accuracy",
    "compare": r"data_order", "report": r"opens offline", "export": r"exported [1-9]\d* adapter\(s\)",
    "influence": r"tracin(-cp)? over \d+ (step|checkpoint)|LDS over \d+ replays of steps",
    "config": r"training\.stage1_steps  \(int, default 75\)", "tail": r"step +stage +loss[^\n]*\n +\d+ ",
    "--print-config": r"stage1_steps: 12\n",
    "verify": r"verified steps? \d+(-\d+)? from \d+ checkpoints?: identical",
    "replay": r"replayed steps? \d+(-\d+)? of \S+ from checkpoints/checkpoint-step-\d+\.ckpt without",
}


def bash(command: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    """A README line as a user's shell runs it, `loratrace` being this interpreter's `python -m loratrace`."""
    script = f'loratrace() {{ "{sys.executable}" -m loratrace "$@"; }}\n{command}\n'
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_states(root) -> dict:
    """Each run folder under root/runs/ with its status and number of launches, from run.json."""
    return {p.name: (info["status"], len(info["attempts"]))
            for p in sorted((root / "runs").iterdir()) if (info := _run_json(p))}


def _run_json(run_dir) -> dict | None:
    return json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else None


def scratch(tmp_path):
    """A folder where the README's relative paths resolve: configs/ from the repository, runs/ empty."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    (tmp_path / "runs").mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, default_run):
    """runs/ holds a copy of the default job and a small tracked run made by the CLI: `runs/<run>` is the small one."""
    root = scratch(tmp_path_factory.mktemp("readme"))
    shutil.copytree(default_run, root / "runs" / default_run.name)
    made = bash("loratrace train --config configs/tiny.yaml --track-batches training.max_steps=8 "
                "training.stage1_steps=5 logging.swanlab=false --tag demo", root)  # `runs --tag demo` lists it
    assert made.returncode == 0, made.stderr[-2000:]
    small = next(p for p in (root / "runs").iterdir() if p.name != default_run.name)
    (root / "query.sql").write_text("SELECT step, loss FROM batches ORDER BY step\n")
    return root, small


def substitute(command: str, small) -> str:
    """The README's placeholders -> the small run: its folder, and its first checkpoint for a resume."""
    first = sorted((small / "checkpoints").glob("checkpoint-step-*.ckpt"))[0].name
    command = re.sub(r"checkpoint-step-\d+\.ckpt", first, command.replace("runs/<run>", f"runs/{small.name}"))
    assert not re.search(r"<\w+>", command), command
    return command


def parsed_train(argv: list[str], monkeypatch) -> list:
    """What `loratrace train ARGS` would train, (config, resume_from) per run, without training: argparse and config
    loading only."""
    import loratrace.cli
    import loratrace.recipe

    calls = []

    def train(cfg=None, resume_from=None, overrides=()):  # the config it resolves, as recipe.train does first
        calls.append((loratrace.recipe.resolve_run(cfg, resume_from, overrides)[0], resume_from))

    monkeypatch.setattr(loratrace.recipe, "train", train)
    assert loratrace.cli.main(argv) == 0
    return calls


# ---- the blocks are all accounted for ----

def test_the_readme_has_the_blocks_these_tests_run():
    assert len(QUERIES) == 6 and len(PYTHON) == 1
    assert sum(body.startswith(LISTINGS) for lang, body in BLOCKS if lang == "") == len(LISTINGS)
    assert {lang for lang, _ in BLOCKS} <= {"", "sql", "python"}
    unlisted = [c for c in COMMANDS if not c.startswith("loratrace ") and c not in NOT_RUN]
    assert unlisted == [], "a README command that is neither run here nor listed in NOT_RUN with why"
    assert len(RUN_HERE) >= 8 and DEFAULT_JOBS <= set(COMMANDS)


# ---- SQL ----

@pytest.mark.parametrize("sql", QUERIES, ids=[f"query{i}" for i in range(len(QUERIES))])
def test_readme_query_runs_read_only(small_run, sql):
    with loratrace.open_runs(small_run, read_only=True) as db:
        frame = db.sql(sql).df()
    assert len(frame) > 0


def test_exposure_and_forgetting_agree_with_pandas(small_run):
    rows = pd.read_parquet(small_run / "tracking" / "batches").sort_values(["step", "micro_batch", "rank"])
    seen, forgotten, last = {}, {}, {}
    for ids, correct in zip(rows.example_ids, rows.correct):
        for example_id, ok in zip(ids, correct):
            seen[example_id] = seen.get(example_id, 0) + 1
            if last.get(example_id) is True and not ok:
                forgotten[example_id] = forgotten.get(example_id, 0) + 1
            last[example_id] = bool(ok)
    with loratrace.open_runs(small_run) as db:
        exposures = dict(db.sql(QUERIES[4]).df()[["example_id", "exposures"]].itertuples(index=False))
        events = db.sql(QUERIES[3]).df()
    assert exposures == seen
    assert {k: v for k, v in zip(events.example_id, events.forgetting_events) if v} == forgotten


# ---- Python ----

NOTEBOOK = '''import ast, sys
scope = {}
for node in ast.parse(sys.stdin.read()).body:  # statement by statement; an expression's value is shown, as in Jupyter
    if isinstance(node, ast.Expr):
        value = eval(compile(ast.Expression(node.value), "README.md", "eval"), scope)
        print("shown", type(value).__name__, len(value))
    else:
        exec(compile(ast.Module([node], []), "README.md", "exec"), scope)
'''


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_readme_python_runs(code, tmp_path):
    """Run in a scratch folder (configs/ from the repository, runs/ there), each shown value a non-empty frame."""
    before = sorted(p.name for p in (ROOT / "runs").iterdir())
    result = subprocess.run([sys.executable, "-c", NOTEBOOK], input=code, cwd=scratch(tmp_path), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = [line.split() for line in result.stdout.splitlines() if line.startswith("shown ")]
    assert len(shown) == sum(isinstance(node, ast.Expr) for node in ast.parse(code).body) > 0
    assert all(kind == "DataFrame" and int(rows) > 0 for _, kind, rows in shown), shown
    assert len(run_states(tmp_path)) == 1
    assert sorted(p.name for p in (ROOT / "runs").iterdir()) == before  # nothing written into the repository


# ---- shell ----

@pytest.mark.parametrize("command", RUN_HERE)
def test_readme_command_runs(workdir, command):
    root, small = workdir
    before = run_states(root)
    result = bash(substitute(command, small), root)
    assert result.returncode == 0, result.stderr[-3000:]
    after = run_states(root)
    verb = "--print-config" if "--print-config" in command else command.split()[1]
    if verb in ("train", "replay"):  # a new run, or one more launch of the resumed one, and every run completed
        assert after != before and all(status == "completed" for status, _ in after.values()), after
        assert verb == "train" or re.search(EXPECT[verb], result.stdout), result.stdout[-2000:]
    else:
        assert after == before and re.search(EXPECT[verb], result.stdout), result.stdout[-2000:]


@pytest.mark.parametrize("command", TRAIN)
def test_readme_train_command_parses(workdir, command, monkeypatch):
    """Every `loratrace train` line, those not run here too: its arguments and config load, and say what it trains."""
    root, small = workdir
    monkeypatch.chdir(root)
    argv = shlex.split(substitute(command, small))[1:]
    args, calls = argv[1:], parsed_train(argv, monkeypatch)
    datasets = [args[i + 1] for i, arg in enumerate(args) if arg == "--dataset"]
    assert [cfg.data.dataset for cfg, _ in calls] == (datasets or [calls[0][0].data.dataset])
    for cfg, resume_from in calls:
        assert cfg.tracking.enabled or "--track-batches" not in args
        assert resume_from == (args[args.index("--resume-from-checkpoint") + 1] if "--resume-from-checkpoint" in args
                               else None)
        for key, value in (arg.split("=", 1) for arg in args if "=" in arg):
            section, field = key.split(".")
            assert str(getattr(getattr(cfg, section), field)).lower() == value.lower(), key
    if "configs/arc-challenge.yaml" in command:
        assert calls[0][0].model.name == "Qwen/Qwen2.5-0.5B" and calls[0][0].data.source == "hub"


def test_first_command_is_the_default_job_and_trains_the_example_it_traces(default_run, monkeypatch, tmp_path):
    """The setup line's `loratrace train --track-batches` is the default_run fixture's job, and the example its
    `loratrace trace` names is one that job trained (a change of default model or sample must keep it so)."""
    train, trace = [c for c in segments(SHELL_LINES[0]) if c.startswith("loratrace ")]
    (cfg, _), = parsed_train(shlex.split(train)[1:], monkeypatch)
    recorded = load_config(default_run / "config.yaml")
    assert replace(cfg, runs_dir=recorded.runs_dir) == recorded
    example_id = re.search(r"--example-id (\S+)", trace)[1]
    result = bash(f"{trace} --runs-dir {default_run}", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(rf"{example_id} \(line \d+\) trained at [1-9]\d* step", result.stdout), result.stdout[:2000]


@pytest.mark.slow
@pytest.mark.parametrize("line", [line for line in SHELL_LINES if DEFAULT_JOBS & set(segments(line))])
def test_readme_default_job_line_runs(line, tmp_path):
    """The lines that train the full default job, as written (their loratrace commands; setup is NOT_RUN)."""
    commands = [c for c in segments(line) if c.startswith("loratrace ")]
    result = bash(" && ".join(commands), scratch(tmp_path), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    if "loratrace trace" in line:
        assert re.search(EXPECT["trace"], result.stdout), result.stdout[-2000:]
    assert_default_jobs(tmp_path / "runs", line)


def assert_default_jobs(runs, line: str) -> None:
    """One completed 125-step run per data set the line names, with 50 scored checkpoints if it asks for them."""
    infos = [_run_json(p) for p in sorted(runs.iterdir())]
    datasets = re.findall(r"--dataset (\S+)", line) or ["arc-challenge"]
    assert [(i["dataset"], i["status"], i["steps"], len(i["attempts"])) for i in infos] == \
        [(name, "completed", 125, 1) for name in datasets]
    if "eval.every_checkpoint=true" in line:
        with loratrace.open_runs(runs) as db:
            assert db.sql("SELECT count(DISTINCT checkpoint_step) AS n FROM evals").df().n[0] == 50


def test_every_document_the_code_and_docs_cite_is_in_the_repository():
    """A help text, docstring or doc that sends the reader to a .md file names one that exists here (a file outside
    the repository, such as a planning document, is no help to a user)."""
    cited = {}
    for path in [*ROOT.glob("src/**/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("bench/*.py")]:
        for name in re.findall(r"[\w./-]*\b[A-Z][A-Z_]+\.md\b", path.read_text()):
            cited.setdefault(name, path.relative_to(ROOT))
    assert cited, "no citations found: the pattern is wrong"
    missing = {name: where for name, where in cited.items()
               if not any((ROOT / base / name.lstrip("./")).is_file() for base in ("", "docs", "bench"))}
    assert not missing, f"cited but not in the repository: {missing}"


def test_the_readme_file_tree_names_every_module_and_test():
    """README's "Files" block is the map a newcomer reads: every module of the package (as `room/module.py` under
    src/loratrace/) and every test file is on it, and nothing on it is gone."""
    block = README.split("## Files", 1)[1].split("```", 2)[1]
    package = ROOT / "src" / "loratrace"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")
               if p.name != "__init__.py" or p.parent == package}
    named = set(re.findall(r"(?<![\w/])((?:[a-z_]+/)?[a-z_]+\.py)\b", block))
    tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py") if p.parent.name != "hostile"}
    assert modules - named == set() and tests - set(re.findall(r"tests/\S+\.py", block)) == set()
    gone = {path for path in re.findall(r"^(?:src|tests|bench|docs|configs)/\S+", block, re.M)
            if "*" not in path and not (ROOT / path).exists()}
    assert gone == set()

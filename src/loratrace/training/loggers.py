"""The experiment loggers of a run, built in one place from `logging.*`: TensorBoard, SwanLab, MLflow, W&B, CSV.

Every enabled logger is one of Lightning's own classes and gets the same numbers: `LoRAModule` hands each step's
scalars to every logger in `trainer.loggers`, the checkpoint evaluator each accuracy. `check_loggers(cfg)` runs before
the run folder exists, so a logger that cannot start (package missing, a bad tracking URI, W&B online without a
login) is one `LoggerError` line, not a crash once training is under way.

    loratrace train logging.mlflow=true logging.wandb=true logging.csv=true
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
    wandb sync runs/<run>/wandb/offline-run-*
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import logging
import os
import re
import time
import warnings
from pathlib import Path

from loratrace.config import Config, flatten_keys
from loratrace.errors import LoratraceError, first_line
from loratrace.runs.storage import is_remote, local_form

RUN_TAG = "loratrace.run_id"  # MLflow tag naming the run folder: a resume finds its MLflow run by it
PACKAGES = ("mlflow", "wandb", "swanlab", "tensorboard")  # loggers whose package has the logger's name


# Lines a loratrace user cannot act on: MLflow creating its tables, Lightning creating the experiment.
QUIET = {"mlflow": logging.WARNING, "alembic": logging.WARNING, "lightning.pytorch.loggers.mlflow": logging.ERROR}
# Lightning finalizes every logger with status "failed" on any exception that ends `fit`, a SIGTERM's or Ctrl+C's
# planned stop included, and SwanLab's logger warns about it: the command's one error line and run.json's status
# already say how the run ended (`interrupted` or `failed`).
QUIET_WARNINGS = ("SwanLabLogger received non-success Lightning finalize status",)


class LoggerError(LoratraceError):
    """A logger switched on in the config that cannot start."""


def mlflow_tracking_uri(cfg: Config) -> str:
    """`logging.mlflow_tracking_uri`, or the default: a SQLite store beside the run folders (MLflow 3's file store is
    in maintenance mode)."""
    return cfg.logging.mlflow_tracking_uri or f"sqlite:///{(Path(local_form(cfg.runs_dir)) / 'mlflow.db').resolve()}"


def mlflow_artifact_location(cfg: Config) -> str | None:
    """Artifacts of the default store go beside it (MLflow would put them under the working folder)."""
    if cfg.logging.mlflow_tracking_uri:
        return None
    return (Path(local_form(cfg.runs_dir)) / "mlartifacts").resolve().as_uri()


def enabled(cfg: Config) -> list[str]:
    """The loggers `cfg` switches on, by name."""
    g = cfg.logging
    names = [("tensorboard", g.tensorboard), ("swanlab", g.swanlab and g.swanlab_mode != "disabled"),
             ("mlflow", g.mlflow), ("wandb", g.wandb), ("csv", g.csv)]
    return [name for name, on in names if on]


def check_loggers(cfg: Config) -> None:
    """Fail in one line, before anything is written, when an enabled logger cannot start."""
    for name in enabled(cfg):
        if name in PACKAGES and not _installed(name):
            extra = "loggers" if name in ("mlflow", "wandb") else "dev"
            raise LoggerError(f"logging.{name}=true needs the {name} package: pip install 'loratrace[{extra}]' "
                              f"(or set logging.{name}=false)")
    if cfg.logging.mlflow and not cfg.logging.mlflow_tracking_uri and is_remote(cfg.runs_dir):
        raise LoggerError(f"logging.mlflow=true with runs_dir={cfg.runs_dir} needs logging.mlflow_tracking_uri: the "
                          "default store is a SQLite file beside local run folders")
    if cfg.logging.mlflow:
        _check_mlflow(cfg)
    if cfg.logging.wandb and cfg.logging.wandb_mode == "online":
        import wandb

        if not wandb.login(prompt=False, verify=False):  # a key in the environment or ~/.netrc; no network
            raise LoggerError("logging.wandb_mode=online needs a W&B login: run `wandb login` first "
                              "(or keep logging.wandb_mode=offline and `wandb sync` later)")


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken install
        return False


def _check_mlflow(cfg: Config) -> None:
    uri = mlflow_tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # A remote server that does not answer fails now, once, instead of after minutes of retries at fit start.
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
        try:
            from mlflow import MlflowClient  # importing sets MLflow's own log level: quieted after it

            with quiet_loggers():
                client = MlflowClient(tracking_uri=uri)  # a new SQLite store creates its tables here
            if uri.split(":", 1)[0] in ("http", "https", "databricks"):
                client.search_experiments(max_results=1)
        except Exception as error:  # noqa: BLE001 - MLflow raises many types for a bad URI; all end the same way
            first = first_line(error)
            raise LoggerError(f"logging.mlflow_tracking_uri={uri!r}: MLflow cannot use it: {first}") from None


@contextlib.contextmanager
def _environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if key not in os.environ})  # the user's win
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet_loggers():
    """While training: the loggers' set-up chatter off (`QUIET`) and their warnings of `QUIET_WARNINGS`, levels and
    warning filters restored after."""
    saved = {name: logging.getLogger(name).level for name in QUIET}
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    try:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=re.escape(message))
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _after_earlier_event_files(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order: first the second each was opened, then a per-process
    counter compared as text (".10" before ".9"). A resume's file must open in a later second than the files before
    it, or its purge can be read first and the earlier attempt's points all kept. Waits at most a second, and only
    after an attempt shorter than one."""
    opened = [int(second) for p in folder.glob("events.out.tfevents.*") if (second := p.name.split(".")[3]).isdigit()]
    if opened:
        time.sleep(max(0.0, max(opened) + 1 - time.time()))


def build_loggers(cfg: Config, run_dir: Path, resumed_step: int) -> list:
    """Lightning loggers for every enabled `logging.*`, in a fixed order; a resume (`resumed_step` > 0) continues
    each logger's record of the run without showing a step twice where the logger allows it."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = []
    g = cfg.logging
    if g.tensorboard:
        # purge_step: TensorBoard's readers drop the earlier attempt's points from the resumed step on, so every
        # step shows once, as in the `batches` view.
        # default_hp_metric off: the HParams summary is written once, at the run's end, with its final metrics
        # (`finish_loggers`); the config set now fills hparams.yaml when Lightning saves it.
        if resumed_step:
            _after_earlier_event_files(run_dir / "tensorboard_logs")
        tensorboard = TensorBoardLogger(save_dir=str(run_dir), name="tensorboard_logs", version="",
                                        purge_step=resumed_step + 1 if resumed_step else None, default_hp_metric=False)
        tensorboard.log_hyperparams(flatten_keys(cfg.to_dict()))
        loggers.append(tensorboard)
    if g.swanlab and g.swanlab_mode != "disabled":
        from swanlab.integration.pytorch_lightning import SwanLabLogger

        loggers.append(SwanLabLogger(project=g.project, experiment_name=run_dir.name,
                                     log_dir=str(run_dir / "swanlab_logs"), mode=g.swanlab_mode,
                                     config=cfg.to_dict()))
    if g.mlflow:
        loggers.append(_mlflow_logger(cfg, run_dir, resumed_step))
    if g.wandb:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(name=run_dir.name, save_dir=str(run_dir), project=g.project,
                             offline=g.wandb_mode == "offline", config=cfg.to_dict(),
                             settings=wandb.Settings(silent=True, console="off"))
        # Lightning always passes W&B's deprecated `anonymous` setting, and W&B then warns on stderr.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    if g.csv:
        loggers.append(_csv_logger(run_dir, resumed_step))
    return loggers


def _mlflow_logger(cfg: Config, run_dir: Path, resumed_step: int):
    """One MLflow run per run folder, tagged with its name; a resume appends to it (params are the config it started
    with: MLflow refuses a changed value, and run.json records a resume's `config_changes`)."""
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name=cfg.logging.project, run_name=run_dir.name,
                          tracking_uri=mlflow_tracking_uri(cfg), tags={RUN_TAG: run_dir.name},
                          artifact_location=mlflow_artifact_location(cfg),
                          run_id=find_mlflow_run(cfg, run_dir.name) if resumed_step else None)
    if not resumed_step:
        logger.log_hyperparams(flatten_keys(cfg.to_dict()))
    return logger


def find_mlflow_run(cfg: Config, run_id: str) -> str | None:
    """The MLflow run id of loratrace run `run_id` in `logging.project`'s experiment (None: not logged there)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.logging.project)
    if experiment is None:
        return None
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_id}'",
                               max_results=1)
    return found[0].info.run_id if found else None


def _csv_logger(run_dir: Path, resumed_step: int):
    """Lightning's CSVLogger in csv_logs/ (metrics.csv, hparams.yaml). Its writer empties metrics.csv when it opens
    an existing folder: on a resume the rows up to the resumed step are written back, the rows after it dropped (the
    purge TensorBoard does), so each step shows once."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=str(run_dir), name="csv_logs", version="")
    metrics = Path(logger.log_dir) / "metrics.csv"
    if resumed_step and metrics.is_file():
        with open(metrics, newline="") as file:
            kept = [row for row in csv.DictReader(file) if row.get("step") and int(row["step"]) <= resumed_step]
        for row in kept:
            step = int(row.pop("step"))
            logger.experiment.log_metrics({k: float(v) for k, v in row.items() if v != ""}, step=step)
        logger.save()
    return logger


def finish_loggers(loggers: list, cfg: Config, run_dir: Path, step: int, last_metrics: dict | None = None) -> None:
    """At a run's end (update `step`): the config with the final metrics to TensorBoard's HParams tab; the final
    adapter and config.yaml to MLflow as artifacts; W&B's run is closed now (its closing lines would otherwise follow
    the summary, and a second run in the process needs the first finished)."""
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":  # Lightning closed its writer at fit's end: this one is reopened, then closed
            logger.log_hyperparams(flatten_keys(cfg.to_dict()), hparams_metrics(run_dir, last_metrics or {}), step)
            logger.finalize("success")
        if kind == "MLFlowLogger":
            client, mlflow_run = logger.experiment, logger.run_id
            client.log_artifact(mlflow_run, str(run_dir / "config.yaml"))
            if (run_dir / "final_adapter").is_dir():
                client.log_artifacts(mlflow_run, str(run_dir / "final_adapter"), "final_adapter")
    close_wandb(loggers)


def hparams_metrics(run_dir: Path, last_metrics: dict) -> dict[str, float]:
    """What TensorBoard's HParams tab compares runs by: the last logged train loss and accuracy, and the accuracy of
    the last evaluation written during training (`eval.every_checkpoint`), under `hparams/`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    metrics = {f"hparams/{name.replace('/', '_')}": float(value) for name, value in last_metrics.items()
               if name in ("train/loss", "train/accuracy") and value is not None}
    parts = sorted((run_dir / "tracking" / "evals").glob("s*.parquet"))  # names sort by step, then time
    if parts:
        table = pq.read_table(parts[-1], columns=["split", "correct"])
        if table.num_rows:
            accuracy = pc.mean(table["correct"].cast("float64")).as_py()
            metrics[f"hparams/eval_{table['split'][0].as_py()}_accuracy"] = accuracy
    return metrics


class EvalTables:
    """A `CheckpointListener` after the checkpoint evaluator: each evaluation's per-example rows go to MLflow as a
    table artifact once its part is written (`eval.every_checkpoint`; `loratrace eval` does the same afterwards)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def checkpoint_saving(self, trainer, step: int) -> None:
        """Nothing to hand over: the evaluation's part is read after it is written."""

    def checkpoint_saved(self, trainer, step: int, path: str, size: int) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if type(logger).__name__ == "MLFlowLogger":
                for part in eval_parts(self.run_dir, step):
                    log_eval_table(logger.experiment, logger.run_id, part)


def eval_parts(run_dir: Path, step: int, count: int = 1) -> list[Path]:
    """The `count` newest evaluation parts of checkpoint step `step` (their names sort by evaluation time)."""
    return sorted((run_dir / "tracking" / "evals").glob(f"s{step:09d}-*.parquet"))[-count:]


EVAL_TABLE_COLUMNS = ("example_id", "line", "gold", "pred", "correct", "p_gold", "choice_logliks", "checkpoint_step",
                      "checkpoint_path", "split", "scoring")


def log_eval_table(client, mlflow_run: str, part: Path) -> None:
    """One evaluation's per-example rows as an MLflow table (`evals/<split>/<part>.json`, shown as a table by MLflow's
    UI and read back by `mlflow.load_table`); named after its part, so a second evaluation never appends to it."""
    import pyarrow.parquet as pq

    table = pq.read_table(part, columns=list(EVAL_TABLE_COLUMNS))
    if table.num_rows:
        split = table["split"][0].as_py()
        client.log_table(mlflow_run, data=table.to_pydict(), artifact_file=f"evals/{split}/{part.stem}.json")


def close_wandb(loggers: list) -> None:
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
        import wandb

        wandb.finish()


def logger_summary(cfg: Config, run_dir: Path) -> list[str]:
    """The run summary's lines for MLflow, W&B and CSV: where each logger's record is and what opens it."""
    g, lines = cfg.logging, []
    if g.mlflow:
        lines.append(f"mlflow       mlflow ui --backend-store-uri {mlflow_tracking_uri(cfg)}")
    if g.wandb:
        lines.append(f"wandb        {run_dir / 'wandb'}" +
                     (f"   (wandb sync {run_dir / 'wandb'}/offline-run-*)" if g.wandb_mode == "offline" else ""))
    if g.csv:
        lines.append(f"csv          {run_dir / 'csv_logs' / 'metrics.csv'}")
    return lines


def log_accuracies_after_training(cfg: Config, run_dir: Path, points: list[tuple[str, int, float]]) -> list[str]:
    """`loratrace eval`'s accuracies (tag, step, value) to the run's file-based loggers: TensorBoard, CSV and MLflow.
    W&B's offline run and SwanLab's are closed files that a later process cannot append to; the evals view holds the
    scores for them. Returns the loggers written."""
    written = []
    if cfg.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run_dir / "tensorboard_logs")) as writer:
            for tag, step, value in points:
                writer.add_scalar(tag, value, step)
        written.append("tensorboard")
    if cfg.logging.csv and (run_dir / "csv_logs").is_dir():
        _append_csv(run_dir / "csv_logs" / "metrics.csv", points)
        written.append("csv")
    if cfg.logging.mlflow and _installed("mlflow"):
        mlflow_run = find_mlflow_run(cfg, run_dir.name)
        if mlflow_run is not None:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
            for tag, step, value in points:
                client.log_metric(mlflow_run, tag, value, step=step)
            # one accuracy point per evaluation this command made (its stderr is a point too, not a part)
            steps = [step for tag, step, _ in points if not tag.endswith("_stderr")]
            for step in dict.fromkeys(steps):  # this command's parts: the newest of each step it scored
                for part in eval_parts(run_dir, step, steps.count(step)):
                    log_eval_table(client, mlflow_run, part)
            written.append("mlflow")
    return written


def _append_csv(path: Path, points: list[tuple[str, int, float]]) -> None:
    """Add rows to a CSVLogger metrics.csv, widening its header for a new tag (as Lightning's writer does)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
    rows += [{"step": str(step), tag: repr(float(value))} for tag, step, value in points]
    names = sorted({key for row in rows for key in row})
    tmp = path.with_name(f".tmp-{path.name}.partial")
    with open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)

"""Which process this is, and the one run folder every process of a run writes to, whatever started them.

    launch = identify(cfg)                          # rank and world size as Lightning will count them; bad settings:
                                                    # one line (ConfigError), before anything is written
    run_dir = shared_run_dir(launch, make_run_dir)  # rank 0 makes (or reopens) the folder; every rank gets its path

Two ways processes start:

- Lightning's own launcher (`training.devices=N` from one command, one node): rank 0 is the command, and Lightning
  starts ranks 1..N-1 inside `fit` by running the command again. Rank 0 has made the folder by then; the children
  find it in `LORATRACE_RUN_DIR`, set while fitting (`folder_for_children`).
- An external launcher (`torchrun`, one node or several; SLURM's `srun`; anything Lightning's cluster environments
  read): every rank runs from the start and no environment variable can carry a name made at run time. The ranks
  meet in the process group Lightning itself would create (its strategy's `setup_environment`: same cluster
  environment, backend and timeout; Lightning finds it initialized and uses it) and rank 0 broadcasts the folder's
  path, with the run's URL when it is staged for object storage (storage.py): every rank then publishes what it writes,
  from rank 0's scratch folder on rank 0's machine, from one of its own on another. A name derived from the
  launcher's variables alone (TORCHELASTIC_RUN_ID, SLURM_JOB_ID) would not do: torchrun's run id is "none" unless
  `--rdzv-id` is given, and neither says when the run started.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loratrace.config import Config, ConfigError
from loratrace.errors import LoratraceError, first_line
from loratrace.runs import storage

RUN_DIR_ENV = "LORATRACE_RUN_DIR"  # Lightning's launcher re-runs the command for ranks 1..N-1: they join this folder


class LaunchError(LoratraceError):
    """Rank 0 could not make the run folder: the other ranks stop with its reason."""

    exit_code = 1


@dataclass
class Launch:
    rank: int
    """Global rank, as Lightning will number it: node rank x devices + local rank."""
    world_size: int
    """Processes in the run: training.devices x training.num_nodes (Lightning checks it against the launcher's)."""
    external: bool
    """Every rank was started by a launcher (torchrun, srun), not by Lightning inside `fit`."""
    strategy: object | None = None
    """The strategy of the Trainer built to check the settings: it sets up the process group the same way."""


def identify(cfg: Config) -> Launch:
    """This process's rank and the run's world size, from the Trainer Lightning would build for these settings
    (built only to ask, then dropped). `training.accelerator`, `devices`, `num_nodes`, `strategy` and `precision`
    Lightning refuses, or that do not match the launcher's world, are one line now, before any file is written."""
    import lightning as L
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    t = cfg.training
    try:
        probe = L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                          precision=t.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    except Exception as exc:  # noqa: BLE001 - Lightning raises MisconfigurationException, ValueError, RuntimeError
        raise _settings_error(cfg, exc) from None
    strategy = probe.strategy
    environment = getattr(strategy, "cluster_environment", None)
    if environment is None:  # one device, one process
        started = int(os.environ.get("WORLD_SIZE", "1")) if TorchElasticEnvironment.detect() else 1
        if started > 1:  # each would train alone, in its own run folder
            raise ConfigError(f"torchrun started {started} processes, but training.devices={t.devices} x "
                              f"training.num_nodes={t.num_nodes} is 1: set training.devices to the processes per "
                              "node (--nproc_per_node) and training.num_nodes to the nodes (--nnodes)")
        return Launch(rank=0, world_size=1, external=False)
    child_of_lightning = RUN_DIR_ENV in os.environ
    external = environment.creates_processes_externally and not child_of_lightning
    if t.num_nodes > 1 and not external and not child_of_lightning:
        raise ConfigError(f"training.num_nodes={t.num_nodes}: start the processes on every node with torchrun or "
                          "srun (Lightning's own launcher starts them on one node only)")
    if external:  # Lightning checks this only for processes it starts itself: a wrong count would train silently
        try:
            environment.validate_settings(num_devices=strategy.num_processes, num_nodes=t.num_nodes)
        except ValueError as exc:
            raise _settings_error(cfg, exc) from None
    rank = environment.node_rank() * strategy.num_processes + environment.local_rank()
    return Launch(rank=rank, world_size=t.num_nodes * strategy.num_processes, external=external, strategy=strategy)


def _settings_error(cfg: Config, exc: Exception) -> ConfigError:
    t = cfg.training
    return ConfigError(f"training.accelerator={t.accelerator}, devices={t.devices}, num_nodes={t.num_nodes}, "
                       f"strategy={t.strategy}, precision={t.precision}: {first_line(exc)}")


def shared_run_dir(launch: Launch, make: Callable[[], Path]) -> Path:
    """The run folder: `make()` on rank 0 (it creates or reopens the folder and writes run.json and config.yaml),
    its path on every other rank. Under an external launcher this is the first collective call: every rank must reach
    it (they run the same checks first, so a user error stops them all before it)."""
    if launch.world_size == 1 or (not launch.external and launch.rank == 0):
        return make()
    if not launch.external:
        return Path(os.environ[RUN_DIR_ENV])
    import torch.distributed as dist

    launch.strategy.setup_environment()  # the process group Lightning would make in fit(); it will reuse it
    message: list[str | None] = [None, None, None]  # [path, why rank 0 could not make it, its URL when staged]
    error: BaseException | None = None
    if launch.rank == 0:
        try:
            made = make()
            message[0], message[2] = str(made), storage.remote_name(made)
        except BaseException as exc:  # noqa: BLE001 - told to the other ranks, then raised here as it was
            error, message[1] = exc, first_line(exc) or type(exc).__name__
    dist.broadcast_object_list(message, src=0, device=launch.strategy.root_device)
    if error is not None:
        raise error
    if message[0] is None:
        raise LaunchError(f"rank 0 could not make the run folder: {message[1]}")
    if message[2] is not None and launch.rank != 0:
        return storage.join_staged_run(Path(message[0]), message[2])
    return Path(message[0])


@contextlib.contextmanager
def folder_for_children(run_dir: Path, launch: Launch):
    """Lightning's launcher starts the other ranks by running the command again: they find rank 0's folder in the
    environment they inherit. Set only while fitting, and only when Lightning is the one starting them."""
    if launch.world_size == 1 or launch.external or RUN_DIR_ENV in os.environ:
        yield
        return
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        os.environ.pop(RUN_DIR_ENV, None)

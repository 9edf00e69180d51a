"""Where run folders live: a local folder, or any fsspec URL (`s3://`, `gs://`, ...) on object storage.

    loratrace train --track-batches --runs-dir s3://lab-bucket/loratrace/runs
    loratrace query --runs-dir s3://lab-bucket/loratrace/runs "SELECT run_id, count(*) FROM samples GROUP BY 1"

Writing: a run on object storage is staged in a local scratch folder laid out exactly as a local run, and every file
is PUT to the same key there as soon as it is complete (`publish`, called right after the local `os.replace` that
completes it: tracking parts, mappings, the samples index, checkpoints, run.json, config.yaml, evaluation parts). One
PUT is atomic on S3 (a multipart upload too, at its completion), so a reader never sees half an object, as a local
reader never sees half a file; the order of the PUTs is the order of the local renames (a checkpoint's rows land
before the checkpoint). Files no finalizing writer owns (TensorBoard's event file, exports, SwanLab's files) are
uploaded by `publish_tree` when the launch ends. Under torchrun or srun every rank publishes what it writes: ranks on
rank 0's machine write into its scratch folder, a rank on another node into one of its own (`join_staged_run`); the
ranks Lightning's launcher starts inherit the staging. `file://` URLs are local folders.

Credentials and endpoint come from the standard environment, as boto3 and s3fs read them: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 (MinIO, Ceph, R2), AWS_DEFAULT_REGION, or a profile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from loratrace.errors import ConfigError, LoratraceError, first_line
from loratrace.runs.processes import alive, on_this_host, this_process

STAGED_ENV = "LORATRACE_STAGED_RUN"  # "<local scratch run folder>\n<its URL>": inherited by the ranks a launcher starts
NOT_STAGED = ("final_model/", "final_adapter/", "tensorboard_logs/", "swanlab_logs/")  # `stage_run` leaves these out


class StorageError(LoratraceError):
    """A runs location that cannot be used: unknown protocol, package or credentials missing, access refused."""

    exit_code = 1


def is_remote(location) -> bool:
    """Whether `location` is a URL on object storage (any scheme but file://): never a local folder."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def local_form(location):
    """A `file://` URL as the local path it names; anything else unchanged."""
    text = str(location)
    return text[len("file://"):] if text.startswith("file://") else location


def local_folder(location, refusal: str) -> Path:
    """A folder a command reads or writes on this machine only: a `file://` URL as the path it names; a URL on object
    storage refused in one line that names it as given and says what to do instead (`refusal`)."""
    if is_remote(location):
        raise StorageError(f"{location}: {refusal}")
    return Path(local_form(location))


def join(base: str, *names: str) -> str:
    """A URL under `base` (no normalization: `s3://b/x` + `y` is `s3://b/x/y`)."""
    return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])


_filesystems: dict[str, object] = {}  # one per protocol and AWS_* environment (credentials, endpoint)


def filesystem(url: str, listings: bool = False):
    """(fsspec filesystem, path inside it) for `url`. One filesystem per protocol and process whose listings are never
    cached (runs change under a reader); with `listings`, a new one of its own that keeps what it listed until told
    otherwise (`invalidate_cache`): a reader answers DuckDB's `info` calls from its last listing, not with a HEAD
    request per file. Fails in one line when the package or the credentials are missing."""
    protocol = str(url).split("://", 1)[0]
    cache_key = repr((protocol, sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if cache_key not in _filesystems or listings:
        try:
            import fsspec

            kind = fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            raise StorageError(f"{url}: {first_line(exc)} (pip install 'loratrace[s3]' for s3://)") from None
        except ValueError:
            raise StorageError(f"{url}: unknown storage protocol {protocol}://") from None
        options = {}
        if protocol in ("s3", "s3a"):
            _check_s3_credentials(url)
            options = {"skip_instance_cache": True, "use_listings_cache": listings}
        if listings:
            fs = kind(**options)
            return fs, fs._strip_protocol(str(url)).rstrip("/")
        _filesystems[cache_key] = kind(**options)
    fs = _filesystems[cache_key]
    return fs, fs._strip_protocol(str(url)).rstrip("/")


def _check_s3_credentials(url: str) -> None:
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise StorageError(f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                           "AWS_ENDPOINT_URL for MinIO, Ceph or R2), or AWS_PROFILE")


def check_location(location) -> None:
    """Before anything is written: a local runs folder is (or can become) a folder, a remote runs location is
    reachable with the credentials at hand, in a bucket that exists."""
    if not is_remote(location):
        _check_local_folder(Path(local_form(location)))
    else:
        fs, path = filesystem(str(location))
        bucket = path.split("/", 1)[0]
        with remote_errors(str(location)):
            found = _bucket_exists(fs, bucket)
        if not found:
            raise StorageError(f"{location}: no bucket {bucket!r} at this endpoint (create it, or check "
                               "AWS_ENDPOINT_URL)")


def _check_local_folder(folder: Path) -> None:
    """The folder, or the nearest part of its path that exists, must be a folder: a file there would fail the
    first mkdir, half-way through setting up a run."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise ConfigError(f"runs_dir {folder}: {existing} is a file, not a folder (name a folder)")
            return


def _bucket_exists(fs, bucket: str) -> bool:
    """S3: HEAD the bucket, so that an endpoint that cannot be reached or refuses access is told as such (s3fs's
    `exists` answers False for every error); other stores: their `exists`."""
    if not hasattr(fs, "call_s3"):
        return fs.exists(bucket)
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return False
    return True


def _unreachable(exc: BaseException) -> str | None:
    """The endpoint a connection error of botocore or aiohttp failed to reach (scheme://host:port), else None."""
    import urllib.parse

    kinds = {(c.__module__.split(".")[0], c.__name__) for c in type(exc).__mro__}
    if not kinds & {("botocore", "ConnectionError"), ("aiohttp", "ClientConnectionError")}:
        return None
    endpoint = getattr(exc, "kwargs", {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"
    parts = urllib.parse.urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else endpoint


@contextlib.contextmanager
def remote_errors(url: str):
    """An error of the object store (access denied, no such bucket, endpoint down) as one StorageError line."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{url}: {first_line(exc) or type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - botocore and aiohttp raise their own types
        if (endpoint := _unreachable(exc)) is not None:
            raise StorageError(f"{url}: cannot reach the endpoint {endpoint} ({first_line(exc)}): check "
                               "AWS_ENDPOINT_URL and that the server is up") from None
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs"):
            raise StorageError(f"{url}: {first_line(exc) or type(exc).__name__}") from None
        raise


# ---------------------------------------------------------------------------------------------- a staged run


def staged() -> tuple[Path, str] | None:
    """(local scratch run folder, its URL) of the run this process stages, if any."""
    value = os.environ.get(STAGED_ENV)
    if not value:
        return None
    local, url = value.split("\n", 1)
    return Path(local), url


def remote_name(path) -> str | None:
    """The URL a file or folder of the staged run is published to; None when `path` is not in a staged run."""
    stage = staged()
    if stage is None:
        return None
    try:
        relative = Path(os.path.abspath(path)).relative_to(stage[0])
    except ValueError:
        return None
    return join(stage[1], relative.as_posix()) if relative.parts else stage[1]


def public(run_dir):
    """What to show a user for a run folder: its URL when it is staged for object storage, else the folder."""
    return remote_name(run_dir) or run_dir


_published: dict[str, tuple[int, int]] = {}  # local file -> (mtime_ns, size) when this process last synced it
_scratch: list[Path] = []  # the scratch folders this process made (`staging` removes them)


def publish(path) -> None:
    """PUT a file just completed in the staged run to its key there (one atomic PUT); no-op for any other file."""
    url = remote_name(path)
    if url is None:
        return
    fs, key = filesystem(url)
    stat = os.stat(path)
    with remote_errors(url):
        fs.put_file(str(path), key)
    _published[str(path)] = (stat.st_mtime_ns, stat.st_size)


def publish_tree(folder) -> None:
    """Publish every file under `folder` (in a staged run) that changed since this process last synced it: what no
    finalizing writer published (TensorBoard's events, exports, SwanLab's files). Partial files are left out, and so
    are files another process (a rank sharing the scratch folder) put there already, as large as here."""
    url = remote_name(folder)
    if url is None:
        return
    fs, root = filesystem(url)
    with remote_errors(url):
        try:
            there = {key[len(root):].lstrip("/"): int(info.get("size") or 0)
                     for key, info in fs.find(root, detail=True).items()}
        except FileNotFoundError:
            there = {}
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.name.endswith(".partial"):
            continue
        stat = path.stat()
        if _published.get(str(path)) == (stat.st_mtime_ns, stat.st_size):
            continue
        if str(path) not in _published and there.get(path.relative_to(folder).as_posix()) == stat.st_size:
            continue  # published by the rank that wrote it
        publish(path)


def new_staged_run(runs_url: str, name: str) -> Path:
    """A local scratch folder for a new run named `name` (with `_2`, `_3`, ... when the name is taken there) under
    `runs_url`; its files are published there as they complete."""
    fs, root = filesystem(runs_url)
    with remote_errors(runs_url):
        try:
            taken = {PurePosixPath(p).name for p in fs.ls(root, detail=False)}
        except FileNotFoundError:
            taken = set()
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    local = _scratch_folder(candidate)
    os.environ[STAGED_ENV] = f"{local}\n{join(runs_url, candidate)}"
    return local


SCRATCH_PREFIX = "loratrace-stage-"
OWNER_PREFIX = "owner-"  # owner-<pid>.json beside the run in a scratch folder: a process that writes into it


def _scratch_folder(name: str) -> Path:
    local = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    _scratch.append(local)
    _add_owner(local)
    (local / name).mkdir()
    return local / name


def _add_owner(scratch: Path) -> None:
    """Record this process (host, pid, start time) as one that writes into `scratch`: while any is alive the folder
    is in use (`remove_abandoned_scratch`)."""
    record = this_process()
    tmp = scratch / f".{OWNER_PREFIX}{record['pid']}.json.partial"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, scratch / f"{OWNER_PREFIX}{record['pid']}.json")


def remove_abandoned_scratch(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders of killed commands (a SIGKILLed `train` on object storage leaves its staged run):
    only those provably abandoned, every process recorded as writing there being dead on this host. A folder with no
    owner record (being made, or made by an older version) or an owner on another host is left alone."""
    removed = []
    for scratch in sorted(Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*")):
        if scratch.is_dir() and not scratch.is_symlink() and _abandoned(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    return removed


def _abandoned(scratch: Path) -> bool:
    owners = []
    for path in scratch.glob(f"{OWNER_PREFIX}*.json"):
        try:
            owners.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            return False  # unreadable: not proven
    return bool(owners) and all(isinstance(o, dict) and on_this_host(o) and not alive(o) for o in owners)


def join_staged_run(local: Path, url: str) -> Path:
    """The staged run `url` as another rank of its launch sees it: the scratch folder rank 0 made at `local` when
    this machine has it (ranks of one node share it: rank 0 indexes and uploads the whole folder at the end), else a
    scratch folder of this rank's own (another node). Either way what this rank writes is published as it completes."""
    if local.is_dir():
        _add_owner(local.parent)  # rank 0 may die first: the folder stays in use while this rank writes
    else:
        local = _scratch_folder(local.name)
    os.environ[STAGED_ENV] = f"{local}\n{url.rstrip('/')}"
    return local


def stage_run(run_url: str, leave_out: tuple[str, ...] = NOT_STAGED) -> Path:
    """Download a run on object storage into a local scratch folder (all but `leave_out`: exports and logs) to resume
    or evaluate it there; what is then written is published back. A process that stages `run_url` already (a rank
    Lightning's launcher started inherits the staging of the process that started it) gets that folder again."""
    stage = staged()
    if stage is not None and stage[1] == run_url.rstrip("/") and stage[0].is_dir():
        return stage[0]
    fs, root = filesystem(run_url)
    with remote_errors(run_url):
        files = fs.find(root)
        if not files:
            raise StorageError(f"{run_url}: no such run on object storage")
        local = _scratch_folder(PurePosixPath(root).name)
        for key in files:
            relative = key[len(root):].lstrip("/")
            if relative.startswith(leave_out):
                continue
            target = local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(target))
            stat = target.stat()
            _published[str(target)] = (stat.st_mtime_ns, stat.st_size)
    os.environ[STAGED_ENV] = f"{local}\n{run_url.rstrip('/')}"
    return local


@contextlib.contextmanager
def staging():
    """Around a command that may stage a run: at its end the scratch folders it made go, and the staging it found (none,
    or the one a launcher's parent process handed down) is back."""
    found, made = os.environ.get(STAGED_ENV), len(_scratch)
    remove_abandoned_scratch()
    try:
        yield
    finally:
        if found is None:
            os.environ.pop(STAGED_ENV, None)
        else:
            os.environ[STAGED_ENV] = found
        while len(_scratch) > made:
            folder = _scratch.pop()
            for key in [k for k in _published if Path(k).is_relative_to(folder)]:
                del _published[key]
            shutil.rmtree(folder, ignore_errors=True)

"""Runs on object storage as the query layer reads them (store.py), through fsspec.

Each refresh lists every object under the runs' prefixes at once (a paginated LIST, a thousand keys a request,
instead of a request per folder). `RemotePath` answers the few questions store.py and run_folders.py ask of a `Path`
(exists, is_dir, iterdir, stat, read_text) from that listing, so the views are built by the same code as local ones.
Parquet footers of new parts are fetched together (`cat_ranges`, concurrent), run.json and config.yaml too; DuckDB
reads the parts themselves through the same filesystem, registered with its connection.
"""

from __future__ import annotations

import posixpath
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.errors import LoratraceError
from loratrace.runs import storage
from loratrace.runs.find import RunsNotFound, as_list, is_run_folder

FOOTER_TAIL = 64 * 1024  # bytes fetched from the end of a part: its footer, in one request (larger ones: a second)


class RemoteRuns:
    """The objects under the runs location(s) `sources` (URLs), as last listed."""

    def __init__(self, sources):
        self.sources = [str(s).rstrip("/") for s in as_list(sources)]
        if any(not storage.is_remote(s) for s in self.sources):
            raise storage.StorageError("open local folders and object storage separately: " + ", ".join(self.sources))
        self.fs, _ = storage.filesystem(self.sources[0], listings=True)
        self.protocol = self.sources[0].split("://", 1)[0]
        self.objects: dict[str, dict] = {}  # key (no protocol) -> the listing's info
        self.folders: set[str] = set()
        self._children: dict[str, set[str]] = {}
        self._footers: dict[tuple, pa.Schema | None] = {}  # (key, etag) -> footer schema, or None: unreadable
        self._texts: dict[str, str | None] = {}

    def find_runs(self) -> list[RemotePath]:
        """List again; the run folders under each source (a run folder itself, or a folder of them)."""
        self.objects, self._texts = {}, {}
        self.fs.invalidate_cache()  # the listing below refills it: DuckDB's info calls are answered from there
        for source in self.sources:
            _, root = storage.filesystem(source)
            with storage.remote_errors(source):
                try:
                    found = self.fs.find(root, detail=True)
                except FileNotFoundError:
                    found = {}
            self.objects.update({key: info for key, info in found.items() if info.get("type") != "directory"})
        self.folders, self._children = set(), {}
        for key in self.objects:
            child, parent = key, posixpath.dirname(key)
            while parent:
                self._children.setdefault(parent, set()).add(child)
                if parent in self.folders:
                    break  # its ancestors are known already
                self.folders.add(parent)
                child, parent = parent, posixpath.dirname(parent)
        runs: list[RemotePath] = []
        for source in self.sources:
            top = self.path(storage.filesystem(source)[1])
            if is_run_folder(top):
                runs.append(top)
            elif top.is_dir():
                runs += [p for p in top.iterdir() if is_run_folder(p)]
            else:
                raise RunsNotFound(f"{source} is not a run folder or a folder of runs")
        return list(dict.fromkeys(runs))

    def path(self, key: str) -> RemotePath:
        return RemotePath(self, key.rstrip("/"))

    def url(self, key: str) -> str:
        return f"{self.protocol}://{key}"

    def footer_schema(self, key: str) -> pa.Schema:
        """A part's Arrow schema from its footer; raises when it cannot be read. The footers of every part listed
        and not read yet are fetched in one go."""
        wanted = (key, self.objects[key].get("ETag"))
        if wanted not in self._footers:
            self._fetch_footers()
        found = self._footers[wanted]
        if found is None:
            raise LoratraceError(f"{self.url(key)}: unreadable Parquet footer")
        return found

    def _fetch_footers(self) -> None:
        new = [(k, i) for k, i in self.objects.items() if k.endswith(".parquet")
               and (k, i.get("ETag")) not in self._footers]
        starts = [max(0, int(i["size"]) - FOOTER_TAIL) for _, i in new]
        with storage.remote_errors(self.sources[0]):
            tails = self.fs.cat_ranges([k for k, _ in new], starts, [int(i["size"]) for _, i in new],
                                       on_error="return") if new else []
        for (key, info), tail in zip(new, tails):
            self._footers[(key, info.get("ETag"))] = self._parse_footer(key, tail)

    def _parse_footer(self, key: str, tail) -> pa.Schema | None:
        try:
            if isinstance(tail, Exception) or len(tail) < 12 or tail[-4:] != b"PAR1":
                return None
            length = int.from_bytes(tail[-8:-4], "little")
            if length + 8 > len(tail):
                tail = self.fs.cat_file(key, start=max(0, int(self.objects[key]["size"]) - length - 8))
            meta = pq.read_metadata(pa.BufferReader(tail))
            return meta.schema.to_arrow_schema()
        except Exception:  # noqa: BLE001 - any failure to parse is an unreadable part, reported by the caller
            return None

    def text(self, key: str) -> str:
        """A small file's text (run.json, config.yaml); those of every run listed are fetched in one go."""
        if key not in self._texts:
            wanted = [k for k in self.objects if posixpath.basename(k) in ("run.json", "config.yaml")
                      and k not in self._texts] or [key]
            with storage.remote_errors(self.sources[0]):
                found = self.fs.cat(wanted, on_error="return")
            for k in wanted:
                value = found.get(k) if isinstance(found, dict) else found
                self._texts[k] = None if value is None or isinstance(value, Exception) else value.decode()
        if self._texts.get(key) is None:
            raise FileNotFoundError(self.url(key))
        return self._texts[key]


class RemotePath:
    """A file or folder of a `RemoteRuns` listing, with the part of `pathlib.Path` the query layer uses; `str()` is
    its URL, which DuckDB reads through the registered filesystem."""

    def __init__(self, runs: RemoteRuns, key: str):
        self.runs, self.key = runs, key

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.runs, f"{self.key}/{name}")

    def __str__(self) -> str:
        return self.runs.url(self.key)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.key == self.key

    def __lt__(self, other: RemotePath) -> bool:
        return self.key < other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.runs, posixpath.dirname(self.key))

    def exists(self) -> bool:
        return self.key in self.runs.objects or self.key in self.runs.folders

    def is_dir(self) -> bool:
        return self.key in self.runs.folders

    def is_file(self) -> bool:
        return self.key in self.runs.objects

    def iterdir(self):
        return iter(sorted(RemotePath(self.runs, k) for k in self.runs._children.get(self.key, ())))

    def stat(self):
        """What tells one version of an object from the next: its ETag (as st_ino), time and size."""
        info = self.runs.objects.get(self.key)
        if info is None:
            if self.is_dir():
                return SimpleNamespace(st_mtime_ns=0, st_ino=0, st_size=0)
            raise FileNotFoundError(str(self))
        modified = info.get("LastModified")
        return SimpleNamespace(st_mtime_ns=int(modified.timestamp() * 1e9) if modified else 0,
                               st_ino=hash(info.get("ETag")), st_size=int(info["size"]))

    def footer_schema(self) -> pa.Schema:
        return self.runs.footer_schema(self.key)

    def read_text(self) -> str:
        return self.runs.text(self.key)

    def open(self, mode: str = "rb"):
        return self.runs.fs.open(self.key, mode, block_size=1 << 20)

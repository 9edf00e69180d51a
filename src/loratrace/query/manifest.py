"""tracking/manifest.json: a run's parts as they were when its samples index was written (query/index.py, at the
end of the run), each with its size, modification time and footer columns, and the index's own stamp. Opening many
runs reads this one small file per run instead of a Parquet footer per part. An entry is trusted only while its file
has the size and time it records; any other file (a part written later, one rewritten, a manifest that does not
parse) is read as if there were no manifest. It is a reader's cache: plain JSON beside plain Parquet."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

from loratrace.track import schema

MANIFEST_FILE = "manifest.json"  # tracking/<this>
MANIFEST_VERSION = 1
INDEX_ENTRY = "samples_index.parquet"  # the index's entry: its stamp, whether the views read it flat, its columns


# A list's item field is named by its writer ("item" by pyarrow, "element" by DuckDB): Arrow types that differ only
# there are equal (schema.part_problem), and so are their texts here
ITEM_NAME = re.compile(r"list<[^:<>]+: ")


# (columns, id(expected)) -> (expected, its problem): the parts of a folder share their columns, each set is checked
# once. Keyed by the schema's identity (the expected schemas are schema.py's constants): pa.Schema's own hash reads
# every field, ~25 us, more than the check itself, and a manifest stands for thousands of parts.
_CHECKED: dict[tuple, tuple] = {}


def columns_problem(columns: tuple, expected: pa.Schema) -> str | None:
    """schema.part_problem for columns as a manifest records them: (name, type as text) pairs."""
    key = (columns, id(expected))
    cached = _CHECKED.get(key)
    if cached is None or cached[0] is not expected:
        if len(_CHECKED) >= 256:
            _CHECKED.clear()
        cached = _CHECKED[key] = (expected, _problem(columns, expected))
    return cached[1]


def _problem(columns: tuple, expected: pa.Schema) -> str | None:
    found = {name: ITEM_NAME.sub("list<item: ", kind) for name, kind in columns}
    for field in expected:
        if field.name not in found:
            if field.name in schema.LATER_COLUMNS:
                continue
            return f"no {field.name} column"
        if found[field.name] != ITEM_NAME.sub("list<item: ", str(field.type)):
            return f"column {field.name} is {found[field.name]}, expected {field.type}"
    return None


def stamp_of(stat: os.stat_result) -> list[int]:
    """What a manifest records of a file to know it again: its size and modification time."""
    return [stat.st_size, stat.st_mtime_ns]


class Manifests:
    """Each run's manifest, read once per version of the file."""

    def __init__(self):
        self._read: dict[str, tuple[tuple, dict]] = {}  # tracking folder -> (manifest's stat, its entries)

    def entries(self, tracking: Path) -> dict:
        """The manifest's entries of `tracking` (name under tracking/ -> entry), or {} without a usable one."""
        path = tracking / MANIFEST_FILE
        try:
            stat = path.stat()
        except OSError:
            return {}
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        cached = self._read.get(str(tracking))
        if cached is None or cached[0] != key:
            cached = self._read[str(tracking)] = (key, _parse(path))
        return cached[1]

    def index_stamp(self, tracking: Path, stat: os.stat_result) -> dict | None:
        """What the samples index holds ({"stamp": run_id, parts and gaps, "flat", "columns"}) if the manifest knows
        this version of it."""
        entry = self.entries(tracking).get(INDEX_ENTRY)
        if isinstance(entry, dict) and entry.get("file") == stamp_of(stat):
            return entry
        return None


def recorded_columns(entries: dict, name: str, file: list[int]) -> tuple | None:
    """The columns `entries` (a manifest's) record for tracking/`name` if they know this version of it (`file`:
    `stamp_of`)."""
    entry = entries.get(name)
    if not isinstance(entry, dict) or entry.get("file") != file:
        return None
    return entry.get("columns")


def _parse(path: Path) -> dict:
    """The entries of a manifest, each entry's "columns" (an index into its "schemas": the parts of a folder share
    theirs) made the (name, type) pairs; {} for a file that is not a manifest of this version."""
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
            return {}
        schemas = [tuple((str(name), str(kind)) for name, kind in columns) for columns in manifest["schemas"]]
        entries = {str(name): {**entry, "columns": schemas[entry["columns"]]}
                   for name, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}
    return entries


def manifest_text(run_id: str, entries: dict[str, dict]) -> str:
    """A manifest's JSON: `entries` (name under tracking/ -> {"file": `stamp_of`, "columns": (name, type) pairs,
    ...}) with each distinct set of columns written once."""
    schemas: dict[tuple, int] = {}
    files = {name: {**entry, "columns": schemas.setdefault(tuple(map(tuple, entry["columns"])), len(schemas))}
             for name, entry in entries.items()}
    return json.dumps({"version": MANIFEST_VERSION, "run_id": run_id, "schemas": [list(s) for s in schemas],
                       "files": files}) + "\n"

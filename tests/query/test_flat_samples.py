"""A finished run's samples index read flat by the views (views.py), and its manifest read instead of the parts'
footers (query/manifest.py): the same rows and values as unnesting the batches, used only while they cover exactly
the run's parts on disk."""

import json
import os
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_damaged_runs import _smash_data_pages
from test_store import _batch, _write_run, two_runs  # noqa: F401  (the fixture)

import loratrace
from loratrace.query import parts, samples_index
from loratrace.query.index import write_samples_index
from loratrace.query.store import StoreWarning
from loratrace.track import schema

VIEWS = ["samples", "example_trace", "example_checkpoint", "batches", "batches_all", "step_checkpoint", "metrics",
         "runs", "checkpoints"]


def _answers(root) -> dict:
    """Every view's rows (sorted) and column types, and the warnings opening the runs gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loratrace.open_runs(root) as db:
            answers = {view: (db.sql(f"SELECT * FROM {view} ORDER BY ALL").fetchall(), db.sql(f"FROM {view}").types)
                       for view in VIEWS}
            answers["flat"] = sorted(f.split("/")[-3] for f in db.files["samples_flat_raw"])
    answers["warnings"] = sorted(str(w.message) for w in caught if issubclass(w.category, StoreWarning))
    return answers


@pytest.fixture
def three_runs(two_runs):  # noqa: F811
    """two_runs (A resumed: attempt 0's steps 3-4 abandoned) and C, whose step 3 has no batch (a lost part)."""
    _write_run(two_runs, "C", [[_batch("C", 0, s, ["y", f"c{s}"], [9, 20 + s]) for s in (1, 2, 4)]],
               checkpoints=[(0, 2), (0, 4)], attempts=[(0, None, 0)])
    return two_runs


def test_flat_index_answers_exactly_like_the_unnested_batches(three_runs):
    unnested = _answers(three_runs)
    assert unnested["flat"] == []
    assert len(unnested["samples"][0]) == 2 * 2 + 3 * 2 + 2 + 3 * 2  # A: 2 of attempt 0, 3 of attempt 1; B; C
    assert any("run C has no tracked rows for step(s) 3" in w for w in unnested["warnings"])
    for run in ("A", "B", "C"):
        write_samples_index(three_runs / run)
    flat = _answers(three_runs)
    assert flat["flat"] == ["A", "B", "C"]  # every view below read the indexes, not the batches' lists
    for key in [*VIEWS, "warnings"]:
        assert flat[key] == unnested[key], key


def test_a_run_that_trains_on_is_read_from_its_batches_again(three_runs):
    for run in ("A", "B", "C"):
        write_samples_index(three_runs / run)
    schema.write_atomic(pa.Table.from_pylist([_batch("B", 0, 3, ["new"], [30])], schema=schema.BATCHES),
                        three_runs / "B" / "tracking" / "batches" / schema.batches_part_name(0, 0, 7))
    answers = _answers(three_runs)
    assert answers["flat"] == ["A", "C"]  # B's index no longer covers its parts: B is unnested, with its new step
    (three_runs / "A" / "tracking" / samples_index.INDEX_FILE).unlink()
    (three_runs / "C" / "tracking" / samples_index.INDEX_FILE).unlink()
    unnested = _answers(three_runs)
    assert unnested["flat"] == []
    for view in VIEWS:
        assert answers[view] == unnested[view], view
    assert ("B", "new", 3) in [(r[0], r[10], r[2]) for r in answers["samples"][0]]


def test_an_index_without_the_samples_columns_serves_trace_only(three_runs):
    unnested = _answers(three_runs)
    write_samples_index(three_runs / "A")
    index = three_runs / "A" / "tracking" / samples_index.INDEX_FILE
    table = pq.read_table(index)  # as an older loratrace wrote it: the trace columns only
    pq.write_table(table.select(list(samples_index.TRACE_COLUMNS)), index)
    (three_runs / "A" / "tracking" / "manifest.json").unlink()
    answers = _answers(three_runs)
    assert answers["flat"] == []
    assert all(answers[view] == unnested[view] for view in VIEWS)
    with loratrace.open_runs(three_runs) as db:
        assert db.indexed_runs == ["A"]
        assert db.trace("y", run_id="A").step.tolist() == [1, 2, 3, 4, 5]


def _footers_read(monkeypatch) -> list:
    read = []
    footer_schema, opened = parts.footer_schema, samples_index.SamplesIndex.__init__
    monkeypatch.setattr(parts, "footer_schema", lambda path: read.append(path.name) or footer_schema(path))

    def counted(self, path):
        read.append(path.name)
        opened(self, path)

    monkeypatch.setattr(samples_index.SamplesIndex, "__init__", counted)
    return read


def test_the_manifest_stands_for_the_footers_while_it_matches(three_runs, monkeypatch):
    for run in ("A", "B", "C"):
        write_samples_index(three_runs / run)
    manifest = json.loads((three_runs / "A" / "tracking" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["attempts/a000.parquet", "batches/a000-r00-000000.parquet",
                                         "batches/a001-r00-000001.parquet", "checkpoints/a000-s000000000.parquet",
                                         "examples.parquet", "samples_index.parquet"]
    expected = _answers(three_runs)
    read = _footers_read(monkeypatch)
    assert _answers(three_runs) == expected
    assert read == []  # opened from the manifests alone

    # a part replaced since (another size and time): its footer is read, the rest still trusted
    part = three_runs / "A" / "tracking" / "batches" / "a001-r00-000001.parquet"
    rows = pq.read_table(part).to_pylist()
    rows[0]["example_ids"], rows[0]["lines"] = ["zz", "y"], [99, 9]
    schema.write_atomic(pa.Table.from_pylist(rows, schema=schema.BATCHES), part)
    answers = _answers(three_runs)
    assert read == ["a001-r00-000001.parquet"]
    assert ("A", "zz") in [(r[0], r[10]) for r in answers["samples"][0]]  # the part as it is now, not the index
    assert answers["flat"] == ["B", "C"]  # A's index covers the replaced part's old version: A is unnested

    # a manifest that does not parse: every footer read, the same answers
    (three_runs / "B" / "tracking" / "manifest.json").write_text("{not json")
    read.clear()
    again = _answers(three_runs)
    assert {name for name in read} >= {"a000-r00-000000.parquet", "samples_index.parquet"}
    assert again == answers


def test_a_flat_index_whose_pages_are_damaged_gives_way_to_its_batches(three_runs):
    unnested = _answers(three_runs)
    write_samples_index(three_runs / "A")
    index = three_runs / "A" / "tracking" / samples_index.INDEX_FILE
    _smash_data_pages(index)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loratrace.open_runs(three_runs) as db:
            assert db.files["samples_flat_raw"] == [str(index)]  # its footer reads: taken for current
            samples = db.fetch_table("SELECT * FROM samples ORDER BY ALL")  # its pages do not: read from A's batches
            assert [tuple(row.values()) for row in samples.to_pylist()] == unnested["samples"][0]
            assert db.files["samples_flat_raw"] == []
    [warned] = [str(w.message) for w in caught if str(index) in str(w.message)]
    assert warned.startswith(f"samples index {index} cannot be read (")
    assert warned.endswith("): reading its run from its batches instead")


# ------------------------------------------------------------------- opening many runs, tracing them (issue #25)

def _trace_rows(root, example_id) -> tuple[list, list[str], list[str]]:
    """The trace of `example_id` over every run (rows and Arrow types), and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loratrace.open_runs(root) as db:
            table = db.trace_table(example_id)
    return table.to_pylist(), [str(f.type) for f in table.schema], sorted(
        str(w.message) for w in caught if issubclass(w.category, StoreWarning))


def test_a_part_touched_since_the_manifest_is_read_again(three_runs, monkeypatch):
    for run in ("A", "B", "C"):
        write_samples_index(three_runs / run)
    expected = _answers(three_runs)
    read = _footers_read(monkeypatch)
    part = three_runs / "B" / "tracking" / "batches" / "a000-r00-000000.parquet"
    stat = part.stat()
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the same size and bytes, another time
    answers = _answers(three_runs)
    assert read == [part.name]  # its footer read again, the other parts still known from the manifests
    assert answers["flat"] == ["A", "C"]  # B's index covers the part as it was: B is unnested, to the same rows
    assert all(answers[view] == expected[view] for view in VIEWS)


def test_a_tracking_folder_linked_from_outside_the_run_is_skipped(three_runs, tmp_path_factory):
    write_samples_index(three_runs / "B")
    batches = three_runs / "B" / "tracking" / "batches"
    outside = tmp_path_factory.mktemp("elsewhere").resolve() / "batches"
    batches.rename(outside)
    batches.symlink_to(outside)
    answers = _answers(three_runs)
    assert [w for w in answers["warnings"] if "outside" in w] == [
        f"skipping tracking part {batches}/a000-r00-000000.parquet: a link to {outside}/a000-r00-000000.parquet, "
        "outside its run folder"]
    assert {row[0] for row in answers["batches"][0]} == {"A", "C"} and answers["flat"] == []


def test_trace_reads_every_index_at_once_and_a_damaged_one_gives_way(three_runs):
    expected, types, gap = _trace_rows(three_runs, "y")  # from the batches: no index yet
    assert {row["run_id"] for row in expected} == {"A", "B", "C"} and len(gap) == 1  # C's missing step
    for run in ("A", "B", "C"):
        write_samples_index(three_runs / run)
    assert _trace_rows(three_runs, "y") == (expected, types, gap)
    index = three_runs / "B" / "tracking" / samples_index.INDEX_FILE
    _smash_data_pages(index)
    rows, found_types, warned = _trace_rows(three_runs, "y")
    assert (rows, found_types) == (expected, types)
    [damaged] = [w for w in warned if w not in gap]  # once, naming B's index alone
    assert damaged.startswith(f"samples index {index} cannot be read (")


def test_trace_reads_an_older_index_beside_current_ones(three_runs):
    expected = _trace_rows(three_runs, "y")
    for run in ("A", "B", "C"):
        write_samples_index(three_runs / run)
    index = three_runs / "A" / "tracking" / samples_index.INDEX_FILE
    pq.write_table(pq.read_table(index).select(list(samples_index.TRACE_COLUMNS)), index)  # an older loratrace's
    (three_runs / "A" / "tracking" / "manifest.json").unlink()
    with loratrace.open_runs(three_runs) as db:
        assert db.indexed_runs == ["A", "B", "C"]
    assert _trace_rows(three_runs, "y") == expected


def test_trace_reads_every_row_group_an_id_spans(three_runs):
    expected = _trace_rows(three_runs, "y")
    write_samples_index(three_runs / "A")
    index = three_runs / "A" / "tracking" / samples_index.INDEX_FILE
    table = pq.read_table(index)  # its stamp kept, in row groups of 2 rows: A's five "y" rows span three
    pq.write_table(table, index, row_group_size=2)
    assert pq.read_metadata(index).num_row_groups > 3 and table.schema.metadata[samples_index.INDEX_KEY]
    with loratrace.open_runs(three_runs) as db:
        assert db.indexed_runs == ["A"]
    assert _trace_rows(three_runs, "y") == expected


def test_trace_reads_an_id_whose_rows_span_pages_of_one_row_group(three_runs):
    expected = _trace_rows(three_runs, "y")
    write_samples_index(three_runs / "A")
    index = three_runs / "A" / "tracking" / samples_index.INDEX_FILE
    table = pq.read_table(index)  # one row group, pages of one row: DuckDB skips pages by their statistics
    pq.write_table(table, index, data_page_size=1, write_batch_size=1)  # a page a row
    assert pq.read_metadata(index).num_row_groups == 1
    with loratrace.open_runs(three_runs) as db:
        assert db.indexed_runs == ["A"]
    assert _trace_rows(three_runs, "y") == expected


def test_an_index_is_written_in_row_groups_of_sorted_id_ranges_and_traces_every_exposure(tmp_path):
    """A run of 140,000 samples (bench.scale's synthetic layout): three row groups of at most INDEX_ROW_GROUP rows,
    each with its example_id range, ranges in order; a trace returns every exposure the unnested batches hold."""
    from bench.scale import TARGET, write_run

    run = write_run(tmp_path, 0, 140_000)  # ends as a finished run ends: write_samples_index
    meta = pq.read_metadata(run / "tracking" / samples_index.INDEX_FILE)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [65_536, 65_536, 8_928]
    column = meta.schema.to_arrow_schema().get_field_index("example_id")
    ranges = [(meta.row_group(g).column(column).statistics.min, meta.row_group(g).column(column).statistics.max)
              for g in range(meta.num_row_groups)]
    assert all(low <= high for low, high in ranges) and all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    with loratrace.open_runs(tmp_path) as db:
        assert db.indexed_runs == [run.name]
        traced = db.trace_table(TARGET)
        unnested = db.sql(f"SELECT count(*) FROM batches_raw, unnest(example_ids) AS t(id) "
                          f"WHERE id = '{TARGET}'").fetchall()[0][0]
    assert traced.num_rows == unnested == 7  # 140,000 samples over 20,000 examples: 7 epochs
    assert traced.column("step").to_pylist() == sorted(traced.column("step").to_pylist())

"""step_checkpoint / line_checkpoint: the same files whichever way the rows reach `Mappings`, and by either sort."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loratrace.track import mappings, schema


@pytest.mark.parametrize(("n", "lines", "ids", "low", "one_id_a_line", "null_ids"), [
    (5_000, 40, 7, 0, True, False),  # an imported run's: each line one id, some lines out of range (null)
    (200_000, 400, 401, 12, True, False),
    (100_000, 300, 300, 0, False, True),  # a line with two ids (one null): grouped by (line, id)
    (300_000, 400, 400, -7, False, False),  # ids drawn apart from lines: ~160,000 groups, past 16 bits
])
def test_rows_group_the_same_in_step_order_or_not(n, lines, ids, low, one_id_a_line, null_ids, monkeypatch):
    """`_unique_rows` counts and radix-sorts rows already in step order (by line, or by line and id), and sorts others
    in full: all give each (line_null, line, id, step) once, in that order, as pandas does."""
    rng = np.random.default_rng(0)
    steps = np.sort(rng.integers(1, n // 8, n))
    line = rng.integers(0, lines, n) + low
    line_null = rng.random(n) < 0.01  # indices out of the data set's range
    line[line_null] = 0
    id_rank = (line - low) % ids if one_id_a_line else rng.integers(0, ids, n)
    id_rank[line_null] = ids - 1 if one_id_a_line else id_rank[line_null]  # a null line's rows: one id too
    if null_ids:
        id_rank = np.where(rng.random(n) < 0.01, ids, id_rank)  # a null id: the last rank
    expected = (pd.DataFrame({"null": line_null, "line": line, "id": id_rank, "step": steps})
                .drop_duplicates().sort_values(["null", "line", "id", "step"]))
    assert len(expected) < n  # repeated rows: an example trained twice at a step
    counted, count = [], mappings._unique_stepped
    monkeypatch.setattr(mappings, "_unique_stepped", lambda key, *rest: counted.append(rest[-1]) or count(key, *rest))
    shuffled = rng.permutation(n)
    for given in ((line_null, line, id_rank, steps),
                  (line_null[shuffled], line[shuffled], id_rank[shuffled], steps[shuffled])):
        got = mappings._unique_rows(*given, ids + 1)
        for column, values in zip(expected.columns, got):
            np.testing.assert_array_equal(values, expected[column].to_numpy())
    # counted once, the rows in step order: by line where each holds one id, else by (line, id)
    assert counted == [lines + 1 if one_id_a_line else (lines + 1) * (ids + 1)]


def _batches(run_id: str, steps: int, batch: int = 4, abandoned: int = 0) -> pa.Table:
    """`steps` steps of attempt 0, and every 50th also in an attempt 1 that the lineage {0: (0, None)} does not count
    when `abandoned`."""
    rng = np.random.default_rng(2)
    rows = []
    for step in range(1, steps + 1):
        for attempt in (0, 1) if abandoned and step % 50 == 0 else (0,):
            lines = rng.integers(0, 50, batch).tolist()
            rows.append({"run_id": run_id, "attempt": attempt, "step": step, "micro_batch": 0, "rank": 0,
                         "epoch": 0, "batch_idx": step - 1, "stage": 1, "example_ids": [f"EX{n:03d}" for n in lines],
                         "lines": lines, "losses": [1.0] * batch})
    return pa.Table.from_pylist(rows, schema=schema.BATCHES)


def test_rows_in_memory_give_the_files_reading_the_parts_gives(tmp_path):
    run_id = "r"
    batches = _batches(run_id, 300, abandoned=True)  # 306 rows: 6 of an attempt the lineage does not count
    written = {}
    for name, folder in (("read", "parts"), ("memory", "memory")):
        tracking = tmp_path / folder / "tracking"
        names = [schema.batches_part_name(0, 0, part) for part in range(3)]
        for part, start in zip(names, range(0, 306, 102)):
            schema.write_atomic(batches.slice(start, 102), tracking / "batches" / part)
        for step in (100, 200, 300):
            row = {"run_id": run_id, "attempt": 0, "step": step, "path": f"checkpoints/c{step}.ckpt"}
            schema.write_atomic(pa.Table.from_pylist([row], schema=schema.CHECKPOINTS),
                                tracking / "checkpoints" / schema.checkpoints_part_name(0, step))
        maps = mappings.Mappings(tracking, run_id, {0: (0, None)})
        if name == "memory":
            (tracking / "batches" / names[1]).unlink()  # its rows come from memory
            (tracking / "batches" / names[0]).write_bytes(b"not Parquet")  # and a part is not read back: this one
            maps.add_written(names, batches)
        returned = maps.refresh()
        written[name] = [pq.read_table(tracking / f"{table}.parquet") for table in ("step_checkpoint",
                                                                                    "line_checkpoint")]
        assert [t.to_pylist() for t in returned] == [t.to_pylist() for t in written[name]]
    assert [t.to_pylist() for t in written["read"]] == [t.to_pylist() for t in written["memory"]]
    step_map = written["memory"][0].to_pandas()
    assert list(step_map.step) == list(range(1, 301))
    assert list(step_map.checkpoint_step) == [100] * 100 + [200] * 100 + [300] * 100
    line_map = pd.DataFrame(written["memory"][1].to_pylist())
    counted = [row for row in batches.to_pylist() if row["attempt"] == 0]
    assert sum(len(steps) for steps in line_map.steps) == len({(row["step"], line) for row in counted
                                                             for line in row["lines"]})


def test_large_files_keep_texts_in_a_dictionary_and_numbers_plain(tmp_path):
    batches = _batches("r", 5_000, batch=8)
    schema.write_atomic(batches, tmp_path / "part.parquet")
    group = pq.ParquetFile(tmp_path / "part.parquet").metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert "RLE_DICTIONARY" in encodings["example_ids.list.element"] and "RLE_DICTIONARY" in encodings["run_id"]
    assert "RLE_DICTIONARY" not in encodings["lines.list.element"] and "RLE_DICTIONARY" not in encodings["step"]
    assert pq.read_table(tmp_path / "part.parquet").equals(batches.replace_schema_metadata(None).cast(
        pq.read_schema(tmp_path / "part.parquet").remove_metadata()))

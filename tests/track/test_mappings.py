"""step_checkpoint / line_checkpoint: the same files whichever way the rows reach `Mappings`, and by either sort."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.track import mappings, schema


def test_rows_group_the_same_in_step_order_or_not():
    """`_unique_rows` counts and radix-sorts rows already in step order, and sorts others in full: both give each
    (line_null, line, id, step) once, in that order, as pandas does."""
    rng = np.random.default_rng(0)
    for n, lines, ids in ((5_000, 40, 7), (200_000, 400, 401), (100_000, 300, 300)):
        steps = np.sort(rng.integers(1, n // 8, n))
        line = rng.integers(0, lines, n)
        line_null = rng.random(n) < 0.01  # indices out of the data set's range
        line[line_null] = 0
        id_rank = np.where(rng.random(n) < 0.01, ids, line % ids)  # a null id: the last rank
        expected = (pd.DataFrame({"null": line_null, "line": line, "id": id_rank, "step": steps})
                    .drop_duplicates().sort_values(["null", "line", "id", "step"]))
        assert len(expected) < n  # repeated rows: an example trained twice at a step
        shuffled = rng.permutation(n)
        for given in ((line_null, line, id_rank, steps),
                      (line_null[shuffled], line[shuffled], id_rank[shuffled], steps[shuffled])):
            got = mappings._unique_rows(*given, ids + 1)
            for column, values in zip(expected.columns, got):
                np.testing.assert_array_equal(values, expected[column].to_numpy())


def _batches(run_id: str, steps: int, batch: int = 4) -> pa.Table:
    rng = np.random.default_rng(2)
    rows = []
    for step in range(1, steps + 1):
        lines = rng.integers(0, 50, batch).tolist()
        rows.append({"run_id": run_id, "attempt": 0, "step": step, "micro_batch": 0, "rank": 0, "epoch": 0,
                     "batch_idx": step - 1, "stage": 1, "example_ids": [f"EX{n:03d}" for n in lines],
                     "lines": lines, "losses": [1.0] * batch})
    return pa.Table.from_pylist(rows, schema=schema.BATCHES)


def test_rows_in_memory_give_the_files_reading_the_parts_gives(tmp_path):
    run_id = "r"
    batches = _batches(run_id, 300)
    written = {}
    for name, folder in (("read", "parts"), ("memory", "memory")):
        tracking = tmp_path / folder / "tracking"
        names = [schema.batches_part_name(0, 0, part) for part in range(3)]
        for part, start in zip(names, range(0, 300, 100)):
            schema.write_atomic(batches.slice(start, 100), tracking / "batches" / part)
        for step in (100, 200, 300):
            row = {"run_id": run_id, "attempt": 0, "step": step, "path": f"checkpoints/c{step}.ckpt"}
            schema.write_atomic(pa.Table.from_pylist([row], schema=schema.CHECKPOINTS),
                                tracking / "checkpoints" / schema.checkpoints_part_name(0, step))
        maps = mappings.Mappings(tracking, run_id, {0: (0, None)})
        if name == "memory":
            (tracking / "batches" / names[1]).unlink()  # not read back: its rows come from memory
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
    assert sum(len(steps) for steps in line_map.steps) == len({(s, line) for s, lines in
                                                             enumerate(batches["lines"].to_pylist()) for line in lines})


def test_large_files_keep_texts_in_a_dictionary_and_numbers_plain(tmp_path):
    batches = _batches("r", 5_000, batch=8)
    schema.write_atomic(batches, tmp_path / "part.parquet")
    group = pq.ParquetFile(tmp_path / "part.parquet").metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert "RLE_DICTIONARY" in encodings["example_ids.list.element"] and "RLE_DICTIONARY" in encodings["run_id"]
    assert "RLE_DICTIONARY" not in encodings["lines.list.element"] and "RLE_DICTIONARY" not in encodings["step"]
    assert pq.read_table(tmp_path / "part.parquet").equals(batches.replace_schema_metadata(None).cast(
        pq.read_schema(tmp_path / "part.parquet").remove_metadata()))

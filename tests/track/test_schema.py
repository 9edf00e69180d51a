import pyarrow as pa
import pyarrow.parquet as pq

from loratrace.track import schema


def test_parts_are_compressed_only_when_big_enough_to_pay(tmp_path):
    small = pa.table({"x": list(range(10))})
    big = pa.table({"x": list(range(schema.COMPRESS_FROM_BYTES))})  # 8 bytes a value: 8x the threshold
    schema.write_atomic(small, tmp_path / "small.parquet")
    schema.write_atomic(big, tmp_path / "big.parquet")
    codec = {name: pq.read_metadata(tmp_path / f"{name}.parquet").row_group(0).column(0).compression
             for name in ("small", "big")}
    assert codec == {"small": "UNCOMPRESSED", "big": "ZSTD"}
    assert pq.read_table(tmp_path / "big.parquet")["x"].to_pylist() == big["x"].to_pylist()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []  # nothing half-written left

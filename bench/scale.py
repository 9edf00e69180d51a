"""Queries at scale: `python -m bench.scale [--samples 1e6,1e7,1e8] [--s3-samples 1e6,1e7] [--open-runs 100x32]
[--root /tmp/x]`.

Writes many synthetic tracked runs in the tracker's own layout (one folder per run; `tracking/batches/` parts named as
the tracker names them, `a000-r00-NNNNNN.parquet`; attempts, checkpoints, examples.parquet, run.json, config.yaml)
with DuckDB `COPY ... TO parquet` from `range()`, ends each as a finished run ends (loratrace's own
`write_samples_index`: the samples index and the manifest), writes the baseline (the same sample rows unnested once
into one flat Parquet file per run, outside the runs folder), then measures, each in a fresh process (peak RSS is
the process's):

  trace       open_runs(root) + trace(one example id) cold, then a warm trace on the same connection
  cartography one GROUP BY over every sample row: confidence, variability and correctness per (run, example)
  baseline    the same GROUP BY by DuckDB itself over the baseline: "cartography: samples view / flat Parquet baseline"

locally and, with `--s3-samples`, against moto's S3 server on 127.0.0.1 (the same folder uploaded to a bucket, read
through loratrace's s3:// support). `--open-runs RxP` also opens R finished runs of P small parts each (opening costs
follow runs and parts, not rows). Prints Markdown tables; bench/RESULTS.md and docs/SCALING.md hold the figures.
The generated data is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_SIZE = 32
ROWS_PER_PART = 1_000  # micro-batch rows per tracking part: tracking.flush_every_steps=1000 at one micro-batch a step
SAMPLES_PER_RUN = 1_000_000
EXAMPLES_PER_RUN = 20_000  # so each run trains 50 epochs: cartography has 50 points per example
TARGET = "EX0004242"


def _sql_path(path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _batches_select(run_id: str, first_row: int, last_row: int) -> str:
    """Micro-batch rows first_row..last_row-1 of a run: step = row + 1, the example at slot k of row r is a fixed
    permutation of the run's examples (7919 is prime to EXAMPLES_PER_RUN), so each epoch sees every example once."""
    sample = f"(r * {BATCH_SIZE} + k)"
    example = f"(({sample} * 7919) % {EXAMPLES_PER_RUN})"
    unit = f"(hash({sample}, '{run_id}') % 1000000) / 1e6"
    return f"""
        SELECT '{run_id}' AS run_id, 0::INTEGER AS attempt, (r + 1)::BIGINT AS step, 0::INTEGER AS micro_batch,
               0::INTEGER AS rank, (r * {BATCH_SIZE} // {EXAMPLES_PER_RUN})::INTEGER AS epoch, r::BIGINT AS batch_idx,
               1::TINYINT AS stage,
               list_transform(range({BATCH_SIZE}), lambda k: 'EX' || lpad({example}::VARCHAR, 7, '0')) AS example_ids,
               list_transform(range({BATCH_SIZE}), lambda k: {example}::BIGINT) AS lines,
               list_transform(range({BATCH_SIZE}), lambda k: ({unit} * 3)::FLOAT) AS losses,
               list_transform(range({BATCH_SIZE}), lambda k: ({unit})::FLOAT) AS p_gold,
               list_transform(range({BATCH_SIZE}), lambda k: {unit} > 0.5) AS correct,
               (hash(r) % 1000 / 300.0)::FLOAT AS loss, 1.0::FLOAT AS grad_norm, 1e-4::DOUBLE AS lr,
               4096::BIGINT AS n_tokens, {BATCH_SIZE}::BIGINT AS n_target_tokens,
               TIMESTAMPTZ '2025-07-20 00:00:00+00' + to_seconds(r) AS wall_time
        FROM range({first_row}, {last_row}) t(r)"""


def write_run(root: Path, index: int, samples: int, rows_per_part: int = ROWS_PER_PART) -> Path:
    """One synthetic tracked run of `samples` sample rows, then its samples index."""
    import duckdb

    from loratrace.query.index import write_samples_index

    run_id = f"synthetic_lora_20250720_{index:06d}"
    run, tracking = root / run_id, root / run_id / "tracking"
    for folder in ("batches", "attempts", "checkpoints"):
        (tracking / folder).mkdir(parents=True, exist_ok=True)
    rows = samples // BATCH_SIZE
    con = duckdb.connect()
    con.execute("SET threads = 2")
    for part, first in enumerate(range(0, rows, rows_per_part)):
        target = tracking / "batches" / f"a000-r00-{part:06d}.parquet"
        con.execute(f"COPY ({_batches_select(run_id, first, min(rows, first + rows_per_part))}) TO {_sql_path(target)} "
                    "(FORMAT parquet, COMPRESSION zstd)")
    con.execute(f"""COPY (SELECT '{run_id}' AS run_id, 0::INTEGER AS attempt, NULL::INTEGER AS parent_attempt,
                                 TIMESTAMPTZ '2025-07-20 00:00:00+00' AS started_at, NULL::VARCHAR AS resumed_from,
                                 0::BIGINT AS resumed_step, 1::INTEGER AS world_size, 'bench' AS host)
                    TO {_sql_path(tracking / 'attempts' / 'a000.parquet')} (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT '{run_id}' AS run_id, 0::INTEGER AS attempt, s::BIGINT AS step,
                                 printf('checkpoints/checkpoint-step-%03d.ckpt', s) AS path, 1::BIGINT AS bytes,
                                 TIMESTAMPTZ '2025-07-20 00:00:00+00' AS created_at
                          FROM range(1000, {rows + 1}, 1000) t(s))
                    TO {_sql_path(tracking / 'checkpoints' / f'a000-s{rows:09d}.parquet')} (FORMAT parquet)""")
    con.execute(f"""COPY (SELECT '{run_id}' AS run_id, 'EX' || lpad(i::VARCHAR, 7, '0') AS example_id,
                                 i::BIGINT AS line, 'train' AS split, 'synthetic' AS dataset, 'A' AS gold,
                                 4::INTEGER AS n_choices, 1::INTEGER AS n_target_tokens,
                                 NULL::VARCHAR AS prompt_sha256, NULL::VARCHAR AS prompt
                          FROM range({EXAMPLES_PER_RUN}) t(i))
                    TO {_sql_path(tracking / 'examples.parquet')} (FORMAT parquet)""")
    con.close()
    (run / "run.json").write_text(json.dumps({"run_id": run_id, "dataset": "synthetic", "method": "lora",
                                              "status": "completed", "attempts": []}) + "\n")
    (run / "config.yaml").write_text("method: lora\ndata:\n  dataset: synthetic\n")
    write_samples_index(run)
    return run


def generate(root: Path, samples: int) -> dict:
    """`samples` sample rows in runs of SAMPLES_PER_RUN (fewer runs when smaller), and the baseline beside them."""
    per_run = min(samples, SAMPLES_PER_RUN)
    started = time.perf_counter()
    for index in range(samples // per_run):
        write_run(root, index, per_run)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    write_baseline(root, baseline_folder(root))
    return {"runs": samples // per_run, "generate_s": time.perf_counter() - started, "bytes": size}


def many_parts(root: Path, runs: int, parts: int) -> dict:
    """`runs` finished runs of `parts` parts each, 20 micro-batch rows a part: what opening many runs costs depends
    on the number of runs and parts, not on their rows (the rows of these are few: traces read small indexes)."""
    started = time.perf_counter()
    for index in range(runs):
        write_run(root, index, parts * 20 * BATCH_SIZE, rows_per_part=20)  # 20,480 samples: TARGET is one
    return {"runs": runs, "parts": runs * parts, "generate_s": time.perf_counter() - started}


def baseline_folder(root: Path) -> Path:
    return root.parent / f"{root.name}-flat"


def write_baseline(root: Path, flat: Path) -> None:
    """The baseline: every run's sample rows unnested once into a plain Parquet file of flat columns, in the order
    training saw them (not sorted by example), outside the runs folder: what DuckDB aggregates at its own speed."""
    import duckdb

    flat.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET threads = 2")
    for run in sorted(root.iterdir()):
        parts = _sql_path(run / "tracking" / "batches" / "*.parquet")
        con.execute(f"""COPY (SELECT run_id, attempt, step, micro_batch, rank, epoch, batch_idx, stage, lr,
                                     unnest(range(len(example_ids))) AS position, unnest(example_ids) AS example_id,
                                     unnest(lines) AS line, unnest(losses) AS loss, unnest(p_gold) AS p_gold,
                                     unnest(correct) AS correct
                              FROM read_parquet({parts}) ORDER BY step)
                        TO {_sql_path(flat / (run.name + '.parquet'))} (FORMAT parquet, COMPRESSION zstd)""")
    con.close()


CARTOGRAPHY = """SELECT run_id, example_id, avg(p_gold) AS confidence, stddev_pop(p_gold) AS variability,
                        avg(correct::INTEGER) AS correctness, count(*) AS exposures
                 FROM samples GROUP BY run_id, example_id"""


def measure(location: str, what: str) -> dict:
    """Runs in its own process (`--measure`): one figure and the process's peak RSS."""
    import loratrace

    if what == "baseline":
        return measure_baseline(location)
    clock = Clock()
    db = loratrace.open_runs(location, read_only=True)
    result: dict = {"open": clock.lap()}
    if what == "trace":
        rows = db.trace_table(TARGET)
        result.update(first=clock.lap(), exposures=rows.num_rows)
        db.relist_after = 60.0  # a warm call on the same connection: what a notebook's second trace costs
        db.trace_table(TARGET)
        result["warm"] = clock.lap()
    else:
        table = db.fetch_table(CARTOGRAPHY)
        result.update(query=clock.lap(), groups=table.num_rows,
                      exposures=int(sum(table.column("exposures").to_pylist())))
    db.close()
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def measure_baseline(flat: str) -> dict:
    """The cartography GROUP BY over the baseline's flat Parquet (`write_baseline`), by DuckDB itself: no loratrace."""
    import duckdb

    clock = Clock()
    con = duckdb.connect()
    query = CARTOGRAPHY.replace("FROM samples", f"FROM read_parquet({_sql_path(Path(flat) / '*.parquet')})")
    table = con.sql(query).to_arrow_table()
    result = {"query": clock.lap(), "groups": table.num_rows}
    con.close()
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


class Clock:
    """Wall and CPU seconds (all of the process's threads: DuckDB's too) since the last lap. On a shared machine the
    CPU time is the steadier figure: wall time grows with what else runs."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        lap, (self.wall, self.cpu) = (wall - self.wall, cpu - self.cpu), (wall, cpu)
        return lap


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike getrusage's ru_maxrss it does not carry over the peak of the
    process that forked it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measured(location: str, what: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--measure", what, location], capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {what} on {location} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _s3_server():
    """moto's S3 server on 127.0.0.1 and a bucket; returns (server, env for the measuring processes)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench-bucket")
    return server, env


def _upload(root: Path, url: str) -> float:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    started = time.perf_counter()
    fs.put(str(root) + "/", url.removeprefix("s3://"), recursive=True)
    return time.perf_counter() - started


def _seconds(lap: list[float]) -> str:
    wall, cpu = lap
    return f"{wall:.2f} s ({cpu:.2f})"


def row(where: str, samples: int, g: dict, t: dict, c: dict) -> str:
    return (f"| {where} | {samples:,} | {g['runs']} | {g['bytes'] / 1e9:.2f} GB | {_seconds(t['open'])} | "
            f"{_seconds(t['first'])}, {t['exposures']} rows | {_seconds(t['warm'])} | {t['peak_rss_mb']:.0f} MB | "
            f"{_seconds(c['query'])}, {c['groups']:,} groups | {c['peak_rss_mb']:.0f} MB |")


def ratio_row(where: str, samples: int, c: dict, b: dict) -> str:
    """cartography: samples view / flat Parquet baseline, both measured in this run, side by side."""
    if b["groups"] != c["groups"]:
        raise SystemExit(f"the baseline has {b['groups']} groups, the samples view {c['groups']}: not the same rows")
    return (f"| {where} | {samples:,} | {_seconds(c['query'])} | {_seconds(b['query'])} | "
            f"{c['query'][0] / b['query'][0]:.2f} ({c['query'][1] / max(b['query'][1], 1e-9):.2f}) | "
            f"{c['peak_rss_mb']:.0f} MB / {b['peak_rss_mb']:.0f} MB |")


RATIO_HEADER = ["| where | sample rows | cartography: samples view | the same GROUP BY on flat Parquet (DuckDB direct) "
                "| cartography: samples view / flat Parquet baseline, wall (CPU) | peak RSS |",
                "|---|---|---|---|---|---|"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--samples", default="1e6,1e7", help="total sample rows, comma-separated (e.g. 1e6,1e7,1e8)")
    parser.add_argument("--s3-samples", default="", help="the same against moto's S3 server, at these sizes")
    parser.add_argument("--root", default=None, help="scratch folder (default: a temporary folder, deleted after)")
    parser.add_argument("--open-runs", default="100x32", help="also open this many finished runs x parts a run "
                        "(few rows each: opening costs follow runs and parts), e.g. 100x32; empty: not measured")
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "LOCATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[1], args.measure[0])))
        return
    local = [int(float(s)) for s in args.samples.split(",") if s]
    remote = [int(float(s)) for s in args.s3_samples.split(",") if s]
    scratch = Path(tempfile.mkdtemp(prefix="loratrace-scale-", dir=args.root))
    server, env = _s3_server() if remote else (None, {})
    lines = ["| where | sample rows | runs | Parquet | open_runs, wall (CPU) | first trace | warm trace "
             "| trace peak RSS | cartography GROUP BY | its peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = list(RATIO_HEADER)
    try:
        for samples in sorted(set(local) | set(remote)):
            root = scratch / f"n{samples}"
            g = generate(root, samples)
            print(f"generated {samples:,} samples in {g['runs']} runs: {g['bytes'] / 1e9:.2f} GB in "
                  f"{g['generate_s']:.0f} s (samples indexes included)", file=sys.stderr, flush=True)
            if samples in local:
                cartography = _measured(str(root), "cartography")
                baseline = _measured(str(baseline_folder(root)), "baseline")
                lines.append(row("local disk", samples, g, _measured(str(root), "trace"), cartography))
                ratios.append(ratio_row("local disk", samples, cartography, baseline))
                print(lines[-1], ratios[-1], sep="\n", file=sys.stderr, flush=True)
            if samples in remote:
                url = f"s3://bench-bucket/n{samples}"
                upload_s = _upload(root, url)
                print(f"uploaded in {upload_s:.0f} s", file=sys.stderr, flush=True)
                lines.append(row("moto S3 server", samples, g, _measured(url, "trace", env),
                                 _measured(url, "cartography", env)))
                print(lines[-1], file=sys.stderr, flush=True)
            shutil.rmtree(root)
            shutil.rmtree(baseline_folder(root))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if server is not None:
            server.stop()
    if args.open_runs:
        runs, parts = map(int, args.open_runs.split("x"))
        root = scratch / f"open{runs}x{parts}"
        g = many_parts(root, runs, parts)
        t = _measured(str(root), "trace")
        opened = (f"open_runs over {runs} runs / {g['parts']:,} parts (20 micro-batch rows a part): "
                  f"{_seconds(t['open'])}; first trace {_seconds(t['first'])}, {t['exposures']} rows; "
                  f"warm {_seconds(t['warm'])}")
        print(opened, file=sys.stderr, flush=True)
        shutil.rmtree(root)
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    print("\n".join(lines))
    print()
    print("\n".join(ratios))
    if args.open_runs:
        print()
        print(opened)


if __name__ == "__main__":
    main()

"""The README's research queries run, one query each, and answer what they claim on a real tracked run."""

import re

import pytest
from conftest import ROOT

import loratrace

QUERIES = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_the_research_queries():
    assert len(QUERIES) == 6


@pytest.mark.parametrize("sql", QUERIES, ids=[f"query{i}" for i in range(len(QUERIES))])
def test_readme_query_runs_read_only(small_run, sql):
    with loratrace.open_runs(small_run, read_only=True) as db:
        frame = db.sql(sql).df()
    assert len(frame) > 0


def test_exposure_and_forgetting_agree_with_pandas(small_run):
    import pandas as pd

    rows = pd.read_parquet(small_run / "tracking" / "batches").sort_values(["step", "micro_batch", "rank"])
    seen, forgotten, last = {}, {}, {}
    for ids, correct in zip(rows.example_ids, rows.correct):
        for example_id, ok in zip(ids, correct):
            seen[example_id] = seen.get(example_id, 0) + 1
            if last.get(example_id) is True and not ok:
                forgotten[example_id] = forgotten.get(example_id, 0) + 1
            last[example_id] = bool(ok)
    with loratrace.open_runs(small_run) as db:
        exposures = dict(db.sql(QUERIES[4]).df()[["example_id", "exposures"]].itertuples(index=False))
        events = db.sql(QUERIES[3]).df()
    assert exposures == seen
    assert {k: v for k, v in zip(events.example_id, events.forgetting_events) if v} == forgotten

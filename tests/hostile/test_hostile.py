"""Every command against every kind of damage (cases.py), judged by the rule of issue #27 (conftest.judge).

    python -m pytest tests/hostile -q                 # the quick subset: one case per damage class
    python -m pytest tests/hostile -q -m hostile_full  # the rest of the cross product
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hostile import cases as table
from hostile.conftest import judge, make_world, record, run_command
from loratrace.cli import _parser

CASES = table.all_cases()


def _param(case: table.Case):
    return pytest.param(case, id=case.id, marks=() if case.quick else (pytest.mark.hostile_full,))


def _subcommands() -> set[str]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_subcommand_has_rows_and_a_quick_case():
    commands = _subcommands()
    assert commands - {c.command for c in CASES} == set(), "a subcommand without hostile cases"
    assert {c.command for c in CASES} - commands == set(), "cases of a subcommand the parser no longer has"
    assert commands - {c.command for c in CASES if c.quick} == set(), "a subcommand without a quick case"


def test_every_damage_class_has_a_quick_case():
    """A class is a damage name's first word (runjson, config, part, checkpoint, ...)."""
    quick = {c.id for c in CASES if c.quick}
    covered = {d.name.split("_")[0] for d in table.DAMAGES if f"{d.quick}-{d.name}" in quick}
    assert {d.name.split("_")[0] for d in table.DAMAGES} == covered


@pytest.fixture(scope="session")
def undamaged_stdout(pristine, tmp_path_factory):
    """A probe's stdout on an undamaged world (the case folder written $CASE): what a damage it does not read, or
    reads and does not warn about, must leave as it is. Run once per probe, when a case first needs it."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            probe = next(p for p in table.PROBES if p.name == name)
            w = make_world(pristine, tmp_path_factory.mktemp(f"reference-{name}") / "case")
            case = table.fill(w, table.Case(name, probe.command, probe.argv))
            result = run_command(w, list(case.argv))
            assert result.rc == 0, f"{name} fails on the undamaged world: {result.stderr[-500:]}"
            cache[name] = result.stdout.replace(str(w.root), "$CASE")
        return cache[name]
    return get


def _same_as_undamaged(check, undamaged, names: tuple[str, ...]):
    """A success over damage is right if a warning names what is damaged, or else it prints what the undamaged world
    prints (and passes the probe's own check)."""
    def same(result, w) -> str | None:
        warnings = [line for line in result.stderr.splitlines() if line.startswith("loratrace: warning:")]
        if any(name in line for line in warnings for name in names):
            return None
        if result.stdout.replace(str(w.root), "$CASE") != undamaged():
            return "a different result than the undamaged world's, and no warning names the damage"
        return check(result, w) if check else None
    return same


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile(case: table.Case, world, undamaged_stdout):
    table.prepare_outputs(world)
    if case.needs == "mknod" and not (world.out / "null").exists():
        pytest.skip("this machine cannot make a device node in tmp")
    filled = table.fill(world, case)
    if filled.damage:
        filled.damage(world)
    check = filled.check
    if filled.probe:
        check = _same_as_undamaged(filled.check, lambda: undamaged_stdout(filled.probe), filled.names)
    result = run_command(world, list(filled.argv), filled.stdin, filled.timeout,
                         Path(filled.cwd) if filled.cwd else None)
    outcome, reasons = judge(world, result, expect=filled.expect, names=filled.names, check=check,
                             writes_runs=filled.writes_runs, outputs=filled.outputs,
                             cwd=Path(filled.cwd) if filled.cwd else None)
    verdict = record(case.id, world, result, outcome, reasons)
    assert outcome == "clean", f"{outcome}: {verdict.command}\n{'; '.join(reasons)}\nstderr: {result.stderr[-1500:]}"

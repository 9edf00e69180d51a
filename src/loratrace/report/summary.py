"""`loratrace compare`'s default output: a comparison that fits one screen (about 50 lines for two 125-step runs).

The runs' facts side by side (status, steps, duration, final and lowest training loss, best and last eval accuracy
+/- stderr), the config keys that differ, eval accuracy per checkpoint with its standard error (at most
`ROWS` checkpoints: the first, the last, each run's best and evenly spaced others), whether the best evals differ by
more than the noise, where the data order diverges, and the examples that flip. Per-step metrics and forgetting are
tables of their own (`--section metrics`, `--steps`, `--section forgetting`); every table whole is `--section NAME`.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from loratrace.query import formats
from loratrace.query.accuracy import NOISE_Z, with_stderr, within_noise
from loratrace.report.compare import Comparison

ROWS = 10  # rows of a condensed table (evals, config, examples)


def run_labels(c: Comparison) -> dict[str, str]:
    """Each run's column label: its name when it has one that no other run shares, else its run id."""
    names = dict(zip(c.runs.run_id, c.runs.name))
    taken = [n for n in names.values() if isinstance(n, str) and n]
    return {run_id: name if isinstance(name, str) and name and taken.count(name) == 1 and name not in names else run_id
            for run_id, name in names.items()}


def summary_text(c: Comparison) -> str:
    labels = run_labels(c)
    parts = [_runs(c, labels), _config(c, labels), _evals(c, labels), _data_order(c, labels), _examples(c, labels)]
    footer = "per-step metrics: --section metrics (or --steps); forgetting: --section forgetting; a whole table: " \
             "--section NAME\n"
    return "\n".join(parts) + "\n" + footer


def _table(columns: dict[str, list]) -> str:
    return formats.render_table(pa.table({key: pa.array([_text(v) for v in values], pa.string())
                                          for key, values in columns.items()}))


def _text(value) -> str:
    if value is None or value is pd.NA or isinstance(value, float) and value != value:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _at(value, step) -> str:
    shown = _text(value)
    return f"{shown} (step {int(step)})" if shown and _text(step) else shown


def _runs(c: Comparison, labels: dict[str, str]) -> str:
    facts = {"fact": ["run_id", "status", "steps", "duration", "final train/loss", "lowest train/loss",
                      "final train/accuracy", "best eval accuracy", "last eval accuracy"]}
    for number, row in enumerate(c.runs.itertuples()):
        duration = "" if row.duration_s != row.duration_s or row.duration_s is None else f"{row.duration_s:.0f} s"
        facts[labels[row.run_id] + (" (reference)" if number == 0 else "")] = [
            row.run_id, row.status, row.steps, duration, row.final_loss, _at(row.lowest_loss, row.lowest_loss_step),
            row.final_train_accuracy, _at(with_stderr(_number(row.best_eval_accuracy), _number(row.best_eval_stderr)),
                                          row.best_eval_step),
            _at(with_stderr(_number(row.last_eval_accuracy), _number(row.last_eval_stderr)), row.last_eval_step)]
    if all(label == run_id for run_id, label in labels.items()):
        facts = {k: v[1:] for k, v in facts.items()}  # the run ids are the column labels already
    return "== runs ==\n" + _table(facts)


def _number(value) -> float | None:
    return None if value is None or value is pd.NA or value != value else float(value)


def _config(c: Comparison, labels: dict[str, str]) -> str:
    if c.config.empty:
        return "== config ==\n(the same in every run)\n"
    shown = c.config.head(ROWS)
    text = _table({"key": list(shown.key), **{labels[r]: list(shown[r]) for r in c.run_ids}})
    return "== config ==\n" + text + _more(len(c.config), ROWS, "keys", "config")


def _more(total: int, shown: int, what: str, section: str) -> str:
    return f"({shown} of {total} {what}; all: --section {section})\n" if total > shown else ""


def _evals(c: Comparison, labels: dict[str, str]) -> str:
    if c.evals.empty:
        return "== evals ==\n(no run was evaluated: loratrace eval RUN, or train with eval.every_checkpoint=true)\n"
    parts = []
    for (split, scoring), group in c.evals.groupby(["split", "scoring"], sort=True):
        group = group.reset_index(drop=True)
        kept = _condensed(group, c.run_ids)
        columns = {"step": [int(s) for s in kept.checkpoint_step],
                   **({"scored": list(kept.scored)} if (kept.scored == "final_model").any() else {})}
        for run_id in c.run_ids:
            columns[labels[run_id]] = [with_stderr(_number(a), _number(e))
                                       for a, e in zip(kept[run_id], kept[f"{run_id} stderr"])]
        parts.append(f"== evals: {split}, {scoring} scoring (accuracy +/- stderr) ==\n" + _table(columns)
                     + _more(len(group), len(kept), "evaluations", "evals") + _best_against_reference(group, c, labels))
    return "\n".join(parts)


def _condensed(group: pd.DataFrame, run_ids: list[str]) -> pd.DataFrame:
    """At most ROWS rows: the first, the last, each run's best, and evenly spaced others, in step order."""
    if len(group) <= ROWS:
        return group
    keep = {0, len(group) - 1} | {int(group[r].astype(float).idxmax()) for r in run_ids if group[r].notna().any()}
    room = ROWS - len(keep)
    spaced = [round(i * (len(group) - 1) / (room + 1)) for i in range(1, room + 1)] if room > 0 else []
    for index in spaced:
        keep.add(index)
    return group.loc[sorted(keep)[:max(ROWS, len(keep))]]


def _best_against_reference(group: pd.DataFrame, c: Comparison, labels: dict[str, str]) -> str:
    """One line per other run: its best checkpoint against the reference's best, and whether that is beyond the
    noise (query/accuracy.py)."""
    best = {}
    for run_id in c.run_ids:
        if group[run_id].notna().any():
            row = group.loc[group[run_id].astype(float).idxmax()]
            best[run_id] = (float(row[run_id]), _number(row[f"{run_id} stderr"]), int(row.checkpoint_step))
    reference = c.run_ids[0]
    if reference not in best:
        return ""
    lines = []
    for run_id in c.run_ids[1:]:
        if run_id not in best:
            continue
        (mine, my_error, my_step), (theirs, their_error, their_step) = best[reference], best[run_id]
        high, low = max(best[reference], best[run_id]), min(best[reference], best[run_id])
        noise = within_noise(high[0], high[1], low[0], low[1])
        verdict = (f"within the noise ({NOISE_Z} combined stderr)" if noise else
                   f"{'above' if theirs > mine else 'below'} it by more than {NOISE_Z} combined stderr")
        lines.append(f"best: {labels[run_id]} {with_stderr(theirs, their_error)} (step {their_step}) vs the "
                     f"reference's {with_stderr(mine, my_error)} (step {my_step}): {verdict}\n")
    return "".join(lines)


def _data_order(c: Comparison, labels: dict[str, str]) -> str:
    lines = []
    for row in c.data_order.itertuples():
        who = labels[row.run_id]
        if row.note and not row.replay:  # untracked; a replay's note goes with its own line
            lines.append(f"{who}: {row.note}")
        elif row.same_order:
            lines.append(f"{who}: the same examples in the same order as the reference at all {row.steps_compared} "
                         "steps compared")
        else:
            same = "the same set of examples overall" if row.same_examples else "different sets of examples"
            lines.append(f"{who}: the order diverges from the reference's at step {row.first_divergent_step} "
                         f"({row.steps_compared} steps compared; {same})")
        if row.replay:
            lines.append(_replay_line(row, who))
    return "== data_order ==\n" + "".join(line + "\n" for line in lines)


def _replay_line(row, who: str) -> str:
    """Which run replays which, from what step, and every example the replay left out (a note if run.json's record
    of them disagrees with the batches)."""
    removed = list(row.removed_examples)
    said = (f"{who} is a replay of the reference" if row.replay.startswith("run") else
            f"the reference is a replay of {who}")
    line = f"{said} from step {row.replay_step}, without {len(removed)} example(s)"
    line += (": " + " ".join(removed[:ROWS]) + (f" (+{len(removed) - ROWS} more; all: --section data_order)"
                                                 if len(removed) > ROWS else "")) if removed else ""
    return line + (f" ({row.note})" if row.note else "")


def _examples(c: Comparison, labels: dict[str, str]) -> str:
    """Counts of flips per run and direction, then the first ROWS flips."""
    flips = c.examples
    if flips.empty:
        return ("== examples ==\nno example flips between the runs' last evaluated checkpoints"
                + ("" if not c.evals.empty else " (no evals)") + "\n")
    lines = []
    for (run_id, split, scoring), group in flips.groupby(["run_id", "split", "scoring"], sort=False):
        gained = int((group.run_correct & ~group.reference_correct).sum())
        lost = int((group.reference_correct & ~group.run_correct).sum())
        steps = f"steps {_text(group.run_step.iloc[0])} and {_text(group.reference_step.iloc[0])}"
        lines.append(f"{labels[run_id]}: {gained} examples right only here, {lost} right only in the reference "
                     f"({split}/{scoring}, {steps})\n")
    shown = flips.head(ROWS)
    table = _table({"example_id": list(shown.example_id), "line": list(shown.line),
                    "run": [labels[r] for r in shown.run_id], "reference_correct": list(shown.reference_correct),
                    "run_correct": list(shown.run_correct)})
    return "== examples ==\n" + "".join(lines) + table + _more(len(flips), len(shown), "flips", "examples")

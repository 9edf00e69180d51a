"""An eval accuracy with its standard error, and when a "best" checkpoint is within the noise of another.

The standard error is lm-evaluation-harness's for a mean of 0/1 scores: the sample standard deviation over sqrt(n),
sqrt(acc * (1 - acc) / (n - 1)) (the `eval_accuracy` view computes the same in SQL). Two accuracies are within the
noise of each other when they differ by less than NOISE_Z combined standard errors, sqrt(se_a^2 + se_b^2): a 95%
two-sided test for two independent proportions. Two checkpoints scored on the same examples are paired, so the true
noise of their difference is smaller; this rule errs towards "no clear winner", never towards a false one.
"""

from __future__ import annotations

import math

NOISE_Z = 1.96


def stderr(accuracy: float, examples: int) -> float | None:
    """The standard error of an accuracy over `examples` 0/1 scores; None for fewer than two."""
    if examples < 2:
        return None
    return math.sqrt(max(0.0, accuracy * (1 - accuracy)) / (examples - 1))


def within_noise(best: float, best_stderr: float | None, other: float, other_stderr: float | None) -> bool:
    """`other` cannot be told apart from `best` at the examples scored (unknown errors: it cannot)."""
    if best_stderr is None or other_stderr is None:
        return True
    combined = math.hypot(best_stderr, other_stderr)
    return best - other < NOISE_Z * combined or combined == 0 and best == other


def with_stderr(accuracy: float | None, error: float | None, digits: int = 3) -> str:
    """`0.625 +/- 0.078`, or the accuracy alone when its error is unknown; empty for none."""
    if accuracy is None or accuracy != accuracy:  # None or NaN: not evaluated
        return ""
    shown = f"{accuracy:.{digits}f}"
    return shown if error is None or error != error else f"{shown} +/- {error:.{digits}f}"


def best_line(rows: list[tuple[str, str, float, float | None]]) -> str:
    """One line naming the best of (label, short label, accuracy, stderr) rows with its stderr, and saying whether it
    is a clear winner or which others (by short label) lie within its noise."""
    label, _, accuracy, error = max(rows, key=lambda row: row[2])  # the first of equal accuracies
    line = f"best: {label}, accuracy {with_stderr(accuracy, error, 4)} (stderr)"
    others = [short for lab, short, acc, err in rows if lab != label and within_noise(accuracy, error, acc, err)]
    if len(rows) == 1:
        return line
    if not others:
        return line + f"; above every other by more than {NOISE_Z} combined stderr"
    shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
    return line + f"; not a clear winner: within the noise ({NOISE_Z} combined stderr) of {shown}"

"""`loratrace eval` and `influence`: scoring a run's checkpoints on held-out examples."""

from __future__ import annotations

import argparse

from loratrace.cli.common import FORMATS, emit
from loratrace.cli.verify import add_validate_options, cmd_validate
from loratrace.config import ConfigError
from loratrace.query.accuracy import best_line
from loratrace.training.selection import CHECKPOINT_SELECTION, FINAL_IS_EVAL_ONLY

INFLUENCE_DESCRIPTION = """Influence of each training example on test examples, from the run's checkpoints:
  tracin     sum over the stage-2 steps t whose batch held the training example of
             lr_t * grad L(train; w_t-1) . grad L(test; w_t-1), w_t-1 the checkpoint before step t
             (a step without that checkpoint is reported and skipped)
  tracin-cp  sum over the chosen checkpoints c of lr_c * grad L(train; w_c) . grad L(test; w_c), every training example
Gradients of training's per-example loss, LoRA parameters only. Scores go to tracking/influence/ (the influence
view); a computation stopped part-way continues where it stopped when run again with the same arguments."""


def add_eval(sub) -> None:
    evaluate = sub.add_parser("eval", help="multiple-choice accuracy of a run's checkpoints, per example",
                              description="Score checkpoints on a held-out split; results join the evals view. "
                                          "Prints each accuracy with its standard error (sqrt(acc*(1-acc)/(n-1)), as "
                                          "lm-evaluation-harness reports it) and names the best checkpoint with its "
                                          "stderr, saying which others are within its noise.")
    evaluate.add_argument("run", help="the run folder")
    evaluate.add_argument("--checkpoints", default="all", metavar="SELECTION",
                          help=f"which checkpoints: {CHECKPOINT_SELECTION}, or final (the merged final_model/); "
                               "default: all")
    evaluate.add_argument("--split", help="split to score (default: the run's eval.split, validation)")
    evaluate.add_argument("--limit", type=int, help="score only the first N rows")
    evaluate.add_argument("--batch-size", type=int, help="examples per forward pass")
    evaluate.add_argument("--scoring", choices=("label", "text"), help="choice letters (default) or choice texts")


def add_influence(sub) -> None:
    influence = sub.add_parser("influence", help="training examples that helped or hurt test examples (TracIn)",
                               description=INFLUENCE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    influence.add_argument("run", help="the run folder")
    influence.add_argument("--example-id", action="append", metavar="ID", help="a test example (repeatable; default: "
                                                                              "the split's first --limit rows)")
    influence.add_argument("--split", default="validation", help="the test examples' split (default: validation)")
    influence.add_argument("--limit", type=int, help="without --example-id: only the split's first N rows")
    influence.add_argument("--method", choices=("tracin", "tracin-cp"), action="append",
                           help="tracin (default): per step over the tail; tracin-cp: over checkpoints (with "
                                "--validate repeatable; default both)")
    influence.add_argument("--checkpoints", default="all", metavar="SELECTION",
                           help=f"tracin-cp's checkpoints: {CHECKPOINT_SELECTION} (default: all; "
                                f"{FINAL_IS_EVAL_ONLY})")
    influence.add_argument("--project-dim", type=int, metavar="K",
                           help="project gradients to K dimensions (seeded Gaussian): bounded memory, approximate")
    influence.add_argument("--batch-size", type=int, default=8, help="examples per batched gradient (default 8)")
    influence.add_argument("--top", type=int, default=20, help="training examples listed each way (default 20)")
    influence.add_argument("--format", choices=FORMATS[:3], default="table",
                           help="table (default: the top helpful and harmful), or every score as csv/json")
    add_validate_options(influence)


def cmd_eval(args: argparse.Namespace) -> int:
    # here, not at the top: query, trace and runs load this module, without torch
    from loratrace.evaluate import evaluate_run

    overrides = [f"eval.{key}={value}" for key, value in (("split", args.split), ("limit", args.limit),
                                                          ("batch_size", args.batch_size), ("scoring", args.scoring))
                 if value is not None]
    summary = evaluate_run(args.run, args.checkpoints, overrides)
    emit(summary, "table", None)
    print(best_line([(f"{row.checkpoint} (step {int(row.checkpoint_step)})",
                      "final_model" if row.checkpoint == "final_model" else f"step {int(row.checkpoint_step)}",
                      row.accuracy, None if row.stderr != row.stderr else row.stderr) for row in summary.itertuples()]))
    return 0


def cmd_influence(args: argparse.Namespace) -> int:
    if args.validate:
        return cmd_validate(args)
    if len(args.method or []) > 1:
        raise ConfigError("--method once (repeatable with --validate only)")
    args.method = (args.method or ["tracin"])[0]
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    # here, after the argument errors and not at the top: query, trace and runs load this module, without torch
    from loratrace.attribution.tracin import compute, top_examples

    result = compute(args.run, args.example_id, args.split, args.limit, args.method, args.checkpoints,
                     args.project_dim, batch_size=args.batch_size)
    if args.format != "table":
        emit(result.frame, args.format, None)
        return 0
    tests = list(dict.fromkeys(result.frame.test_example_id))
    what = (f"{tests[0]} ({args.split}): {' '.join(result.texts[tests[0]].split())}" if len(tests) == 1 else
            f"{len(tests)} {args.split} examples (scores summed over them)")
    print(f"{args.method} over {len(result.terms)} {'step' if args.method == 'tracin' else 'checkpoint'}(s) "
          f"(steps {result.terms[0].step}..{result.terms[-1].step}); {what}")
    for title, table in zip(("helpful", "harmful"), top_examples(result, args.top)):
        print(f"\n{title}")
        if table.num_rows:
            emit(table, "table", None)
        else:
            print("(none)")
    return 0

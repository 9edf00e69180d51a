"""The `loratrace` command: it parses and prints; the library does the work.

    loratrace train [--config F] [key=value ...] [--track-batches] [--resume-from-checkpoint CKPT] [--dataset D ...]
    loratrace query "SELECT ..." [-p VALUE ...] [--format table|csv|json|parquet] [--output FILE] [--runs-dir DIR]
    loratrace trace --example-id ID | --line N [--run RUN_ID]
    loratrace eval RUN [--checkpoints all|last|final|76,100] [--split S] [--limit N]
    loratrace runs

Errors a user can cause (`LoratraceError`) end in one line on stderr: exit 2 for a bad config, data set, model or
checkpoint (before any work starts), exit 1 for a query or lookup that cannot be answered. `query`, `trace` and
`runs` never import torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("table", "csv", "json", "parquet")


def _parser() -> argparse.ArgumentParser:
    from loratrace import __version__

    parser = argparse.ArgumentParser(prog="loratrace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"loratrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune with LoRA and write a run folder",
                           description="Fine-tune with LoRA; writes runs/<dataset>_<method>_<time>/.")
    train.add_argument("--config", help="YAML config (default: the embedded default: tiny model, bundled sample)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.max_steps=20")
    train.add_argument("--track-batches", action="store_true", help="record every batch in tracking/ (Parquet)")
    train.add_argument("--resume-from-checkpoint", metavar="CKPT", help="continue a run from one of its .ckpt files")
    train.add_argument("--dataset", action="append", metavar="NAME", help="train one run per data set, in turn")
    train.add_argument("--runs-dir", help="folder for run folders (config key runs_dir)")

    def add_runs_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runs-dir", default="runs", help="runs folder, one run folder, or a glob (default: runs)")

    query = sub.add_parser("query", help="run SQL over the tracking views (read-only)",
                           description="SQL over the views runs, batches, batches_all, samples, examples, "
                                       "checkpoints, step_checkpoint, example_checkpoint, metrics, attempts.")
    query.add_argument("sql", help="the query, or - to read it from stdin")
    query.add_argument("-p", "--param", action="append", default=[], metavar="VALUE",
                       help="value for the next ? placeholder (repeatable)")
    query.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    query.add_argument("--output", "-o", help="write to this file instead of stdout (needed for parquet)")
    add_runs_dir(query)

    trace = sub.add_parser("trace", help="every step and checkpoint that trained one example",
                           description="Every step an example trained at, and the first checkpoint that includes it.")
    key = trace.add_mutually_exclusive_group(required=True)
    key.add_argument("--example-id", help="the example's id")
    key.add_argument("--line", type=int, help="the example's 0-based row in its data file")
    trace.add_argument("--run", help="only this run id")
    trace.add_argument("--format", choices=FORMATS[:3], default="table", help="output format (default: table)")
    add_runs_dir(trace)

    evaluate = sub.add_parser("eval", help="multiple-choice accuracy of a run's checkpoints, per example",
                              description="Score checkpoints on a held-out split; results join the evals view.")
    evaluate.add_argument("run", help="the run folder")
    evaluate.add_argument("--checkpoints", default="all", help="all (default), last, final, or steps like 76,100")
    evaluate.add_argument("--split", help="split to score (default: the run's eval.split, validation)")
    evaluate.add_argument("--limit", type=int, help="score only the first N rows")
    evaluate.add_argument("--batch-size", type=int, help="examples per forward pass")
    evaluate.add_argument("--scoring", choices=("label", "text"), help="choice letters (default) or choice texts")

    runs = sub.add_parser("runs", help="one line per run: id, dataset, steps, checkpoints, status",
                          description="List the runs under --runs-dir.")
    runs.add_argument("--format", choices=FORMATS[:3], default="table", help="output format (default: table)")
    add_runs_dir(runs)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"loratrace: error: {message}", file=sys.stderr)
    return code


def _emit(frame, fmt: str, output: str | None) -> None:
    if fmt == "parquet":
        frame.to_parquet(output, index=False)
        return
    if fmt == "csv":
        text = frame.to_csv(index=False)
    elif fmt == "json":
        text = frame.to_json(orient="records", lines=True, date_format="iso")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200,
                               "display.max_colwidth", 60):
            text = frame.to_string(index=False) + "\n"
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)


def _open(runs_dir: str):
    from loratrace.store import open_runs

    return open_runs(runs_dir, read_only=True)


def cmd_train(args: argparse.Namespace) -> int:
    from loratrace.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.track_batches:
        overrides.append("tracking.enabled=true")
    if args.runs_dir:
        overrides.append(f"runs_dir={args.runs_dir}")
    if args.resume_from_checkpoint and args.dataset:
        raise ConfigError("--dataset cannot be combined with --resume-from-checkpoint")
    if args.resume_from_checkpoint and not args.config:
        from loratrace.recipe import resume_run_dir

        args.config = str(resume_run_dir(Path(args.resume_from_checkpoint)) / "config.yaml")
    names = args.dataset or [None]
    configs = [load_config(args.config, overrides + ([f"data.dataset={n}"] if n else [])) for n in names]
    from loratrace.recipe import train

    for cfg in configs:
        train(cfg, resume_from=args.resume_from_checkpoint)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if args.format == "parquet" and not args.output:
        return _fail("--format parquet needs --output FILE", 2)
    with _open(args.runs_dir) as db:
        frame = db.sql(sql, params=args.param or None).df()
    _emit(frame, args.format, args.output)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    import pandas as pd

    with _open(args.runs_dir) as db:
        frame = db.trace(example_id=args.example_id, line=args.line, run_id=args.run)
    if args.format == "table":
        for run_id, rows in frame.groupby("run_id", sort=False):
            first = rows[rows["first"]].iloc[0]
            where = (f"checkpoint-step {int(first.checkpoint_step)} ({first.checkpoint_path})"
                     if not pd.isna(first.checkpoint_step) else "no checkpoint yet")
            print(f"{run_id}: {rows.example_id.iloc[0]} (line {rows.line.iloc[0]}) trained at {len(rows)} step(s); "
                  f"first included in {where}")
        columns = ["run_id", "step", "epoch", "loss", "p_gold", "correct", "checkpoint_step", "first"]
        _emit(frame[columns], "table", None)
    else:
        _emit(frame, args.format, None)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loratrace.evaluate import evaluate_run

    overrides = [f"eval.{key}={value}" for key, value in (("split", args.split), ("limit", args.limit),
                                                          ("batch_size", args.batch_size), ("scoring", args.scoring))
                 if value is not None]
    summary = evaluate_run(args.run, args.checkpoints, overrides)
    _emit(summary, "table", None)
    best = summary.loc[summary.accuracy.idxmax()]
    print(f"best: {best.checkpoint} (step {int(best.checkpoint_step)}), accuracy {best.accuracy:.4f}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    with _open(args.runs_dir) as db:
        frame = db.sql("SELECT run_id, dataset, steps, checkpoints, last_checkpoint_step, status FROM runs "
                       "ORDER BY run_id").df()
    if frame.empty:
        print(f"no runs under {args.runs_dir}", file=sys.stderr)
        return 0
    _emit(frame, args.format, None)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "query": cmd_query, "trace": cmd_trace, "runs": cmd_runs}


def main(argv: list[str] | None = None) -> int:
    from loratrace.errors import LoratraceError

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `loratrace`: what it can do, not an error
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except LoratraceError as exc:
        message = str(exc).strip()
        return _fail(message.splitlines()[0] if message else type(exc).__name__, exc.exit_code)
    except KeyboardInterrupt:  # Ctrl+C outside training (loading, exporting); training stops cleanly by itself
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

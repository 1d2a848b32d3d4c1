"""The ``reflectevo`` command: list tasks, grade answers, check graders, inspect the sandbox.

reflectevo tasks
reflectevo grade math --gold '\\frac{1}{2}' --output 'Action: Finish<<<0.5>>>'
reflectevo grade logiqa --data logiqa_test.jsonl --predictions preds.jsonl --out graded.jsonl
reflectevo check-graders --official-dir path/to/reflectevo-official --allow-code-execution
reflectevo sandbox
reflectevo run params/quickstart.yaml [--stages 01,02 | --from 03] [--force] [--dry-run]
reflectevo run params/evolve-smoke.yaml --from round_2:03      (a run of several rounds: evolve.rounds)
reflectevo serve MODEL [--host 127.0.0.1] [--port 8000]
reflectevo compare outputs/quickstart outputs/quickstart-3shot [--tasks] [--out compare/]
reflectevo push outputs/quickstart --repo ORG/NAME [--what adapters|datasets|all] [--private] [--dry-run]
reflectevo train sft|dpo params/quickstart.yaml      (also under accelerate launch -m reflectevo ...)
accelerate launch --multi_gpu --num_processes 8 -m reflectevo generate params/quickstart.yaml --stage reflect|eval
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reflectevo.errors import DataError, ReflectEvoError

# Each subcommand imports what it runs inside its handler: `reflectevo --help` or `reflectevo tasks` then
# starts in ~15 ms instead of ~0.5 s (the schema's pydantic and every stage's modules, imported at the top).


def _sandbox(args: argparse.Namespace, task_names: Sequence[str]):
    """A sandbox when a task runs code and the user opted in; the opt-in check comes first."""
    from reflectevo.tasks import check_code_execution

    check_code_execution(task_names, allowed=args.allow_code_execution)
    if not any(_task(name).needs_code_execution for name in task_names):
        return None
    from reflectevo.sandbox.host import Sandbox

    return Sandbox(allow_code_execution=True, workers=args.workers, timeout_s=args.timeout)


def _task(name: str):
    from reflectevo.tasks import get_task

    return get_task(name)


def cmd_tasks(args: argparse.Namespace) -> int:
    from reflectevo.tasks import TASKS

    rows = [task.describe() for task in TASKS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']:9s} v{row['version']}  {row['description']}")
        print(f"{'':12s} answer: {row['answer_format']}")
        print(
            f"{'':12s} official file: {row['official_file']}   hub: {row['hub_dataset']}"
            + ("   (runs model code: needs --allow-code-execution)" if row["runs_code"] else "")
        )
    return 0


def _graders(choice: str) -> list[str]:
    return ["official", "robust"] if choice == "both" else [choice]


def _read_predictions(path: Path) -> dict[str, str]:
    from reflectevo.core.jsonl import read_jsonl

    predictions: dict[str, str] = {}
    for line, row in read_jsonl(path):
        if "id" not in row or not isinstance(row.get("output"), str):
            raise DataError(f"{path}:{line}: a prediction row needs an 'id' and a string 'output'")
        if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):  # str() of anything else never matches
            raise DataError(f"{path}:{line}: 'id' must be a string or an integer, got {type(row['id']).__name__}")
        key = str(row["id"])
        if key in predictions:
            raise DataError(f"{path}:{line}: a second prediction for id {key!r}")
        predictions[key] = row["output"]
    return predictions


def cmd_grade(args: argparse.Namespace) -> int:
    task = _task(args.task)
    graders = _graders(args.grader)
    sandbox = _sandbox(args, [task.name])  # the opt-in check comes before anything else
    if args.predictions is not None:
        if args.data is None:
            raise ReflectEvoError("--predictions needs --data FILE with the items to grade against")
        if args.output is not None or args.gold is not None:
            raise ReflectEvoError("give either --predictions (a file of outputs) or --output (one output), not both")
        return _grade_file(args, task, graders, sandbox)
    if args.output is None:
        raise ReflectEvoError("nothing to grade: give --output TEXT, or --data FILE --predictions FILE")
    if args.gold is not None:
        item = task.item_from_answer(args.gold, args.question or "")
    elif args.data is not None and args.id is not None:
        items = {item.id: item for item in task.load_file(args.data)}
        if args.id not in items:
            raise DataError(f"{args.data}: no item with id {args.id!r} ({len(items)} items)")
        item = items[args.id]
    else:
        raise ReflectEvoError("say what the answer is graded against: --gold GOLD, or --data FILE --id ID")
    verdicts = [task.grade(item, args.output, grader, sandbox) for grader in graders]
    if args.json:
        print(json.dumps([verdict.to_dict() for verdict in verdicts], indent=2))
        return 0
    print(f"{task.name} item {item.id}, gold {item.gold!r}" if len(item.gold) < 80 else f"{task.name} item {item.id}")
    for verdict in verdicts:
        feedback = verdict.feedback.replace("\n", " | ")
        print(
            f"  {verdict.grader:8s} {verdict.outcome:13s} extracted={verdict.extracted!r:.60}  feedback: {feedback[:160]}"
        )
    return 0


def _grade_file(args: argparse.Namespace, task, graders: list[str], sandbox) -> int:
    items = task.load_file(args.data)
    predictions = _read_predictions(args.predictions)
    unknown = sorted(set(predictions) - {item.id for item in items})
    if unknown:
        raise DataError(f"{args.predictions}: ids not in {args.data}: {', '.join(unknown[:10])}")
    graded = [item for item in items if item.id in predictions]
    missing = len(items) - len(graded)
    if missing and not args.allow_missing:
        raise DataError(
            f"{args.predictions}: no prediction for {missing} of {len(items)} items "
            "(grade the subset with --allow-missing)"
        )
    rows: list[dict[str, Any]] = []
    summary: dict[str, Counter] = {}
    for grader in graders:
        verdicts = task.grade_many(graded, [predictions[item.id] for item in graded], grader, sandbox)
        summary[grader] = Counter(verdict.outcome for verdict in verdicts)
        rows += [{"task": task.name, "id": item.id, **verdict.to_dict()} for item, verdict in zip(graded, verdicts)]
    if args.out is not None:
        from reflectevo.core.jsonl import write_jsonl_atomic

        write_jsonl_atomic(args.out, rows)
    print(f"{task.name}: {len(graded)} predictions graded" + (f" ({missing} items without one)" if missing else ""))
    for grader, counts in summary.items():
        accuracy = counts["correct"] / len(graded) if graded else 0.0
        detail = ", ".join(
            f"{name} {counts[name]}" for name in ("correct", "wrong", "parse_failure", "timeout") if counts[name]
        )
        print(f"  {grader:8s} accuracy {accuracy:.3f}  ({detail})")
    if args.out is not None:
        print(f"per-item verdicts: {args.out}")
    return 0


def cmd_check_graders(args: argparse.Namespace) -> int:
    from reflectevo.tasks import task_names
    from reflectevo.tasks.selfcheck import check_graders, format_report

    names = args.tasks or task_names()
    tasks = [_task(name) for name in names]
    if args.official_dir is None and not args.samples:
        raise ReflectEvoError("choose the items to check: --official-dir DIR (the paper's test files) or --samples")
    sandbox = _sandbox(args, names)  # the opt-in check comes before anything else
    sources = {}
    for task in tasks:  # load everything first: a missing file fails before any code runs
        sources[task.name] = (
            task.load_samples() if args.samples else task.load_official(Path(args.official_dir) / task.official_file)
        )
    reports = []
    for task in tasks:
        report = check_graders(task, sources[task.name], sandbox)
        reports.append(report)
        print(format_report(report))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from reflectevo.sandbox.host import isolation_report

    report = isolation_report()
    if args.json:
        print(
            json.dumps(
                {"mode": report.mode, "layers": report.layers, "limits": report.limits, "not_used": report.tried},
                indent=2,
            )
        )
    else:
        print(report.describe())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from reflectevo.cli.run import run_pipeline

    stages = [name.strip() for name in args.stages.split(",") if name.strip()] if args.stages else None
    return run_pipeline(
        args.params,
        stages=stages,
        start=args.start,
        force=args.force,
        dry_run=args.dry_run,
        notebooks=args.notebooks,
        quiet=args.quiet,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from reflectevo.cli.serve import serve
    from reflectevo.config import ModelParams

    serve(ModelParams(name=args.model, device=args.device, dtype=args.dtype), host=args.host, port=args.port)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from reflectevo.config import load_params
    from reflectevo.models.loading import select_backend

    params = load_params(args.params)
    select_backend(params.model.backend)  # Unsloth, when chosen, must be imported before transformers
    from reflectevo.training.adapters import process_rank
    from reflectevo.training.stage import run_training_stage

    summary = run_training_stage(
        "03_sft" if args.stage == "sft" else "04_dpo", params, params_file=Path(args.params).resolve()
    )
    if process_rank()[0] == 0:  # under accelerate launch, one table
        print(summary.table().to_string(index=False))
        print(f"adapters: {', '.join(str(path) for path in summary.outputs if path.name == 'adapter')}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from reflectevo.cli.generate import generate_stage
    from reflectevo.config import load_params

    params = load_params(args.params)
    generate_stage(params, args.stage, params_file=Path(args.params).resolve(), notebooks=args.notebooks)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from reflectevo.config import load_params, validate_params
    from reflectevo.models.loading import select_backend

    raw = load_params(args.params).to_dict()
    raw["model"].update({key: value for key, value in (("name", args.model), ("device", args.device)) if value})
    if args.protocols:
        raw["eval"]["protocols"] = [name.strip() for name in args.protocols.split(",") if name.strip()]
    params = validate_params(raw, f"{args.params} with the command-line options")
    select_backend(params.model.backend)
    from reflectevo.evaluation.stage import evaluate_model

    variants = [name.strip() for name in args.variants.split(",") if name.strip()] if args.variants else None
    out_dir, tables = evaluate_model(
        params, adapter=args.adapter, adapter_as=args.adapter_as, variants=variants, out_dir=args.out
    )
    grader = params.eval.graders[0]
    for protocol in params.eval.protocols:
        print(f"\nprotocol {protocol}, grader {grader} (Acc@t1 / Acc@t2 / delta, %):")
        print(tables.paper_view(protocol, grader).to_string())
    print(f"\nresults: {out_dir}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from reflectevo.analysis.compare import compare_runs

    labels = [name.strip() for name in args.labels.split(",")] if args.labels else None
    comparison = compare_runs(
        args.runs, labels=labels, allow_different_items=args.allow_different_items, tasks=args.tasks
    )
    print(comparison.to_markdown())
    if args.out:
        print(f"written: {comparison.write(args.out)} (with headline.csv, params.csv, paired.csv)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import tempfile

    from reflectevo.cli.push import push_plan, stage_uploads, upload

    uploads = push_plan(args.run_dir, args.repo, args.what)
    print(f"{'would upload' if args.dry_run else 'uploading'} ({'private' if args.private else 'public'} repos):")
    for item in uploads:
        print(f"  {item.describe()}" + (" (card only)" if not item.files else ""))
        for key, value in item.rewrites.items():
            print(f"    adapter_config.json {key} -> {value!r} (a path on this machine)")
    if args.dry_run:
        if args.stage:
            folders = stage_uploads(uploads, args.stage)
            print(f"staged as they would be uploaded: {', '.join(map(str, folders))}")
        return 0
    with tempfile.TemporaryDirectory(prefix="reflectevo-push-") as staging:
        for url in upload(uploads, private=args.private, staging=staging):
            print(f"  {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflectevo", description="ReflectEvo: learning from self-reflection.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tasks = commands.add_parser("tasks", help="list the registered tasks")
    tasks.add_argument("--json", action="store_true", help="machine-readable output")
    tasks.set_defaults(run=cmd_tasks)

    def code_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--allow-code-execution",
            action="store_true",
            help="opt in to running model-written code in the sandbox (MBPP)",
        )
        sub.add_argument("--workers", type=int, default=1, help="parallel sandbox workers (default 1)")
        sub.add_argument("--timeout", type=float, default=5.0, help="seconds per program (default 5, as the paper)")

    grade = commands.add_parser("grade", help="grade one output, or a file of predictions")
    grade.add_argument("task", help="task name (see `reflectevo tasks`)")
    grade.add_argument("--output", help="one model output (its action line is parsed)")
    grade.add_argument("--gold", help="the gold answer to grade --output against")
    grade.add_argument("--question", help="the question text, for option-aware robust grading with --gold")
    grade.add_argument("--data", type=Path, help="items: an official JSONL file or unified items")
    grade.add_argument("--id", help="with --data and --output: the item to grade against")
    grade.add_argument("--predictions", type=Path, help='JSONL of {"id": ..., "output": ...} rows')
    grade.add_argument("--allow-missing", action="store_true", help="grade only the items that have a prediction")
    grade.add_argument("--grader", choices=["both", "official", "robust"], default="both")
    grade.add_argument("--out", type=Path, help="write per-item verdicts here (JSONL, atomic)")
    grade.add_argument("--json", action="store_true", help="machine-readable output (single answer)")
    code_options(grade)
    grade.set_defaults(run=cmd_grade)

    check = commands.add_parser("check-graders", help="grade gold, wrong and reformatted answers on a task's items")
    check.add_argument("tasks", nargs="*", help="tasks to check (default: all)")
    check.add_argument("--official-dir", type=Path, help="folder with the paper's *_test.jsonl files")
    check.add_argument("--samples", action="store_true", help="check the built-in sample items instead")
    check.add_argument("--json", type=Path, help="also write the reports as JSON")
    code_options(check)
    check.set_defaults(run=cmd_check_graders)

    sandbox = commands.add_parser("sandbox", help="show which isolation layers the code sandbox gets here")
    sandbox.add_argument("--json", action="store_true")
    sandbox.set_defaults(run=cmd_sandbox)

    run = commands.add_parser("run", help="run the numbered notebooks of a recipe with papermill")
    run.add_argument("params", help="a params file, e.g. params/quickstart.yaml")
    run.add_argument(
        "--stages",
        help="only these stages, comma-separated (01,02 or 01_data,02_reflect); with "
        "evolve.rounds >= 2 a plain 03 means 03 of every round, round_2:03 that of round 2",
    )
    run.add_argument(
        "--from",
        dest="start",
        help="this stage and every later one (with rounds: round_2:03, or 03 for round 1's 03 onwards)",
    )
    run.add_argument("--force", action="store_true", help="rerun stages even when their identity matches")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved params, the stage plan and one prompt per task; load no model",
    )
    run.add_argument(
        "--notebooks", help="folder of the numbered notebooks (default: ./notebooks, else the source tree's)"
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="one line per stage only: no section and progress lines while a stage runs, no summary at the end",
    )
    run.set_defaults(run=cmd_run)

    train = commands.add_parser(
        "train", help="stage 03 (sft) or 04 (dpo) without Jupyter; works under accelerate launch"
    )
    train.add_argument(
        "stage", choices=["sft", "dpo"], help="sft: every mode of sft.modes; dpo: every pair type of dpo.pairs"
    )
    train.add_argument("params", help="a params file, e.g. params/quickstart.yaml")
    train.set_defaults(run=cmd_train)

    generate = commands.add_parser(
        "generate",
        help="fill stage 02's or 05's generation store, split between processes (accelerate launch)",
        description="Generate what stage 02 (reflect) or 05 (eval) generates, split between the processes of "
        "`accelerate launch` (one per GPU, on one or several machines), into the store the stage's "
        "notebook reads; then `reflectevo run PARAMS` finds every batch committed and only merges.",
    )
    generate.add_argument("params", help="the params file the run uses, unchanged")
    generate.add_argument("--stage", required=True, choices=["reflect", "eval"], help="reflect (02) or eval (05)")
    generate.add_argument("--notebooks", help="folder of the numbered notebooks, as for run (which stages exist)")
    generate.set_defaults(run=cmd_generate)

    evaluate = commands.add_parser(
        "eval", help="evaluate any model or adapter on the eval split, without the other stages"
    )
    evaluate.add_argument("params", help="a params file: its data, generation and eval sections are used")
    evaluate.add_argument("--model", help="a hub id or local folder (replaces model.name)")
    evaluate.add_argument("--adapter", help="a LoRA adapter folder to evaluate on top of the model")
    evaluate.add_argument(
        "--adapter-as",
        default="sft/two_stage",
        help="the variant whose roles the adapter plays: sft/two_stage (default: it reflects and answers "
        "the second turn), sft/one_stage, sft/qa_pairs, dpo/d_pm or dpo/d_pref (it reflects)",
    )
    evaluate.add_argument(
        "--variants", help="comma-separated: retry, base and the --adapter-as name (default: all three)"
    )
    evaluate.add_argument(
        "--protocols", help="comma-separated, replaces eval.protocols (oracle, oracle_free, self_verify)"
    )
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], help="replaces model.device")
    evaluate.add_argument(
        "--out", type=Path, help="results folder (default outputs/<run>/eval-standalone/<model>[-<adapter>])"
    )
    evaluate.set_defaults(run=cmd_eval)

    compare = commands.add_parser(
        "compare",
        help="headline tables of several runs side by side, the params that differ, paired tests",
        description="Put the Acc@t1 / Acc@t2 / delta tables of two or more evaluated runs side by side, with "
        "the params that differ between them and a paired test of each later run against the first on "
        "the test items they share. Runs evaluated on different items are refused unless "
        "--allow-different-items.",
    )
    compare.add_argument("runs", nargs="+", help="run folders (outputs/<run>, or outputs/<run>/round_<k>)")
    compare.add_argument("--labels", help="comma-separated names for the runs (default: their run names)")
    compare.add_argument("--tasks", action="store_true", help="also one headline table per task")
    compare.add_argument(
        "--allow-different-items",
        action="store_true",
        help="compare runs evaluated on different test items (every table says so; paired tests use the shared ones)",
    )
    compare.add_argument("--out", type=Path, help="also write compare.md and its tables as CSV into this folder")
    compare.set_defaults(run=cmd_compare)

    push = commands.add_parser(
        "push",
        help="upload a run's adapters and dataset folder to the Hub (with their cards)",
        description="Upload a run's LoRA adapters (model repo ORG/NAME, one subfolder each) and its curated "
        "sets (dataset repo ORG/NAME, one config per set) to the Hugging Face Hub. Needs the network and "
        "a token (hf auth login, or HF_TOKEN). --dry-run lists what would be uploaded without a network.",
    )
    push.add_argument("run_dir", metavar="RUN", type=Path, help="a run folder, e.g. outputs/quickstart")
    push.add_argument("--repo", required=True, help="ORG/NAME on the Hub (created if missing)")
    push.add_argument("--what", choices=["adapters", "datasets", "all"], default="all")
    push.add_argument("--private", action="store_true", help="create the repos private")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    push.add_argument("--stage", type=Path, help="with --dry-run: also write the upload's folders here, to inspect")
    push.set_defaults(run=cmd_push)

    serve = commands.add_parser("serve", help="serve a model on an OpenAI-compatible endpoint (e.g. as a judge)")
    serve.add_argument("model", help="a hub id, a local folder or a built-in (builtin:tiny), as model.name")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; the server has no authentication)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ReflectEvoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

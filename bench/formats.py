"""What makes a real small model answer in the task's format: first attempts on official items, one
row per way of asking and task, all in one run on the same model, items and seed.

    python bench/formats.py --official-dir data/reflectevo-official          # builtin:smollm2-135m, 8 items per task
    python bench/formats.py --official-dir DIR --items 16 --json out.json

The ways of asking are the package's own options: worked examples in the prompt (``fewshots``), the
paper's two calls per attempt (``attempt_calls: 2``, the action call pre-filled with ``Action:``), and the
action call pre-filled through the answer syntax (``attempt_prefill: answer``, ``Action: Finish[``).
Per row: items, parseable share (an answer could be read from the action, official grader), accuracy
under the official and the robust grader, the share of attempts cut at the token limit, and seconds. The
first attempt is greedy, as in the pipeline; the items are the first ``--items`` of each official file
after a seeded shuffle.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from reflectevo.config import load_params
from reflectevo.generation.engines import make_engine
from reflectevo.models.loading import load_model
from reflectevo.reflection.pipeline import ReflectionPipeline, make_sandbox
from reflectevo.tasks import TASKS, get_task

# (label, reflect settings): the ways of asking, from the plainest to the most guided
WAYS = (
    ("0-shot, 1 call", {"fewshots": 0, "attempt_calls": 1}),
    ("3-shot, 1 call", {"fewshots": 3, "attempt_calls": 1}),
    ("0-shot, 2 calls (Action:)", {"fewshots": 0, "attempt_calls": 2}),
    ("0-shot, 2 calls (Action: Finish[)", {"fewshots": 0, "attempt_calls": 2, "attempt_prefill": "answer"}),
    ("3-shot, 2 calls (Action: Finish[)", {"fewshots": 3, "attempt_calls": 2, "attempt_prefill": "answer"}),
)


def official_sample(official_dir: Path, count: int, seed: int) -> dict[str, list]:
    sample = {}
    for name, task in TASKS.items():
        items = task.load_official(official_dir / task.official_file)
        random.Random(f"{seed}/{name}").shuffle(items)
        sample[name] = items[:count]
    return sample


def measure(model: str, items: dict[str, list], max_new_tokens: int, batch_size: int, seed: int) -> list[dict]:
    base = {
        "run": {"name": "bench-formats", "seed": seed, "allow_code_execution": True},
        "model": {"name": model, "backend": "transformers", "dtype": "float32", "device": "cpu"},
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens},
    }
    params = load_params(None, base)
    loaded = load_model(params.model)
    sandbox = make_sandbox(params, list(items))
    rows = []
    for label, reflect in WAYS:
        params = load_params(None, {**base, "reflect": reflect})
        pipeline = ReflectionPipeline(params, make_engine(params.generation, loaded, progress=False), sandbox=sandbox)
        started = time.perf_counter()
        trials = pipeline.first_trials(items)
        seconds = time.perf_counter() - started
        for name in items:
            mine = [trial for (task, _), trial in trials.items() if task == name]
            robust = get_task(name).grade_many(
                [t.item for t in mine], [t.attempt.text for t in mine], "robust", sandbox
            )
            cut = [any(call.get("finish_reason") == "length" for call in t.attempt.calls) for t in mine]
            rows.append(
                {
                    "way": label,
                    "task": name,
                    "items": len(mine),
                    "parseable": round(sum(t.verdict.outcome != "parse_failure" for t in mine) / len(mine), 3),
                    "accuracy official": round(sum(t.verdict.correct for t in mine) / len(mine), 3),
                    "accuracy robust": round(sum(v.correct for v in robust) / len(mine), 3),
                    "cut at limit": round(sum(cut) / len(mine), 3),
                    "seconds (all tasks)": round(seconds, 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", required=True, help="folder with the paper's <task>_test.jsonl files")
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--items", type=int, default=8, help="items per task")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per call")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    items = official_sample(Path(args.official_dir), args.items, args.seed)
    rows = measure(args.model, items, args.max_new_tokens, args.batch_size, args.seed)
    columns = list(rows[0])
    print(f"model {args.model}, {args.items} official items per task, {args.max_new_tokens} tokens per call, greedy")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[column]) for column in columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

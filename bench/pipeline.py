"""The stage-02 pipeline batched over the whole split against the same pipeline one question at a
time (batch size 1), on the same model, items and seed, in the same run.

    python bench/pipeline.py                                   # params/standin.yaml, builtin:tiny on CPU
    python bench/pipeline.py --params params/smoke.yaml --batch-size 16 --json out.json

Both runs generate exactly the same requests (first trials, reflections, second trials) with the
same per-batch seeds where the batches coincide; a record is one output of the raw records (a first
or a second trial). The table gives seconds, records/s and generated tokens/s for each, and the
ratio batched over one-at-a-time. Greedy attempts can differ between the two runs by padding alone
on some hardware, so the record counts are printed too.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from reflectevo.config import load_params
from reflectevo.data.prepare import prepare_data
from reflectevo.generation.engines import make_engine
from reflectevo.models.loading import load_model
from reflectevo.reflection.pipeline import ReflectionPipeline, make_sandbox

REPO = Path(__file__).resolve().parents[1]


def run_once(params, loaded, items, batch_size: int) -> dict:
    generation = params.generation.model_copy(update={"batch_size": batch_size})
    engine = make_engine(generation, loaded, progress=False)
    pipeline = ReflectionPipeline(params, engine, sandbox=make_sandbox(params, list(items)))
    started = time.perf_counter()
    result = pipeline.run(items)
    seconds = time.perf_counter() - started
    new_tokens = sum(stage["new_tokens"] for stage in engine.stats.values())
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 2),
        "records": result.stats["records"],
        "generations": result.stats["generations"],
        "records_per_s": round(result.stats["records"] / seconds, 2),
        "tokens_per_s": round(new_tokens / seconds, 1),
        "successes": sum(o["is_correct"] for r in result.records for o in r["output"][1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params" / "standin.yaml"))
    parser.add_argument(
        "--batch-size", type=int, default=None, help="the batched run's batch size (default: the params')"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    params = load_params(args.params, {})
    params = params.model_copy(update={"run": params.run.model_copy(update={"allow_code_execution": True})})
    data = prepare_data(params.data, seed=params.run.seed)
    items = {name: task_data.splits[params.reflect.split] for name, task_data in data.items()}
    loaded = load_model(params.model)
    batch = args.batch_size or int(params.generation.batch_size if params.generation.batch_size != "auto" else 16)
    run_once(params, loaded, {name: rows[:2] for name, rows in items.items()}, batch)  # warm-up: imports, kernels
    naive = run_once(params, loaded, items, 1)
    batched = run_once(params, loaded, items, batch)

    shown = Path(args.params).resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
    print(
        f"stage-02 pipeline, {shown}: model {loaded.name} on {loaded.device} ({platform.processor() or platform.machine()}), "
        f"{sum(map(len, items.values()))} questions"
    )
    print(f"{'run':<16}{'batch':>6}{'seconds':>9}{'records':>9}{'records/s':>11}{'tokens/s':>10}{'successes':>11}")
    for label, row in (("one at a time", naive), ("batched", batched)):
        print(
            f"{label:<16}{row['batch_size']:>6}{row['seconds']:>9}{row['records']:>9}{row['records_per_s']:>11}"
            f"{row['tokens_per_s']:>10}{row['successes']:>11}"
        )
    ratio = batched["records_per_s"] / naive["records_per_s"]
    print(f"{'ratio':<16}{'':>6}{'':>9}{'':>9}{ratio:>10.2f}x{batched['tokens_per_s'] / naive['tokens_per_s']:>9.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"naive": naive, "batched": batched, "ratio_records_per_s": round(ratio, 3)}, indent=2)
        )


if __name__ == "__main__":
    main()

"""Batched generation against a naive one-prompt-at-a-time loop, on the same model in the same run.

    python bench/generation.py                                  # builtin:tiny on CPU, both mixes
    python bench/generation.py --model builtin:random-1b --n-prompts 512 --batch-size 64 --json out.json
    python bench/generation.py --model-dir path/to/hf-folder --mixes short

Mixes of prompt lengths:
  short     one-line arithmetic questions in the zero-shot attempt prompt (MATH task wording)
  official  a seeded sample of the paper's official test items of all four tasks, zero-shot attempt
            prompts (needs the <task>_test.jsonl files in --official-dir); items whose prompt and
            output budget do not fit the model's context are left out and counted

Decoding is greedy. Each record's output budget comes from OUTPUT_TOKENS (by task). Random-weight
models never stop by themselves, so for them every record is made to produce exactly that many
tokens (min_new_tokens = max_new_tokens); a trained model stops where it stops, the same way in
both loops. The ratio columns are batched over naive.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from reflectevo.generation.engines import TransformersEngine
from reflectevo.generation.requests import GenerationRequest, GenerationSettings
from reflectevo.prompts import attempt_messages
from reflectevo.tasks import get_task, task_names

REPO = Path(__file__).resolve().parents[1]
# The official files: $REFLECTEVO_OFFICIAL_DATA, else the shared data folder beside the repository
# (the layout the tests use, see tests/conftest.py).
DEFAULT_OFFICIAL_DIR = Path(
    os.environ.get("REFLECTEVO_OFFICIAL_DATA") or REPO.parent / "shared" / "data" / "reflectevo-official"
)
DEFAULTS = {"model": "builtin:tiny", "mixes": "short,official", "n_prompts": 64, "batch_size": 16, "seed": 0}
# Output budget per record, in tokens: roughly one Thought line and one Action line (code is longer).
OUTPUT_TOKENS = {"short": 32, "logiqa": 64, "math": 96, "mbpp": 128, "bigbench": 64}


def short_prompts(count: int, rng: random.Random) -> list[tuple[str, str, list[dict]]]:
    math = get_task("math")
    prompts = []
    for i in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        item = math.item_from_answer(str(a + b), f"What is {a} + {b}?")
        prompts.append((f"short-{i:04d}", "short", attempt_messages(math, item, fewshots=0)))
    return prompts


def official_prompts(count: int, rng: random.Random, folder: Path, engine: TransformersEngine) -> tuple[list, int]:
    """A seeded sample of the items whose prompt and output budget fit the model's context; how many did not."""
    pool = []
    for name in task_names():
        task = get_task(name)
        path = folder / f"{name}_test.jsonl"
        if not path.is_file():
            sys.exit(f"official test file not found: {path} (give the folder with --official-dir)")
        pool += [
            (f"{name}-{item.id}", name, attempt_messages(task, item, fewshots=0)) for item in task.load_official(path)
        ]
    chosen = rng.sample(pool, min(count, len(pool)))
    lengths = [len(ids) for ids in engine.tokenize([engine.render(messages) for _key, _task, messages in chosen])]
    fitting = [
        record for record, length in zip(chosen, lengths) if length + OUTPUT_TOKENS[record[1]] <= engine.max_seq_length
    ]
    return fitting, len(chosen) - len(fitting)


def load(args: argparse.Namespace):
    """(model, tokenizer, label, random_weights)"""
    if args.model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
        return model, AutoTokenizer.from_pretrained(args.model_dir), args.model_dir, args.random_weights
    from reflectevo.config import ModelParams
    from reflectevo.models.loading import load_model

    loaded = load_model(ModelParams(name=args.model, backend="transformers"))
    random_weights = args.random_weights or args.model.startswith("builtin:random")
    return loaded.model, loaded.tokenizer, args.model, random_weights


def settings_for(task: str, random_weights: bool) -> GenerationSettings:
    budget = OUTPUT_TOKENS[task]
    return GenerationSettings(max_new_tokens=budget, min_new_tokens=budget if random_weights else 0)


def naive_loop(
    engine: TransformersEngine, prompts: list[str], settings: list[GenerationSettings]
) -> tuple[list[str], int]:
    """The plain way: one ``model.generate`` call per prompt, no padding."""
    import torch

    model, tokenizer = engine.model, engine.tokenizer
    texts, tokens = [], 0
    for prompt, setting in zip(prompts, settings):
        input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=setting.max_new_tokens,
                min_new_tokens=setting.min_new_tokens or None,
                pad_token_id=engine.pad_id,
                eos_token_id=sorted(engine.eos_ids),
            )
        text, _reason, count = engine.finish(out[0, input_ids.shape[1] :].tolist(), ())
        texts.append(text)
        tokens += count
    return texts, tokens


def timed(function, *args):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def measure(mix: str, records: list, engine: TransformersEngine, random_weights: bool, skipped: int = 0) -> dict:
    requests = [GenerationRequest(key, messages) for key, _task, messages in records]
    settings = [settings_for(task, random_weights) for _key, task, _messages in records]

    def batched() -> tuple[list[str], int]:
        # one engine call per output budget (settings are per call); each is batched over its records
        texts: dict[str, str] = {}
        tokens = 0
        for budget in sorted({s.max_new_tokens for s in settings}):
            group = [r for r, s in zip(requests, settings) if s.max_new_tokens == budget]
            for output in engine.generate(
                group, next(s for s in settings if s.max_new_tokens == budget), stage=f"bench-{mix}"
            ):
                texts[output.key] = output.text
                tokens += output.new_tokens
        return [texts[r.key] for r in requests], tokens

    prompts = [engine.render(r.messages) for r in requests]
    (naive_texts, naive_tokens), naive_s = timed(naive_loop, engine, prompts, settings)
    (batched_texts, batched_tokens), batched_s = timed(batched)
    prompt_tokens = [len(ids) for ids in engine.tokenize(prompts)]
    return {
        "mix": mix,
        "prompts": len(requests),
        "skipped_too_long": skipped,
        "batch_size": engine.batch_size,
        "prompt_tokens_mean": round(sum(prompt_tokens) / len(prompt_tokens), 1),
        "prompt_tokens_max": max(prompt_tokens),
        "naive_s": round(naive_s, 3),
        "batched_s": round(batched_s, 3),
        "naive_prompts_per_s": round(len(requests) / naive_s, 2),
        "batched_prompts_per_s": round(len(requests) / batched_s, 2),
        "naive_tokens": naive_tokens,
        "batched_tokens": batched_tokens,
        "naive_tokens_per_s": round(naive_tokens / naive_s, 1),
        "batched_tokens_per_s": round(batched_tokens / batched_s, 1),
        "speedup": round(naive_s / batched_s, 2),
        "same_text": round(sum(a == b for a, b in zip(naive_texts, batched_texts)) / len(requests), 3),
    }


COLUMNS = [
    ("mix", "mix"),
    ("prompts", "n"),
    ("skipped_too_long", "too long"),
    ("batch_size", "batch"),
    ("prompt_tokens_mean", "prompt tok"),
    ("naive_s", "naive s"),
    ("batched_s", "batched s"),
    ("naive_prompts_per_s", "naive p/s"),
    ("batched_prompts_per_s", "batched p/s"),
    ("naive_tokens_per_s", "naive tok/s"),
    ("batched_tokens_per_s", "batched tok/s"),
    ("speedup", "speed-up"),
    ("same_text", "same text"),
]


def print_table(rows: list[dict]) -> None:
    cells = [[label for _key, label in COLUMNS]] + [[str(row[key]) for key, _label in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for n, line in enumerate(cells):
        print(" | ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        if n == 0:
            print("-+-".join("-" * width for width in widths))


def batch_size_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULTS["model"], help="a model name for reflectevo.models.load_model")
    parser.add_argument("--model-dir", help="a local Hugging Face folder instead of --model")
    parser.add_argument(
        "--random-weights", action="store_true", help="force every output to its full budget (for --model-dir)"
    )
    parser.add_argument("--mixes", default=DEFAULTS["mixes"], help="comma-separated: short, official")
    parser.add_argument("--n-prompts", type=int, default=DEFAULTS["n_prompts"])
    parser.add_argument(
        "--batch-size", type=batch_size_arg, default=DEFAULTS["batch_size"], help="sequences per batch, or auto"
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="which prompts are sampled")
    parser.add_argument("--official-dir", type=Path, default=DEFAULT_OFFICIAL_DIR)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    model, tokenizer, label, random_weights = load(args)
    engine = TransformersEngine(model, tokenizer, batch_size=args.batch_size, progress=False, model_name=label)
    if args.batch_size == "auto":
        print(f"batch_size auto: {engine.batch_size} ({engine.batch_size_how})")
    warm = short_prompts(2, random.Random(args.seed))
    measure("warm-up", warm, engine, random_weights)  # first calls pay one-off costs

    rows = []
    for mix in [m.strip() for m in args.mixes.split(",") if m.strip()]:
        rng = random.Random(args.seed)
        skipped = 0
        if mix == "short":
            records = short_prompts(args.n_prompts, rng)
        elif mix == "official":
            records, skipped = official_prompts(args.n_prompts, rng, args.official_dir, engine)
        else:
            parser.error(f"unknown mix {mix!r}; choose short or official")
        rows.append(measure(mix, records, engine, random_weights, skipped))

    device = str(model.device)
    print(
        f"model {label} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {next(model.parameters()).dtype}) "
        f"on {device}, {torch.get_num_threads()} CPU threads, greedy, "
        f"{'forced output lengths' if random_weights else 'natural stops'}, budgets {OUTPUT_TOKENS}; "
        f"prompts longer than the {engine.max_seq_length}-token context less the budget are left out"
    )
    print_table(rows)
    if args.json:
        report = {
            "model": label,
            "device": device,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "random_weights": random_weights,
            "output_tokens": OUTPUT_TOKENS,
            "seed": args.seed,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reflect stage's generation (first trials, reflections, second trials) on the realistic length
mix, three ways on the same model in the same run:

  naive      one question at a time in dataset order, as the paper's code does: its first trial,
             then its k reflections, then one second trial per reflection, each a model.generate call
  plain-64   each step over all questions in dataset order, model.generate on 64 sequences at a time,
             left-padded, no sorting (the k reflections by num_return_sequences)
  engine     the package's engine (reflectevo.generation): prompts sorted by length, batches as
             large as the batch size allows, the k reflections of a prompt from one prefill

    python bench/reflect_stage.py                                   # builtin:tiny on CPU, a few seconds
    python bench/reflect_stage.py --model builtin:random-8b --questions 512 --batch-size auto --json out.json
    python bench/reflect_stage.py --engine unsloth --model builtin:random-8b ...   # in its own process

Every record's output length is imposed from bench/lengths.py (a logits processor suppresses the
end token until the record's length, then forces it), for every way alike, so all three generate the
same number of tokens and the ratios compare equal work. Every first trial counts as wrong (a
random-weight model is never right), so every question gets k reflections: the upper end of the
stage's work. ``--length-scale`` shrinks the imposed lengths for CPU smoke runs. Reflections are
sampled (temperature 0.7), attempts greedy, as in the package's reflect stage.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lengths
from generation import (
    timed,  # bench/generation.py: a call timed with the GPU synchronised
)

from reflectevo.generation.requests import GenerationRequest, GenerationSettings, render_chat
from reflectevo.prompts import (
    INSTRUCTIONS,
    attempt_messages,
    reflection_prompt,
    second_trial_prompt,
)
from reflectevo.tasks import get_task

DEFAULTS = {
    "model": "builtin:tiny",
    "questions": 8,
    "k": 2,
    "batch_size": "16",
    "plain_batch": 64,
    "seed": 0,
    "length_scale": 0.1,
}
REFLECTION_TEMPERATURE = 0.7
FEEDBACK = "Your answer is incorrect."


# ---- imposed output lengths ----------------------------------------------------------------------
class ImposedLengths:
    """A logits processor: row i ends with the end token exactly at its ``targets[i]``-th new token."""

    def __init__(self, targets: list[int], prompt_width: int, eos_id: int) -> None:
        import torch

        self.targets = torch.tensor(targets)
        self.width, self.eos = prompt_width, eos_id

    def __call__(self, input_ids, scores):
        import torch

        made = input_ids.shape[1] - self.width  # tokens generated before this step
        targets = self.targets.to(scores.device)
        scores[:, self.eos] = torch.where(made < targets - 1, torch.finfo(scores.dtype).min, scores[:, self.eos])
        finish = made >= targets - 1
        if finish.any():
            scores[finish] = torch.finfo(scores.dtype).min
            scores[finish, self.eos] = 0.0
        return scores


@dataclass
class Step:
    """One generation step: its requests, each request's imposed lengths (one per sample), settings."""

    name: str
    requests: list[GenerationRequest]
    targets: dict[str, list[int]]
    settings: GenerationSettings


def imposed_factory(step: Step, tokenizer, eos_id: int):
    """For the engine: builds each generate call's processor from the call's own prompts."""
    by_prompt: dict[tuple[int, ...], list[list[int]]] = {}

    def key_of(request: GenerationRequest) -> tuple[int, ...]:
        return tuple(tokenizer(render_chat(tokenizer, request.messages), add_special_tokens=False)["input_ids"])

    for request in step.requests:
        by_prompt.setdefault(key_of(request), []).append(step.targets[request.key])

    def make(token_ids, settings: GenerationSettings) -> ImposedLengths:
        seen: dict[tuple[int, ...], int] = {}
        targets = []
        for ids in token_ids:  # identical prompts (none here) would take their targets in turn
            ids = tuple(ids)
            targets += by_prompt[ids][seen.get(ids, 0)]
            seen[ids] = seen.get(ids, 0) + 1
        return ImposedLengths(targets, max(len(ids) for ids in token_ids), eos_id)

    return make


# ---- the three steps -------------------------------------------------------------------------------
def scaled(n: int, scale: float) -> int:
    return max(2, round(n * scale))


def first_trials(mix: list[lengths.MixItem], scale: float, max_new: int) -> Step:
    requests = [GenerationRequest(m.key, attempt_messages(get_task(m.task), m.item)) for m in mix]
    targets = {m.key: [scaled(m.first_trial, scale)] for m in mix}
    return Step("first_trial", requests, targets, GenerationSettings(max_new_tokens=max_new))


def reflections(
    mix: list[lengths.MixItem], attempts: dict[str, str], k: int, scale: float, seed: int, max_new: int
) -> Step:
    keys = sorted(INSTRUCTIONS)
    requests, targets = [], {}
    for m in mix:
        rng = random.Random(f"{seed}:{m.key}")  # per question, so every way draws the same
        instruction = INSTRUCTIONS[rng.choice(keys)]
        user = reflection_prompt(m.item, attempts[m.key], FEEDBACK, instruction)
        requests.append(GenerationRequest(m.key, [{"role": "user", "content": user}]))
        # the k samples' lengths: the first is the record's, the others drawn around the same mean
        targets[m.key] = [scaled(m.reflection, scale)] + [
            scaled(lengths.output_length(m.task, "reflection", rng), scale) for _ in range(k - 1)
        ]
    return Step(
        "reflection",
        requests,
        targets,
        GenerationSettings(max_new_tokens=max_new, n=k, temperature=REFLECTION_TEMPERATURE, seed=seed),
    )


def second_trials(mix: list[lengths.MixItem], texts: dict[str, list[str]], scale: float, max_new: int) -> Step:
    requests, targets = [], {}
    for m in mix:
        rng = random.Random(f"second:{m.key}")
        task = get_task(m.task)
        for j, reflection in enumerate(texts[m.key]):
            key = f"{m.key}/{j}"
            requests.append(
                GenerationRequest(key, [{"role": "user", "content": second_trial_prompt(task, m.item, reflection)}])
            )
            length = m.second_trial if j == 0 else lengths.output_length(m.task, "second_trial", rng)
            targets[key] = [scaled(length, scale)]
    return Step("second_trial", requests, targets, GenerationSettings(max_new_tokens=max_new))


# ---- the three ways ------------------------------------------------------------------------------
def generate_rows(
    model,
    tokenizer,
    pad_id: int,
    eos_id: int,
    prompts: list[str],
    targets: list[list[int]],
    settings: GenerationSettings,
) -> list[tuple[str, int]]:
    """One plain ``model.generate`` call over these prompts (left-padded), (text, new tokens) per sample."""
    import torch

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=model.device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=model.device)
    flat = [t for row in targets for t in row]
    from transformers import LogitsProcessorList

    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max(flat),
            num_return_sequences=settings.n,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            logits_processor=LogitsProcessorList([ImposedLengths(flat, width, eos_id)]),
            **sampling,
        )
    rows = []
    for row in out[:, width:].tolist():
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        rows.append((tokenizer.decode(row[: end - 1] if eos_id in row else row, skip_special_tokens=True), end))
    return rows


class PlainWay:
    """naive (batch 1, one question at a time) and plain-64 (dataset order, fixed chunks)."""

    def __init__(self, model, tokenizer, batch: int, name: str) -> None:
        self.model, self.tokenizer, self.batch, self.name = model, tokenizer, batch, name
        eos = model.generation_config.eos_token_id
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def prepare(self, step: Step) -> None:
        """Nothing to set up: the imposed lengths travel with each call's prompts."""

    def run_step(self, step: Step) -> dict[str, list[tuple[str, int]]]:
        import torch

        torch.manual_seed(step.settings.seed)
        results: dict[str, list[tuple[str, int]]] = {}
        per_call = max(1, self.batch // step.settings.n)
        for start in range(0, len(step.requests), per_call):
            chunk = step.requests[start : start + per_call]
            prompts = [render_chat(self.tokenizer, r.messages) for r in chunk]
            rows = generate_rows(
                self.model,
                self.tokenizer,
                self.pad,
                self.eos,
                prompts,
                [step.targets[r.key] for r in chunk],
                step.settings,
            )
            for i, request in enumerate(chunk):
                results[request.key] = rows[i * step.settings.n : (i + 1) * step.settings.n]
        return results


class EngineWay:
    """The package's engine, with the imposed lengths added to each of its generate calls."""

    def __init__(self, engine, name: str) -> None:
        self.engine, self.name, self.tokenizer = engine, name, engine.tokenizer
        eos = engine.model.generation_config.eos_token_id
        self.eos = eos[0] if isinstance(eos, list) else eos

    def prepare(self, step: Step) -> None:
        """Untimed: the imposed lengths by prompt (tokenizing every prompt is the benchmark's work, not the engine's)."""
        self.engine.processor_factories = [imposed_factory(step, self.engine.tokenizer, self.eos)]

    def run_step(self, step: Step) -> dict[str, list[tuple[str, int]]]:
        outputs = self.engine.generate(step.requests, step.settings, stage=f"bench-{step.name}")
        results: dict[str, list[tuple[str, int]]] = {}
        for output in outputs:
            results.setdefault(output.key, []).append((output.text, output.new_tokens))
        return results


def run_stage(way, mix: list[lengths.MixItem], k: int, scale: float, seed: int, naive: bool) -> dict[str, Any]:
    """The three steps for every question; ``naive`` runs all three for one question before the next."""
    max_new = scaled(max(max(v.values()) for v in lengths.OUTPUT_MEANS.values()) * lengths.SPREAD_CAP, scale)
    groups = [[m] for m in mix] if naive else [mix]
    steps: dict[str, dict[str, float]] = {name: {"seconds": 0.0, "records": 0, "tokens": 0} for name in lengths.STEPS}
    done: list[tuple[Step, dict[str, list[tuple[str, int]]]]] = []

    def run(step: Step) -> dict[str, list[tuple[str, int]]]:
        way.prepare(step)
        results, seconds = timed(way.run_step, step)
        steps[step.name]["seconds"] += seconds
        steps[step.name]["records"] += sum(len(rows) for rows in results.values())
        steps[step.name]["tokens"] += sum(n for rows in results.values() for _t, n in rows)
        done.append((step, results))
        return results

    for group in groups:
        attempts = {key: rows[0][0] for key, rows in run(first_trials(group, scale, max_new)).items()}
        reflected = run(reflections(group, attempts, k, scale, seed, max_new))
        run(second_trials(group, {key: [text for text, _n in rows] for key, rows in reflected.items()}, scale, max_new))
    # the stage's time is the generation steps' time; building prompts in between is the benchmark's own
    seconds = sum(s["seconds"] for s in steps.values())
    records = sum(s["records"] for s in steps.values())
    tokens = sum(s["tokens"] for s in steps.values())
    context = 0.0  # sum over records of prompt tokens + half the record's output: its mean context
    for step, results in done:
        for request in step.requests:
            prompt = len(
                way.tokenizer(render_chat(way.tokenizer, request.messages), add_special_tokens=False)["input_ids"]
            )
            context += sum(prompt + n / 2 for _t, n in results[request.key])
    return {
        "way": way.name,
        "seconds": round(seconds, 3),
        "records": records,
        "generated_tokens": tokens,
        "mean_context": round(context / records, 1),
        "records_per_s": round(records / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "steps": {
            name: {
                **s,
                "seconds": round(s["seconds"], 3),
                "tokens_per_s": round(s["tokens"] / max(s["seconds"], 1e-9), 1),
            }
            for name, s in steps.items()
        },
    }


# ---- entry -----------------------------------------------------------------------------------------
def load(model_name: str, engine: str, device: str):
    from reflectevo.config import ModelParams
    from reflectevo.models.loading import load_model

    backend = "unsloth" if engine == "unsloth" else "transformers"
    dtype = "auto"
    return load_model(ModelParams(name=model_name, backend=backend, device=device, dtype=dtype, max_seq_length=4096))


def batch_size_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every way's row for one engine, as the JSON report's ``reflect_stage`` part."""
    import torch

    from reflectevo.generation.engines import TransformersEngine, UnslothEngine

    loaded = load(args.model, args.engine, args.device)
    mix = lengths.official_mix(args.questions, args.seed, args.official_dir)
    if args.engine == "unsloth":
        from reflectevo.config import GenerationParams

        engine = UnslothEngine(loaded, GenerationParams(batch_size=args.batch_size), progress=False)
    else:
        engine = TransformersEngine(
            loaded.model,
            loaded.tokenizer,
            batch_size=args.batch_size,
            progress=False,
            model_name=args.model,
            max_seq_length=4096,
        )
    ways = [EngineWay(engine, f"engine:{args.engine}")]
    if args.engine == "transformers" and not args.engine_only:
        ways = [
            PlainWay(loaded.model, loaded.tokenizer, 1, "naive"),
            PlainWay(loaded.model, loaded.tokenizer, args.plain_batch, f"plain-{args.plain_batch}"),
        ] + ways
    warm = mix[:2]
    rows = []
    for way in ways:
        run_stage(way, warm, args.k, args.length_scale, args.seed, naive=way.name == "naive")  # one-off costs
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        row = run_stage(way, mix, args.k, args.length_scale, args.seed, naive=way.name == "naive")
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
        row["batch_size"] = (
            1 if way.name == "naive" else (args.plain_batch if way.name.startswith("plain") else engine.batch_size)
        )
        rows.append(row)
    info = loaded.info
    return {
        "model": args.model,
        "parameters": info["parameters"],
        "dtype": info["dtype"],
        "device": info["device"],
        "engine": args.engine,
        "batch_size_how": engine.batch_size_how,
        "questions": len(mix),
        "k": args.k,
        "length_scale": args.length_scale,
        "seed": args.seed,
        "rows": rows,
        "task_counts": {t: sum(m.task == t for m in mix) for t in lengths.OUTPUT_MEANS},
        "config": model_shape(loaded.model),
    }


def model_shape(model) -> dict[str, Any]:
    config = model.config.get_text_config()
    return {
        key: getattr(config, key, None)
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }


def add_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    base = next((r for r in rows if r["way"] == baseline), None)
    for row in rows:
        row["x_" + baseline] = round(row["tokens_per_s"] / base["tokens_per_s"], 2) if base else None


COLUMNS = [
    ("way", "way"),
    ("batch_size", "batch"),
    ("records", "records"),
    ("generated_tokens", "gen tok"),
    ("seconds", "s"),
    ("records_per_s", "rec/s"),
    ("tokens_per_s", "tok/s"),
]


def print_table(rows: list[dict[str, Any]], extra: list[tuple[str, str]] = ()) -> None:
    columns = COLUMNS + list(extra)
    cells = [[label for _key, label in columns]] + [[str(row.get(key)) for key, _label in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print(" | ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        if n == 0:
            print("-+-".join("-" * width for width in widths))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--engine", choices=["transformers", "unsloth"], default="transformers")
    p.add_argument("--engine-only", action="store_true", help="skip the naive and plain ways")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--questions", type=int, default=DEFAULTS["questions"])
    p.add_argument("--k", type=int, default=DEFAULTS["k"], help="reflections per question")
    p.add_argument("--batch-size", type=batch_size_arg, default=DEFAULTS["batch_size"], help="the engine's, or auto")
    p.add_argument("--plain-batch", type=int, default=DEFAULTS["plain_batch"])
    p.add_argument(
        "--length-scale",
        type=float,
        default=DEFAULTS["length_scale"],
        help="multiply the imposed lengths (1 = the paper's; the CPU default keeps a smoke run short)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--official-dir", type=Path, default=lengths.DEFAULT_OFFICIAL_DIR)
    p.add_argument("--json", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.questions < 2 or args.k < 1 or args.length_scale <= 0:
        raise SystemExit("--questions must be 2 or more, --k 1 or more and --length-scale positive")
    report = measure(args)
    add_ratios(report["rows"], f"plain-{args.plain_batch}")
    print(
        f"reflect stage, {report['model']} ({report['parameters'] / 1e6:.1f} M parameters, {report['dtype']}, "
        f"{report['device']}), {report['questions']} questions x k={args.k}, lengths x{args.length_scale}"
    )
    print_table(report["rows"], [("x_" + f"plain-{args.plain_batch}", "x plain")])
    report["python"] = platform.python_version()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

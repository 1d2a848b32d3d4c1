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

``--lengths imposed`` (the default): every record's output length is imposed from bench/lengths.py
(a logits processor suppresses the end token until the record's length, then forces it), for every
way alike, so all three generate the same number of tokens and the ratios compare equal work.
``--length-scale`` shrinks the imposed lengths for CPU smoke runs. ``--lengths natural``: a
pretrained model writes what it writes, up to ``--max-new-tokens``, attempts stopping at the
package's stop strings; the ways then compare generated tokens per second, and the greedy first
trials, which every way generates from the same prompts, are compared text for text (``same text``:
the share equal to the naive way's). ``--fewshots 3`` gives the attempts the worked examples of the
package's prompts (most of a first-trial prompt, shared by every question of a task).

Every first trial counts as wrong (a random-weight model is never right), so every question gets k
reflections: the upper end of the stage's work. Reflections are sampled (temperature 0.7), attempts
greedy, as in the package's reflect stage. A second table says where the time went: prefill and
decoding (the engine times them; decode tok/s against the compute ceiling measured by a matmul),
rows idle (row-steps spent on rows that had already ended) and prompt padding.

    python bench/reflect_stage.py --model builtin:smollm2-135m --lengths natural --fewshots 3 \
        --questions 8 --k 2 --batch-size 64 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
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
    ATTEMPT_STOP,
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
    "lengths": "imposed",
    "fewshots": 0,
    "max_new_tokens": 128,  # --lengths natural only
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
        """model.generate: every row has generated as many tokens as the input is wider than the prompts."""
        import torch

        rows = torch.arange(len(self.targets))
        return self.score_rows(rows, torch.full_like(rows, input_ids.shape[1] - self.width), scores)

    def score_rows(self, rows, made, scores):
        """The engine's decoding loop: ``rows`` are row numbers in the call, ``made`` their tokens so far."""
        import torch

        targets = self.targets[rows].to(scores.device)
        made = made.to(scores.device)
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
    targets: dict[str, list[int]] | None  # None: natural lengths
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


@dataclass(frozen=True)
class Shape:
    """What every step of one run shares: lengths imposed or natural, prompts, limits."""

    natural: bool
    scale: float
    max_new: int
    fewshots: int
    seed: int

    def attempt_settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new, stop=ATTEMPT_STOP if self.natural else ())


def first_trials(mix: list[lengths.MixItem], shape: Shape) -> Step:
    requests = [GenerationRequest(m.key, attempt_messages(get_task(m.task), m.item, shape.fewshots)) for m in mix]
    targets = None if shape.natural else {m.key: [scaled(m.first_trial, shape.scale)] for m in mix}
    return Step("first_trial", requests, targets, shape.attempt_settings())


def reflections(mix: list[lengths.MixItem], attempts: dict[str, str], k: int, shape: Shape) -> Step:
    scale, seed = shape.scale, shape.seed
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
        None if shape.natural else targets,
        GenerationSettings(max_new_tokens=shape.max_new, n=k, temperature=REFLECTION_TEMPERATURE, seed=seed),
    )


def second_trials(mix: list[lengths.MixItem], texts: dict[str, list[str]], shape: Shape) -> Step:
    requests, targets = [], {}
    for m in mix:
        rng = random.Random(f"second:{m.key}")
        task = get_task(m.task)
        for j, reflection in enumerate(texts[m.key]):
            key = f"{m.key}/{j}"
            requests.append(
                GenerationRequest(
                    key,
                    [{"role": "user", "content": second_trial_prompt(task, m.item, reflection, shape.fewshots)}],
                )
            )
            length = m.second_trial if j == 0 else lengths.output_length(m.task, "second_trial", rng)
            targets[key] = [scaled(length, shape.scale)]
    return Step("second_trial", requests, None if shape.natural else targets, shape.attempt_settings())


# ---- the three ways ------------------------------------------------------------------------------
def generate_rows(
    model,
    tokenizer,
    pad_id: int,
    eos_id: int,
    prompts: list[str],
    targets: list[list[int]] | None,
    settings: GenerationSettings,
    load: dict[str, int],
) -> list[tuple[str, int]]:
    """One plain ``model.generate`` call over these prompts (left-padded), (text, new tokens) per sample.
    ``targets``: imposed lengths per prompt and sample (None: natural). Adds the call's row-steps, the
    row-steps of rows that had already ended, and the prompt padding to ``load``."""
    import torch

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=model.device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=model.device)
    from transformers import LogitsProcessorList

    if targets is None:
        limit, extra = settings.max_new_tokens, {}
        if settings.stop:
            extra = {"stop_strings": list(settings.stop), "tokenizer": tokenizer}
    else:
        flat = [t for row in targets for t in row]
        limit = max(flat)
        extra = {"logits_processor": LogitsProcessorList([ImposedLengths(flat, width, eos_id)])}

    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        if settings.temperature > 0
        else {"do_sample": False}
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=limit,
            num_return_sequences=settings.n,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **extra,
            **sampling,
        )
    rows = []
    steps = out.shape[1] - width  # generate() ran every row for this many steps
    for row in out[:, width:].tolist():
        if eos_id in row:
            end = row.index(eos_id) + 1
            text = tokenizer.decode(row[: end - 1], skip_special_tokens=True)
        else:
            end = len(row)
            while end and row[end - 1] == pad_id:  # a stop string ended the row; padding after it
                end -= 1
            text = tokenizer.decode(row[:end], skip_special_tokens=True)
        cut = min((at for at in (text.find(stop) for stop in settings.stop) if at >= 0), default=None)
        rows.append((text if cut is None else text[:cut], end))
    load["row_steps"] += steps * len(rows)
    load["idle_row_steps"] += sum(steps - n for _text, n in rows)
    load["prefill_tokens"] += width * len(encoded)
    load["prefill_padding"] += sum(width - len(ids) for ids in encoded)
    return rows


class PlainWay:
    """naive (batch 1, one question at a time) and plain-64 (dataset order, fixed chunks)."""

    def __init__(self, model, tokenizer, batch: int, name: str) -> None:
        self.model, self.tokenizer, self.batch, self.name = model, tokenizer, batch, name
        eos = model.generation_config.eos_token_id
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.load = dict.fromkeys(LOAD_KEYS, 0)

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
                None if step.targets is None else [step.targets[r.key] for r in chunk],
                step.settings,
                self.load,
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

    @property
    def load(self) -> dict[str, float]:
        return {key: self.engine.decode_stats.get(key, 0) for key in (*LOAD_KEYS, "prefill_seconds", "decode_seconds")}

    def prepare(self, step: Step) -> None:
        """Untimed: the imposed lengths by prompt (tokenizing every prompt is the benchmark's work, not the engine's)."""
        imposed = step.targets is not None
        self.engine.processor_factories = [imposed_factory(step, self.engine.tokenizer, self.eos)] if imposed else []

    def run_step(self, step: Step) -> dict[str, list[tuple[str, int]]]:
        outputs = self.engine.generate(step.requests, step.settings, stage=f"bench-{step.name}")
        results: dict[str, list[tuple[str, int]]] = {}
        for output in outputs:
            results.setdefault(output.key, []).append((output.text, output.new_tokens))
        return results


LOAD_KEYS = ("row_steps", "idle_row_steps", "prefill_tokens", "prefill_padding")


def run_stage(way, mix: list[lengths.MixItem], k: int, shape: Shape, naive: bool) -> dict[str, Any]:
    """The three steps for every question; ``naive`` runs all three for one question before the next."""
    load_before = dict(way.load)
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

    first_texts: dict[str, str] = {}
    for group in groups:
        attempts = {key: rows[0][0] for key, rows in run(first_trials(group, shape)).items()}
        first_texts.update(attempts)
        reflected = run(reflections(group, attempts, k, shape))
        run(second_trials(group, {key: [text for text, _n in rows] for key, rows in reflected.items()}, shape))
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
        "load": {key: way.load[key] - load_before[key] for key in way.load},
        "first_trial_texts": first_texts,
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
def imposed_max_new(scale: float) -> int:
    return scaled(max(max(v.values()) for v in lengths.OUTPUT_MEANS.values()) * lengths.SPREAD_CAP, scale)


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
        ways = [EngineWay(engine, "engine:unsloth")]
    else:
        ways = []
        for decoder in args.decoders.split(","):
            engine = TransformersEngine(
                loaded.model,
                loaded.tokenizer,
                batch_size=args.batch_size,
                progress=False,
                model_name=args.model,
                max_seq_length=4096,
            )
            engine.decoder = decoder
            engine.decode_options = dataclasses.replace(engine.decode_options, max_rows=args.max_rows)
            # the default decoder keeps the suite's name for the engine's row
            ways.append(EngineWay(engine, "engine:transformers" + ("" if decoder == "loop" else f"/{decoder}")))
    if args.engine == "transformers" and not args.engine_only:
        ways = [
            PlainWay(loaded.model, loaded.tokenizer, 1, "naive"),
            PlainWay(loaded.model, loaded.tokenizer, args.plain_batch, f"plain-{args.plain_batch}"),
        ] + ways
    natural = args.lengths == "natural"
    shape = Shape(
        natural,
        args.length_scale,
        args.max_new_tokens if natural else imposed_max_new(args.length_scale),
        args.fewshots,
        args.seed,
    )
    warm = mix[:2]
    rows = []
    gflops = matmul_gflops()
    for way in ways:
        run_stage(way, warm, args.k, shape, naive=way.name == "naive")  # one-off costs
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        row = run_stage(way, mix, args.k, shape, naive=way.name == "naive")
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
        row["batch_size"] = (
            1 if way.name == "naive" else (args.plain_batch if way.name.startswith("plain") else way.engine.batch_size)
        )
        rows.append(row)
    flops_per_token = 2 * loaded.info["parameters"]  # one multiply-add per weight, the tied head included
    ceiling = gflops * 1e9 / flops_per_token
    add_load_columns(rows, ceiling)
    info = loaded.info
    return {
        "model": args.model,
        "parameters": info["parameters"],
        "dtype": info["dtype"],
        "device": info["device"],
        "engine": args.engine,
        "batch_size_how": ways[-1].engine.batch_size_how,
        "questions": len(mix),
        "k": args.k,
        "length_scale": args.length_scale,
        "lengths": args.lengths,
        "fewshots": args.fewshots,
        "max_new_tokens": shape.max_new,
        "seed": args.seed,
        "matmul_gflops": round(gflops, 1),
        "ceiling_tokens_per_s": round(ceiling, 1),
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


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """What the processor does on one dense float32 matmul: the compute ceiling's numerator."""
    import time

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def add_load_columns(rows: list[dict[str, Any]], ceiling: float) -> None:
    """Where the time went, per way: idle rows, padding, and (the engine, which times them) prefill
    and decoding, decode tok/s and its share of the compute ceiling; the first trials' same-text
    share against the naive way's texts."""
    texts_of = {row["way"]: row.pop("first_trial_texts") for row in rows}
    reference = texts_of.get("naive")
    for row in rows:
        load = row.pop("load")
        texts = texts_of[row["way"]]
        # the generate decoder does not say which rows had ended: unknown, not zero
        row["idle_rows"] = round(load["idle_row_steps"] / load["row_steps"], 3) if load["row_steps"] else None
        counted = load["prefill_tokens"] > 0
        row["padding"] = round(load["prefill_padding"] / load["prefill_tokens"], 3) if counted else None
        row["prefill_tokens"] = load["prefill_tokens"] if counted else None
        if load.get("decode_seconds"):
            row["prefill_s"] = round(load["prefill_seconds"], 2)
            row["decode_s"] = round(load["decode_seconds"], 2)
            row["decode_tok_s"] = round(row["generated_tokens"] / load["decode_seconds"], 1)
            row["of_ceiling"] = round(row["decode_tok_s"] / ceiling, 3)
        if reference is not None:
            row["same_text"] = round(sum(texts[key] == reference[key] for key in texts) / len(texts), 3)


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


LOAD_COLUMNS = [
    ("prefill_tokens", "prefill tok"),
    ("padding", "padding"),
    ("idle_rows", "rows idle"),
    ("prefill_s", "prefill s"),
    ("decode_s", "decode s"),
    ("decode_tok_s", "decode tok/s"),
    ("of_ceiling", "of ceiling"),
    ("same_text", "same text"),
]


def print_table(
    rows: list[dict[str, Any]], extra: list[tuple[str, str]] = (), base: list[tuple[str, str]] = COLUMNS
) -> None:
    columns = list(base) + list(extra)
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
    p.add_argument(
        "--decoders",
        default="loop",
        help="the transformers engine's decoders to measure, comma-separated: loop (the default), generate",
    )
    p.add_argument("--max-rows", type=int, help="the loop decoder's rows at once (default: the whole batch)")
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
    p.add_argument("--lengths", choices=["imposed", "natural"], default=DEFAULTS["lengths"])
    p.add_argument("--fewshots", type=int, choices=[0, 1, 2, 3], default=DEFAULTS["fewshots"])
    p.add_argument(
        "--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="per call, with --lengths natural"
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--official-dir", type=Path, default=lengths.DEFAULT_OFFICIAL_DIR)
    p.add_argument("--json", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.questions < 2 or args.k < 1 or args.length_scale <= 0:
        raise SystemExit("--questions must be 2 or more, --k 1 or more and --length-scale positive")
    if not set(args.decoders.split(",")) <= {"loop", "generate"}:
        raise SystemExit(f"--decoders takes loop and/or generate, got {args.decoders!r}")
    report = measure(args)
    add_ratios(report["rows"], f"plain-{args.plain_batch}")
    add_ratios(report["rows"], "naive")
    print(
        f"reflect stage, {report['model']} ({report['parameters'] / 1e6:.1f} M parameters, {report['dtype']}, "
        f"{report['device']}), {report['questions']} questions x k={args.k}, "
        + (
            f"natural lengths ({args.fewshots}-shot, at most {args.max_new_tokens} tokens per call)"
            if args.lengths == "natural"
            else f"imposed lengths x{args.length_scale} ({args.fewshots}-shot)"
        )
    )
    print_table(report["rows"], [("x_" + f"plain-{args.plain_batch}", "x plain"), ("x_naive", "x naive")])
    print(
        f"\nwhere the time went (compute ceiling {report['ceiling_tokens_per_s']:.0f} tok/s: "
        f"{report['matmul_gflops']:.0f} GFLOP/s on a 1024x1024 matmul / 2 x parameters per token)"
    )
    print_table(report["rows"], LOAD_COLUMNS, base=[("way", "way")])
    report["python"] = platform.python_version()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA SFT and DPO training speed and peak memory: Unsloth against transformers + peft, every figure
also a ratio against the padded transformers + peft baseline measured in the same run.

    python bench/training.py                                    # builtin:tiny on CPU, a handful of steps
    python bench/training.py --model builtin:random-8b --backends transformers,unsloth --json out.json
    python bench/training.py --rows 8 --batch-size 2 --steps 1 --length-scale 0.25 --memory-lengths ''   # CI smoke
    python bench/memory.py out.json                             # the largest model and length per GPU size

Each backend runs in its own child process (this script with --child): importing Unsloth patches
transformers and TRL for the whole process, so the backends never share one. Every row trains
through the package's own path (reflectevo.training: prepare_model, choose_batching,
training_arguments, make_trainer) on rows built from bench/lengths.py: official test items in the
package's one-stage SFT and DPO prompts, with the first trial, reflections and second trial given
imposed lengths drawn around the paper's means (filler cut from real question text to the exact
token count, so the content is real text and the lengths are the mix's).

Rows (sft: prompt = failed first trial + reflection instruction, completion = reflection + second
trial; dpo: the same prompt, a chosen and a rejected reflection):

  sft padded            transformers + peft, each batch padded to its longest row: the SFT baseline
  sft padding-free      the same rows, each batch concatenated without padding (sft.batching: padding_free)
  sft length-grouped    rows of similar length batched together, then padded (sft.batching: length_grouped)
  sft unsloth padded / sft unsloth padding-free    the same through Unsloth
  dpo                   transformers + peft, the reference is the model with its adapter disabled: the DPO baseline
  dpo precomputed ref   reference log-probs computed once before training (dpo.precompute_ref_log_probs)
  dpo unsloth           the DPO baseline through Unsloth
  memory sft/dpo T      fixed-length rows of T tokens, batch 1, for bench/memory.py's fit (--memory-lengths)

Speed is timed over a window after warm-up steps (the first steps pay one-off costs: kernels,
optimizer state). "processed" tokens include padding, "useful" ones do not; the padding share is
measured on the batches trained and, for the whole mix, over one epoch laid out by the sampler's own
rules. Peak memory is torch.cuda's peak allocated and reserved bytes on a GPU, and the process's
peak resident set size on a CPU (Linux: reset before each row; elsewhere the process's peak so far).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def sibling(name: str):
    """A module of bench/ (lengths.py, memory.py), loaded by path however this file is run or imported,
    without putting bench/ on sys.path."""
    import importlib.util

    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before running it: its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[key]


lengths = sibling("lengths")
memory = sibling("memory")

BACKENDS = ("transformers", "unsloth")
# (device kind) -> defaults; a flag given on the command line wins
DEFAULTS = {
    "cpu": {
        "rows": 32,
        "batch_size": 4,
        "dpo_batch_size": 2,
        "warmup_steps": 1,
        "steps": 2,
        "memory_lengths": "256,512",
    },
    "cuda": {
        "rows": 512,
        "batch_size": 8,
        "dpo_batch_size": 4,
        "warmup_steps": 2,
        "steps": 8,
        "memory_lengths": "1024,4096",
    },
}
FEEDBACK = "Answer is INCORRECT"  # the first trial's observation, as the tasks write it


@dataclass(frozen=True)
class RowSpec:
    """One measured configuration."""

    id: str
    kind: str  # sft or dpo
    backend: str
    batching: str = "padded"  # sft.batching
    precompute_ref: bool = False
    memory_length: int | None = None  # a fixed-length memory row of this many tokens
    baseline: bool = False  # the row every figure of its kind is divided by


SPEED_ROWS = (
    RowSpec("sft padded", "sft", "transformers", "padded", baseline=True),
    RowSpec("sft padding-free", "sft", "transformers", "padding_free"),
    RowSpec("sft length-grouped", "sft", "transformers", "length_grouped"),
    RowSpec("sft unsloth padded", "sft", "unsloth", "padded"),
    RowSpec("sft unsloth padding-free", "sft", "unsloth", "padding_free"),
    RowSpec("dpo", "dpo", "transformers", baseline=True),
    RowSpec("dpo precomputed ref", "dpo", "transformers", precompute_ref=True),
    RowSpec("dpo unsloth", "dpo", "unsloth"),
)


def memory_rows(backend: str, lengths_: list[int]) -> list[RowSpec]:
    return [
        RowSpec(
            f"memory {kind} {length}{' unsloth' if backend == 'unsloth' else ''}", kind, backend, memory_length=length
        )
        for kind in ("sft", "dpo")
        for length in lengths_
    ]


# ---- arguments -----------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults (rows, batch sizes, steps, memory lengths) depend on the device: "
        f"CPU {DEFAULTS['cpu']}, CUDA GPU {DEFAULTS['cuda']}.",
    )
    parser.add_argument("--model", default="builtin:tiny", help="a model name for reflectevo.models.load_model")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: transformers, unsloth")
    parser.add_argument(
        "--rows", type=positive_int, help="SFT rows in the length mix (DPO uses as many as its steps need)"
    )
    parser.add_argument("--batch-size", type=positive_int, help="SFT rows per device batch")
    parser.add_argument("--dpo-batch-size", type=positive_int, help="DPO pairs per device batch")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    parser.add_argument("--warmup-steps", type=positive_int, help="steps before the timed window (at least 1)")
    parser.add_argument("--steps", type=positive_int, help="timed optimizer steps")
    parser.add_argument("--max-length", type=positive_int, default=2048, help="sft/dpo max_length of the speed rows")
    parser.add_argument(
        "--length-scale",
        type=float,
        default=1.0,
        help="multiply the imposed output lengths (1: the paper's; smaller for a quick smoke run)",
    )
    parser.add_argument("--memory-lengths", help="comma-separated sequence lengths of the memory rows ('' for none)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0, help="which items, lengths and filler are drawn")
    parser.add_argument("--official-dir", type=Path, default=lengths.DEFAULT_OFFICIAL_DIR)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)  # internal: run one backend's rows
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backends: unknown {unknown or 'none given'}; choose from {', '.join(BACKENDS)}")
    if "transformers" not in backends:
        parser.error("--backends must include transformers: its padded rows are the baselines every ratio divides by")
    args.backends = backends
    from reflectevo.errors import UnknownModelError
    from reflectevo.models.loading import check_builtin_name

    try:
        check_builtin_name(args.model)
    except UnknownModelError as exc:
        parser.error(str(exc))
    missing = [
        f"{name}_test.jsonl"
        for name in ("logiqa", "math", "mbpp", "bigbench")
        if not (args.official_dir / f"{name}_test.jsonl").is_file()
    ]
    if missing:
        parser.error(
            f"official test files missing from {args.official_dir}: {', '.join(missing)} "
            "(give the folder with --official-dir or set REFLECTEVO_OFFICIAL_DATA)"
        )
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in DEFAULTS[device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.memory_lengths = sorted({int(x) for x in str(args.memory_lengths).split(",") if x.strip()})
    except ValueError:
        parser.error(f"--memory-lengths must be comma-separated integers, got {args.memory_lengths!r}")
    if any(length < 32 for length in args.memory_lengths):
        parser.error("--memory-lengths: each length must be at least 32 tokens")
    if not 0 < args.length_scale <= 4:
        parser.error(f"--length-scale must be in (0, 4], got {args.length_scale}")
    if len(args.memory_lengths) == 1:
        parser.error("--memory-lengths needs two lengths or more (the fit is a line), or '' for no memory rows")
    args.device = device
    return args


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting a child needs (each child knows its backend's rows)."""
    return {
        "model": args.model,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "dpo_batch_size": args.dpo_batch_size,
        "grad_accum": args.grad_accum,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "max_length": args.max_length,
        "length_scale": args.length_scale,
        "memory_lengths": args.memory_lengths,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "dtype": args.dtype,
        "seed": args.seed,
        "official_dir": str(args.official_dir),
    }


# ---- training rows ---------------------------------------------------------------------------------------
class Filler:
    """Real text of an exact token count: slices of the token stream of the mix's questions."""

    def __init__(self, tokenizer: Any, texts: list[str], seed: int):
        self.tokenizer = tokenizer
        self.ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        self.rng = random.Random(seed)

    def __call__(self, count: int) -> str:
        start = self.rng.randrange(len(self.ids))
        ids = (
            (self.ids[start:] + self.ids)[:count]
            if count <= len(self.ids)
            else (self.ids * (count // len(self.ids) + 1))[:count]
        )
        return self.tokenizer.decode(ids).strip() or "."


def mix_rows(spec: dict[str, Any], tokenizer: Any, count: int) -> tuple[list[dict], list[dict]]:
    """(D+ rows, D± rows) in the curated-row form reflectevo.curation turns into training rows, with the
    mix's imposed lengths: first trial, reflection (chosen), second trial; a second reflection length,
    drawn the same way, for the rejected one."""
    mix = lengths.official_mix(count, spec["seed"], Path(spec["official_dir"]))
    filler = Filler(tokenizer, [m.item.question for m in mix], spec["seed"])
    rng = random.Random(spec["seed"] + 1)

    def scaled(tokens: int) -> int:
        return max(1, round(tokens * spec["length_scale"]))

    d_plus, d_pm = [], []
    for m in mix:
        base = {
            "task": m.task,
            "id": m.item.id,
            "question": m.item.question,
            "answer": m.item.gold,
            "first_trial_attempt": filler(scaled(m.first_trial)),
            "first_trial_feedback": FEEDBACK,
        }
        d_plus.append(
            {
                **base,
                "reflections": filler(scaled(m.reflection)),
                "second_trial_attempt": filler(scaled(m.second_trial)),
            }
        )
        d_pm.append(
            {
                **base,
                "reflection_chosen": filler(scaled(m.reflection)),
                "reflection_rejected": filler(scaled(lengths.output_length(m.task, "reflection", rng))),
            }
        )
    return d_plus, d_pm


def prompt_tokens(tokenizer: Any, kind: str, row: dict[str, Any]) -> int:
    """Tokens of a curated row's training prompt (kind one_stage or dpo), rendered as the trainer renders it."""
    from reflectevo.reflection import exports

    text = exports.training_rows(kind, [row])[0]["prompt"]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def fixed_length_rows(spec: dict[str, Any], tokenizer: Any, length: int, count: int) -> tuple[list[dict], list[dict]]:
    """Rows of at least ``length`` tokens, about half prompt and half completion, so that with
    max_length = ``length`` every sequence is cut to exactly ``length`` tokens (and keeps trained ones)."""
    mix = lengths.official_mix(count, spec["seed"], Path(spec["official_dir"]))
    filler = Filler(tokenizer, [m.item.question for m in mix], spec["seed"])
    d_plus, d_pm = [], []
    placeholders = {
        "reflections": "x",
        "second_trial_attempt": "x",
        "reflection_chosen": "x",
        "reflection_rejected": "x",
    }
    for m in mix:
        base = {
            "task": m.task,
            "id": m.item.id,
            "question": filler(16),
            "answer": m.item.gold,
            "first_trial_attempt": "x",
            "first_trial_feedback": FEEDBACK,
        }
        template = prompt_tokens(tokenizer, "one_stage", {**base, **placeholders})  # the longer of the two prompts
        if template + 16 > length:
            raise ValueError(
                f"memory length {length} leaves no room for a completion after the {template}-token prompt "
                f"template; use lengths of {template + 64} tokens or more"
            )
        base["first_trial_attempt"] = filler(max(1, length // 2 - template))
        sft_completion = length - prompt_tokens(tokenizer, "one_stage", {**base, **placeholders}) + 16
        dpo_completion = length - prompt_tokens(tokenizer, "dpo", {**base, **placeholders}) + 16
        d_plus.append({**base, "reflections": filler(sft_completion), "second_trial_attempt": filler(8)})
        d_pm.append(
            {**base, "reflection_chosen": filler(dpo_completion), "reflection_rejected": filler(dpo_completion)}
        )
    return d_plus, d_pm


def training_sets(d_plus: list[dict], d_pm: list[dict]):
    from reflectevo.reflection import exports

    return (
        exports.to_trl_dataset(exports.training_rows("one_stage", d_plus)),
        exports.to_trl_dataset(exports.training_rows("dpo", d_pm)),
    )


# ---- measuring -------------------------------------------------------------------------------------------
class BatchCounter:
    """Wraps a trainer's collator: the processed (padding included) and useful tokens of each batch, in
    the order the batches are made (the order they are trained in)."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        processed = int(batch["input_ids"].numel())
        if "attention_mask" in batch:
            useful = int(batch["attention_mask"].sum())
        else:  # padding-free: the rows concatenated, nothing else (but a pad_to_multiple_of tail)
            useful = sum(len(example["input_ids"]) for example in examples)
        self.batches.append((processed, useful))
        return batch


def step_timer(cuda: bool):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """The clock at the end of every optimizer step (after the GPU has finished it)."""

        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                import torch

                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def reset_peak_memory(cuda: bool) -> str:
    """Reset the peak counter; returns how peak memory is measured."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_reserved (allocated beside it)"
    try:  # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return "process peak RSS (VmHWM, reset before the row)"
    except OSError:
        return "process peak RSS (resource.getrusage: the process's peak so far, not reset per row)"


def peak_memory(cuda: bool) -> dict[str, int]:
    if cuda:
        import torch

        return {
            "peak_bytes": torch.cuda.max_memory_reserved(),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        }
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_bytes": int(line.split()[1]) * 1024}
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def epoch_padding(trainer: Any, batching: str, batch_size: int, grad_accum: int, seed: int) -> float | None:
    """Share of processed tokens that are padding over one whole epoch of the SFT set, laid out as the
    trainer's sampler lays it out (random batches, or transformers' length-grouped order)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    if batching == "padding_free":
        return 0.0
    rows = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    generator = torch.Generator().manual_seed(seed)
    if batching == "length_grouped":
        order = get_length_grouped_indices(rows, batch_size * grad_accum, generator=generator)
    else:
        order = torch.randperm(len(rows), generator=generator).tolist()
    processed = useful = 0
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        processed += max(batch) * len(batch)
        useful += sum(batch)
    return 1 - useful / processed if processed else None


def run_row(
    row: RowSpec, spec: dict[str, Any], data: dict[str, Any], cuda: bool, model: dict[str, Any]
) -> dict[str, Any]:
    """Train one row through the package's path and measure it; describe the model in ``model`` if it is empty."""
    from reflectevo.config import DPOParams, ModelParams, SFTParams
    from reflectevo.training import adapters
    from reflectevo.training import trainer as training_trainer

    free_memory()
    memory_method = reset_peak_memory(cuda)
    memory_row = row.memory_length is not None
    max_length = row.memory_length or spec["max_length"]
    batch = 1 if memory_row else spec["batch_size"] if row.kind == "sft" else spec["dpo_batch_size"]
    warmup, steps = (1, 1) if memory_row else (spec["warmup_steps"], spec["steps"])
    total = warmup + steps
    common = {
        "max_steps": total,
        "per_device_batch_size": batch,
        "gradient_accumulation_steps": spec["grad_accum"],
        "max_length": max_length,
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "eval_fraction": 0.0,
        "logging_steps": total,
        "save_steps": 10 * total,
        "report_to": [],
        "warmup_ratio": 0.0,
    }
    if row.kind == "sft":
        train = SFTParams(**common, batching=row.batching)
    else:
        train = DPOParams(
            **common, precompute_ref_log_probs=row.precompute_ref, reward_check_pairs=0, learning_rate=5e-6
        )
    if memory_row and max_length not in data["memory"]:
        sets = training_sets(*fixed_length_rows(spec, data["tokenizer"], max_length, 2 * spec["grad_accum"]))
        data["memory"][max_length] = dict(zip(("sft", "dpo"), sets, strict=True))
    dataset = data["memory"][max_length][row.kind] if memory_row else data[row.kind]
    if row.kind == "dpo":  # as many pairs as the steps train, so that a precomputed reference pass costs what they need
        dataset = dataset.select(range(min(len(dataset), total * batch * spec["grad_accum"])))

    model_params = ModelParams(
        name=spec["model"],
        backend=row.backend,
        dtype=spec["dtype"],
        max_seq_length=max(max_length, spec["max_length"], *spec["memory_lengths"], 32),
    )
    started = time.perf_counter()
    loaded = adapters.prepare_model(model_params, train.lora, train.gradient_checkpointing, spec["seed"])
    load_s = time.perf_counter() - started
    if not model:
        model.update(describe(loaded))
    batching = training_trainer.choose_batching(train.batching, loaded) if row.kind == "sft" else None
    mode = batching.mode if batching else "padded"
    timer = step_timer(cuda)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as out_dir:
        args = training_trainer.training_arguments(
            row.kind,
            train,
            Path(out_dir),
            seed=spec["seed"],
            device=loaded.device,
            dtype=loaded.dtype,
            has_eval=False,
            beta=getattr(train, "beta", None),
            precompute_ref=row.precompute_ref,
            batching=mode,
        )
        started = time.perf_counter()
        trainer = training_trainer.make_trainer(row.kind, loaded, args, dataset, {}, callbacks=(timer,), batching=mode)
        setup_s = time.perf_counter() - started  # tokenising, and the reference pass when it is precomputed
        counter = BatchCounter(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
        per_step = spec["grad_accum"]
        window = counter.batches[warmup * per_step : total * per_step]
        seconds = timer.ends[total - 1] - timer.ends[warmup - 1]
        processed = sum(p for p, _ in window)
        useful = sum(u for _, u in window)
        # over the whole SFT mix; DPO trains only the pairs its steps need, too few for an epoch figure
        epoch = (
            epoch_padding(trainer, mode, batch, spec["grad_accum"], spec["seed"])
            if row.kind == "sft" and not memory_row
            else None
        )
    measured = {
        "status": "ok",
        "batching": mode,
        "batching_reason": batching.reason if batching else "TRL's DPO trainer pads its batches",
        "attention": training_trainer.attention_implementation(loaded),
        "backend_used": loaded.backend,
        "batch_size": batch,
        "grad_accum": spec["grad_accum"],
        "max_length": max_length,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "window_s": round(seconds, 4),
        "processed_tokens": processed,
        "useful_tokens": useful,
        "processed_tokens_per_s": round(processed / seconds, 1),
        "useful_tokens_per_s": round(useful / seconds, 1),
        "padding_fraction": round(1 - useful / processed, 4) if processed else None,
        "epoch_padding_fraction": round(epoch, 4) if epoch is not None else None,
        "setup_s": round(setup_s, 3),
        "load_s": round(load_s, 3),
        "memory_method": memory_method,
        **peak_memory(cuda),
    }
    if memory_row:
        measured["tokens_per_sequence"] = max_length
    del trainer, loaded
    free_memory()
    return measured


def describe(loaded: Any) -> dict[str, Any]:
    """Shape, parameter count, dtype, device and versions of the model, as loaded for training."""
    config = loaded.model.config
    shape = {
        key: getattr(config, key, None)
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "tie_word_embeddings",
            "max_position_embeddings",
        )
    }
    from importlib.metadata import PackageNotFoundError, version

    versions = dict(loaded.info["versions"])
    for package in ("trl", "accelerate", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {
        "parameters": loaded.info["parameters"],
        "shape": shape,
        "dtype": loaded.dtype,
        "device": loaded.device,
        "backend_reason": loaded.info["backend_reason"],
        "versions": versions,
    }


def child(args: argparse.Namespace) -> int:
    """Run one backend's rows in this process; write them to ``args.out``."""
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    backend = args.child
    result: dict[str, Any] = {"backend": backend, "rows": {}}
    specs = [row for row in SPEED_ROWS if row.backend == backend] + memory_rows(backend, spec["memory_lengths"])
    from reflectevo.errors import BackendUnavailable
    from reflectevo.models.loading import choose_backend

    try:
        if backend == "unsloth":
            choose_backend("unsloth")  # imports Unsloth before transformers, TRL and peft, or says why it cannot
    except BackendUnavailable as exc:  # no CUDA GPU, the package missing, or importing it failed
        reason = f"unavailable: {exc}"
        result["rows"] = {row.id: {"status": reason} for row in specs}
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return 0

    import torch

    from reflectevo.config import ModelParams
    from reflectevo.models.loading import load_tokenizer

    cuda = torch.cuda.is_available()
    tokenizer = load_tokenizer(ModelParams(name=spec["model"]))
    sft_rows, dpo_rows = mix_rows(spec, tokenizer, spec["rows"])
    sft_set, dpo_set = training_sets(sft_rows, dpo_rows)
    data: dict[str, Any] = {
        "sft": sft_set,
        "dpo": dpo_set,
        "memory": {},
        "tokenizer": tokenizer,
    }  # memory sets: when first needed
    result["data"] = data_description(tokenizer, sft_set, dpo_set)
    result["model"] = {}
    for row in specs:
        print(f"[{backend}] {row.id} ...", file=sys.stderr, flush=True)
        try:
            result["rows"][row.id] = run_row(row, spec, data, cuda, result["model"])
        except Exception as exc:  # noqa: BLE001  (one row failing, out of memory or in Unsloth, leaves the others measured)
            result["rows"][row.id] = {
                "status": f"failed: {type(exc).__name__}: {str(exc)[:500]}",
                "traceback": traceback.format_exc()[-3000:],
            }
            free_memory()
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")
    return 0


def data_description(tokenizer: Any, sft_set: Any, dpo_set: Any) -> dict[str, Any]:
    """Token counts of the rows as trained (chat template included)."""
    from reflectevo.training import datasets as training_datasets

    def summary(values: list[int]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "mean": round(sum(values) / len(values), 1),
            "median": ordered[len(ordered) // 2],
            "max": ordered[-1],
            "min": ordered[0],
        }

    sft = training_datasets.row_lengths(tokenizer, sft_set, ("completion",))
    chosen = training_datasets.row_lengths(tokenizer, dpo_set, ("chosen",))
    rejected = training_datasets.row_lengths(tokenizer, dpo_set, ("rejected",))
    tasks: dict[str, int] = {}
    for task in sft_set["task"]:
        tasks[task] = tasks.get(task, 0) + 1
    return {
        "sft_rows": len(sft_set),
        "dpo_pairs": len(dpo_set),
        "tasks": tasks,
        "sft_row_tokens": summary(sft),
        "dpo_chosen_tokens": summary(chosen),
        "dpo_rejected_tokens": summary(rejected),
        "prompt_tokens": summary(training_datasets.prompt_lengths(tokenizer, sft_set)),
    }


# ---- the suite -------------------------------------------------------------------------------------------
def run_child(backend: str, spec: dict[str, Any], folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(the child's result, or None; the tail of its output)."""
    spec_path, out_path = folder / f"{backend}-spec.json", folder / f"{backend}-result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        backend,
        "--spec",
        str(spec_path),
        "--out",
        str(out_path),
    ]
    quiet = {
        **os.environ,
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    }  # its output is kept for failures only
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO), check=False, env=quiet)
    output = (done.stdout + done.stderr)[-4000:]
    if done.returncode != 0 or not out_path.is_file():
        return (
            None,
            f"child process exited with {done.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}",
        )
    return json.loads(out_path.read_text(encoding="utf-8")), output


def ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's speed and memory over its kind's baseline row (same run), and an Unsloth row's over the
    transformers row of the same kind and batching."""
    baselines = {row["kind"]: row for row in rows if row["baseline"] and row["status"] == "ok"}
    by_key = {
        (row["kind"], row["batching_requested"], row["precompute_ref"]): row
        for row in rows
        if row["backend"] == "transformers" and row["status"] == "ok" and row["memory_length"] is None
    }
    for row in rows:
        base = baselines.get(row["kind"]) or {}
        ok = row["status"] == "ok" and row["memory_length"] is None
        row["baseline_row"] = base.get("id")
        for key, figure in (
            ("useful_speed_vs_baseline", "useful_tokens_per_s"),
            ("processed_speed_vs_baseline", "processed_tokens_per_s"),
            ("peak_memory_vs_baseline", "peak_bytes"),
        ):
            row[key] = ratio(row.get(figure), base.get(figure)) if ok else None
        same = (
            by_key.get((row["kind"], row["batching_requested"], row["precompute_ref"]))
            if row["backend"] == "unsloth"
            else None
        )
        row["useful_speed_vs_transformers_same_batching"] = (
            ratio(row.get("useful_tokens_per_s"), same.get("useful_tokens_per_s")) if ok and same else None
        )
    precomputed = next((r for r in rows if r["precompute_ref"] and r["status"] == "ok"), None)
    dpo = baselines.get("dpo")
    if precomputed and dpo:
        # the reference pass moved out of the steps into the set-up: charge its share back to the window
        reference_s = max(0.0, precomputed["setup_s"] - dpo["setup_s"])
        precomputed["reference_pass_s"] = round(reference_s, 3)
        total = precomputed["useful_tokens"] / (
            precomputed["window_s"]
            + reference_s * precomputed["timed_steps"] / (precomputed["warmup_steps"] + precomputed["timed_steps"])
        )
        precomputed["useful_tokens_per_s_with_reference_pass"] = round(total, 1)
        precomputed["useful_speed_with_reference_pass_vs_baseline"] = ratio(total, dpo["useful_tokens_per_s"])
    return rows


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Every backend's rows, each backend in its own process; the whole result as a dict."""
    spec = spec_of(args)
    children: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as folder:
        for backend in args.backends:
            print(f"{backend}: training in a child process ...", file=sys.stderr, flush=True)
            result, output = run_child(backend, spec, Path(folder))
            if result is None:
                failures[backend] = output
            else:
                children[backend] = result
    rows = []
    for backend in args.backends:
        for row in [r for r in SPEED_ROWS if r.backend == backend] + memory_rows(backend, args.memory_lengths):
            measured = (
                children[backend]["rows"].get(row.id, {"status": "failed: not run"})
                if backend in children
                else {"status": f"failed: {failures[backend]}"}
            )
            rows.append(
                {
                    "id": row.id,
                    "kind": row.kind,
                    "backend": row.backend,
                    "batching_requested": row.batching if row.kind == "sft" else "padded",
                    "precompute_ref": row.precompute_ref,
                    "memory_length": row.memory_length,
                    "baseline": row.baseline,
                    **measured,
                }
            )
    rows = with_ratios(rows)
    for row in rows:  # the short fields bench/suite.py's table reads
        row["name"] = row["id"]
        if row["status"] != "ok":
            row["unavailable"] = row["status"]
        else:
            row["tokens_per_s"] = row["useful_tokens_per_s"]
            if row["useful_speed_vs_baseline"] is not None:
                row["ratio"] = row["useful_speed_vs_baseline"]
    reference = children.get("transformers", {})
    model = reference.get("model", {})
    result = {
        "benchmark": "training",
        "model": args.model,
        "shape": model.get("shape"),
        "parameters": model.get("parameters"),
        "dtype": model.get("dtype"),
        "device": model.get("device"),
        "versions": model.get("versions"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": os.cpu_count(),
        "length_mix": {**lengths.describe(), "rows_as_trained": reference.get("data")},
        "settings": spec,
        "backends": {b: backend_summary(children.get(b), failures.get(b)) for b in args.backends},
        "rows": rows,
    }
    result["memory"] = memory_section(result)
    return result


def backend_summary(child_result: dict[str, Any] | None, failure: str | None) -> dict[str, Any]:
    if child_result is None:
        return {"failed": failure}
    model = child_result.get("model", {})
    return {"reason": model.get("backend_reason"), "versions": model.get("versions")}


def memory_section(result: dict[str, Any]) -> dict[str, Any] | None:
    """The memory rows fitted per backend and kind, and the derived fits per GPU size (bench/memory.py)."""
    points = [row for row in result["rows"] if row["memory_length"] is not None and row["status"] == "ok"]
    if not points or not result.get("parameters") or not result.get("shape"):
        return None
    return memory.from_benchmark(result)


def benchmark_rows(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of one run of the suite, as dicts (for a suite script)."""
    return run_suite(parse_args(argv))["rows"]


# ---- output ----------------------------------------------------------------------------------------------
COLUMNS = [
    ("id", "row"),
    ("backend", "backend"),
    ("batching", "batching"),
    ("status", "status"),
    ("processed_tokens_per_s", "processed tok/s"),
    ("useful_tokens_per_s", "useful tok/s"),
    ("padding_fraction", "padding"),
    ("epoch_padding_fraction", "padding/epoch"),
    ("peak_gib", "peak GiB"),
    ("useful_speed_vs_baseline", "useful x base"),
    ("peak_memory_vs_baseline", "memory x base"),
    ("useful_speed_vs_transformers_same_batching", "x transformers"),
]


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def print_table(result: dict[str, Any], out=sys.stdout) -> None:
    rows = []
    for row in result["rows"]:
        shown = dict(row)
        shown["peak_gib"] = round(row["peak_bytes"] / 2**30, 3) if row.get("peak_bytes") else None
        shown["status"] = row["status"] if row["status"] != "ok" else "ok"
        rows.append(shown)
    cells = [[label for _key, label in COLUMNS]] + [[cell(row.get(key)) for key, _label in COLUMNS] for row in rows]
    limit = 60  # a long failure reason stays readable in the JSON; the table keeps its start
    cells = [[text if len(text) <= limit else text[: limit - 3] + "..." for text in line] for line in cells]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    shape = result.get("shape") or {}
    mix = result["length_mix"].get("rows_as_trained") or {}
    print(
        f"model {result['model']}: {result.get('parameters') or 0:,} parameters, {result.get('dtype')} on "
        f"{result.get('device')}, {shape.get('num_hidden_layers')} layers x hidden {shape.get('hidden_size')}, "
        f"vocab {shape.get('vocab_size')}",
        file=out,
    )
    if mix:
        print(
            f"length mix: {mix['sft_rows']} SFT rows, tokens mean {mix['sft_row_tokens']['mean']} / "
            f"max {mix['sft_row_tokens']['max']}; "
            f"DPO chosen mean {mix['dpo_chosen_tokens']['mean']}, rejected mean {mix['dpo_rejected_tokens']['mean']}; "
            f"tasks {mix['tasks']}; output means x{result['settings']['length_scale']} of {lengths.OUTPUT_MEANS}",
            file=out,
        )
    settings = result["settings"]
    print(
        f"batch {settings['batch_size']} (DPO {settings['dpo_batch_size']}) x accumulation {settings['grad_accum']}, "
        f"max_length {settings['max_length']}, {settings['warmup_steps']} warm-up + {settings['steps']} timed steps, "
        f"gradient checkpointing {settings['gradient_checkpointing']}; ratios: over the same run's 'sft padded' / 'dpo' "
        "transformers + peft rows; peak: "
        f"{next((r['memory_method'] for r in result['rows'] if r.get('memory_method')), 'n/a')}",
        file=out,
    )
    for n, line in enumerate(cells):
        print(
            " | ".join(
                text.rjust(width) if i >= 4 else text.ljust(width) for i, (text, width) in enumerate(zip(line, widths))
            ),
            file=out,
        )
        if n == 0:
            print("-+-".join("-" * width for width in widths), file=out)
    precomputed = next((r for r in result["rows"] if r.get("useful_tokens_per_s_with_reference_pass")), None)
    if precomputed:
        print(
            f"dpo precomputed ref, with its reference pass ({precomputed['reference_pass_s']} s of set-up) charged to the "
            f"timed steps: {precomputed['useful_tokens_per_s_with_reference_pass']:,.0f} useful tok/s, "
            f"x{precomputed['useful_speed_with_reference_pass_vs_baseline']} the baseline",
            file=out,
        )
    if result.get("memory"):
        memory.print_derived(result["memory"], out=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    result = run_suite(args)
    print_table(result)
    if args.json:
        from reflectevo.core.files import atomic_write_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    baselines_ok = all(row["status"] == "ok" for row in result["rows"] if row["baseline"])
    return 0 if baselines_ok else 1


if __name__ == "__main__":
    sys.exit(main())

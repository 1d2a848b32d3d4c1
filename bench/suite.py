"""The performance suite: one table and one JSON, every figure a ratio against a baseline measured
in the same run, on the same machine, with the model shape and the length mix stated.

    python bench/suite.py --smoke                       # builtin:tiny on CPU: CI's check that it all runs
    python bench/suite.py --model builtin:random-8b --json bench-8b.json       # one GPU, paper-length mix
    python bench/suite.py --model builtin:random-1b --json bench-1b.json

Parts, each in its own process (importing Unsloth patches transformers and TRL for the whole
process, so no two backends ever share one):
  training     SFT and DPO with LoRA: tokens/s, useful (non-padding) tokens/s, padding share and peak
               memory; Unsloth and padding-free / precomputed-reference variants against padded
               transformers+peft (bench/training.py)
  generation   the reflect stage's three steps on the realistic length mix (bench/lengths.py): the
               package's engine against one question at a time and against plain batch-64 generate
               in dataset order; Unsloth's engine against the same baseline (bench/reflect_stage.py)
  ceilings     each generation row against the memory-bandwidth and compute ceilings of the device
               at the batch size used (bench/floors.py; datasheet peaks, GPU only)
  memory       the largest model and sequence length that fit for SFT and DPO in 16/24/40/80 GB,
               from the measured peaks, labelled derived (bench/memory.py)
  paper scale  hours for the paper's ~460k reflections and one SFT epoch at the measured speeds,
               labelled derived

A part that cannot run here (Unsloth without a CUDA GPU, say) gives a row that says why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import floors
import lengths

# --smoke: the smallest run that still exercises every part (CPU, builtin:tiny, seconds)
SMOKE = {
    "model": "builtin:tiny",
    "questions": 6,
    "length_scale": 0.08,
    "batch_size": "16",
    "train_steps": 1,
    "training_args": [
        "--rows",
        "8",
        "--batch-size",
        "2",
        "--dpo-batch-size",
        "1",
        "--warmup-steps",
        "1",
        "--memory-lengths",
        "",
        "--length-scale",
        "0.25",
        "--no-gradient-checkpointing",
    ],
}
# a GPU run: the paper's lengths, a batch size the engine sizes from free memory, bench/training.py's
# GPU defaults (512 SFT rows, batch 8, memory rows at 1,024 and 4,096 tokens)
FULL = {"questions": 512, "length_scale": 1.0, "batch_size": "auto", "train_steps": 8, "training_args": []}


def child(script: str, args: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run ``bench/<script>`` in a fresh process; (its JSON report or None, why it failed)."""
    with tempfile.TemporaryDirectory(prefix="reflectevo-bench-") as folder:
        out = Path(folder) / "report.json"
        command = [sys.executable, str(HERE / script), *args, "--json", str(out)]
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"{script} ran past {timeout:.0f} s"
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"{script} exited with {done.returncode}: " + " / ".join(tail)
        return json.loads(out.read_text(encoding="utf-8")), ""


def unsloth_unavailable() -> str | None:
    """Why Unsloth cannot run here, or None (checked without importing it into this process)."""
    if importlib.util.find_spec("unsloth") is None:
        return "the unsloth package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def generation_part(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    common = [
        "--model",
        args.model,
        "--questions",
        str(settings["questions"]),
        "--length-scale",
        str(settings["length_scale"]),
        "--batch-size",
        str(settings["batch_size"]),
        "--official-dir",
        str(args.official_dir),
        "--seed",
        str(args.seed),
    ]
    report, why = child("reflect_stage.py", common, args.timeout)
    if report is None:
        raise SystemExit(f"the generation part failed: {why}")
    rows = report["rows"]
    unavailable = unsloth_unavailable()
    if unavailable is None:
        extra, why = child("reflect_stage.py", common + ["--engine", "unsloth", "--engine-only"], args.timeout)
        rows += extra["rows"] if extra else [{"way": "engine:unsloth", "unavailable": why}]
    else:
        rows.append({"way": "engine:unsloth", "unavailable": unavailable})
    baseline = next(r for r in rows if r["way"] == "plain-64")
    for row in rows:
        if "tokens_per_s" in row:
            row["x_plain_64"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 2)
    report["rows"] = rows
    return report


def ceilings_part(
    generation: dict[str, Any], device_name: str | None, given: tuple[float, float] | None
) -> dict[str, Any]:
    peaks = given or (floors.device_peaks(device_name) if device_name else None)
    if peaks is None:
        return {"unavailable": f"no datasheet peaks for {device_name or 'a CPU'}; give --peaks BYTES_PER_S,FLOPS"}
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[generation["dtype"]]
    rows = []
    for row in generation["rows"]:
        if "tokens_per_s" not in row:
            continue
        ceiling = floors.decode_ceilings(
            generation["config"], generation["parameters"], dtype_bytes, row["batch_size"], row["mean_context"], *peaks
        )
        rows.append({"way": row["way"], **ceiling, **floors.fractions(row["tokens_per_s"], ceiling)})
    return {
        "device": device_name,
        "peaks_from": "--peaks" if given else "datasheet",
        "bandwidth_bytes_s": peaks[0],
        "peak_flops": peaks[1],
        "rows": rows,
    }


def training_part(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    if not (HERE / "training.py").is_file():
        return {"unavailable": "bench/training.py is missing"}
    report, why = child(
        "training.py",
        [
            "--model",
            args.model,
            "--steps",
            str(settings["train_steps"]),
            "--official-dir",
            str(args.official_dir),
            *settings["training_args"],
        ],
        args.timeout,
    )
    return report if report is not None else {"unavailable": why}


def memory_part(training: dict[str, Any]) -> dict[str, Any]:
    if "rows" not in training:
        return {"unavailable": "no training measurements"}
    try:
        import memory
    except ImportError as exc:
        return {"unavailable": f"bench/memory.py: {exc}"}
    return memory.derive_from_report(training)


# Paper scale (ReflectEvo-460K, arXiv 2505.16475): 461,799 reflections, each followed by a second
# trial; two reflections were sampled per question and instruction, so about half as many first
# trials. Mean lengths over all categories: turn-1 answer 189, reflection 250, turn-2 answer 237.
PAPER_REFLECTIONS = 461_799
PAPER_FIRST_TRIALS = PAPER_REFLECTIONS // 2
PAPER_GENERATED_TOKENS = PAPER_FIRST_TRIALS * 189 + PAPER_REFLECTIONS * (250 + 237)
# SFT on the 344,944 Q&A-reflection samples for one epoch: question (130) + turn-1 answer (189) +
# an instruction (about 60) + the reflection and turn-2 answer as the completion (250 + 237)
PAPER_SFT_TOKENS = 344_944 * (130 + 189 + 60 + 250 + 237)


def paper_scale_part(report: dict[str, Any]) -> dict[str, Any]:
    """Hours for the paper's generation and one SFT epoch at this run's measured speeds (derived)."""
    best = {}
    for row in report["generation"].get("rows", []):
        if "tokens_per_s" in row:
            best[row["way"]] = row["tokens_per_s"]
    sft = [
        r
        for r in report["training"].get("rows", [])
        if r.get("kind") == "sft" and r.get("status") == "ok" and r.get("memory_length") is None
    ]
    derived = {
        "label": "derived from this run's measured speeds, not measured end to end",
        "generated_tokens": PAPER_GENERATED_TOKENS,
        "sft_tokens": PAPER_SFT_TOKENS,
        "hours": {},
    }
    for way, speed in best.items():
        derived["hours"][f"generation, {way}"] = round(PAPER_GENERATED_TOKENS / speed / 3600, 1)
    for row in sft:
        derived["hours"][f"SFT epoch, {row['name']}"] = round(PAPER_SFT_TOKENS / row["useful_tokens_per_s"] / 3600, 1)
    return derived


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The one table: part, what, value, unit, ratio against the part's same-run baseline."""
    lines = []
    for row in report["training"].get("rows", []):
        if row.get("unavailable"):
            lines.append(["training", row["name"], "-", "", row["unavailable"].split(";")[0]])
            continue
        note = f"{row['ratio']:.2f}x, padding {row['padding_fraction']:.0%}, peak {row['peak_bytes'] / 2**30:.2f} GiB"
        lines.append(["training", row["name"], f"{row['useful_tokens_per_s']:,.0f}", "useful tok/s", note])
    if "unavailable" in report["training"]:
        lines.append(["training", "all", "-", "", report["training"]["unavailable"]])
    for row in report["generation"]["rows"]:
        if "unavailable" in row:
            lines.append(["generation", row["way"], "-", "", row["unavailable"]])
            continue
        lines.append(
            [
                "generation",
                f"{row['way']} (batch {row['batch_size']})",
                f"{row['tokens_per_s']:,.0f}",
                "gen tok/s",
                f"{row['x_plain_64']:.2f}x",
            ]
        )
        lines.append(["generation", f"{row['way']} records", f"{row['records_per_s']:,.1f}", "records/s", ""])
    ceilings = report["ceilings"]
    for row in ceilings.get("rows", []):
        fractions = f"{row['of_bandwidth_ceiling']:.1%} / {row['of_compute_ceiling']:.1%}"
        lines.append(
            [
                "ceilings",
                f"{row['way']}: of bandwidth / compute ceiling",
                fractions,
                "",
                f"batch {row['batch']}, context {row['mean_context']:.0f}",
            ]
        )
    if "unavailable" in ceilings:
        lines.append(["ceilings", "all", "-", "", ceilings["unavailable"]])
    return lines


def print_table(lines: list[list[str]]) -> None:
    header = ["part", "what", "value", "unit", "ratio / note"]
    cells = [header] + lines
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    for n, line in enumerate(cells):
        print(
            " | ".join(
                cell.ljust(width) if i in (0, 1, 4) else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths))
            )
        )
        if n == 0:
            print("-+-".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="builtin:tiny on CPU, tiny sizes: checks that every part runs"
    )
    parser.add_argument("--model", help="builtin:random-1b, builtin:random-8b, builtin:tiny or a model folder")
    parser.add_argument("--questions", type=int, help="questions in the reflect-stage mix")
    parser.add_argument("--length-scale", type=float, help="multiply the imposed output lengths (1 = the paper's)")
    parser.add_argument("--batch-size", help="the engine's batch size, or auto")
    parser.add_argument("--train-steps", type=int, help="timed training steps per row")
    parser.add_argument("--parts", default="training,generation", help="comma-separated: training, generation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official-dir", type=Path, default=lengths.DEFAULT_OFFICIAL_DIR)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    parser.add_argument(
        "--peaks",
        help="memory bandwidth (bytes/s) and peak FLOP/s, e.g. 4.8e12,989e12, "
        "instead of the datasheet figures of the GPU found (needed on a CPU)",
    )
    parser.add_argument("--json", type=Path, help="write the whole report here")
    args = parser.parse_args(argv)
    peaks = None
    if args.peaks:
        try:
            bandwidth, flops = (float(x) for x in args.peaks.split(","))
        except ValueError:
            parser.error(f"--peaks wants two numbers, bytes/s and FLOP/s, like 4.8e12,989e12 (got {args.peaks!r})")
        if bandwidth <= 0 or flops <= 0:
            parser.error("--peaks must be positive")
        peaks = (bandwidth, flops)
    if not args.smoke and not args.model:
        parser.error("give --model (e.g. builtin:random-8b), or --smoke")
    settings = dict(SMOKE if args.smoke else FULL)
    for key in ("questions", "length_scale", "batch_size", "train_steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    args.model = args.model or SMOKE["model"]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"training", "generation"}:
        parser.error(f"unknown parts: {', '.join(sorted(parts - {'training', 'generation'}))}")
    if not (args.official_dir / "math_test.jsonl").is_file():
        parser.error(f"the official test files are not in {args.official_dir}; give --official-dir")

    import torch

    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    started = time.perf_counter()
    report: dict[str, Any] = {
        "model": args.model,
        "settings": settings,
        "seed": args.seed,
        "length_mix": lengths.describe(),
        "device": device_name or f"CPU ({os.cpu_count()} cores)",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    report["training"] = training_part(args, settings) if "training" in parts else {"unavailable": "not asked for"}
    report["generation"] = generation_part(args, settings) if "generation" in parts else {"rows": []}
    report["ceilings"] = (
        ceilings_part(report["generation"], device_name, peaks)
        if report["generation"].get("rows")
        else {"unavailable": "no generation rows"}
    )
    report["memory"] = memory_part(report["training"])
    report["paper_scale"] = paper_scale_part(report)
    report["seconds"] = round(time.perf_counter() - started, 1)

    gen = report["generation"]
    if gen.get("rows"):
        print(
            f"model {args.model}: {gen['parameters'] / 1e6:,.1f} M parameters, {gen['dtype']}, {report['device']}; "
            f"shape {gen['config']}"
        )
        print(
            f"length mix: {gen['questions']} official test items {gen['task_counts']}, k={gen['k']} reflections each, "
            f"output lengths x{gen['length_scale']} of the paper's means {lengths.OUTPUT_MEANS}"
        )
    print_table(table_rows(report))
    print(
        f"paper scale ({report['paper_scale']['label']}; {PAPER_GENERATED_TOKENS / 1e6:.0f} M generated tokens, "
        f"{PAPER_SFT_TOKENS / 1e6:.0f} M SFT tokens per epoch):"
    )
    for what, hours in report["paper_scale"]["hours"].items():
        print(f"  {what}: {hours:,} h")
    if isinstance(report["memory"], dict) and report["memory"].get("table"):
        print("memory (derived from the measured peaks):")
        for line in report["memory"]["table"]:
            print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

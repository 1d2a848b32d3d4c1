"""Peak LoRA training memory fitted per parameter and per token from measured rows, and the largest
model (Llama 3.x 1B, 3B, 8B shapes) and sequence length it implies for SFT and DPO on 16, 24, 40 and
80 GB GPUs. Every such cell is derived (labelled so); where the measured model is that shape, the
measured lengths that fit are given beside it.

    python bench/training.py --model builtin:random-8b --json training.json     # measures (memory rows)
    python bench/memory.py training.json                                        # fits and derives
    python bench/memory.py training.json --budgets 16,24 --reserve-gib 1.5 --json memory.json

The fit, per backend and kind (sft, dpo), over the memory rows (batch 1, every sequence T tokens; a
DPO row holds a chosen and a rejected sequence of T tokens):

    peak(T) = intercept + bytes_per_token x T              (least squares over the measured lengths)
    bytes_per_param = intercept / parameters                (weights, LoRA, optimizer state and every
                                                             fixed overhead, all charged to the parameters)
    bytes_per_token_per_width = bytes_per_token / (layers x hidden)

and for a shape S, weights as measured or in 4 bits, and b rows per batch:

    peak_S(T) = bytes_per_param x P_S - 4-bit saving + bytes_per_token_per_width x layers_S x hidden_S x T x b

layers x hidden is what gradient checkpointing keeps per token (one hidden state per layer), so the
per-token figure scales with it; charging fixed overheads per parameter over-estimates larger shapes
(the safe side). 4-bit weights: linear layers in NF4 with double quantisation (4.127 bits a weight),
embeddings and head kept in 16 bits. A GPU of G GiB fits a configuration when its peak plus the
reserve (CUDA context, allocator slack; --reserve-gib) is at most G GiB.

The recipes params/colab-t4.yaml and params/llama3-8b-24gb.yaml are checked against the fit at
their own batch sizes and lengths (the last table).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
BUDGETS_GIB = (16, 24, 40, 80)
NF4_BYTES_PER_WEIGHT = 4.127 / 8  # NF4 with double-quantised block scales (QLoRA)
# Llama 3.x shapes, keyed by the transformers config fields (1B and 3B: Llama 3.2; 8B: Llama 3)
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128_256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131_072,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 128_256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131_072,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128_256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    },
}
# recipe -> (params file, GPU size in GiB, shape of its model)
RECIPES = {"colab-t4": ("params/colab-t4.yaml", 16, "8b"), "llama3-8b-24gb": ("params/llama3-8b-24gb.yaml", 24, "8b")}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---- shapes ----------------------------------------------------------------------------------------------
def parameter_counts(shape: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, those of the embeddings and the output head) of a Llama-style decoder."""
    hidden, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    head_dim = hidden // shape["num_attention_heads"]
    attention = hidden * head_dim * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])  # q, o, k, v
    mlp = 3 * hidden * shape["intermediate_size"]  # gate, up, down
    per_layer = attention + mlp + 2 * hidden  # two RMS norms
    embeddings = vocab * hidden * (1 if shape.get("tie_word_embeddings") else 2)
    return embeddings + layers * per_layer + hidden, embeddings


def width(shape: dict[str, Any]) -> int:
    """layers x hidden: the activation values gradient checkpointing keeps per token."""
    return shape["num_hidden_layers"] * shape["hidden_size"]


# ---- the fit ---------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """Peak memory of one backend and kind against the sequence length, on one measured model."""

    backend: str
    kind: str  # sft or dpo
    model: str
    parameters: int
    shape: dict[str, Any]
    dtype: str
    points: list[tuple[int, int]]  # (tokens per sequence, peak bytes), batch 1
    intercept: float = 0.0
    bytes_per_token: float = 0.0
    problem: str | None = None  # why nothing can be derived from it (peak not growing with length)
    derived_from: str = field(default="measured")

    @property
    def bytes_per_param(self) -> float:
        return self.intercept / self.parameters

    @property
    def bytes_per_token_per_width(self) -> float:
        return self.bytes_per_token / width(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "bytes_per_param": round(self.bytes_per_param, 4),
            "bytes_per_token_per_width": round(self.bytes_per_token_per_width, 4),
        }


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (tokens, bytes) points of two lengths or more."""
    if len({t for t, _ in points}) < 2:
        raise ValueError(
            f"a fit needs peaks at two sequence lengths or more, got lengths {sorted({t for t, _ in points})}"
        )
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_b = sum(b for _, b in points) / n
    slope = sum((t - mean_t) * (b - mean_b) for t, b in points) / sum((t - mean_t) ** 2 for t, _ in points)
    return mean_b - slope * mean_t, slope


def make_fit(
    backend: str,
    kind: str,
    model: str,
    parameters: int,
    shape: dict[str, Any],
    dtype: str,
    points: list[tuple[int, int]],
) -> Fit:
    fit = Fit(backend, kind, model, parameters, shape, dtype, sorted(points))
    fit.intercept, fit.bytes_per_token = fit_line(fit.points)
    if fit.bytes_per_token <= 0 or fit.intercept <= 0:
        fit.problem = (
            f"peak memory does not grow with the sequence length as a line with a positive base "
            f"(slope {fit.bytes_per_token:.0f} B/token, intercept {fit.intercept:.0f} B): measure longer "
            "sequences, or on a GPU (a CPU's resident set is a coarse measure)"
        )
    return fit


def weight_saving_4bit(fit: Fit, shape: dict[str, Any]) -> float:
    """Bytes saved by holding the linear layers of ``shape`` in NF4 instead of the measured dtype."""
    total, embeddings = parameter_counts(shape)
    measured = DTYPE_BYTES.get(fit.dtype, 2)
    return (total - embeddings) * (measured - NF4_BYTES_PER_WEIGHT) + embeddings * max(0, measured - 2)


def peak_estimate(fit: Fit, shape: dict[str, Any], tokens: int, four_bit: bool = False) -> float:
    """Derived peak bytes of ``shape`` training on ``tokens`` tokens per step (length x rows per batch)."""
    total, _ = parameter_counts(shape)
    base = fit.bytes_per_param * total - (weight_saving_4bit(fit, shape) if four_bit else 0.0)
    return base + fit.bytes_per_token_per_width * width(shape) * tokens


def max_length(fit: Fit, shape: dict[str, Any], budget_bytes: float, batch: int = 1, four_bit: bool = False) -> int:
    """The longest sequence (tokens, at ``batch`` rows per step) whose derived peak fits ``budget_bytes``; 0 when
    not even the weights fit. Not capped at the shape's context length (the caller says where it is)."""
    base = peak_estimate(fit, shape, 0, four_bit)
    if base >= budget_bytes:
        return 0
    return int((budget_bytes - base) // (fit.bytes_per_token_per_width * width(shape) * batch))


def same_shape(fit: Fit, shape: dict[str, Any]) -> bool:
    return abs(parameter_counts(shape)[0] - fit.parameters) <= 0.01 * fit.parameters and width(shape) == width(
        fit.shape
    )


def derive(
    fits: list[Fit],
    budgets_gib: tuple[int, ...] = BUDGETS_GIB,
    reserve_gib: float = 1.0,
    min_length: int = 2048,
    shapes: dict[str, dict[str, Any]] = SHAPES,
) -> dict[str, list[dict[str, Any]]]:
    """Per fit, weights (as measured, 4-bit), budget and shape: the longest sequence at batch 1; and the
    largest shape that fits ``min_length`` tokens. Every cell is labelled derived, with the measured
    lengths that fit beside it where the measured model is that shape (and the weights as measured)."""
    per_shape, largest = [], []
    for fit in fits:
        if fit.problem:
            continue
        for four_bit in (False, True):
            weights = "4-bit" if four_bit else fit.dtype
            for budget in budgets_gib:
                usable = (budget - reserve_gib) * GIB
                best = None
                for name, shape in shapes.items():
                    length = max_length(fit, shape, usable, 1, four_bit)
                    context = shape.get("max_position_embeddings") or length
                    cell = {
                        "backend": fit.backend,
                        "kind": fit.kind,
                        "weights": weights,
                        "budget_gib": budget,
                        "shape": name,
                        "max_length": min(length, context),
                        "capped_at_context": length > context,
                        "label": "derived",
                        "source": fit.model if same_shape(fit, shape) else f"{fit.model}, scaled to {name}",
                    }
                    if same_shape(fit, shape) and not four_bit:
                        fitting = [t for t, peak in fit.points if peak + reserve_gib * GIB <= budget * GIB]
                        cell["measured_fits_at"] = max(fitting) if fitting else None
                        cell["measured_lengths"] = [t for t, _ in fit.points]
                    per_shape.append(cell)
                    if cell["max_length"] >= min_length:
                        best = cell
                largest.append(
                    {
                        "backend": fit.backend,
                        "kind": fit.kind,
                        "weights": weights,
                        "budget_gib": budget,
                        "min_length": min_length,
                        "largest_shape": best["shape"] if best else None,
                        "max_length": best["max_length"] if best else None,
                        "label": "derived",
                    }
                )
    return {"per_shape": per_shape, "largest": largest}


def recipe_checks(fits: list[Fit], reserve_gib: float = 1.0, repo: Path = REPO) -> list[dict[str, Any]]:
    """The recipes' SFT and DPO steps (their batch size x max_length, their weights) against their GPU size."""
    import yaml

    checks = []
    for recipe, (path, budget, shape_name) in RECIPES.items():
        params = yaml.safe_load((repo / path).read_text(encoding="utf-8"))
        model = params.get("model", {})
        four_bit = bool(model.get("load_in_4bit"))
        for kind in ("sft", "dpo"):
            section = params.get(kind, {})
            batch, length = section.get("per_device_batch_size", 1), section.get("max_length", 2048)
            chosen = [f for f in fits if f.kind == kind and not f.problem]
            fit = next((f for f in chosen if f.backend == model.get("backend")), None) or next(iter(chosen), None)
            if fit is None:
                continue
            peak = peak_estimate(fit, SHAPES[shape_name], batch * length, four_bit)
            checks.append(
                {
                    "recipe": recipe,
                    "kind": kind,
                    "budget_gib": budget,
                    "shape": shape_name,
                    "weights": "4-bit" if four_bit else fit.dtype,
                    "batch": batch,
                    "max_length": length,
                    "fit_backend": fit.backend,
                    "estimated_peak_gib": round(peak / GIB, 2),
                    "fits": peak + reserve_gib * GIB <= budget * GIB,
                    "max_length_at_this_batch": min(
                        max_length(fit, SHAPES[shape_name], (budget - reserve_gib) * GIB, batch, four_bit),
                        SHAPES[shape_name]["max_position_embeddings"],
                    ),
                    "label": "derived",
                }
            )
    return checks


# ---- from a bench/training.py result ------------------------------------------------------------------------
def fits_from_benchmark(result: dict[str, Any]) -> list[Fit]:
    """One fit per backend and kind from the memory rows of a bench/training.py result."""
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for row in result["rows"]:
        if row.get("memory_length") is not None and row.get("status") == "ok":
            groups.setdefault((row["backend"], row["kind"]), []).append((row["memory_length"], row["peak_bytes"]))
    fits = []
    for (backend, kind), points in sorted(groups.items()):
        if len({t for t, _ in points}) >= 2:
            fits.append(
                make_fit(
                    backend,
                    kind,
                    result["model"],
                    result["parameters"],
                    result["shape"],
                    result.get("dtype") or "bfloat16",
                    points,
                )
            )
    return fits


def from_benchmark(
    result: dict[str, Any],
    budgets_gib: tuple[int, ...] = BUDGETS_GIB,
    reserve_gib: float = 1.0,
    min_length: int = 2048,
    allow_cpu: bool = False,
) -> dict[str, Any]:
    """The fits of a bench/training.py result and, when it was measured on a CUDA GPU (or ``allow_cpu``), the
    derived cells and recipe checks: a CPU's figure is the whole process's resident set, Python and
    libraries included, which says nothing about a GPU."""
    fits = fits_from_benchmark(result)
    on_gpu = result.get("device") == "cuda"
    derived = (
        derive(fits, budgets_gib, reserve_gib, min_length) if on_gpu or allow_cpu else {"per_shape": [], "largest": []}
    )
    return {
        "fits": [fit.to_dict() for fit in fits],
        **derived,
        "recipes": recipe_checks(fits, reserve_gib) if on_gpu or allow_cpu else [],
        "assumptions": {
            "reserve_gib": reserve_gib,
            "min_length": min_length,
            "budgets_gib": list(budgets_gib),
            "measured_on": result.get("device"),
            "derivation": (
                "from GPU measurements"
                if on_gpu
                else "from CPU measurements, on request: process RSS, not GPU memory"
                if allow_cpu
                else "skipped: measured on a CPU (the process's resident set says nothing about a GPU); "
                "run bench/training.py on a CUDA GPU"
            ),
            "peak": next((r.get("memory_method") for r in result["rows"] if r.get("memory_method")), None),
            "scaling": "per-parameter bytes x parameters; per-token bytes x (layers x hidden) of the shape",
            "four_bit": f"linear layers at {NF4_BYTES_PER_WEIGHT * 8:.3f} bits, embeddings and head 16-bit",
        },
    }


def derive_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """:func:`from_benchmark` with defaults, plus ``table``: the printed lines (for bench/suite.py)."""
    import io

    section = from_benchmark(report)
    printed = io.StringIO()
    print_derived(section, out=printed)
    section["table"] = [line for line in printed.getvalue().splitlines() if line.strip()]
    return section


# ---- output ----------------------------------------------------------------------------------------------
def print_derived(section: dict[str, Any], out=sys.stdout) -> None:
    assumptions = section["assumptions"]
    print(
        f"\nmemory: peak = bytes/param x parameters + bytes/token x tokens, fitted on the memory rows (peak: "
        f"{assumptions['peak']}); derived cells add a {assumptions['reserve_gib']} GiB reserve",
        file=out,
    )
    for fit in section["fits"]:
        if fit["problem"]:
            print(f"  {fit['backend']} {fit['kind']}: not derivable: {fit['problem']}", file=out)
            continue
        measured = ", ".join(f"{t}: {b / GIB:.3f} GiB" for t, b in fit["points"])
        print(
            f"  {fit['backend']} {fit['kind']} on {fit['model']} ({fit['parameters']:,} parameters, {fit['dtype']}): "
            f"{fit['bytes_per_param']:.3f} B/parameter, {fit['bytes_per_token'] / 2**20:.4f} MiB/token "
            f"(measured {measured})",
            file=out,
        )
    budgets = assumptions["budgets_gib"]
    print(f"  derivation: {assumptions['derivation']}", file=out)
    if not section["per_shape"]:
        return
    print(
        f"\nlongest sequence at batch 1, derived (largest shape fitting {assumptions['min_length']} tokens marked *):",
        file=out,
    )
    header = ["backend", "kind", "weights", "shape"] + [f"{b} GiB" for b in budgets]
    lines = [header]
    largest = {(c["backend"], c["kind"], c["weights"], c["budget_gib"]): c["largest_shape"] for c in section["largest"]}
    keys = []
    for c in section["per_shape"]:
        key = (c["backend"], c["kind"], c["weights"], c["shape"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        line = list(key)
        for budget in budgets:
            c = next(
                c
                for c in section["per_shape"]
                if (c["backend"], c["kind"], c["weights"], c["shape"]) == key and c["budget_gib"] == budget
            )
            text = f"{c['max_length']:,}" + ("+" if c["capped_at_context"] else "")
            if c.get("measured_fits_at"):
                text += f" (measured {c['measured_fits_at']:,})"
            if largest.get((key[0], key[1], key[2], budget)) == key[3]:
                text += " *"
            line.append(text)
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print(
            " | ".join(
                str(text).rjust(width) if i >= 4 else str(text).ljust(width)
                for i, (text, width) in enumerate(zip(line, widths))
            ),
            file=out,
        )
        if n == 0:
            print("-+-".join("-" * width for width in widths), file=out)
    print("  (+: the shape's context length; 0: the weights alone do not fit)", file=out)
    for check in section["recipes"]:
        print(
            f"recipe {check['recipe']} ({check['budget_gib']} GiB, {check['shape']}, {check['weights']} weights): "
            f"{check['kind']} batch {check['batch']} x {check['max_length']} tokens -> {check['estimated_peak_gib']} GiB, "
            f"{'fits' if check['fits'] else 'does NOT fit'}; longest at this batch {check['max_length_at_this_batch']:,} "
            f"(derived from the {check['fit_backend']} fit)",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("result", type=Path, help="the JSON that bench/training.py --json wrote (with memory rows)")
    parser.add_argument(
        "--budgets", default=",".join(str(b) for b in BUDGETS_GIB), help="GPU sizes in GiB, comma-separated"
    )
    parser.add_argument(
        "--reserve-gib", type=float, default=1.0, help="kept free on every GPU (CUDA context, allocator slack)"
    )
    parser.add_argument(
        "--min-length", type=int, default=2048, help="the length the 'largest shape' must fit at batch 1"
    )
    parser.add_argument("--allow-cpu", action="store_true", help="derive even from a CPU run (the arithmetic only)")
    parser.add_argument("--json", type=Path, help="also write the fits and derived cells here")
    args = parser.parse_args(argv)
    if not args.result.is_file():
        parser.error(f"{args.result} not found: run python bench/training.py --json {args.result} first")
    try:
        budgets = tuple(int(b) for b in args.budgets.split(",") if b.strip())
    except ValueError:
        parser.error(f"--budgets must be comma-separated integers (GiB), got {args.budgets!r}")
    if not budgets or min(budgets) <= args.reserve_gib:
        parser.error(f"--budgets must be larger than --reserve-gib ({args.reserve_gib})")
    result = json.loads(args.result.read_text(encoding="utf-8"))
    if result.get("benchmark") != "training" or "rows" not in result:
        parser.error(f"{args.result} is not a bench/training.py result")
    section = from_benchmark(result, budgets, args.reserve_gib, args.min_length, args.allow_cpu)
    if not section["fits"]:
        print(
            f"{args.result} has no memory rows measured at two lengths or more: run bench/training.py with "
            "--memory-lengths (e.g. 1024,4096)",
            file=sys.stderr,
        )
        return 1
    print_derived(section)
    if args.json:
        sys.path.insert(0, str(REPO))
        from reflectevo.core.files import atomic_write_json

        atomic_write_json(args.json, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

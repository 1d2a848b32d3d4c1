"""The training benchmark (bench/training.py) runs on CPU with the tiny model: every row is in its
table and JSON, every ratio divides by the same run's baseline, Unsloth rows say why they are
unavailable, and padding-free batches carry less padding than padded ones. Padding-free batches
train the same loss as padded ones through the package's trainer, and the memory derivation
(bench/memory.py) computes what hand arithmetic gives."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("trl")


def bench_module(name: str):
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


# ---- the suite on CPU --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_run(official_dir, tmp_path_factory):
    """One run of the suite: the fewest rows and steps that still time a window after a warm-up step."""
    out = tmp_path_factory.mktemp("bench-training") / "training.json"
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = bench_module("training").main(
            [
                "--model",
                "builtin:tiny",
                "--backends",
                "transformers,unsloth",
                "--rows",
                "8",
                "--batch-size",
                "2",
                "--dpo-batch-size",
                "1",
                "--warmup-steps",
                "1",
                "--steps",
                "1",
                "--memory-lengths",
                "",
                "--length-scale",
                "0.25",
                "--no-gradient-checkpointing",
                "--official-dir",
                str(official_dir),
                "--json",
                str(out),
            ]
        )
    return code, printed.getvalue(), out


def test_every_row_is_measured_or_says_why(bench_run):
    code, printed, out = bench_run
    assert code == 0
    result = json.loads(out.read_text())
    training = bench_module("training")
    expected = [row.id for backend in training.BACKENDS for row in training.SPEED_ROWS if row.backend == backend]
    assert [row["id"] for row in result["rows"]] == expected
    for row_id in expected:
        assert f"\n{row_id} " in printed  # a line of the table
    import torch

    unsloth_here = torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None
    for row in result["rows"]:
        if row["backend"] == "transformers" or unsloth_here:
            assert row["status"] == "ok", row
            assert row["useful_tokens_per_s"] > 0 and row["peak_bytes"] > 0 and row["window_s"] > 0
        else:  # no CUDA GPU or no Unsloth: Unsloth is never imported, and the row says why
            assert row["status"].startswith("unavailable: ") and "unsloth" in row["status"], row
            assert row["useful_speed_vs_baseline"] is None
    # what the JSON states about the run
    assert result["model"] == "builtin:tiny" and result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result["dtype"] in ("float32", "bfloat16")
    assert result["parameters"] > 1e6 and result["shape"]["num_hidden_layers"] >= 1
    assert {"torch", "transformers", "peft", "trl"} <= set(result["versions"])
    assert result["length_mix"]["output_means_tokens"]["logiqa"]["reflection"] > 0
    assert result["length_mix"]["rows_as_trained"]["sft_rows"] == 8
    assert result["memory"] is None  # no memory rows asked for


def test_memory_rows_are_cut_to_exactly_their_length(official_dir):
    """The fixed-length rows of the memory fit hold at least the length in every sequence, with trained
    tokens left after the cut, so that max_length = the length gives sequences of exactly that many tokens."""
    from reflectevo.config import ModelParams
    from reflectevo.models.loading import load_tokenizer
    from reflectevo.training import datasets as training_datasets

    bench = bench_module("training")
    tokenizer = load_tokenizer(ModelParams(name="builtin:tiny"))
    spec = {"seed": 0, "official_dir": str(official_dir)}
    sft, dpo = bench.training_sets(*bench.fixed_length_rows(spec, tokenizer, 320, 2))
    assert len(sft) == len(dpo) == 2
    assert min(training_datasets.row_lengths(tokenizer, sft, ("completion",))) >= 320
    assert (
        min(
            training_datasets.row_lengths(tokenizer, dpo, ("chosen",))
            + training_datasets.row_lengths(tokenizer, dpo, ("rejected",))
        )
        >= 320
    )
    assert max(training_datasets.prompt_lengths(tokenizer, sft)) < 320 - 16  # the cut leaves completion tokens to train
    with pytest.raises(ValueError, match="leaves no room for a completion"):
        bench.fixed_length_rows(spec, tokenizer, 64, 1)


def test_ratios_divide_by_the_same_runs_baseline(bench_run):
    result = json.loads(bench_run[2].read_text())
    rows = {row["id"]: row for row in result["rows"]}
    for row in result["rows"]:
        if row["status"] != "ok" or row["memory_length"] is not None:
            continue
        base = rows["sft padded" if row["kind"] == "sft" else "dpo"]
        assert row["baseline_row"] == base["id"]
        assert row["useful_speed_vs_baseline"] == round(row["useful_tokens_per_s"] / base["useful_tokens_per_s"], 3)
        assert row["peak_memory_vs_baseline"] == round(row["peak_bytes"] / base["peak_bytes"], 3)
    assert rows["sft padded"]["useful_speed_vs_baseline"] == rows["dpo"]["useful_speed_vs_baseline"] == 1.0
    assert rows["dpo precomputed ref"]["reference_pass_s"] >= 0


def test_padding_free_batches_carry_no_padding(bench_run):
    rows = {row["id"]: row for row in json.loads(bench_run[2].read_text())["rows"]}
    padded, free, grouped = rows["sft padded"], rows["sft padding-free"], rows["sft length-grouped"]
    assert padded["padding_fraction"] > free["padding_fraction"] == 0.0
    assert padded["useful_tokens"] < padded["processed_tokens"] and free["useful_tokens"] == free["processed_tokens"]
    assert (padded["batching"], free["batching"], grouped["batching"]) == ("padded", "padding_free", "length_grouped")
    assert padded["epoch_padding_fraction"] > free["epoch_padding_fraction"] == 0.0


# ---- padding-free batches through the package's trainer ---------------------------------------------------------
def test_padding_free_batches_train_the_padded_loss(tmp_path):
    """The same rows collated padded and padding-free give one loss (transformers masks each row off from the
    others by its position ids, with sdpa attention too); auto keeps padded batches where no per-row kernel exists."""
    import torch

    from reflectevo.config import ModelParams, SFTParams
    from reflectevo.reflection import exports
    from reflectevo.training import adapters
    from reflectevo.training import trainer as training_trainer

    rows = [
        {
            "task": "math",
            "id": str(i),
            "question": f"What is {i} + {i}?" * (1 + 5 * i),
            "answer": str(2 * i),
            "first_trial_attempt": "Thought: add.\nAction: Finish[3]" * (1 + 3 * i),
            "first_trial_feedback": "Answer is INCORRECT",
            "reflections": "I added wrongly." * (1 + 2 * i),
            "second_trial_attempt": f"Thought: add.\nAction: Finish[{2 * i}]",
        }
        for i in range(4)
    ]
    dataset = exports.to_trl_dataset(exports.training_rows("one_stage", rows))
    loaded = adapters.prepare_model(
        ModelParams(name="builtin:tiny", backend="transformers"), SFTParams().lora, False, seed=0
    )
    loaded.model.eval()  # no dropout: the two losses must be equal
    assert training_trainer.choose_batching("auto", loaded).mode == "padded"  # sdpa on a CPU: no per-row kernel
    assert training_trainer.choose_batching("length_grouped", loaded).mode == "length_grouped"
    with pytest.raises(ValueError, match="unknown batching"):
        training_trainer.choose_batching("packed", loaded)
    losses = {}
    for mode in ("padded", "padding_free"):
        train = SFTParams(per_device_batch_size=4, max_length=512, report_to=[], batching=mode)
        args = training_trainer.training_arguments(
            "sft", train, tmp_path / mode, seed=0, device="cpu", dtype="float32", has_eval=False, batching=mode
        )
        trainer = training_trainer.make_trainer("sft", loaded, args, dataset, {}, batching=mode)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
        assert ("attention_mask" in batch) == (mode == "padded") and batch["input_ids"].shape[0] == (
            4 if mode == "padded" else 1
        )
        with torch.no_grad():
            losses[mode] = trainer.compute_loss(loaded.model, batch).item()
    assert losses["padded"] == pytest.approx(losses["padding_free"], rel=1e-5)


# ---- the memory arithmetic -------------------------------------------------------------------------------------
def test_memory_fit_and_derivation_by_hand():
    memory = bench_module("memory")
    shape = {
        "hidden_size": 1000,
        "intermediate_size": 1000,
        "num_hidden_layers": 10,
        "num_attention_heads": 10,
        "num_key_value_heads": 10,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
        "max_position_embeddings": 100_000,
    }
    total, embeddings = memory.parameter_counts(shape)
    # per layer: q, k, v, o 4 x 1000 x 1000, mlp 3 x 1000 x 1000, two norms 2 x 1000; embeddings 1000 x 1000; final norm
    assert (total, embeddings) == (10 * (7_000_000 + 2000) + 1_000_000 + 1000, 1_000_000)
    fit = memory.make_fit(
        "transformers", "sft", "hand", total, shape, "bfloat16", [(1000, 3 * 10**9), (2000, 4 * 10**9)]
    )
    assert fit.problem is None
    assert fit.bytes_per_token == pytest.approx(1e6) and fit.intercept == pytest.approx(2e9)
    assert fit.bytes_per_token_per_width == pytest.approx(1e6 / 10_000)
    budget = 9 * memory.GIB  # a 10 GiB GPU less a 1 GiB reserve
    assert memory.max_length(fit, shape, budget) == (9 * 2**30 - 2 * 10**9) // 10**6 == 7663
    assert memory.max_length(fit, shape, budget, batch=2) == 3831
    # twice the layers: twice the per-token bytes, and the parameters' bytes at the same rate per parameter
    deeper = {**shape, "num_hidden_layers": 20}
    deeper_total = memory.parameter_counts(deeper)[0]
    base = 2e9 / total * deeper_total
    assert memory.peak_estimate(fit, deeper, 100) == pytest.approx(base + 2e6 * 100)
    assert memory.max_length(fit, deeper, budget) == int((9 * 2**30 - base) // 2e6)
    # 4-bit: linear layers from 2 bytes to 4.127 bits a weight, embeddings kept 16-bit
    saving = (total - embeddings) * (2 - 4.127 / 8)
    assert memory.peak_estimate(fit, shape, 0, four_bit=True) == pytest.approx(2e9 - saving)
    # the cells: derived, with the measured lengths that fit on the measured shape
    cells = memory.derive([fit], budgets_gib=(4, 10), reserve_gib=1.0, min_length=2048, shapes={"hand": shape})
    ten = next(c for c in cells["per_shape"] if c["budget_gib"] == 10 and c["weights"] == "bfloat16")
    assert ten["max_length"] == 7663 and ten["label"] == "derived" and ten["measured_fits_at"] == 2000
    four = next(c for c in cells["per_shape"] if c["budget_gib"] == 4 and c["weights"] == "bfloat16")
    # 4 GiB: 3e9 measured at 1,000 tokens plus the reserve fits, 4e9 at 2,000 does not
    assert four["measured_fits_at"] == 1000 and four["max_length"] == (3 * 2**30 - 2 * 10**9) // 10**6 == 1221
    assert (
        next(c for c in cells["largest"] if c["budget_gib"] == 10 and c["weights"] == "bfloat16")["largest_shape"]
        == "hand"
    )


def test_a_memory_that_does_not_grow_is_not_derived_from():
    memory = bench_module("memory")
    shape = memory.SHAPES["1b"]
    fit = memory.make_fit("transformers", "dpo", "x", 10**9, shape, "bfloat16", [(256, 5 * 10**9), (512, 4 * 10**9)])
    assert "does not grow" in fit.problem
    assert memory.derive([fit])["per_shape"] == []
    with pytest.raises(ValueError, match="two sequence lengths"):
        memory.make_fit("transformers", "dpo", "x", 10**9, shape, "bfloat16", [(256, 5 * 10**9)])


def test_the_llama_shapes_have_their_published_parameter_counts():
    memory = bench_module("memory")
    counts = {name: memory.parameter_counts(shape)[0] for name, shape in memory.SHAPES.items()}
    assert counts == {"1b": 1_235_814_400, "3b": 3_212_749_824, "8b": 8_030_261_248}

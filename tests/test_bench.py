"""The performance suite in bench/: its CPU smoke run, the imposed output lengths and the ceilings' arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import floors
import formats
import lengths


def test_imposed_lengths_end_every_row_at_its_own_length(tiny_model_dir):
    import torch
    from reflect_stage import ImposedLengths
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    targets = [2, 7, 4]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=9,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        logits_processor=LogitsProcessorList([ImposedLengths(targets, 3, eos)]),
    )
    for row, target in zip(out[:, 3:].tolist(), targets):
        assert row.index(eos) == target - 1  # the target-th new token is the end token, none before


def test_length_table_keeps_the_papers_means():
    assert lengths.OUTPUT_MEANS["math"] == {"first_trial": 267, "reflection": 222, "second_trial": 299}
    import random

    rng = random.Random(0)
    draws = [lengths.output_length("logiqa", "reflection", rng) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 238) < 10  # log-normal spread around the mean, mean kept
    assert min(draws) >= lengths.MIN_TOKENS and max(draws) <= lengths.SPREAD_CAP * 238


def test_decode_ceilings_arithmetic():
    # 1e9 parameters in 2 bytes, 2 layers x 2 KV heads x 64 dims x K,V x 2 bytes = 1024 bytes of KV per token
    shape = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
    ceiling = floors.decode_ceilings(shape, 1_000_000_000, 2, batch=10, context=1000, bandwidth=2e12, flops=1e15)
    assert ceiling["kv_bytes_per_token"] == 1024
    # bytes per step: 2e9 + 10 x 1000 x 1024; 10 tokens per step at 2e12 bytes/s
    assert ceiling["bandwidth_ceiling_tok_s"] == pytest.approx(10 * 2e12 / (2e9 + 10_240_000), rel=1e-4)
    # FLOPs per step: 10 x (2e9 + 4 x 2 x 1000 x 256)
    assert ceiling["compute_ceiling_tok_s"] == pytest.approx(10 * 1e15 / (10 * (2e9 + 2_048_000)), rel=1e-4)
    assert floors.device_peaks("NVIDIA H200") == (4.8e12, 989e12)
    assert floors.device_peaks("NVIDIA A100-SXM4-80GB") == floors.DATASHEET_PEAKS["A100-SXM4-80GB"]
    assert floors.device_peaks("a CPU") is None


def test_suite_smoke_runs_every_part_and_reports_same_run_ratios(tmp_path, official_dir):
    out = tmp_path / "suite.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "suite.py"),
            "--smoke",
            "--official-dir",
            str(official_dir),
            "--peaks",
            "2e10,1e11",
            "--json",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    table = done.stdout
    gen = {row["way"]: row for row in report["generation"]["rows"]}
    assert set(gen) == {"naive", "plain-64", "engine:transformers", "engine:unsloth"}
    assert gen["plain-64"]["x_plain_64"] == 1.0
    for way in ("naive", "plain-64", "engine:transformers"):
        # every way generated the same records and, lengths being imposed, the same number of tokens
        assert gen[way]["records"] == gen["plain-64"]["records"] == report["generation"]["questions"] * 5
        assert gen[way]["generated_tokens"] == gen["plain-64"]["generated_tokens"]
        assert gen[way]["x_plain_64"] == pytest.approx(
            gen[way]["tokens_per_s"] / gen["plain-64"]["tokens_per_s"], abs=0.01
        )
        assert f"{way} (batch" in table
    assert "unavailable" in gen["engine:unsloth"]  # no GPU here: the row says why
    assert {row["way"] for row in report["ceilings"]["rows"]} == {"naive", "plain-64", "engine:transformers"}
    assert report["ceilings"]["peaks_from"] == "--peaks"
    assert report["length_mix"]["output_means_tokens"] == lengths.OUTPUT_MEANS
    training = {row["name"]: row for row in report["training"]["rows"]}
    assert {"sft padded", "sft padding-free", "dpo", "dpo precomputed ref", "sft unsloth padded", "dpo unsloth"} <= set(
        training
    )
    assert training["sft padded"]["ratio"] == training["dpo"]["ratio"] == 1.0
    assert training["sft unsloth padded"]["status"].startswith("unavailable")
    assert training["sft padding-free"]["padding_fraction"] == 0.0
    for name in ("sft padded", "sft padding-free", "dpo"):
        assert f"training   | {name} " in table
    # the derived paper-scale hours use the measured speeds: tokens / (tokens/s)
    hours = report["paper_scale"]["hours"]
    engine = gen["engine:transformers"]["tokens_per_s"]
    assert hours["generation, engine:transformers"] == pytest.approx(
        report["paper_scale"]["generated_tokens"] / engine / 3600, abs=0.06
    )
    assert "SFT epoch, sft padded" in hours and not any("memory" in key for key in hours)


def test_the_answer_format_bench_measures_every_way_of_asking(tmp_path, official_dir, tiny_model_dir):
    """bench/formats.py on the stand-in (fast; the figures in docs/benchmarks.md are the real model's): one
    row per way of asking and task, shares between 0 and 1, and the answer pre-fill makes every attempt
    state its answer in the task's syntax."""
    out = tmp_path / "formats.json"
    command = [sys.executable, str(REPO / "bench" / "formats.py"), "--official-dir", str(official_dir)]
    command += ["--model", "builtin:tiny", "--items", "1", "--max-new-tokens", "48", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["way"], row["task"]) for row in rows] == [
        (way, task) for way, _ in formats.WAYS for task in ("logiqa", "math", "mbpp", "bigbench")
    ]
    for row in rows:
        assert row["items"] == 1
        assert all(0 <= row[key] <= 1 for key in ("parseable", "accuracy official", "accuracy robust", "cut at limit"))
        assert row["accuracy official"] <= row["parseable"]
    assert "0-shot, 2 calls (Action: Finish[)" in result.stdout


def test_the_decode_step_bench_times_and_profiles_three_ways(tmp_path, tiny_model_dir):
    """bench/decode_step.py on a small model with grouped heads (the stand-in's shape, every query head on
    one key/value head, random weights): a row per rows x context with the three timings, two ratios and
    a logit difference at float32 rounding, and the profile's operator groups for each way."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_key_value_heads = 1
    torch.manual_seed(0)
    folder = tmp_path / "grouped"
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    command = [sys.executable, str(REPO / "bench" / "decode_step.py"), "--model", str(folder)]
    command += ["--rows", "2,4", "--contexts", "24", "--repeats", "2", "--threads", "1", "--profile"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({config.num_attention_heads} per group)" in result.stdout
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    timings = [cells for cells in rows if cells[0].strip().isdigit()]  # not the header rows
    steps = [cells for cells in timings if len(cells) == 8]
    assert [(int(c[0]), int(c[1])) for c in steps] == [(2, 24), (4, 24)]
    for cells in steps:
        assert all(float(cell) > 0 for cell in cells[2:7]) and float(cells[7]) < 1e-4
    profiled = [cells for cells in timings if len(cells) == 7]
    assert [c[2].strip() for c in profiled] == ["SDPA", "grouped", "reserved"] * 2

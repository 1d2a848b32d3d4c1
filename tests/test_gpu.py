"""What only a CUDA GPU can check: the Unsloth paths, 16-bit random built-ins, the memory-sized batches.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with ``pytest tests/test_gpu.py``.
The Unsloth tests also need the ``gpu`` extra (unsloth) installed, and each runs in its own process,
since importing Unsloth patches transformers and TRL for the whole process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_unsloth = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None,
    reason="needs a CUDA GPU and the unsloth package",
)


def run_python(code: str, timeout: float = 1200) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_gpu
def test_loop_decoder_on_gpu_gives_generates_greedy_texts_and_samples_independent_of_rows():
    import dataclasses

    from reflectevo.config import ModelParams
    from reflectevo.generation.engines import TransformersEngine
    from reflectevo.generation.requests import GenerationRequest, GenerationSettings
    from reflectevo.models.loading import load_model

    loaded = load_model(ModelParams(name="builtin:tiny", device="cuda", dtype="float32"))
    requests = [
        GenerationRequest(f"q{i}", [{"role": "user", "content": "word " * i + "What is 2 + 3?"}]) for i in range(12)
    ]
    greedy = GenerationSettings(max_new_tokens=24)
    engines = {}
    for decoder in ("generate", "loop"):
        engines[decoder] = TransformersEngine(loaded.model, loaded.tokenizer, batch_size=12, progress=False)
        engines[decoder].decoder = decoder
    texts = {name: [o.text for o in made.generate(requests, greedy, stage="s")] for name, made in engines.items()}
    assert texts["loop"] == texts["generate"]
    sampling = GenerationSettings(max_new_tokens=24, n=3, temperature=0.7, seed=1)
    windowed = TransformersEngine(loaded.model, loaded.tokenizer, batch_size=36, progress=False)
    windowed.decode_options = dataclasses.replace(windowed.decode_options, max_rows=7)
    whole = TransformersEngine(loaded.model, loaded.tokenizer, batch_size=36, progress=False)
    assert windowed.generate(requests, sampling, stage="s") == whole.generate(requests, sampling, stage="s")


@needs_gpu
def test_shared_prefill_on_gpu_gives_the_same_greedy_text_as_separate_prefills():
    from reflectevo.config import ModelParams
    from reflectevo.generation.engines import TransformersEngine
    from reflectevo.generation.requests import GenerationRequest, GenerationSettings
    from reflectevo.models.loading import load_model

    loaded = load_model(ModelParams(name="builtin:tiny", device="cuda", dtype="float32"))
    requests = [
        GenerationRequest(f"q{i}", [{"role": "user", "content": "word " * i + "What is 2 + 3?"}]) for i in range(6)
    ]
    settings = GenerationSettings(max_new_tokens=24, n=3, temperature=0.7, seed=1)
    texts = {}
    for shared in (False, True):
        engine = TransformersEngine(loaded.model, loaded.tokenizer, batch_size=18, progress=False)
        engine.decoder, engine.shared_prefill = "generate", shared
        texts[shared] = [o.text for o in engine.generate(requests, settings, stage="s")]
    assert texts[True] == texts[False]


@needs_gpu
def test_auto_batch_size_plans_wide_batches_and_cuts_calls_to_memory():
    from reflectevo.config import ModelParams
    from reflectevo.generation.base import AUTO_MAX_BATCH
    from reflectevo.generation.engines import TransformersEngine
    from reflectevo.generation.requests import GenerationSettings
    from reflectevo.models.loading import load_model

    loaded = load_model(ModelParams(name="builtin:random-1b", device="cuda", dtype="bfloat16"))
    engine = TransformersEngine(loaded.model, loaded.tokenizer, batch_size="auto", progress=False)
    assert engine.batch_size == AUTO_MAX_BATCH and engine.memory_budget is not None
    settings = GenerationSettings(max_new_tokens=256)
    assert engine.rows_that_fit(100, settings) > engine.rows_that_fit(4000, settings) >= 1


@needs_unsloth
def test_unsloth_loads_a_random_builtin_from_its_saved_copy_and_generates():
    result = run_python("""
        import unsloth, json
        from reflectevo.config import GenerationParams, ModelParams
        from reflectevo.generation.requests import GenerationRequest, GenerationSettings
        from reflectevo.generation.engines import make_engine
        from reflectevo.models.loading import load_model
        loaded = load_model(ModelParams(name="builtin:random-1b", backend="unsloth", device="cuda", dtype="bfloat16"))
        engine = make_engine(GenerationParams(batch_size=8), loaded, progress=False)
        outputs = engine.generate([GenerationRequest(f"q{i}", [{"role": "user", "content": "hello " * i}]) for i in range(8)],
                                  GenerationSettings(max_new_tokens=16, min_new_tokens=16), stage="s")
        print(json.dumps({"backend": loaded.backend, "engine": engine.name, "source": loaded.source,
                          "tokens": [o.new_tokens for o in outputs]}))
    """)
    assert result["backend"] == "unsloth" and result["engine"] == "unsloth"
    assert "random-1b-bfloat16" in result["source"]
    assert result["tokens"] == [16] * 8


@needs_unsloth
def test_suite_runs_both_backends_on_the_gpu(tmp_path, official_dir):
    out = tmp_path / "suite.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "suite.py"),
            "--model",
            "builtin:random-1b",
            "--questions",
            "16",
            "--length-scale",
            "0.25",
            "--train-steps",
            "4",
            "--official-dir",
            str(official_dir),
            "--json",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    ways = {row["way"]: row for row in report["generation"]["rows"]}
    assert "tokens_per_s" in ways["engine:unsloth"], ways["engine:unsloth"]
    assert report["ceilings"]["peaks_from"] == "datasheet"

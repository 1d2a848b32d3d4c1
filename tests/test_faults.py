"""Killed runs lose nothing: every stage SIGKILLed at seeded points, rerun, compared with an uninterrupted run.

The harness is ``tests/faults.py``: a stage's notebook runs in a forked child with wrappers around
the fault points (file renames, fsyncs, ``torch.save``, safetensors writes, generation chunks,
optimizer steps); the child kills itself at a chosen point. For every stage of ``params/smoke.yaml``
an uninterrupted reference run lists its points, ``KILLS`` of them are drawn with ``SEED + stage``,
and the stage is run again from the reference's state before it, killed once at each drawn point,
then finished. A failure message names the seed: ``python tests/faults.py replay --stage NN --seed S``
repeats it. More kills: ``REFLECTEVO_FAULT_KILLS=8 pytest tests/test_faults.py``.

Afterwards: data stages (01 data, 02 generation and curation, 05 evaluation) are byte-identical to
the reference, files and manifest hashes; training stages (03, 04) hold the same adapter and
checkpoint tensors bit for bit (CPU, fp32), the same steps and tokens, and the same held-out loss
(to 1e-4 relative: evaluations on CPU are not bit-reproducible across processes); after every kill nothing visible is half-written
(JSONL, JSON, adapters, datasets all read back), and once the rerun finished no temporary file
is left and no sandbox process survives.
"""

from __future__ import annotations

import os

import faults
import pytest

KILLS = int(os.environ.get("REFLECTEVO_FAULT_KILLS", "2"))
SEED = int(os.environ.get("REFLECTEVO_FAULT_SEED", "20261126"))


@pytest.fixture(scope="module")
def zygote(tiny_model_dir):
    forked = faults.Zygote()
    yield forked
    forked.close()


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory):
    """The smoke recipe run once, uninterrupted, stage by stage (a copy kept before each stage)."""
    return faults.reference_run(zygote, tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("stage", faults.STAGES)
def test_a_killed_stage_reruns_to_the_uninterrupted_result(zygote, reference, stage, tmp_path):
    seed = SEED + faults.STAGES.index(stage)
    chain = faults.fault_stage(zygote, reference, stage, KILLS, seed, tmp_path)
    print(
        f"{stage}: {len(reference.traces[stage])} fault points; killed at {chain.landed}; "
        f"runs {[(run.returncode, run.seconds) for run in chain.runs]}; uninterrupted {reference.seconds[stage]} s"
    )
    assert chain.landed, f"no kill landed in {stage}; replay: {chain.replay()}"
    found = faults.differences(reference.root, chain.cwd, stage)
    assert not found, (
        f"{stage} after kills at {chain.landed} differs from the uninterrupted run "
        f"(replay: {chain.replay()}):\n" + "\n".join(found)
    )
    assert not faults.sandbox_strays()
    assert not (chain.cwd / "outputs" / "smoke" / ".lock").exists(), "the finished rerun kept the lock"


def test_every_kind_of_fault_point_is_reached(reference):
    """The points the kills are drawn from cover generation, curation, training and evaluation writes."""
    kinds = {stage: {signature.split("|")[0] for signature in trace} for stage, trace in reference.traces.items()}
    assert {"replace", "fsync"} <= kinds["01_data"]
    assert {"generate", "replace", "fsync"} <= kinds["02_reflect"]
    assert any("/curated/" in s or "/datasets/" in s for s in reference.traces["02_reflect"])
    for stage in ("03_sft", "04_dpo"):
        assert {"step_end", "torch.save", "safetensors", "replace"} <= kinds[stage], kinds[stage]
    assert {"generate", "replace"} <= kinds["05_eval"]


def test_the_same_params_and_seed_give_byte_identical_data_and_metrics(reference, smoke_papermill_run):
    """Two runs of params/smoke.yaml on CPU, one through raw papermill, one cell by cell in a plain process:
    their manifests record the same sha256 for every split, raw record file, curated set, training dataset,
    prediction and metrics table, and the same LoRA tensors (the files on disk match the recorded hashes)."""
    from reflectevo.core.files import file_sha256
    from reflectevo.runs.plan import read_manifest

    runs = [root / "outputs" / "smoke" for root in (reference.root, smoke_papermill_run)]
    manifests = [read_manifest(run) for run in runs]
    for run, manifest in zip(runs, manifests):
        for stage in faults.STAGES:
            for name, recorded in manifest["stages"][stage]["outputs"].items():
                assert file_sha256(run / name) == recorded["sha256"], f"{run}/{name} changed after it was recorded"
    compared = 0
    for stage in faults.STAGES:
        outputs = [manifest["stages"][stage]["outputs"] for manifest in manifests]
        assert outputs[0].keys() == outputs[1].keys(), stage
        assert manifests[0]["stages"][stage]["identity"] == manifests[1]["stages"][stage]["identity"]
        for name in outputs[0]:
            if stage in faults.DATA_STAGES or name.endswith(("adapter_model.safetensors", "adapter_config.json")):
                assert outputs[0][name]["sha256"] == outputs[1][name]["sha256"], (
                    f"{stage}: {name} differs between two runs"
                )
                compared += 1
        if stage in faults.TRAINING_STAGES:
            losses = [
                {
                    phase: {k: v["after"] for k, v in entry["evaluation"].items() if k.endswith("_loss")}
                    for phase, entry in manifest["stages"][stage]["training"].items()
                }
                for manifest in manifests
            ]
            assert faults.same_metrics(*losses), f"{stage}: held-out metrics differ by more than {faults.METRIC_RTOL}"
    print(f"{compared} output files byte-identical across the two runs")
    recorded = {stage: set(manifests[0]["stages"][stage]["outputs"]) for stage in faults.STAGES}
    assert {
        f"data/{task}/{split}.jsonl"
        for task in ("logiqa", "math", "mbpp", "bigbench")
        for split in ("train", "validation", "test")
    } <= recorded["01_data"]
    assert {"reflect/raw.jsonl", "reflect/curated/d_plus.jsonl", "reflect/curated/d_pm.jsonl"} <= recorded["02_reflect"]
    assert any(name.startswith("reflect/datasets/") for name in recorded["02_reflect"])
    assert {"eval/predictions.jsonl", "eval/results.json", "eval/summary.csv"} <= recorded["05_eval"]

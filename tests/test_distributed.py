"""Data-parallel generation (reflectevo.cli.generate): processes split a stage's generation and end with
the bytes one process writes.

The launch test starts two real CPU processes with ``accelerate launch`` (gloo); the others split the
work between threads of this process, through the same ProcessGroup interface, which is cheaper and
still has two writers sharing one store for real.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import clone_run, start_lock_holder

from reflectevo.cli import generate as distributed
from reflectevo.cli.generate import ProcessGroup, check_launch, generate_stage
from reflectevo.config import ModelParams
from reflectevo.errors import DistributedError, GenerationError, RunLockedError, StageError
from reflectevo.generation.base import BatchedEngine
from reflectevo.generation.engines import make_engine
from reflectevo.generation.requests import GenerationRequest, GenerationSettings
from reflectevo.generation.store import create_once
from reflectevo.runs.plan import read_manifest
from reflectevo.runs.rundir import RunDir

BIN = Path(sys.executable).parent
LAUNCH = [
    str(BIN / "accelerate"),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]  # with no GPU visible: 2 CPU processes, gloo


def write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


def store_files(folder: Path) -> dict[str, bytes]:
    """Every batch and plan file under a store, by relative path (shard ledgers left out)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith("shard-")
    }


def ledgers(step: Path, world_size: int) -> list[dict]:
    return [json.loads((step / f"shard-{rank}-of-{world_size}.json").read_text()) for rank in range(world_size)]


def thread_groups(world_size: int, barrier: threading.Barrier | None = None) -> list[ProcessGroup]:
    """One ProcessGroup per thread: a real barrier, objects passed through shared slots (copied, as
    pickling between processes would)."""
    barrier = barrier or threading.Barrier(world_size, timeout=120)
    slots: list = [None] * world_size

    def group(rank: int) -> ProcessGroup:
        def broadcast(value):
            if rank == 0:
                slots[0] = value
            barrier.wait()
            result = copy.deepcopy(slots[0]) if rank else value
            barrier.wait()
            return result

        def gather(value):
            slots[rank] = value
            barrier.wait()
            result = list(slots)
            barrier.wait()
            return result

        return ProcessGroup(rank, world_size, barrier.wait, broadcast, gather, f"{world_size} threads")

    return [group(rank) for rank in range(world_size)]


def run_threads(work, world_size: int) -> list:
    """``work(group)`` in one thread per rank; the results in rank order, or the first error raised."""
    barrier = threading.Barrier(world_size, timeout=120)
    groups = thread_groups(world_size, barrier)
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def target(group: ProcessGroup) -> None:
        try:
            results[group.rank] = work(group)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(exc)
            barrier.abort()  # the others must not wait for this worker at the barrier

    threads = [threading.Thread(target=target, args=(group,)) for group in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


@pytest.fixture
def one_torch_thread():
    """One intra-op thread while a test generates in this process, as each launched process has
    (OMP_NUM_THREADS=1): parallel regions of several threads or processes on a few busy cores wait on
    each other many times over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- two processes under accelerate launch ---------------------------------------------------------
def test_two_processes_fill_the_reflect_store_with_the_bytes_of_one(smoke_reflect_run, tmp_path, one_torch_thread):
    """`accelerate launch` (2 CPU processes) fills stage 02's store; every file is byte-identical to what
    the single-process notebook run wrote, each process generated its own share, and a rerun after a
    batch went missing (a process killed before committing it) generates only that one."""
    from reflectevo.reflection.pipeline import reflection_store_dir

    params = clone_run(smoke_reflect_run, tmp_path, "parallel")
    identity = read_manifest(params.run_dir)["stages"]["02_reflect"]["identity"]
    reference = reflection_store_dir(smoke_reflect_run / "outputs" / "smoke" / "reflect", identity)
    store = reflection_store_dir(params.run_dir / "reflect", identity)
    assert store_files(reference)  # the notebook's run, in one process
    shutil.rmtree(store)
    file = write_params(params, tmp_path / "parallel.yaml")

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [*LAUNCH, "-m", "reflectevo", "generate", str(file), "--stage", "reflect"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 processes (DistributedType.MULTI_CPU, gloo)" in result.stdout
    assert store_files(store) == store_files(reference)

    steps = sorted(path.parent for path in store.rglob("plan.json"))
    assert [step.name for step in steps] == ["first_trial", "judge", "reflection", "second_trial"]
    for step in steps:
        planned = json.loads((step / "plan.json").read_text())["num_batches"]
        shares = ledgers(step, 2)
        assert [share["shard_index"] for share in shares] == [0, 1] and shares[0]["pid"] != shares[1]["pid"]
        assert all(share["resumed"] == [] for share in shares)
        for rank, share in enumerate(shares):  # each rank generated exactly its own share, and nothing else
            assert share["generated"] == list(range(rank, planned, 2)) and share["generated"], (step.name, shares)

    manifest = read_manifest(params.run_dir)
    event = manifest["events"][-1]
    assert (
        event["kind"] == "generation" and event["world_size"] == 2 and [p["rank"] for p in event["processes"]] == [0, 1]
    )
    assert not (params.run_dir / ".lock").exists()  # the main process released the run

    # A process killed while writing its last second-trial batch: the batch is missing, a temporary file is
    # left. How many batches each step has depends on what the stand-in wrote (which answers failed, how many
    # reflections succeeded), so the expectation comes from the plans, not from one build's counts.
    planned = {step.name: json.loads((step / "plan.json").read_text())["num_batches"] for step in steps}
    killed = sorted((store / "second_trial").glob("batch-*.jsonl"))[-1]
    killed.unlink()
    leftover = store / "second_trial" / f".{killed.name}.abcd1234.tmp"
    leftover.write_text('{"half": ')
    lines: list[str] = []
    summary = generate_stage(params, "reflect", params_file=file, out=lines.append)  # one process now
    steps_run = summary["processes"][0]["steps"]
    assert {name: (stats["batches_run"], stats["batches_resumed"]) for name, stats in steps_run.items()} == {
        name: (1, count - 1) if name == "second_trial" else (0, count) for name, count in planned.items()
    }
    assert not leftover.exists()
    assert store_files(store) == store_files(reference)


# ---- the same split between threads: the eval stage, a store that is not shared ----------------------
def test_eval_split_between_two_workers_equals_one(smoke_reflect_run, tmp_path, one_torch_thread):
    """Stage 05's calls (first turns, then the base model's reflections and second turns under the oracle
    protocol, whose gate is the verdicts, and the oracle-free one), split between two workers, write
    the store one worker writes; each did its own share."""
    params = clone_run(
        smoke_reflect_run,
        tmp_path,
        "eval-split",
        {
            "data": {
                "source": "samples",
                "tasks": ["logiqa", "math"],
                "max_items": {"train": 8, "validation": 2, "test": 2},
            },
            "generation": {"batch_size": 2, "max_new_tokens": 16},
            "eval": {
                "variants": ["base"],
                "protocols": ["oracle", "oracle_free"],
                "fewshots": 0,
                "max_new_tokens": 16,
                "reflection_max_new_tokens": 16,
            },
        },
    )
    run = RunDir(params, params.run_dir)
    alone = distributed.generate_eval(params, run, tmp_path / "alone", thread_groups(1)[0])
    shares = run_threads(lambda group: distributed.generate_eval(params, run, tmp_path / "split", group), 2)
    assert store_files(tmp_path / "split") == store_files(tmp_path / "alone")
    first = tmp_path / "split" / "first_turn" / "base"
    planned = json.loads((first / "plan.json").read_text())["num_batches"]
    assert planned >= 2 and [share["generated"] for share in ledgers(first, 2)] == [
        list(range(0, planned, 2)),
        list(range(1, planned, 2)),
    ]
    for name, stats in alone.items():  # together the workers generated what one worker generated alone
        assert shares[0][name]["batches_run"] + shares[1][name]["batches_run"] == stats["batches_run"], name


def test_workers_that_do_not_share_the_store_folder_are_stopped(tmp_path, one_torch_thread):
    """Each worker writes its share into its own folder (as on machines without a shared file system):
    neither can read the other's batches back, and both say why."""
    loaded = [distributed_model() for _ in range(2)]
    requests = [GenerationRequest(f"q{i}", [{"role": "user", "content": "word " * i + "?"}]) for i in range(6)]
    settings = GenerationSettings(max_new_tokens=4)

    def work(group: ProcessGroup) -> str:
        engine = distributed.data_parallel(make_engine(params_generation(), loaded[group.rank], progress=False), group)
        with pytest.raises(GenerationError) as stopped:
            engine.generate(requests, settings, stage="first_trial", store_dir=tmp_path / f"machine-{group.rank}")
        return str(stopped.value)

    for rank, message in enumerate(run_threads(work, 2)):
        assert f"machine-{rank}" in message and "file system that every machine of the launch shares" in message


def distributed_model():
    from reflectevo.models.loading import load_model

    return load_model(ModelParams(name="builtin:tiny", backend="transformers", device="cpu", dtype="float32"))


def params_generation():
    from reflectevo.config import GenerationParams

    return GenerationParams(engine="transformers", batch_size=2)


# ---- what is refused, before anything loads ------------------------------------------------------------
def test_a_launch_that_cannot_plan_the_same_batches_everywhere_is_refused(smoke_reflect_run, tmp_path):
    params = clone_run(smoke_reflect_run, tmp_path, "refused")

    def with_generation(**changes):
        return params.model_copy(update={"generation": params.generation.model_copy(update=changes)})

    for changes, message in (
        ({"batch_size": "auto"}, "set generation.batch_size to a number"),
        ({"num_shards": 2}, "leave num_shards at 1"),
        ({"engine": "vllm"}, "vllm_tensor_parallel_size"),
    ):
        with pytest.raises(DistributedError, match=message):
            check_launch(with_generation(**changes), "reflect", 2)
    check_launch(with_generation(batch_size="auto"), "reflect", 1)  # alone, "auto" is fine
    with pytest.raises(DistributedError, match="switches LoRA adapters"):
        check_launch(with_generation(engine="vllm"), "eval", 1)
    with pytest.raises(DistributedError, match="a run of one round"):
        check_launch(params.model_copy(update={"evolve": params.evolve.model_copy(update={"rounds": 2})}), "reflect", 2)
    with pytest.raises(GenerationError, match="set generation.batch_size to a number"):
        BatchedEngine(batch_size="auto").data_parallel(0, 2, lambda: None)

    # stale upstream: the data section changed since stage 01 ran; nothing in the run is touched
    stale = params.model_copy(update={"data": params.data.model_copy(update={"tasks": ["logiqa"]})})
    before = (params.run_dir / "manifest.json").read_bytes()
    with pytest.raises(StageError, match="01_data, which is out of date"):
        generate_stage(stale, "reflect", out=lambda line: None)
    assert (params.run_dir / "manifest.json").read_bytes() == before
    # stage 05 needs 03 and 04, as `reflectevo run` does: its store is named after them
    with pytest.raises(StageError, match="needs 03_sft, which has not finished"):
        generate_stage(params, "eval", out=lambda line: None)

    # a run another process is writing is left alone
    holder = start_lock_holder(params.run_dir, 60)
    try:
        with pytest.raises(RunLockedError, match="is being written"):
            generate_stage(params, "reflect", out=lambda line: None)
    finally:
        holder.kill()
        holder.wait()


def test_a_file_created_once_by_racing_writers_is_whole_and_written_once(tmp_path):
    path = tmp_path / "plan.json"
    texts = [json.dumps({"writer": i, "pad": "x" * 100_000}) + "\n" for i in range(8)]
    won: list[bool] = [False] * len(texts)
    start = threading.Barrier(len(texts))

    def write(i: int) -> None:
        start.wait()
        won[i] = create_once(path, texts[i])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(won) == 1 and path.read_text() == texts[won.index(True)]
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind

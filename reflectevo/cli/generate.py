"""Data-parallel generation: the reflect (02) and eval (05) stages' generation, split between processes.

    accelerate launch --multi_gpu --num_processes 8 -m reflectevo generate params/llama3-8b.yaml --stage reflect
    reflectevo run params/llama3-8b.yaml          # finds every batch committed: merges and curates

One process per GPU, on one machine or many (``--num_machines``): every process loads the model,
plans the same batches (the plan and each batch's sampling seed depend only on the record keys, the
prompts and the batch size) and generates its share, batch index % processes == its rank, into the
stage's generation store. After each step (first trials, reflections, second trials, ...) the
processes wait for each other and every one reads the whole step back, so the next, dependent step
plans the same requests everywhere. The store is the one the stage's notebook uses, so the ordinary
single-process ``reflectevo run`` afterwards finds every batch committed and only merges, grades
and writes; its outputs are those of a run in one process, byte for byte, on the same hardware.

Only the main process (rank 0) writes run files: it takes the run's lock (so no ``reflectevo run``
can write the run meanwhile), checks the upstream stages, and records the launch in the manifest.
The other processes only add batches to the store, which therefore has to be on a file system every
machine shares. Each finished batch is committed on its own, so a launch that was stopped resumes:
a second launch (with any number of processes) generates only the missing batches.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflectevo.cli.run import make_plan, notebooks_dir
from reflectevo.config import Params
from reflectevo.data.prepare import eval_exclusions
from reflectevo.errors import DistributedError, MainProcessStopped, ReflectEvoError, StageError
from reflectevo.evaluation.evaluator import Evaluator, evaluation_store_dir
from reflectevo.evaluation.variants import ModelPool, dpo_base_model, plan_variants
from reflectevo.generation.base import BatchedEngine
from reflectevo.models.loading import select_backend
from reflectevo.reflection.pipeline import load_items, make_sandbox, reflection_store_dir
from reflectevo.reflection.stage import build_reflector, judge_pairs, stage_judge
from reflectevo.runs.rundir import RunDir, open_run
from reflectevo.runs.stages import STAGES, get_stage

STAGE_KEYS = {"reflect": "02_reflect", "eval": "05_eval"}
# A process that finished its share waits at the barrier for the slowest one; on a resumed launch
# that can be a whole stage's generation, far beyond torch.distributed's default timeout.
BARRIER_TIMEOUT = _dt.timedelta(hours=48)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among those a launcher started, and the few collective steps needed."""

    rank: int
    world_size: int
    barrier: Callable[[], None]
    broadcast: Callable[[Any], Any]  # every process gets the main process's object
    gather: Callable[[Any], list[Any]]  # every process gets one object from each process, in rank order
    description: str = "one process"
    close: Callable[[], None] = lambda: None  # leaves the group (a process exiting inside one can abort)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (it downloads or builds what the others then find
        cached); the others run it together afterwards."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def launched_world_size() -> int:
    """How many processes ``accelerate launch`` or ``torchrun`` started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group() -> ProcessGroup:
    """The process group of this launch, through accelerate's ``PartialState`` (gloo on CPUs, NCCL on
    GPUs, where it also selects this process's GPU); a single process without a launcher is rank 0 of 1."""
    if launched_world_size() <= 1:
        return ProcessGroup(0, 1, lambda: None, lambda value: value, lambda value: [value])
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    if state.num_processes != launched_world_size():
        raise DistributedError(
            f"the launcher started {launched_world_size()} processes, but accelerate sees "
            f"{state.num_processes} ({state.distributed_type}); launch with accelerate launch or torchrun"
        )

    def broadcast(value: Any) -> Any:
        return broadcast_object_list([value], from_process=0)[0]

    def gather(value: Any) -> list[Any]:
        return gather_object([value])

    def close() -> None:
        with contextlib.suppress(RuntimeError):  # leaving must not hide the error a process is exiting with
            state.destroy_process_group()

    return ProcessGroup(
        state.process_index,
        state.num_processes,
        state.wait_for_everyone,
        broadcast,
        gather,
        f"{state.num_processes} processes ({state.distributed_type}, {state.backend})",
        close,
    )


def check_launch(params: Params, stage: str, world_size: int) -> None:
    """Refuse what cannot work before anything loads: every process must plan the same batches."""
    if stage not in STAGE_KEYS:
        raise DistributedError(
            f"unknown stage {stage!r}; reflectevo generate fills the stores of: {', '.join(STAGE_KEYS)}"
        )
    if params.evolve.rounds > 1:
        raise DistributedError(
            f"reflectevo generate fills the stores of a run of one round; this one has "
            f"{params.evolve.rounds} (evolve.rounds): run it with reflectevo run"
        )
    engine = params.generation.engine
    if engine == "replay":
        raise DistributedError(
            "generation.engine is replay: its outputs are stored already, there is nothing to generate; "
            "run the stage with reflectevo run"
        )
    if stage == "eval" and engine == "vllm":
        raise DistributedError(
            "stage 05 switches LoRA adapters on a loaded model, which engine vllm cannot: use "
            "generation.engine auto, transformers or unsloth"
        )
    if world_size > 1 and engine == "vllm":
        raise DistributedError(
            f"engine vllm spreads one model over several GPUs itself: run reflectevo generate as one "
            f"process with generation.vllm_tensor_parallel_size set to the number of GPUs, not under a "
            f"launcher with {world_size} processes"
        )
    if world_size > 1 and params.generation.batch_size == "auto":
        raise DistributedError(
            f"generation.batch_size is 'auto', which each of the {world_size} processes would size from "
            "its own free memory, planning different batches: set generation.batch_size to a number "
            "(an earlier run's manifest records the size 'auto' chose, under generation)"
        )
    if world_size > 1 and params.generation.num_shards > 1:
        raise DistributedError(
            "generation.num_shards splits a stage by hand; under a launcher the processes split it "
            "themselves: leave num_shards at 1 (and shard_index at 0)"
        )


def data_parallel(engine: Any, group: ProcessGroup) -> Any:
    """Make ``engine`` generate its share of every call and return the whole outputs (a no-op alone)."""

    if group.world_size == 1:
        return engine
    if not isinstance(engine, BatchedEngine):
        raise DistributedError(
            f"engine {getattr(engine, 'name', type(engine).__name__)!r} cannot split its work between processes"
        )
    engine.data_parallel(group.rank, group.world_size, group.barrier)
    return engine


def check_upstream(params: Params, stage_key: str, notebooks: str | Path | None = None) -> None:
    """Every stage ``stage_key`` reads must have finished with these params, exactly as ``reflectevo run``
    requires (its own plan decides): the store is named after their identities, so generating before
    them, or after their params changed, would fill a store that the run then never reads."""

    try:
        make_plan(params, notebooks_dir(notebooks), stages=[get_stage(stage_key).number])
    except StageError as exc:
        earlier = ",".join(stage.number for stage in STAGES if stage.number < get_stage(stage_key).number)
        raise StageError(
            f"{exc}. reflectevo generate fills the store of {stage_key} alone: bring the stages before it "
            f"up to date first (reflectevo run PARAMS --stages {earlier}; finished stages are skipped)"
        ) from None


def store_dir_of(params: Params, run: RunDir, stage_key: str) -> Path:
    """The generation store the stage's notebook will read (the same functions compute both)."""
    folder = params.run_dir / get_stage(stage_key).folder
    if stage_key == "02_reflect":
        return reflection_store_dir(folder, run.stage_identity(stage_key))

    return evaluation_store_dir(folder, params, run.manifest())


def generate_stage(
    params: Params,
    stage: str,
    *,
    params_file: str | Path | None = None,
    notebooks: str | Path | None = None,
    group: ProcessGroup | None = None,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fill the generation store of ``stage`` ("reflect" or "eval"), split between the launched processes.

    Returns, on every process, what each process generated and resumed (per generation step).
    """

    check_launch(params, stage, group.world_size if group is not None else launched_world_size())
    select_backend(params.model.backend)  # Unsloth, when chosen, must be imported before transformers
    if group is not None:
        return _generate_stage(params, stage, params_file, notebooks, group, out)
    group = process_group()
    try:
        return _generate_stage(params, stage, params_file, notebooks, group, out)
    finally:
        group.close()


def _generate_stage(
    params: Params,
    stage: str,
    params_file: str | Path | None,
    notebooks: str | Path | None,
    group: ProcessGroup,
    out: Callable[[str], None],
) -> dict[str, Any]:
    stage_key = STAGE_KEYS[stage]
    run: RunDir | None = None
    failure: ReflectEvoError | None = None
    prepared: dict[str, Any] = {}
    if group.is_main:
        try:
            check_upstream(params, stage_key, notebooks)  # before the run is touched
            run = open_run(
                params, params_file=params_file, command=f"reflectevo generate {params_file or ''} --stage {stage}"
            )
            check_upstream(params, stage_key, notebooks)  # again under the lock: no other writer can change it now
            if stage_key == "05_eval":
                eval_variants(params, run)  # a variant without its adapter fails here, before any model loads
            prepared = {"store_dir": str(store_dir_of(params, run, stage_key))}
        except ReflectEvoError as exc:
            failure, prepared = exc, {"error": f"{type(exc).__name__}: {exc}"}
            if run is not None:
                run.close()
    prepared = group.broadcast(prepared)
    if failure is not None:
        raise failure
    if "error" in prepared:
        raise MainProcessStopped(f"process {group.rank}: the main process stopped ({prepared['error']})")
    try:
        store_dir = Path(prepared["store_dir"])
        if group.is_main:
            out(f"stage {stage_key}: {group.description} generate into {store_dir}")
        reader = run if run is not None else RunDir(params, params.run_dir)  # the other processes only read the run
        started = time.monotonic()
        steps = (generate_reflect if stage_key == "02_reflect" else generate_eval)(params, reader, store_dir, group)
        shares = group.gather({"rank": group.rank, "host": socket.gethostname(), "steps": steps})
        summary = {
            "stage": stage_key,
            "store": str(store_dir),
            "world_size": group.world_size,
            "seconds": round(time.monotonic() - started, 2),
            "processes": shares,
        }
        if run is not None:
            run.add_event(
                {
                    "kind": "generation",
                    **summary,
                    "note": f"generated by `reflectevo generate --stage {stage}`; the stage's notebook merges it",
                }
            )
            for share in shares:
                generated = sum(int(stats["batches_run"]) for stats in share["steps"].values())
                resumed = sum(int(stats["batches_resumed"]) for stats in share["steps"].values())
                out(
                    f"  process {share['rank']} on {share['host']}: {generated} batches generated, {resumed} found "
                    f"committed, over {len(share['steps'])} generation steps"
                )
            out(f"every batch is in {store_dir}; now run the stage as usual (reflectevo run PARAMS): it merges them")
        return summary
    finally:
        if run is not None:
            run.close()


def eval_variants(params: Params, run: RunDir) -> list[Any]:
    """The variants stage 05 evaluates, as its notebook plans them (the main process merges the SFT
    model DPO started from, when needed, before the others ask)."""

    return plan_variants(params, params.run_dir, run.manifest(), dpo_base=dpo_base_model(params, run))


def generate_reflect(params: Params, run: RunDir, store_dir: Path, group: ProcessGroup) -> dict[str, Any]:
    """Notebook 02's generation calls, built as the notebook builds them: the four steps of the pipeline,
    then the judge's comparisons (an endpoint judge is left to the notebook: it is not ours to split)."""
    items = load_items(params.run_dir / get_stage("01_data").folder, params.data.tasks, params.reflect.split)
    reflector = build_reflector(
        params,
        store_dir,
        list(items),
        progress=group.is_main,
        on_engine=lambda engine: data_parallel(engine, group),
        share_verdicts=group.broadcast,
        loading=group.main_first,
    )
    engine = reflector.engine
    records = reflector.pipeline.run(items).records
    if params.reflect.judge.kind == "openai":
        return dict(engine.stats)
    with group.main_first():
        judge = stage_judge(params, engine, store_dir, progress=group.is_main)
    if judge.engine is not engine:  # a local judge model: split too
        data_parallel(judge.engine, group)
    judge_pairs(params, records, judge)
    return {**engine.stats, **judge.engine.stats}


def generate_eval(params: Params, run: RunDir, store_dir: Path, group: ProcessGroup) -> dict[str, Any]:
    """Notebook 05's generation calls: every variant under every protocol, first turns shared."""

    # a task without eval items stops here unless data.allow_empty_eval names it, as in notebook 05
    excluded = eval_exclusions(params.run_dir / get_stage("01_data").folder, params)
    items = {
        task: rows
        for task, rows in load_items(
            params.run_dir / get_stage("01_data").folder, params.data.tasks, params.eval.split
        ).items()
        if task not in excluded
    }
    variants = eval_variants(params, run)
    pool = ModelPool(params, progress=group.is_main, on_engine=lambda engine: data_parallel(engine, group))
    evaluator = Evaluator(
        params, pool, store_dir, sandbox=make_sandbox(params, params.data.tasks), share_verdicts=group.broadcast
    )
    with group.main_first():
        pool.prepare([ref for v in variants for ref in (v.first_turn, v.reflector, v.second_turn) if ref is not None])
    evaluator.run(variants, items)
    return {f"{base}: {name}": stats for base, engine in pool.engines.items() for name, stats in engine.stats.items()}

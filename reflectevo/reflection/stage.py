"""Stage 02's wiring, written once: the items, the sandbox, the model, the engine, the pipeline and the judge.

Notebook 02 and ``reflectevo generate --stage reflect`` both build their stage with these functions, so
the store a launch of several processes fills is exactly the one the notebook then reads and merges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflectevo.config import Params
from reflectevo.generation.engines import make_engine
from reflectevo.models.loading import LoadedModel, load_model
from reflectevo.reflection.curation import DPrefResult, build_d_pref
from reflectevo.reflection.judges import Judge, make_judge
from reflectevo.reflection.pipeline import ReflectionPipeline, make_sandbox


@dataclass
class Reflector:
    """Everything stage 02 generates with."""

    loaded: LoadedModel
    engine: Any
    sandbox: Any  # None when no task runs model-written code
    store_dir: Path
    pipeline: ReflectionPipeline

    def describe(self) -> str:
        engine, loaded = self.engine, self.loaded
        sandbox = self.sandbox.isolation.describe() if self.sandbox else "not needed"
        return (
            f"model {loaded.name} ({loaded.backend}, {loaded.dtype} on {loaded.device}); engine {engine.name}, "
            f"batch size {engine.batch_size}; sandbox: {sandbox}"
        )


def build_reflector(
    params: Params,
    store_dir: str | Path,
    tasks: Sequence[str],
    *,
    progress: bool = True,
    on_engine: Callable[[Any], Any] | None = None,
    share_verdicts: Callable[[Any], Any] | None = None,
    loading: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Reflector:
    """The sandbox (refused before any model loads unless code execution is allowed), the model, its engine
    and the pipeline over ``store_dir``. Several processes pass ``on_engine`` (split the engine's work),
    ``share_verdicts`` (the main process's verdicts for all) and ``loading`` (the main process loads first)."""
    sandbox = make_sandbox(params, list(tasks))
    with loading():
        loaded = load_model(params.model)
    engine = make_engine(params.generation, loaded, progress=progress)
    if on_engine is not None:
        engine = on_engine(engine)
    pipeline = ReflectionPipeline(params, engine, Path(store_dir), sandbox=sandbox, share_verdicts=share_verdicts)
    return Reflector(loaded, engine, sandbox, Path(store_dir), pipeline)


def stage_judge(params: Params, engine: Any, store_dir: str | Path, *, progress: bool = True) -> Judge:
    """The Dpref judge ``reflect.judge`` asks for, its replies stored under ``<store>/judge``."""
    return make_judge(
        params.reflect.judge,
        engine=engine,
        model_params=params.model,
        store_dir=Path(store_dir) / "judge",
        seed=params.run.seed,
        progress=progress,
    )


def judge_pairs(params: Params, records: Sequence[dict[str, Any]], judge: Judge) -> DPrefResult:
    """Dpref: the judge's consistent preferences among each question's successful reflections."""
    settings = params.reflect.judge
    return build_d_pref(
        records,
        judge,
        max_pairs_per_question=settings.max_pairs_per_question,
        both_orders=settings.both_orders,
        seed=params.run.seed,
    )

"""The variants evaluated in stage 05 and the role each adapter plays."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflectevo.config import (
    BASELINES,
    TWO_STAGE_REFLECTION_PHASE,
    ModelParams,
    Params,
)
from reflectevo.errors import EvaluationError
from reflectevo.generation.engines import make_engine
from reflectevo.models.loading import load_model
from reflectevo.training.adapters import dpo_start

BASE = "base"


# Two-stage SFT evaluated with the adapter of its reflection phase as the reflector (the adapter that learnt
# to reflect, before the correction phase continued it) and its final adapter answering the second turn:
# the variant named by reflectevo.config.TWO_STAGE_REFLECTION_PHASE.
REFLECTION_PHASE_ADAPTER = "reflection_adapter"  # its folder in sft/two_stage/ (reflectevo.training)


# ---- the variants and their roles -----------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """One model a role is played by: a base model, with or without a LoRA adapter."""

    key: str  # "base", "sft/one_stage", ...: names the generation stores
    base: ModelParams
    adapter: Path | None = None

    @property
    def base_key(self) -> str:
        return self.base.name


@dataclass(frozen=True)
class Variant:
    name: str  # "retry", "base", "sft/one_stage", ...
    first_turn: ModelRef
    reflector: ModelRef | None  # None: no reflection (retry, qa_pairs)
    second_turn: ModelRef | None  # None: no second turn (qa_pairs), or the reflector's own output (one-stage)
    one_stage: bool = False

    @property
    def has_second_turn(self) -> bool:
        return self.one_stage or self.second_turn is not None

    def roles(self) -> dict[str, str | None]:
        second = (
            self.reflector.key
            if self.one_stage and self.reflector
            else (self.second_turn.key if self.second_turn else None)
        )
        return {
            "first_turn": self.first_turn.key,
            "reflector": self.reflector.key if self.reflector else None,
            "second_turn": second,
        }


def trained_variants(params: Params) -> list[str]:
    """The variants stages 03 and 04 train with these params. Two-stage SFT is evaluated with its final
    adapter as the reflector (``sft/two_stage``), with its reflection-phase adapter as the reflector
    (:data:`TWO_STAGE_REFLECTION_PHASE`), or both, as ``eval.two_stage_reflector`` says."""
    names = []
    for mode in params.sft.modes:
        if mode == "two_stage" and params.eval.two_stage_reflector != "final":
            names += [
                *(["sft/two_stage"] if params.eval.two_stage_reflector == "both" else []),
                TWO_STAGE_REFLECTION_PHASE,
            ]
        else:
            names.append(f"sft/{mode}")
    return [*names, *(f"dpo/{pairs}" for pairs in params.dpo.pairs)]


def variant_folder(run_dir: Path, name: str) -> Path:
    """The folder of the stage-03/04 variant a trained variant's adapters come from (``sft/two_stage`` for
    both two-stage variants)."""
    return run_dir / name.split(":")[0]


def reflector_adapter(run_dir: Path, name: str) -> Path:
    """The adapter that reflects for a trained variant: the variant's final adapter, or, for
    :data:`TWO_STAGE_REFLECTION_PHASE`, two-stage SFT's reflection-phase adapter (before its correction phase)."""
    folder = variant_folder(run_dir, name)
    return folder / (REFLECTION_PHASE_ADAPTER if name == TWO_STAGE_REFLECTION_PHASE else "adapter")


def finished_variants(params: Params, manifest: dict[str, Any]) -> list[str]:
    """The trained variants whose stage finished in this run (``eval.variants: trained``)."""
    stages = manifest.get("stages", {})
    done = {kind for kind, key in (("sft", "03_sft"), ("dpo", "04_dpo")) if stages.get(key, {}).get("status") == "done"}
    skipped = skipped_variants(manifest)
    return [
        name
        for name in trained_variants(params)
        if name.split("/")[0] in done and variant_folder_name(name) not in skipped
    ]


def skipped_variants(manifest: dict[str, Any]) -> dict[str, str]:
    """``{"sft/one_stage": why, ...}``: the variants stages 03 and 04 skipped for want of training data."""
    stages = manifest.get("stages", {})
    return {
        f"{kind}/{variant}": why
        for kind, key in (("sft", "03_sft"), ("dpo", "04_dpo"))
        for variant, why in (stages.get(key, {}).get("skipped") or {}).items()
    }


def variant_folder_name(name: str) -> str:
    """``sft/two_stage`` for ``sft/two_stage:reflection_phase``: the trained variant a variant comes from."""
    return name.split(":")[0]


def plan_variants(
    params: Params, run_dir: Path, manifest: dict[str, Any] | None = None, *, dpo_base: ModelParams | None = None
) -> list[Variant]:
    """The variants ``eval.variants`` asks for, with their roles; a trained variant whose adapter is
    missing is an error here, before any model loads."""
    manifest = manifest or {}
    wanted = (
        list(BASELINES) + finished_variants(params, manifest)
        if params.eval.variants == "trained"
        else list(params.eval.variants)
    )
    variants = []
    for name in wanted:
        adapter = reflector = None
        if name not in BASELINES:
            adapter, reflector = variant_folder(run_dir, name) / "adapter", reflector_adapter(run_dir, name)
            for folder in dict.fromkeys([adapter, reflector]):
                if not (folder / "adapter_config.json").is_file():
                    stage = "03_sft" if name.startswith("sft/") else "04_dpo"
                    raise EvaluationError(
                        f"eval.variants names {name}, but {folder} holds no trained adapter; run stage "
                        f"{stage} first (reflectevo run PARAMS --from {stage[:2]}) or leave {name} out of "
                        "eval.variants"
                    )
        variants.append(
            make_variant(
                params,
                name,
                adapter,
                dpo_base if name.startswith("dpo/") and dpo_base else params.model,
                reflector_adapter=reflector,
            )
        )
    return variants


def make_variant(
    params: Params,
    name: str,
    adapter: Path | None = None,
    model: ModelParams | None = None,
    *,
    reflector_adapter: Path | None = None,
) -> Variant:
    """The roles of one variant (``retry``, ``base``, ``sft/<mode>``, ``dpo/<pairs>``,
    :data:`TWO_STAGE_REFLECTION_PHASE`); a trained variant's adapter sits on ``model`` (the base model unless
    DPO started from a merged SFT model). ``reflector_adapter``, when another adapter than ``adapter``
    reflects (two-stage SFT's reflection phase), plays the reflector."""
    base = ModelRef(BASE, params.model)
    if name == "retry":
        return Variant(name, base, None, base)
    if name == BASE:
        return Variant(name, base, base, base)
    if adapter is None:
        raise EvaluationError(f"variant {name} needs its adapter folder")
    kind, mode = name.split(":")[0].split("/")
    own = ModelRef(name.split(":")[0], model or params.model, Path(adapter))
    if name == "sft/qa_pairs":
        return Variant(name, own, None, None)
    first = own if params.eval.first_turn == "variant" else base
    if mode == "one_stage":
        return Variant(name, first, own, None, one_stage=True)
    if name == TWO_STAGE_REFLECTION_PHASE and reflector_adapter is None:
        reflector_adapter = Path(adapter).parent / REFLECTION_PHASE_ADAPTER
    reflector = own
    if reflector_adapter is not None and Path(reflector_adapter) != Path(adapter):
        reflector = ModelRef(name, model or params.model, Path(reflector_adapter))
    second_role = params.eval.second_turn_after_sft if kind == "sft" else params.eval.second_turn_after_dpo
    return Variant(name, first, reflector, own if second_role == "variant" else base)


def roles_table(variants: Sequence[Variant]) -> Any:
    """One row per variant: who answers the first turn, who reflects (and with which adapter), who answers the second turn."""
    import pandas as pd

    rows = []
    for variant in variants:
        roles = variant.roles()
        second = roles["second_turn"] or "—"
        if variant.one_stage:
            second += " (in the reflection's output)"
        rows.append(
            {
                "variant": variant.name,
                "first turn": roles["first_turn"],
                "reflector": roles["reflector"] or "—",
                "second turn": second,
                "adapter": str(variant.reflector.adapter)
                if variant.reflector and variant.reflector.adapter
                else (str(variant.first_turn.adapter) if variant.first_turn.adapter else "—"),
            }
        )
    return pd.DataFrame(rows).set_index("variant")


# ---- models: each base loaded once, its adapters switched by name ----------------------------------
class ModelPool:
    """Loads each base model once and every adapter onto it under its own name; :meth:`active` gives
    the engine that generates with one adapter active, or with none (the base model)."""

    def __init__(self, params: Params, *, progress: bool = True, on_engine: Callable[[Any], Any] | None = None) -> None:
        if params.model.adapter:
            raise EvaluationError(
                f"model.adapter is set ({params.model.adapter}); evaluation attaches the trained variants' "
                "adapters to the base model itself: unset it, and evaluate an adapter with "
                "`reflectevo eval PARAMS --adapter PATH` or as a trained variant"
            )
        if params.generation.engine in ("vllm", "replay"):
            raise EvaluationError(
                f"evaluation switches LoRA adapters on a loaded model; generation.engine "
                f"{params.generation.engine!r} cannot, use auto, transformers or unsloth"
            )
        self.params, self.progress = params, progress
        self.on_engine = on_engine  # applied to every engine made (reflectevo.cli.generate: data-parallel generation)
        self.loaded: dict[str, Any] = {}  # base key -> LoadedModel (its model a PeftModel once adapters are on)
        self.engines: dict[str, Any] = {}
        self.adapters: dict[str, dict[Path, str]] = {}  # base key -> adapter folder -> adapter name

    def prepare(self, refs: Sequence[ModelRef]) -> None:
        """Load every base and attach every adapter the refs need (engines are made afterwards, once)."""

        for ref in refs:
            if ref.base_key not in self.loaded:
                self.loaded[ref.base_key] = load_model(ref.base.model_copy(update={"adapter": None}))
                self.adapters[ref.base_key] = {}
            names = self.adapters[ref.base_key]
            if ref.adapter is not None and ref.adapter not in names:
                names[ref.adapter] = self._attach(ref.base_key, ref.adapter, f"adapter{len(names)}")
                self.engines.pop(ref.base_key, None)  # the first adapter wraps the model: a new engine must see it
        for base_key, loaded in self.loaded.items():
            if base_key not in self.engines:
                engine = make_engine(self.params.generation, loaded, progress=self.progress)
                self.engines[base_key] = self.on_engine(engine) if self.on_engine is not None else engine

    def _attach(self, base_key: str, adapter: Path, name: str) -> str:
        from peft import PeftModel

        loaded = self.loaded[base_key]
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(adapter), adapter_name=name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter), adapter_name=name)
        loaded.model.eval()
        return name

    def describe(self) -> dict[str, Any]:
        return {
            base: {
                "backend": loaded.backend,
                "dtype": loaded.dtype,
                "device": loaded.device,
                "engine": self.engines[base].name if base in self.engines else None,
                "adapters": {str(path): name for path, name in self.adapters[base].items()},
            }
            for base, loaded in self.loaded.items()
        }

    @contextlib.contextmanager
    def active(self, ref: ModelRef) -> Iterator[Any]:
        """The engine of ``ref``'s base with ``ref``'s adapter active (all adapters off for a base ref)."""
        self.prepare([ref])
        model, engine = self.loaded[ref.base_key].model, self.engines[ref.base_key]
        if ref.adapter is None:
            disable = getattr(model, "disable_adapter", None)
            with disable() if disable is not None else contextlib.nullcontext():
                yield engine
        else:
            model.set_adapter(self.adapters[ref.base_key][ref.adapter])
            yield engine


def dpo_base_model(params: Params, run: Any) -> ModelParams | None:
    """The base the DPO adapters sit on when ``dpo.start_from`` names an SFT variant: its merged model
    (merged again if its folder was removed). None when DPO starts from the base or has not run."""
    if params.dpo.start_from == "base" or run.manifest().get("stages", {}).get("04_dpo", {}).get("status") != "done":
        return None

    model, _ = dpo_start(params, run, main=True)
    return model

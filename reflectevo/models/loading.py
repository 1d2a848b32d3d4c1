"""Loading a model and its tokenizer the way the params' ``model`` section describes.

    backend = select_backend(params.model.backend)   # first, before transformers/trl/peft are imported
    loaded = load_model(params.model)                # LoadedModel: model, tokenizer, info for the manifest

``model.name`` is a hub id, a local folder, or a built-in stand-in (``builtin:tiny``,
``builtin:random-1b``, ``builtin:random-8b``; see :mod:`reflectevo.models.builtin`). Two backends load
models: Unsloth (on a CUDA GPU, when installed) and plain transformers + peft. Every way a load can
fail that a user can fix (a missing folder or adapter, 4-bit without a GPU, a base model without a
chat template) raises :class:`ModelLoadError` with what was tried and what to change.

Nothing heavy is imported at module import: torch, transformers and Unsloth are imported inside the
functions, in the order Unsloth needs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflectevo.config import ModelParams

from reflectevo.errors import BackendUnavailable, ModelLoadError, UnknownModelError
from reflectevo.models.builtin import random_shapes, smollm2, tiny
from reflectevo.models.builtin import tokenizer as builtin_tokenizer
from reflectevo.models.chat import default_system_message

BACKENDS = ("auto", "unsloth", "transformers")
BUILTIN_PREFIX = "builtin:"
# Imported before Unsloth, these modules miss some of its patches.
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")

# The fallback for base models without a chat template (``model.chat_template: chatml``). The
# {% generation %} markers let TRL compute assistant-only losses with it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---- backend -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendChoice:
    name: str  # "unsloth" or "transformers"
    reason: str  # why, for the run manifest


def choose_backend(prefer: str = "auto") -> BackendChoice:
    """Pick the backend, and import Unsloth when it is picked (it must come before transformers).

    ``auto`` uses Unsloth only when the package is installed *and* a CUDA GPU is visible: on a CPU,
    Unsloth is never imported, because its CPU mode patches transformers and TRL for the whole
    process. An explicit ``unsloth`` that cannot work raises :class:`BackendUnavailable`.
    """
    if prefer not in BACKENDS:
        raise ValueError(f"unknown backend {prefer!r}; choose one of {', '.join(BACKENDS)}")
    if prefer == "transformers":
        return BackendChoice("transformers", "requested")

    import torch  # torch may precede Unsloth; transformers, trl and peft should not

    installed = "unsloth" in sys.modules or importlib.util.find_spec("unsloth") is not None
    has_gpu = torch.cuda.is_available()
    if not (installed and has_gpu):
        why = (
            "the unsloth package is not installed"
            if not installed
            else "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        )
        if prefer == "unsloth":
            fix = (
                "install the gpu extra (pip install 'reflectevo[gpu]') on a machine with a CUDA GPU"
                if not installed
                else "run on a CUDA GPU (Unsloth's CPU mode patches transformers and TRL globally, so it is not used)"
            )
            raise BackendUnavailable(
                f"model.backend is 'unsloth' but {why}; {fix}, or set model.backend to auto or transformers"
            )
        return BackendChoice("transformers", f"auto: {why}")

    if "unsloth" in sys.modules:
        return BackendChoice("unsloth", "unsloth was already imported in this process, and a CUDA GPU is visible")
    early = [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]
    if early:
        warnings.warn(
            f"{', '.join(early)} imported before unsloth: Unsloth's patches will be partial. "
            "Select the backend before anything imports them (in a notebook: the first cell after the parameters).",
            stacklevel=2,
        )
    try:
        import unsloth  # noqa: F401  (patches transformers, trl and peft on import)
    except Exception as exc:  # ImportError for missing pieces, NotImplementedError without an accelerator
        if prefer == "unsloth":
            raise BackendUnavailable(
                f"model.backend is 'unsloth' but importing it failed: {type(exc).__name__}: {exc}"
            ) from exc
        return BackendChoice("transformers", f"auto: importing unsloth failed ({type(exc).__name__}: {exc})")
    return BackendChoice(
        "unsloth", "requested" if prefer == "unsloth" else "auto: unsloth is installed and a CUDA GPU is visible"
    )


def select_backend(prefer: str = "auto") -> str:
    """``"unsloth"`` or ``"transformers"`` (see :func:`choose_backend`, which also gives the reason)."""
    return choose_backend(prefer).name


# ---- devices and dtypes ------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> str:
    """``auto`` is ``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA GPU is visible; set model.device to auto or cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is bfloat16 on a CUDA GPU that supports it, else float32."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"


# ---- loading -----------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A loaded model and tokenizer, with what the run manifest should record about them."""

    model: Any
    tokenizer: Any
    backend: str
    name: str  # model.name as configured
    source: str  # the folder or hub id the weights came from ("config" for random built-ins)
    dtype: str
    device: str
    info: dict[str, Any] = field(default_factory=dict)


def load_model(params: ModelParams, *, for_training: bool = False) -> LoadedModel:
    """Load the model and tokenizer that ``params`` (the ``model`` section) names.

    The tokenizer comes back ready for batched generation: a chat template (its own, else
    ``params.chat_template``), a pad token (eos when it has none, noted in ``info``) and left
    padding. ``for_training`` puts the model in training mode and makes an adapter trainable.
    """

    started = time.perf_counter()
    name = params.name
    random_builtin = name in random_shapes.RANDOM_SHAPES
    check_builtin_name(name)

    # checks that cost nothing come before anything is built or loaded
    adapter = adapter_folder(params.adapter) if params.adapter else None
    if random_builtin and params.backend != "unsloth":
        if params.load_in_4bit:
            raise ModelLoadError(
                f"{name} has random weights created in place; load_in_4bit is for pretrained weights, set it to false"
            )
        choice = BackendChoice("transformers", "random built-ins are created from their config with transformers")
    elif params.device == "cpu":
        if params.backend == "unsloth":
            raise BackendUnavailable(
                "model.backend 'unsloth' needs a CUDA GPU but model.device is 'cpu'; set model.backend to auto or transformers"
            )
        choice = BackendChoice("transformers", "model.device is cpu")
    else:
        choice = choose_backend(params.backend)
    device = resolve_device(params.device)
    dtype = resolve_dtype(params.dtype, device)
    if params.load_in_4bit:
        _check_four_bit(device)

    builtin_info: dict[str, Any] = {}
    if random_builtin and choice.name == "unsloth":
        # Unsloth's loader reads weights from a folder: save the same random weights once, load them from there
        folder = random_shapes.random_model_dir(name, dtype)
        model, tokenizer = _load_with_unsloth(params, str(folder), "builtin", device, dtype)
        source, source_kind = str(folder), "builtin"
        builtin_info = random_shapes.random_model_info(name)
    elif random_builtin:
        model, tokenizer = random_shapes.random_model(name, device=device, dtype=dtype)
        source, source_kind = "config", "builtin"
        builtin_info = random_shapes.random_model_info(name)
    else:
        if name == tiny.TINY:
            folder = tiny.tiny_model_dir()
            source, source_kind = str(folder), "builtin"
            builtin_info = tiny.read_standin_json(folder)
            builtin_info["quality"] = builtin_info["quality"]["overall"]  # the manifest needs no sample outputs
        elif name == smollm2.SMOLLM2:
            folder = smollm2.smollm2_model_dir()
            source, source_kind = str(folder), "builtin"
            builtin_info = smollm2.read_builtin_json(folder)
        else:
            source, source_kind = _resolve_source(name)
        loader = _load_with_unsloth if choice.name == "unsloth" else _load_with_transformers
        model, tokenizer = loader(params, source, source_kind, device, dtype)

    template_source = ensure_chat_template(tokenizer, params.chat_template, name)
    pad_note = _ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # batched generation appends to the right end of every row
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    if adapter is not None:
        model = _attach_adapter(model, adapter, for_training)
    _set_mode(model, choice.name, for_training)

    info = {
        "name": name,
        "source": source,
        "source_kind": source_kind,
        "revision": params.revision if source_kind == "hub" else None,
        "backend": choice.name,
        "backend_reason": choice.reason,
        "dtype": dtype,
        "device": str(getattr(model, "device", device)),
        "load_in_4bit": params.load_in_4bit,
        "adapter": str(adapter) if adapter else None,
        "for_training": for_training,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "vocab_size": len(tokenizer),
        "chat_template_source": template_source,
        # the pipeline sends no system message; this is what the model's template adds instead (None: nothing)
        "default_system_message": default_system_message(tokenizer),
        "pad_token": pad_note,
        "eos_token": tokenizer.eos_token,
        "max_seq_length": params.max_seq_length,
        "load_seconds": round(time.perf_counter() - started, 2),
        "versions": _versions(),
    }
    if builtin_info:
        info["builtin"] = builtin_info
    return LoadedModel(model, tokenizer, choice.name, name, source, dtype, device, info)


def check_builtin_name(name: str) -> None:
    """A ``builtin:`` name must be one of the built-in stand-ins."""

    if name.startswith(BUILTIN_PREFIX) and name not in random_shapes.BUILTIN_MODELS:
        raise UnknownModelError(f"unknown built-in model {name!r}; known: {', '.join(random_shapes.BUILTIN_MODELS)}")


def load_tokenizer(params: ModelParams) -> Any:
    """The tokenizer of ``params`` alone, with its chat template and pad token, loading no weights
    (to show what a model will be trained on before the model loads)."""

    name = params.name
    check_builtin_name(name)
    if name in random_shapes.RANDOM_SHAPES:
        tokenizer = builtin_tokenizer.llama3_vocab_tokenizer()
    else:
        from transformers import AutoTokenizer

        source, kind = builtin_folder(name) or _resolve_source(name)
        tokenizer = _from_pretrained(
            AutoTokenizer,
            source,
            kind,
            "tokenizer",
            revision=params.revision,
            trust_remote_code=params.trust_remote_code,
        )
    ensure_chat_template(tokenizer, params.chat_template, name)
    _ensure_pad_token(tokenizer)
    return tokenizer


def builtin_folder(name: str) -> tuple[str, str] | None:
    """(folder, "builtin") of a built-in with weights on disk, built first if needed; None for other names."""
    if name == tiny.TINY:
        return str(tiny.tiny_model_dir()), "builtin"
    if name == smollm2.SMOLLM2:
        return str(smollm2.smollm2_model_dir()), "builtin"
    return None


def _resolve_source(name: str) -> tuple[str, str]:
    """A local folder (returned as an absolute path) or a hub id; a path that does not exist is an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve()), "local"
    if path.exists():
        raise ModelLoadError(f"model.name {name!r} is a file, not a model folder ({path.resolve()})")
    # hub ids are "name" or "org/name"; anything else can only have meant a folder
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise ModelLoadError(
            f"model folder not found: {path.resolve()} (model.name {name!r} is a path, so the model hub was not tried)"
        )
    return name, "hub"


def _from_pretrained(loader: Any, source: str, source_kind: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with an error that says which places were tried."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # transformers reports unreachable or missing repos as OSError
        if source_kind != "hub":
            raise ModelLoadError(f"could not load the {what} from {source}: {exc}") from exc
        revision = kwargs.get("revision")
        raise ModelLoadError(
            f"could not load the {what} of {source!r}: there is no local folder {Path(source).resolve()}, and the model hub "
            f"(repository {source!r}, revision {revision or 'main'}) could not provide it: {exc}"
        ) from exc


def _load_with_transformers(params: ModelParams, source: str, source_kind: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"revision": params.revision, "trust_remote_code": params.trust_remote_code}
    tokenizer = _from_pretrained(AutoTokenizer, source, source_kind, "tokenizer", **common)
    model_kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), **common}
    if params.load_in_4bit:
        model_kwargs["quantization_config"] = _four_bit_config()
    placement = device_map(device, params.load_in_4bit)
    if placement is not None:
        model_kwargs["device_map"] = placement
    model = _from_pretrained(AutoModelForCausalLM, source, source_kind, "model", **model_kwargs)
    return model, tokenizer


def device_map(device: str, four_bit: bool = False) -> dict[str, int] | None:
    """Where ``from_pretrained`` puts the weights: on a GPU, this process's own one (``LOCAL_RANK``
    under ``torchrun`` / ``accelerate launch``, where every process loads its copy before the trainer
    starts); none under DeepSpeed or FSDP (without 4 bits), which place and shard the weights themselves."""
    if device != "cuda":
        return None
    sharded = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" or os.environ.get("ACCELERATE_USE_FSDP") == "true"
    if sharded and not four_bit:
        return None
    if "LOCAL_RANK" in os.environ:
        return {"": int(os.environ["LOCAL_RANK"])}
    import torch

    return {"": torch.cuda.current_device()}


def _load_with_unsloth(params: ModelParams, source: str, source_kind: str, device: str, dtype: str):
    import torch
    from unsloth import FastLanguageModel

    try:
        placement = device_map(device, params.load_in_4bit)
        return FastLanguageModel.from_pretrained(
            model_name=source,
            max_seq_length=params.max_seq_length,
            dtype=getattr(torch, dtype),
            load_in_4bit=params.load_in_4bit,
            revision=params.revision,
            trust_remote_code=params.trust_remote_code,
            **({"device_map": placement} if placement is not None else {}),
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Unsloth could not load {source!r} ({source_kind}): {exc}") from exc


def _four_bit_config():
    import torch
    from transformers import BitsAndBytesConfig

    # NF4 with double quantisation and bf16 compute: the QLoRA recipe
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _check_four_bit(device: str) -> None:
    if device != "cuda":
        raise ModelLoadError("model.load_in_4bit needs a CUDA GPU, and none is visible here; set load_in_4bit to false")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "model.load_in_4bit needs the bitsandbytes package: pip install 'reflectevo[gpu]', or set load_in_4bit to false"
        )


def adapter_folder(adapter: str) -> Path:
    path = Path(adapter).expanduser().resolve()
    if not path.is_dir():
        raise ModelLoadError(f"adapter folder not found: {path} (model.adapter {adapter!r})")
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path} is not a LoRA adapter folder: it has no adapter_config.json")
    return path


def _attach_adapter(model: Any, adapter: Path, for_training: bool) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=for_training)


def _set_mode(model: Any, backend: str, for_training: bool) -> None:
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        (FastLanguageModel.for_training if for_training else FastLanguageModel.for_inference)(model)
    else:
        model.train(for_training)


def ensure_chat_template(tokenizer: Any, fallback: str | None, model_name: str = "the model") -> str:
    """Give the tokenizer a chat template and say where it came from.

    Its own template wins; otherwise ``fallback`` (``model.chat_template``): a Jinja template, or
    ``"chatml"`` for :data:`CHATML_TEMPLATE`. With neither, a base model cannot be prompted the way
    the pipeline prompts, so this raises.
    """
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    if not fallback:
        raise ModelLoadError(
            f"{model_name} has no chat template (its tokenizer defines none); set model.chat_template to a Jinja "
            "chat template, or to 'chatml' for the built-in ChatML template"
        )
    named = fallback.strip().lower() == "chatml"
    tokenizer.chat_template = CHATML_TEMPLATE if named else fallback
    try:  # a broken template should fail here, not at the first prompt
        tokenizer.apply_chat_template([{"role": "user", "content": "ping"}], tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 raises several types
        raise ModelLoadError(f"model.chat_template does not render: {type(exc).__name__}: {exc}") from exc
    return "model.chat_template: chatml" if named else "model.chat_template"


def _ensure_pad_token(tokenizer: Any) -> str:
    if tokenizer.pad_token is not None:
        return tokenizer.pad_token
    if tokenizer.eos_token is None:
        raise ModelLoadError("the tokenizer has neither a pad token nor an eos token, so batches cannot be padded")
    tokenizer.pad_token = tokenizer.eos_token
    return f"{tokenizer.eos_token} (eos; the tokenizer had no pad token)"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "unsloth", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found

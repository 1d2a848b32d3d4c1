"""Model loading and the built-in stand-in models.

The default ``builtin:tiny`` is built once per pytest run by the ``tiny_model_dir`` fixture; tests
that need other builds (the lock, reproducibility) use a much smaller variant in a temporary cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reflectevo import errors, prompts
from reflectevo.config import ModelParams
from reflectevo.models import cache
from reflectevo.models import loading as models_loading
from reflectevo.models.builtin import attempts as builtin_attempts
from reflectevo.models.builtin import checks as builtin_checks
from reflectevo.models.builtin import corpus as builtin_corpus
from reflectevo.models.builtin import random_shapes, settings, tiny
from reflectevo.models.builtin import tokenizer as builtin_tokenizer
from reflectevo.prompts import attempt_messages, render_attempt
from reflectevo.tasks import SPLITS, get_task, task_names

REPO = Path(__file__).resolve().parents[1]

# A build small enough for tests that need a build of their own (a few seconds)
SMALL = settings.TinySettings(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    vocab_size=400,
    steps=3,
    batch_size=4,
    warmup_steps=1,
    renders_per_item=1,
    generic_examples=8,
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus_questions(corpus) -> list[str]:
    """The item question of every corpus prompt (the prompt ends with "Question: <item question>")."""
    questions = []
    for _, (messages, _completion) in corpus:
        prompt = messages[-1]["content"]
        assert "\n\nQuestion: " in prompt
        questions.append(prompt.split("\n\nQuestion: ", 1)[1])
    return questions


# ---- cache folder and backend ----------------------------------------------------------------------
def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("REFLECTEVO_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("REFLECTEVO_CACHE")
    assert cache.cache_dir() == tmp_path / "xdg" / "reflectevo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "reflectevo"


def test_importing_the_package_stays_light():
    code = "import sys, reflectevo, reflectevo.models, reflectevo.models.builtin.tiny; print(sorted(m for m in ('torch', 'transformers', 'unsloth') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU behaviour")
def test_backend_on_cpu_is_transformers_and_unsloth_is_refused():
    assert models_loading.select_backend("auto") == "transformers"
    assert models_loading.select_backend("transformers") == "transformers"
    assert "unsloth" not in sys.modules
    choice = models_loading.choose_backend("auto")
    assert choice.reason.startswith("auto: ")
    with pytest.raises(errors.BackendUnavailable) as error:
        models_loading.select_backend("unsloth")
    installed = __import__("importlib").util.find_spec("unsloth") is not None
    assert ("no CUDA GPU" if installed else "not installed") in str(error.value)
    with pytest.raises(ValueError, match="unknown backend"):
        models_loading.select_backend("hf")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU behaviour")
def test_auto_never_imports_an_installed_unsloth_on_cpu(tmp_path):
    # a package named unsloth that fails loudly if anything imports it
    fake = tmp_path / "site" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('unsloth was imported')\n")
    code = textwrap.dedent(
        """
        import importlib.util, sys
        from reflectevo.errors import BackendUnavailable
        from reflectevo.models.loading import choose_backend
        assert importlib.util.find_spec("unsloth") is not None, "the test package is not visible"
        choice = choose_backend("auto")
        assert choice.name == "transformers", choice
        assert "unsloth" not in sys.modules
        try:
            choose_backend("unsloth")
        except BackendUnavailable as exc:
            print("refused:", exc)
        assert "unsloth" not in sys.modules
        print("reason:", choice.reason)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "no CUDA GPU" in out.stdout
    assert "reason: auto: no CUDA GPU" in out.stdout


# ---- the tiny model's corpus -------------------------------------------------------------------------
def test_corpus_holds_train_items_only():
    corpus = builtin_corpus.build_corpus()
    seen = set(corpus_questions(corpus))
    for name in task_names():
        task = get_task(name)
        assert {item.question for item in task.load_samples("train")} <= seen, name
        for split in SPLITS[1:]:
            leaked = [item.id for item in task.load_samples(split) if item.question in seen]
            assert not leaked, f"{name} {split} items in the stand-in corpus: {leaked}"


def test_corpus_holds_no_official_items(official_items):
    seen = set(corpus_questions(builtin_corpus.build_corpus()))
    for name, items in official_items.items():
        assert not [item.id for item in items if item.question in seen], name


def test_corpus_answers_mix_gold_and_wrong(sandbox):
    corpus = builtin_corpus.build_corpus()
    by_task: dict[str, list[tuple]] = {}
    for part, (messages, completion) in corpus:
        if part.startswith("attempts/"):
            by_task.setdefault(part.split("/", 1)[1], []).append((messages[-1]["content"], completion))
    assert sorted(by_task) == task_names()
    correct = total = 0
    for name, rows in by_task.items():
        task = get_task(name)
        items = {item.question: item for item in task.load_samples("train")}
        graded_items = [items[prompt.split("\n\nQuestion: ", 1)[1]] for prompt, _ in rows]
        texts = [completion for _, completion in rows]
        assert all(text.startswith("Thought: ") and "\nAction: " in text for text in texts)
        verdicts = task.grade_many(graded_items, texts, "official", sandbox)
        assert all(verdict.outcome in ("correct", "wrong") for verdict in verdicts), name  # every answer parses
        # a wrong answer really is wrong: exactly the renders that state the gold answer are correct
        for item, text, verdict in zip(graded_items, texts, verdicts):
            states_gold = text.endswith(task.render_answer(prompts.gold_answer(item)))
            assert verdict.correct == states_gold, (name, item.id, text)
        correct += sum(verdict.correct for verdict in verdicts)
        total += len(verdicts)
    assert 0.5 <= correct / total <= 0.7  # about 60 % gold


def test_corpus_second_attempts_change_a_rejected_answer_and_keep_one_that_holds():
    from reflectevo.prompts import parse_self_verdict

    counts = {"changed": 0, "kept": 0, "verdicts": 0}
    for part, (messages, completion) in builtin_corpus.build_corpus():
        kind, name = part.split("/", 1)
        # the generic parts hold multiple-choice questions, whose answers every choice task reads alike
        task = get_task(name) if name in task_names() else get_task("logiqa")
        kind = name if kind == "generic" else kind
        prompt = messages[-1]["content"]
        if kind in ("second_trials", "retries"):
            previous = prompt.split("It was:\n", 1)[1].split("\nObservation:", 1)[0] if "It was:\n" in prompt else None
            if previous is not None:  # never the rejected answer again
                assert task.extract(completion).answer != task.extract(previous).answer, (part, prompt, completion)
                counts["changed"] += 1
        elif kind == "review_second_trials":
            previous = prompt.split("was:\n", 1)[1].split("\nIf it was right", 1)[0]
            same = task.extract(completion).answer == task.extract(previous).answer
            if "Here is a review" in prompt:
                review = prompt.split("previous attempt:\n", 1)[1].split("\n\n", 1)[0]
                holds = any(sentence in review for sentence in builtin_corpus.REVIEW_HOLDS_CHECKS)
                assert same == holds, (part, review, previous, completion)
            counts["kept"] += same
        elif kind == "reviews":
            assert "Action:" not in completion
        elif kind == "self_verify":
            assert parse_self_verdict(completion) in ("correct", "wrong")
            counts["verdicts"] += 1
    assert counts["changed"] > 200 and counts["kept"] > 50 and counts["verdicts"] > 50, counts


def test_cache_key_follows_the_corpus(monkeypatch):
    key = tiny.tiny_cache_key()
    assert key == tiny.tiny_cache_key()  # deterministic

    def extra(rng, settings):
        task = get_task("logiqa")
        item = task.load_samples("train")[0]
        return [(attempt_messages(task, item), render_attempt(task, "A new kind of example.", "A"))]

    monkeypatch.setattr(
        builtin_corpus, "CORPUS_PARTS", [*builtin_corpus.CORPUS_PARTS, builtin_attempts.CorpusPart("test/extra", extra)]
    )
    assert tiny.tiny_cache_key() != key
    # adding a part leaves the other parts' text as it was
    corpus = builtin_corpus.build_corpus()
    assert [pair for name, pair in corpus if name != "test/extra"] == [
        pair for _, pair in builtin_corpus.build_corpus(parts=builtin_corpus.CORPUS_PARTS[:-1])
    ]
    monkeypatch.setattr(builtin_corpus, "CORPUS_PARTS", builtin_corpus.CORPUS_PARTS[:-1])
    assert tiny.tiny_cache_key() == key
    assert tiny.tiny_cache_key(settings.TinySettings(steps=7)) != key  # settings are part of the key


# ---- building builtin:tiny -----------------------------------------------------------------------
def test_tiny_build_is_cached_and_reused(tiny_model_dir):
    info_file = tiny_model_dir / "standin.json"
    before = (info_file.read_text(), info_file.stat().st_mtime_ns, sha256_of(tiny_model_dir / "model.safetensors"))
    assert tiny.tiny_model_dir() == tiny_model_dir  # found, not rebuilt
    after = (info_file.read_text(), info_file.stat().st_mtime_ns, sha256_of(tiny_model_dir / "model.safetensors"))
    assert after == before
    info = json.loads(before[0])
    assert info["cache_key"] == tiny.tiny_cache_key()
    assert tiny_model_dir.name == f"tiny-{info['cache_key'][:16]}"
    assert info["steps"] == settings.default_tiny_settings().steps
    assert info["settings"] == json.loads(json.dumps(settings.default_tiny_settings().to_dict()))
    assert 3_000_000 < info["parameters"] < 5_000_000
    assert info["rows_dropped_too_long"] == 0
    # no half-built folders left behind
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(f".tiny-{info['cache_key'][:16]}-")]


def test_tiny_tokenizer_round_trips_and_renders_chats(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) == settings.DEFAULT_TINY.vocab_size
    for text in [
        "Thought: 7 * 8 = 56.\nAction: Finish<<<56>>>",
        "Ünïcödé, emoji 🙂 and tabs\tare bytes too",
        "[BEGIN]\ndef f(x):\n    return x\n[END]",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    for special in builtin_tokenizer.SPECIAL_TOKENS:
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.eos_token == builtin_tokenizer.END and tokenizer.pad_token == builtin_tokenizer.PAD
    chat = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}]
    assert (
        tokenizer.apply_chat_template(chat, tokenize=False)
        == "<|user|>\nQuestion?<|end|>\n<|assistant|>\nAnswer.<|end|>\n"
    )
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n"
    )
    mask = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)[
        "assistant_masks"
    ]
    assert 0 < sum(mask) < len(mask)  # the {% generation %} markers work (assistant-only losses)


def test_tiny_answers_in_format_with_a_mix_of_right_and_wrong(tiny_model_dir, sandbox):
    loaded = models_loading.load_model(ModelParams(name="builtin:tiny"))
    assert loaded.backend == "transformers" and loaded.source == str(tiny_model_dir)
    assert loaded.tokenizer.padding_side == "left" and not loaded.model.training
    stored = tiny.read_standin_json(tiny_model_dir)["quality"]
    parsed = correct = total = 0
    for name in task_names():
        task = get_task(name)
        items = task.load_samples("validation")
        texts = builtin_checks.greedy_attempts(loaded.model, loaded.tokenizer, name, items)
        assert texts == stored["outputs"][name]  # greedy decoding reproduces the build's own check
        verdicts = task.grade_many(items, texts, "official", sandbox)
        parsed += sum(verdict.outcome != "parse_failure" for verdict in verdicts)
        correct += sum(verdict.correct for verdict in verdicts)
        total += len(items)
    print(f"builtin:tiny on the validation samples: parseable {parsed}/{total}, correct {correct}/{total}")
    assert parsed / total >= 0.8
    assert 0 < correct < total, f"expected a mix of right and wrong answers, got {correct}/{total} right"
    assert stored["overall"]["parseable"] == pytest.approx(parsed / total, abs=1e-3)


def test_tiny_answers_the_evaluation_prompts_in_format(tiny_model_dir):
    """Stage 05's prompts (retry without reflection, oracle-free review and second attempt, self-verification,
    one-stage answers)
    get parseable answers from the stand-in; the build's own check measured the rates."""
    stored = tiny.read_standin_json(tiny_model_dir)["quality"]["evaluation_prompts"]
    print("builtin:tiny on the evaluation prompts:", json.dumps(stored))
    assert stored["cases"] == 12
    assert stored["retry_second_attempts_parseable"] >= 0.8
    assert stored["reviews_without_action"] >= 0.8
    assert stored["review_second_attempts_parseable"] >= 0.8
    assert stored["self_verdicts_parseable"] >= 0.8
    assert stored["one_stage_attempts_parseable"] >= 0.8  # reflection, "Answer:", then a parseable attempt
    # whether it keeps an answer after its own review is not asserted: at 4M parameters the stand-in does
    # not follow its review (the build reports the share it kept; 0 to 0.25 in our builds)


def test_load_model_info_for_the_manifest(tiny_model_dir):
    loaded = models_loading.load_model(ModelParams(name=str(tiny_model_dir), device="cpu"))
    info = loaded.info
    assert info["source_kind"] == "local" and info["source"] == str(tiny_model_dir)
    assert info["backend"] == "transformers" and info["backend_reason"] == "model.device is cpu"
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert info["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert info["vocab_size"] == len(loaded.tokenizer) and info["chat_template_source"] == "tokenizer"
    assert info["pad_token"] == builtin_tokenizer.PAD
    json.dumps(info)  # the manifest stores it as JSON
    trained = models_loading.load_model(ModelParams(name="builtin:tiny", device="cpu"), for_training=True)
    assert trained.model.training and trained.info["builtin"]["cache_key"] == tiny.tiny_cache_key()


def test_concurrent_builders_build_once(tmp_path):
    """Two processes ask for the same (small) build while a third holds the lock: one builds, and removes
    what a killed builder left."""
    cache = tmp_path / "cache"
    settings = json.dumps(SMALL.to_dict())
    code = textwrap.dedent(
        f"""
        import json
        from reflectevo.models.builtin import settings, tiny
        raw = json.loads({settings!r})
        raw["adam_betas"] = tuple(raw["adam_betas"])
        print(tiny.tiny_model_dir(settings.TinySettings(**raw)))
        """
    )
    env = {**os.environ, "REFLECTEVO_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    key = tiny.tiny_cache_key(SMALL)
    lock_file = cache / "models" / f".tiny-{key[:16]}.lock"
    lock_file.parent.mkdir(parents=True)
    # the staging folder of a builder killed half-way (SIGKILL leaves it): the next builder removes it
    dead = lock_file.parent / f".tiny-{key[:16]}-killed01"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    logs = [tmp_path / f"builder{i}.err" for i in range(2)]
    with open(lock_file, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        builders = [
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
            )
            for log in logs
        ]
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(builder.poll() is None for builder in builders), [log.read_text() for log in logs]
            time.sleep(0.2)
        fcntl.flock(held, fcntl.LOCK_UN)
    folders = [builder.communicate(timeout=300)[0].strip() for builder in builders]
    errors = [log.read_text() for log in logs]
    assert all(builder.returncode == 0 for builder in builders), errors
    assert folders[0] == folders[1] == str(cache / "models" / f"tiny-{key[:16]}")
    assert sum(err.count("building the stand-in model") for err in errors) == 1
    assert sorted(p.name for p in (cache / "models").iterdir() if p.is_dir()) == [f"tiny-{key[:16]}"]


def test_build_is_bit_reproducible(tmp_path, monkeypatch):
    folders = []
    for name in ("first", "second"):
        monkeypatch.setenv("REFLECTEVO_CACHE", str(tmp_path / name))
        folders.append(tiny.tiny_model_dir(SMALL))
    for file in ("model.safetensors", "tokenizer.json"):
        assert sha256_of(folders[0] / file) == sha256_of(folders[1] / file)
    info = tiny.read_standin_json(folders[0])
    assert info["steps"] == SMALL.steps and set(info["quality"]["validation"]) == set(task_names())


# ---- random-weight models ----------------------------------------------------------------------------
def test_llama3_vocab_tokenizer_decodes_every_id():
    import random

    started = time.perf_counter()
    tokenizer = builtin_tokenizer.llama3_vocab_tokenizer()
    print(f"128,256-id tokenizer ready in {time.perf_counter() - started:.2f} s")
    assert len(tokenizer) == builtin_tokenizer.LLAMA3_VOCAB_SIZE == 128_256
    ids = random.Random(0).sample(range(len(tokenizer)), 3000) + list(range(300)) + [len(tokenizer) - 1]
    for token_id in ids:
        text = tokenizer.decode([token_id])
        assert isinstance(text, str) and text, token_id
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) is not None
    text = "Thought: random models never stop.\nAction: Finish[B]"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tokenizer.eos_token == builtin_tokenizer.END and tokenizer.pad_token == builtin_tokenizer.PAD


@pytest.mark.parametrize(
    ("name", "parameters"),
    # the published sizes of Llama-3.2-1B (tied embeddings) and Llama-3-8B
    [("builtin:random-1b", 1_235_814_400), ("builtin:random-8b", 8_030_261_248)],
)
def test_random_models_have_the_real_shapes(name, parameters):
    import torch

    model, tokenizer = random_shapes.random_model(name, device="meta", dtype="bfloat16")  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.vocab_size == len(tokenizer) == 128_256
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert model.config.eos_token_id == tokenizer.eos_token_id


# ---- load_model errors ---------------------------------------------------------------------------------
def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(errors.UnknownModelError) as error:
        models_loading.load_model(ModelParams(name="builtin:huge"))
    for known in random_shapes.BUILTIN_MODELS:
        assert known in str(error.value)


def test_missing_local_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(errors.ModelLoadError, match="model folder not found") as error:
        models_loading.load_model(ModelParams(name=str(missing)))
    assert str(missing) in str(error.value)


def test_unreachable_hub_id_names_what_was_tried(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no waiting on network retries
    with pytest.raises(errors.ModelLoadError) as error:
        models_loading.load_model(ModelParams(name="no-such-org/no-such-model", device="cpu"))
    message = str(error.value)
    assert "no local folder" in message and "model hub" in message and "no-such-org/no-such-model" in message


def test_missing_or_invalid_adapter_folder(tmp_path):
    with pytest.raises(errors.ModelLoadError, match="adapter folder not found"):
        models_loading.load_model(ModelParams(name="builtin:tiny", adapter=str(tmp_path / "no-adapter")))
    with pytest.raises(errors.ModelLoadError, match="no adapter_config.json"):
        models_loading.load_model(ModelParams(name="builtin:tiny", adapter=str(tmp_path)))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU behaviour")
def test_cpu_refuses_four_bit_and_unsloth():
    with pytest.raises(errors.ModelLoadError, match="needs a CUDA GPU"):
        models_loading.load_model(ModelParams(name="builtin:tiny", load_in_4bit=True))
    with pytest.raises(errors.BackendUnavailable):
        models_loading.load_model(ModelParams(name="builtin:tiny", backend="unsloth"))
    with pytest.raises(errors.BackendUnavailable, match="model.device is 'cpu'"):
        models_loading.load_model(ModelParams(name="builtin:tiny", backend="unsloth", device="cpu"))
    # a random built-in goes through Unsloth from a saved copy on a GPU; on CPU it is refused first
    with pytest.raises(errors.BackendUnavailable, match="model.backend is 'unsloth'"):
        models_loading.load_model(ModelParams(name="builtin:random-1b", backend="unsloth"))
    with pytest.raises(errors.ModelLoadError, match="load_in_4bit"):
        models_loading.load_model(ModelParams(name="builtin:random-1b", load_in_4bit=True))
    with pytest.raises(errors.ModelLoadError, match="no CUDA GPU"):
        models_loading.load_model(ModelParams(name="builtin:tiny", device="cuda"))


@pytest.fixture
def bare_model_dir(tmp_path) -> Path:
    """A small Llama whose tokenizer has no chat template and no pad token, like many base models."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = builtin_tokenizer.train_bpe(["plain text for a tiny tokenizer"] * 4, 300)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=builtin_tokenizer.END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    folder = tmp_path / "bare"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_model_without_chat_template(bare_model_dir):
    with pytest.raises(errors.ModelLoadError, match="has no chat template.*model.chat_template"):
        models_loading.load_model(ModelParams(name=str(bare_model_dir)))
    loaded = models_loading.load_model(ModelParams(name=str(bare_model_dir), chat_template="chatml"))
    assert loaded.info["chat_template_source"] == "model.chat_template: chatml"
    rendered = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # no pad token: eos pads, and the manifest says so
    assert loaded.tokenizer.pad_token == builtin_tokenizer.END and "no pad token" in loaded.info["pad_token"]
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    loaded = models_loading.load_model(ModelParams(name=str(bare_model_dir), chat_template=own))
    assert loaded.info["chat_template_source"] == "model.chat_template"
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    with pytest.raises(errors.ModelLoadError, match="does not render"):
        models_loading.load_model(
            ModelParams(name=str(bare_model_dir), chat_template="{% for m in messages %}{{ m.content }")
        )


def test_lora_adapter_loads_on_top(bare_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bare_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = {k: v.clone() for k, v in peft_model.named_parameters() if "lora_" in k}

    loaded = models_loading.load_model(
        ModelParams(name=str(bare_model_dir), chat_template="chatml", adapter=str(tmp_path / "adapter"))
    )
    assert isinstance(loaded.model, PeftModel) and loaded.info["adapter"] == str(tmp_path / "adapter")
    assert loaded.info["trainable_parameters"] == 0 and not loaded.model.training
    for key, value in loaded.model.named_parameters():
        if "lora_" in key:
            assert torch.equal(value, saved[key])
    trainable = models_loading.load_model(
        ModelParams(name=str(bare_model_dir), chat_template="chatml", adapter=str(tmp_path / "adapter")),
        for_training=True,
    )
    assert trainable.info["trainable_parameters"] == sum(v.numel() for v in saved.values())
    assert trainable.model.training


def test_the_stand_in_can_be_built_from_another_seed(monkeypatch):
    """REFLECTEVO_TINY_SEED names another build of builtin:tiny (another corpus draw and training run), as a
    build on another machine is another model; a bad value is refused with what to set."""
    monkeypatch.delenv(settings.TINY_SEED_ENV, raising=False)
    default = tiny.tiny_cache_key()
    assert settings.default_tiny_settings() == settings.DEFAULT_TINY
    monkeypatch.setenv(settings.TINY_SEED_ENV, "7")
    assert settings.default_tiny_settings().seed == 7
    assert tiny.tiny_cache_key() != default
    monkeypatch.setenv(settings.TINY_SEED_ENV, "seven")
    with pytest.raises(ValueError, match="REFLECTEVO_TINY_SEED must be a non-negative integer seed, got 'seven'"):
        settings.default_tiny_settings()

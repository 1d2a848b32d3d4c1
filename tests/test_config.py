"""The params schema: every shipped recipe validates, defaults come from the schema, and every kind
of mistake is refused with the key path (and a "did you mean" for misspelt keys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflectevo.config import SECTIONS, Params, load_params
from reflectevo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "params").glob("*.yaml"))
EXPECTED = {
    "smoke",
    "quickstart",
    "standin",
    "smollm2-135m-official",
    "smollm2-135m-cpu",
    "llama3-8b",
    "mistral-7b",
    "llama3-8b-24gb",
    "colab-t4",
    "evolve-smoke",
    "evolve-standin",
}


def test_every_recipe_is_shipped_and_validates():
    assert {path.stem for path in RECIPES} == EXPECTED
    for path in RECIPES:
        params = load_params(path)
        assert params.run.name == path.stem, f"{path.name}: run.name should match the file name"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_states_purpose_hardware_time(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lower())
    text = " ".join(header)
    assert header and header[0].startswith(f"# {path.stem}:"), "first line: '# <name>: <purpose>'"
    assert "hardware" in text and "time" in text
    if path.stem not in ("smoke", "standin", "quickstart", "evolve-smoke"):
        assert "not run by our ci" in text


def test_replication_recipes_evaluate_on_the_official_files():
    for name in ("llama3-8b", "mistral-7b", "llama3-8b-24gb", "colab-t4"):
        params = load_params(REPO / "params" / f"{name}.yaml")
        assert params.data.source == "hub" and params.data.test_source == "official"
        assert params.model.backend == "unsloth"


def test_defaults_live_in_the_schema():
    params = load_params(None, {})
    assert params == Params()
    assert params.model.name == "builtin:tiny"
    assert params.reflect.samples_per_instruction == 2 and params.reflect.temperature == 0.8
    assert params.generation.temperature == 0.0  # answers are greedy by default, as in the paper


def test_a_given_section_replaces_the_files_section_whole(tmp_path):
    file = tmp_path / "p.yaml"
    file.write_text("data:\n  tasks: [logiqa]\n  max_items: {train: 3}\nrun:\n  name: x\n")
    params = load_params(file, {"data": {"tasks": ["math"]}, "run": {}})
    assert params.data.tasks == ["math"]
    assert params.data.max_items.train is None  # not merged key by key: papermill replaces sections
    assert params.run.name == "x"  # an empty section means "not given"


def test_section_hash_separates_stages():
    base = load_params(None, {})
    changed_eval = load_params(None, {"eval": {"max_new_tokens": 7}})
    assert base.section_hash(["run.seed", "data"]) == changed_eval.section_hash(["run.seed", "data"])
    assert base.section_hash(["eval"]) != changed_eval.section_hash(["eval"])
    assert base.hash() != changed_eval.hash()


def problems(sections=None, text=None, tmp_path=None) -> str:
    with pytest.raises(ConfigError) as info:
        if text is not None:
            file = tmp_path / "bad.yaml"
            file.write_text(text)
            load_params(file)
        else:
            load_params(None, sections)
    return str(info.value)


def test_misspelt_keys_get_a_did_you_mean():
    message = problems({"data": {"taks": ["logiqa"]}})
    assert "data.taks: unknown key (did you mean 'tasks'?)" in message
    message = problems({"sft": {"lora": {"alhpa": 8}}})
    assert "sft.lora.alhpa" in message and "did you mean 'alpha'" in message
    message = problems({"runn": {"name": "x"}})
    assert "did you mean 'run'" in message


def test_unknown_section_in_a_file(tmp_path):
    message = problems(text="modle:\n  name: x\n", tmp_path=tmp_path)
    assert "modle" in message and "did you mean 'model'" in message and str(tmp_path) in message


def test_wrong_types_name_the_key():
    message = problems({"generation": {"batch_size": "big"}, "sft": {"modes": "one_stage"}, "run": {"seed": "zero"}})
    assert "generation.batch_size" in message and "'auto'" in message
    assert "sft.modes" in message and "run.seed" in message
    assert "3 problem(s)" in message


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"generation": {"temperature": -0.5}}, "generation.temperature"),
        ({"generation": {"batch_size": 0}}, "generation.batch_size"),
        ({"generation": {"num_shards": 2, "shard_index": 2}}, "shard_index 2 must be below num_shards 2"),
        ({"generation": {"engine": "replay"}}, "needs replay_from"),
        ({"data": {"split_fractions": {"train": 0.9, "validation": 0.2, "test": 0.1}}}, "must sum to 1"),
        ({"data": {"source": "official"}}, "needs official_dir"),
        ({"data": {"tasks": ["logiq"]}}, "did you mean 'logiqa'"),
        ({"data": {"tasks": ["math", "math"]}}, "listed twice"),
        ({"data": {"max_items": {"test": 0}}}, "data.max_items.test"),
        ({"model": {"load_in_4bit": True, "device": "cpu"}}, "load_in_4bit needs a CUDA GPU"),
        ({"run": {"name": "../elsewhere"}}, "run.name: must be a folder name"),
        ({"reflect": {"temperature": 0.0}}, "needs temperature > 0"),
        ({"reflect": {"judge": {"kind": "openai"}}}, "needs url and model"),
        ({"reflect": {"instructions": ["1-1-1", "3-1-1"]}}, "unknown reflection instruction '3-1-1'"),
        ({"reflect": {"instructions": []}}, "cannot be empty"),
        ({"sft": {"learning_rate": 0}}, "sft.learning_rate"),
        ({"sft": {"modes": ["one_stage", "one_stage"]}}, "listed twice"),
        ({"dpo": {"pairs": ["d_pm", "dpref"]}}, "dpo.pairs.1"),
        ({"evolve": {"rounds": 0}}, "evolve.rounds"),
    ],
)
def test_impossible_values_are_refused(sections, expected):
    assert expected in problems(sections)


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    assert "not valid YAML" in problems(text="run: [\n", tmp_path=tmp_path)
    assert "a params file is a mapping" in problems(text="- run\n", tmp_path=tmp_path)
    assert "section 'data' is empty" in problems(text="data:\n", tmp_path=tmp_path)


def test_every_section_has_a_schema_class():
    assert set(SECTIONS) == set(Params.model_fields)

"""Hub-ready artefacts of the smoke run: adapter cards, the dataset folder, and `reflectevo push` up to the
network call (the upload itself is not exercised: no Hub is reachable here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard

from reflectevo.cli.push import PushError, push_plan, stage_uploads
from reflectevo.models.cards import base_model_info, model_card_metadata
from reflectevo.reflection.exports import CURATED_SETS, TRL_SETS, empty_training_set, write_dataset_folder

BIN = Path(sys.executable).parent
ADAPTERS = ["sft/one_stage/adapter", "sft/two_stage/adapter", "sft/two_stage/reflection_adapter",
            "sft/qa_pairs/adapter", "dpo/d_pm/adapter", "dpo/d_pref/adapter"]  # fmt: skip


@pytest.fixture(scope="module")
def smoke(smoke_papermill_run) -> Path:
    return smoke_papermill_run / "outputs" / "smoke"


def reflectevo(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "reflectevo"), *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=300, env=env
    )


def set_rows(reflect: Path, name: str) -> int:
    if name in CURATED_SETS:
        return sum(1 for line in (reflect / "curated" / f"{name}.jsonl").read_text().splitlines() if line.strip())
    return datasets.load_from_disk(str(reflect / "datasets" / name)).num_rows


def test_adapter_cards_carry_hub_metadata_and_load_with_peft(smoke, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    for name in ADAPTERS:
        folder = smoke / name
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "peft", name
        assert card.data.base_model is None, "builtin:tiny has no hub id, and none is invented"
        assert card.data.license == "apache-2.0" and "reflectevo" in card.data.tags
        assert "stand-in" in card.text and "finds it only there" in card.text

    folder = smoke / "sft" / "two_stage" / "adapter"
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, folder)(ids).logits
    assert not torch.equal(plain, tuned), "the trained LoRA weights change the output"
    # the base folder of builtin:tiny exists here, so the auto class resolves it offline
    auto = AutoPeftModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.allclose(auto(ids).logits, tuned, atol=1e-5)


def test_card_metadata_for_hub_local_and_builtin_bases(tmp_path):
    hub = base_model_info("meta-llama/Meta-Llama-3-8B-Instruct")
    assert (hub.hub_id, hub.license) == ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3")
    (tmp_path / "README.md").write_text(model_card_metadata(hub, tags=["sft"]) + "# card\n")
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model == "meta-llama/Meta-Llama-3-8B-Instruct" and data.library_name == "peft"

    smollm2 = base_model_info("builtin:smollm2-135m")
    assert smollm2.hub_id is None and "dequantized" in smollm2.description and smollm2.license == "apache-2.0"
    local = base_model_info(str(tmp_path / "my-model"))
    assert local.hub_id is None and str(tmp_path) not in local.description, "no path of this machine on a card"
    assert base_model_info("some-org/unknown-model").license is None  # unknown licence: not guessed


def test_dataset_folder_loads_every_set_with_datasets(smoke):
    folder = smoke / "reflect" / "dataset"
    card = DatasetCard.load(folder / "README.md")
    configs = {entry["config_name"] for entry in card.data.configs}
    reflect = smoke / "reflect"
    expected = {name for name in [*CURATED_SETS, *TRL_SETS] if set_rows(reflect, name)}
    assert configs == expected and expected
    for name in configs:
        loaded = datasets.load_dataset(str(folder), name, split="train")
        assert loaded.num_rows == set_rows(reflect, name), name
        if name in TRL_SETS:
            assert loaded.features == datasets.load_from_disk(str(reflect / "datasets" / name)).features


def test_empty_sets_have_no_config_and_the_card_says_so(smoke, tmp_path):
    reflect = tmp_path / "reflect"
    shutil.copytree(smoke / "reflect", reflect, ignore=shutil.ignore_patterns("generations", "dataset"))
    (reflect / "curated" / "d_pref.jsonl").write_text("")
    shutil.rmtree(reflect / "datasets" / "dpo_d_pref")
    empty_training_set("dpo").save_to_disk(str(reflect / "datasets" / "dpo_d_pref"), num_shards=1)
    folder = write_dataset_folder(reflect, run="smoke", model="builtin:tiny", seed=0)
    card = DatasetCard.load(folder / "README.md")
    configs = {entry["config_name"] for entry in card.data.configs}
    assert "d_pref" not in configs and "dpo_d_pref" not in configs and "d_plus" in configs
    assert "Empty, so without a config: `d_pref`, `dpo_d_pref`" in card.text
    shutil.rmtree(reflect / "datasets" / "sft_one_stage")
    with pytest.raises(Exception, match="sft_one_stage is missing: stage 02 writes it"):
        write_dataset_folder(reflect, run="smoke", model="builtin:tiny", seed=0)
    assert (folder / "README.md").is_file(), "a failed rebuild leaves the previous folder whole"


def test_push_dry_run_stages_what_would_be_uploaded(smoke, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    done = reflectevo(
        "push", str(smoke), "--repo", "someone/smoke", "--dry-run", "--stage", str(tmp_path / "up"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "would upload" in done.stdout and "dataset repo someone/smoke" in done.stdout
    staged = tmp_path / "up"
    root = ModelCard.load(staged / "model" / "README.md")
    assert root.data.library_name == "peft" and root.data.datasets == ["someone/smoke"]
    subfolders = sorted(p.name for p in (staged / "model").iterdir() if p.is_dir())
    assert subfolders == sorted(
        ["sft-one_stage", "sft-two_stage", "sft-two_stage-reflection", "sft-qa_pairs", "dpo-d_pm", "dpo-d_pref"]
    )
    for name in subfolders:
        folder = staged / "model" / name
        assert ModelCard.load(folder / "README.md").data.datasets == ["someone/smoke"]
        assert not (folder / "training_args.bin").exists()
        for config in folder.rglob("adapter_config.json"):
            base_path = json.loads(config.read_text())["base_model_name_or_path"]
            assert "/" not in base_path and base_path == tiny_model_dir.name, "no path of this machine is uploaded"
    # the staged adapter still loads onto its base, as a user would after downloading it
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), staged / "model" / "sft-two_stage")
    assert datasets.load_dataset(str(staged / "dataset"), "d_plus", split="train").num_rows == set_rows(
        smoke / "reflect", "d_plus"
    )


def test_push_says_what_is_wrong_before_any_upload(smoke, tmp_path):
    with pytest.raises(PushError, match="ORG/NAME|Repo id"):
        push_plan(smoke, "no-organisation")
    with pytest.raises(PushError, match="--what"):
        push_plan(smoke, "someone/smoke", "everything")
    bare = tmp_path / "bare"
    shutil.copytree(smoke, bare, ignore=shutil.ignore_patterns("sft", "dpo", "generations"))
    with pytest.raises(PushError, match="no trained adapter.*stages 03 and 04"):
        push_plan(bare, "someone/bare", "adapters")
    # a run from before the dataset folder existed: the push builds it from stage 02's files
    shutil.rmtree(bare / "reflect" / "dataset")
    uploads = push_plan(bare, "someone/bare", "datasets")
    assert [u.repo_type for u in uploads] == ["dataset"] and (bare / "reflect" / "dataset" / "README.md").is_file()
    stage_uploads(uploads, tmp_path / "staged")
    assert DatasetCard.load(tmp_path / "staged" / "dataset" / "README.md").data.configs

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = reflectevo("push", str(smoke), "--repo", "someone/smoke", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "HF_HUB_OFFLINE" in done.stderr and "nothing was uploaded" in done.stderr
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no stored login
    done = reflectevo("push", str(smoke), "--repo", "someone/smoke", "--what", "datasets", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "no Hub token" in done.stderr

"""`reflectevo push RUN --repo ORG/NAME`: a run's adapters and dataset folder, uploaded to the Hub.

Everything up to the upload is built here and can be checked without a network: :func:`push_plan` lists
what would go where, :func:`stage_uploads` writes each upload's folder exactly as it would be uploaded
(cards included). :func:`upload` is the only part that talks to the Hub.

* adapters -> the model repo ``ORG/NAME``, one subfolder per adapter (``sft-two_stage``,
  ``sft-two_stage-reflection``, ``dpo-d_pm``, ...), with a root card listing them:
  ``PeftModel.from_pretrained(base, "ORG/NAME", subfolder="sft-two_stage")``;
* datasets -> the dataset repo ``ORG/NAME`` (a model and a dataset repo may share a name): the folder
  stage 02 writes, ``reflect/dataset/`` (built from stage 02's files first if the run predates it).

Not uploaded: merged models (``merged/``), training checkpoints and ``training_args.bin`` (a pickle).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectevo.errors import DataError, ReflectEvoError
from reflectevo.models.cards import base_model_info, model_card_metadata
from reflectevo.reflection.exports import DATASET_FOLDER, write_dataset_folder
from reflectevo.runs.plan import read_manifest

WHAT = ("adapters", "datasets", "all")
ADAPTER_GLOBS = ("sft/*/adapter", "sft/*/reflection_adapter", "dpo/*/adapter")
SKIPPED_FILES = ("training_args.bin",)  # a pickle: the Hub flags it and nothing needs it to load the adapter


class PushError(ReflectEvoError):
    """The run cannot be pushed as asked, or the Hub refused or could not be reached."""


@dataclass
class Upload:
    """One folder uploaded to one place: ``files`` (relative to ``source``) land under ``path_in_repo``."""

    source: Path
    repo_id: str
    repo_type: str  # "model" or "dataset"
    path_in_repo: str  # "" for the repo's root
    files: list[str]
    card: str | None = None  # replaces the folder's README.md in the upload
    rewrites: dict[str, Any] = field(default_factory=dict)  # keys changed in the upload's adapter_config.json files

    def describe(self) -> str:
        where = f"{self.repo_type} repo {self.repo_id}" + (f", {self.path_in_repo}/" if self.path_in_repo else "")
        size = sum((self.source / name).stat().st_size for name in self.files if (self.source / name).is_file())
        return f"{self.source} -> {where}: {len(self.files)} file(s), {size / 1e6:.1f} MB"


def check_repo_id(repo: str) -> str:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError as exc:
        raise PushError(f"--repo {repo!r}: {exc}") from None
    if repo.count("/") != 1:
        raise PushError(f"--repo {repo!r}: give the repo as ORG/NAME (your user name or an organisation, then a name)")
    return repo


def adapter_subfolder(run_dir: Path, folder: Path) -> str:
    """sft/two_stage/adapter -> sft-two_stage; sft/two_stage/reflection_adapter -> sft-two_stage-reflection."""
    stage, variant, kind = folder.relative_to(run_dir).parts
    return f"{stage}-{variant}" + ("" if kind == "adapter" else f"-{kind.removesuffix('_adapter')}")


def _front_matter(text: str) -> tuple[dict[str, Any], str]:
    import yaml

    if not text.startswith("---\n"):
        return {}, text
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, body


def with_datasets(card: str, dataset_repo: str) -> str:
    """The card with ``datasets: [dataset_repo]`` in its metadata (pushed beside it, so the id is real)."""
    import yaml

    meta, body = _front_matter(card)
    meta["datasets"] = [dataset_repo]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body}"


def adapter_uploads(run_dir: Path, repo: str, *, with_dataset: bool) -> list[Upload]:
    folders = sorted(
        folder
        for pattern in ADAPTER_GLOBS
        for folder in run_dir.glob(pattern)
        if (folder / "adapter_config.json").is_file()
    )
    uploads = []
    for folder in folders:
        files = sorted(
            str(path.relative_to(folder))
            for path in folder.rglob("*")
            if path.is_file() and path.name not in SKIPPED_FILES and not path.name.startswith(".")
        )
        card = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else None
        if card is not None and with_dataset:
            card = with_datasets(card, repo)
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        base_path = str(config.get("base_model_name_or_path") or "")
        rewrites = {}
        if base_path and not base_model_info(base_path).hub_id:
            # a folder on the training machine: its path means nothing elsewhere, and a home folder is private
            rewrites["base_model_name_or_path"] = Path(base_path).name
        uploads.append(
            Upload(folder, repo, "model", adapter_subfolder(run_dir, folder), files, card=card, rewrites=rewrites)
        )
    return uploads


def root_card(run: str, base_name: str, uploads: list[Upload], dataset_repo: str | None) -> str:
    """The model repo's README.md: what the run trained, one line per adapter subfolder, how to load one."""
    info = base_model_info(base_name)
    front = model_card_metadata(info, tags=["sft", "dpo", "trl"], datasets=[dataset_repo] if dataset_repo else None)
    first = uploads[0].path_in_repo
    lines = [
        front + f"# reflectevo run `{run}`: LoRA adapters",
        "",
        f"Trained by reflectevo (the ReflectEvo method, arXiv 2505.16475) on {info.description}. One adapter per "
        "subfolder; each has its own card with its training sets, steps and losses.",
        "",
        *(f"- `{upload.path_in_repo}/`" for upload in uploads),
        "",
        "```python",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained(base_model, "{uploads[0].repo_id}", subfolder="{first}")',
        "```",
        "",
    ]
    if dataset_repo:
        lines += [
            f"The reflections and training sets: the dataset repo [`{dataset_repo}`](https://huggingface.co/datasets/{dataset_repo}).",
            "",
        ]
    return "\n".join(lines)


def push_plan(run_dir: str | Path, repo: str, what: str = "all") -> list[Upload]:
    """What ``reflectevo push`` would upload, in order; builds ``reflect/dataset/`` first if the run lacks it.
    Errors say what is missing (no adapters trained, no stage 02) and what to run."""
    run_dir = Path(run_dir)
    check_repo_id(repo)
    if what not in WHAT:
        raise PushError(f"--what {what!r}: choose one of {', '.join(WHAT)}")
    manifest = read_manifest(run_dir)
    if not manifest:
        raise PushError(f"{run_dir}: no manifest.json, so this is not a run folder (e.g. outputs/quickstart)")
    params = manifest.get("params") or {}
    base_name = str(params.get("model", {}).get("name", ""))
    run = str(manifest.get("run") or run_dir.name)
    uploads: list[Upload] = []
    if what in ("adapters", "all"):
        adapters = adapter_uploads(run_dir, repo, with_dataset=what == "all")
        if not adapters:
            raise PushError(f"{run_dir}: no trained adapter (sft/*/adapter, dpo/*/adapter); run stages 03 and 04 first")
        root = Upload(
            run_dir, repo, "model", "", [], card=root_card(run, base_name, adapters, repo if what == "all" else None)
        )
        uploads += [root, *adapters]
    if what in ("datasets", "all"):
        reflect = run_dir / "reflect"
        folder = reflect / DATASET_FOLDER
        if not (folder / "README.md").is_file():
            if not (reflect / "curated").is_dir():
                raise PushError(f"{run_dir}: no stage 02 output (reflect/curated); run stage 02 first")
            try:
                write_dataset_folder(reflect, run=run, model=base_name, seed=int(params.get("run", {}).get("seed", 0)))
            except DataError as exc:
                raise PushError(str(exc)) from None
        files = sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        uploads.append(Upload(folder, repo, "dataset", "", files))
    return uploads


def stage_uploads(uploads: list[Upload], into: str | Path) -> list[Path]:
    """Each upload's folder as it would be uploaded (files copied, card and config rewrites applied), under
    ``into/<repo_type>/<path_in_repo>``; returns those folders."""
    into = Path(into)
    staged = []
    for upload in uploads:
        target = into / upload.repo_type / upload.path_in_repo if upload.path_in_repo else into / upload.repo_type
        target.mkdir(parents=True, exist_ok=True)
        for name in upload.files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(upload.source / name, target / name)
        if upload.card is not None:
            (target / "README.md").write_text(upload.card, encoding="utf-8")
        for config_path in target.rglob("adapter_config.json") if upload.rewrites else ():  # DPO keeps a ref/ too
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config.update(upload.rewrites)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        staged.append(target)
    return staged


def upload(uploads: list[Upload], *, private: bool, staging: str | Path) -> list[str]:
    """Create the repos (``exist_ok``) and upload each staged folder, one commit per folder; returns their
    URLs. Needs the network and a token (``hf auth login`` or ``HF_TOKEN``)."""
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if HF_HUB_OFFLINE:
        raise PushError("the Hub is switched off here (HF_HUB_OFFLINE is set); nothing was uploaded")
    if not get_token():
        raise PushError("no Hub token: log in with `hf auth login` or set HF_TOKEN, then push again")
    api = HfApi()
    folders = stage_uploads(uploads, staging)
    urls = []
    try:
        for repo_type in dict.fromkeys(u.repo_type for u in uploads):
            api.create_repo(uploads[0].repo_id, repo_type=repo_type, private=private, exist_ok=True)
        for item, folder in zip(uploads, folders):
            if item.path_in_repo == "" and item.repo_type == "model":
                paths = ["README.md"]  # the root card only: the adapters follow in their own subfolders
            else:
                paths = None
            info = api.upload_folder(
                repo_id=item.repo_id,
                repo_type=item.repo_type,
                folder_path=folder,
                path_in_repo=item.path_in_repo or None,
                allow_patterns=paths,
                commit_message=f"reflectevo push: {item.path_in_repo or item.repo_type}",
            )
            urls.append(str(getattr(info, "commit_url", info)))
    except OfflineModeIsEnabled:
        raise PushError("the Hub is switched off here (HF_HUB_OFFLINE is set); nothing was uploaded") from None
    except LocalTokenNotFoundError:
        raise PushError("no Hub token: log in with `hf auth login` or set HF_TOKEN, then push again") from None
    except httpx.TransportError as exc:
        raise PushError(f"could not reach the Hub ({type(exc).__name__}: {exc}); nothing more was uploaded") from None
    except (HfHubHTTPError, OSError) as exc:
        raise PushError(
            f"the upload to {uploads[0].repo_id} failed ({type(exc).__name__}: {exc}); what was uploaded before "
            "the failure stays, and pushing again uploads everything again"
        ) from None
    return urls

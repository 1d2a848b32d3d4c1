"""What produced a run: package versions, git commit, device, task and prompt versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from reflectevo import prompts
from reflectevo.tasks import get_task

PACKAGES = (
    "reflectevo",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "unsloth",
    "vllm",
    "bitsandbytes",
    "papermill",
    "pydantic",
    "math-verify",
)


# ---- environment facts for the manifest --------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(start: Path | None = None) -> dict[str, Any]:
    """The commit of the source tree the package was imported from (None outside a git checkout)."""
    where = start or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        )
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cuda": None}
    if "torch" in sys.modules or _installed("torch"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = {
                "device": torch.cuda.get_device_name(0),
                "count": torch.cuda.device_count(),
                "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                "cuda_version": torch.version.cuda,
            }
    return info


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def versions_of_tasks_and_prompts(task_names: list[str]) -> dict[str, Any]:
    """The versions of what turns a model's text into a number: each task's loading and grading
    (``Task.version``) and each prompt family. Recorded in the manifest and hashed into every
    stage identity."""

    return {
        "tasks": {name: get_task(name).version for name in task_names},
        "prompts": prompts.PROMPT_VERSION,
        "reflection": prompts.REFLECTION_VERSION,
        "review": prompts.REVIEW_VERSION,
        "judge": prompts.JUDGE_VERSION,
    }

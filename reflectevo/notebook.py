"""The first cells every numbered notebook shares, so the notebooks themselves hold no set-up logic.

Cell order in every notebook: the ``parameters`` cell (empty sections, ``params_file``,
``install_source``), the set-up cell (:func:`setup`), the config cell (:func:`configure`, which
selects the training/inference backend before transformers, TRL or PEFT are imported and validates
the params), then narrative and calls.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from reflectevo.config import Params, load_params
from reflectevo.models.loading import select_backend


def setup(quiet: bool = True) -> Path:
    """Make a notebook behave the same in Jupyter, under papermill and under ``reflectevo run``.

    Jupyter starts a kernel in ``notebooks/``; papermill and the runner start it where they were
    called. Paths in params (``params/x.yaml``, ``outputs/``) are relative to the project root, so
    a kernel started inside ``notebooks/`` moves up one folder. Returns the working directory.
    """
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "params").is_dir():
        os.chdir(here.parent)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    if quiet:
        for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return Path.cwd()


def configure(params_file: str | None = None, *, select_model_backend: bool = True, **sections: Any) -> Params:
    """Validate the params (file and/or injected sections) and select the model backend.

    A non-empty section given here replaces the file's section whole, as papermill does; the
    schema fills every key a section leaves out. The backend is selected here, before any cell
    imports transformers, because Unsloth has to be imported first to patch it.
    """
    params = load_params(params_file, sections)
    if select_model_backend:
        backend = select_backend(params.model.backend)
        print(f"model backend: {backend}")
    print(f"run {params.run.name!r} (seed {params.run.seed}) -> {params.run_dir}; params hash {params.hash()[:12]}")
    return params

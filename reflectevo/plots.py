"""The seaborn figures of the notebooks. Each function returns the figure and, given a path, saves
it atomically (a temporary file renamed into place), so a killed kernel leaves no half-written image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def question_lengths(rows: Sequence[dict[str, Any]], path: str | Path | None = None, dpi: int = 120) -> Any:
    """Question length (words) per task and split: the distribution the prompts will have."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(list(rows))
    figure, axis = plt.subplots(figsize=(7, 3.5))
    sns.boxplot(data=frame, x="task", y="words", hue="split", ax=axis, showfliers=True)
    axis.set_xlabel("task")
    axis.set_ylabel("question length (words)")
    axis.set_title("Question lengths per task and split")
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi)
    return figure

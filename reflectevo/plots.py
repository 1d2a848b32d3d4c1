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


def close(figure: Any) -> None:
    """Free a figure that is saved and will not be shown (scripts; notebooks show the saved file)."""
    import matplotlib.pyplot as plt

    plt.close(figure)


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


def curation_counts(counts: Any, path: str | Path | None = None, dpi: int = 120) -> Any:
    """D+, D± and Dpref sizes per task (bars), from :func:`reflectevo.curation.counts_table`."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(counts).reset_index()
    frame = frame[frame["task"] != "all"] if "task" in frame else frame
    long = frame.melt(id_vars="task", value_vars=["d_plus", "d_pm", "d_pref"], var_name="set", value_name="rows")
    long["set"] = long["set"].map({"d_plus": "D+", "d_pm": "D±", "d_pref": "Dpref"})
    figure, axis = plt.subplots(figsize=(7, 3.5))
    sns.barplot(data=long, x="task", y="rows", hue="set", ax=axis)
    axis.set_ylabel("training rows")
    axis.set_title("Curated training data per task")
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi)
    return figure


def reflection_success(table: Any, path: str | Path | None = None, dpi: int = 120) -> Any:
    """Reflection success rate per instruction dimension and value (one panel per dimension, hue = task),
    from :func:`reflectevo.pipeline.reflection_success`."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    dimensions = list(dict.fromkeys(table["dimension"])) or ["verify", "error", "plan"]
    figure, axes = plt.subplots(1, len(dimensions), figsize=(4 * len(dimensions), 3.2), sharey=True, squeeze=False)
    for axis, dimension in zip(axes[0], dimensions):
        part = table[table["dimension"] == dimension]
        if len(part):
            sns.barplot(data=part, x="value", y="rate", hue="task", ax=axis)
        axis.set_title(f"{dimension} (instruction key part)")
        axis.set_xlabel(dimension)
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("second trial correct")
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi)
    return figure


def training_history(phases: Sequence[dict[str, Any]]) -> Any:
    """The trainers' log histories as one long table: variant, phase, step, metric, value. Evaluation
    metrics keep their set name (``eval_heldout_loss``); the step-0 evaluation is the "before" point."""
    import pandas as pd

    rows = []
    for phase in phases:
        for entry in phase["log_history"]:
            step = entry.get("step", 0)
            for metric, value in entry.items():
                if metric in ("step", "epoch") or not isinstance(value, (int, float)):
                    continue
                rows.append({"variant": phase["variant"], "phase": phase["phase"], "step": step, "metric": metric,
                             "value": float(value)})
    return pd.DataFrame(rows, columns=["variant", "phase", "step", "metric", "value"])


def training_loss(history: Any, path: str | Path | None = None, dpi: int = 120) -> Any:
    """Training loss (lines) and held-out loss (points) per optimizer step, one panel per variant/phase."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    wanted = history[history["metric"].isin(["loss", "eval_heldout_loss"])].copy()
    wanted["curve"] = wanted["metric"].map({"loss": "training batches", "eval_heldout_loss": "held-out questions"})
    panels = list(dict.fromkeys(zip(history["variant"], history["phase"]))) or [("", "")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for axis, (variant, phase) in zip(axes[0], panels):
        part = wanted[(wanted["variant"] == variant) & (wanted["phase"] == phase)]
        if len(part):
            sns.lineplot(data=part, x="step", y="value", hue="curve", style="curve", markers=True, dashes=False, ax=axis)
        axis.set_title(variant if variant == phase else f"{variant}: {phase}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss (completion tokens)")
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi)
    return figure


DPO_PANELS = (("rewards", "implicit reward"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy"))


def dpo_rewards(history: Any, path: str | Path | None = None, dpi: int = 120) -> Any:
    """DPO's implicit rewards on the training batches, one row of panels per pair type: chosen and
    rejected rewards, their margin, and the share of pairs whose chosen reward is higher."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    train = history[history["metric"].str.startswith("rewards/")]
    variants = list(dict.fromkeys(history["variant"])) or [""]
    figure, axes = plt.subplots(len(variants), len(DPO_PANELS), figsize=(12, 3.2 * len(variants)), squeeze=False)
    for row, variant in zip(axes, variants):
        part = train[train["variant"] == variant]
        for axis, (metric, label) in zip(row, DPO_PANELS):
            if metric == "rewards":
                shown = part[part["metric"].isin(["rewards/chosen", "rewards/rejected"])]
                hue = "metric"
            else:
                shown, hue = part[part["metric"] == metric], None
            if len(shown):
                sns.lineplot(data=shown, x="step", y="value", hue=hue, marker="o", ax=axis)
            axis.set_title(f"{variant}: {label}")
            axis.set_xlabel("optimizer step")
            axis.set_ylabel(label)
            if metric == "rewards/accuracies":
                axis.set_ylim(-0.05, 1.05)
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi)
    return figure

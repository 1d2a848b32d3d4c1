"""The seaborn figures of the notebooks. Each function returns the figure and, given a path, saves
it atomically (a temporary file renamed into place), so a killed kernel leaves no half-written image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reflectevo.core.files import atomic_write


def save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save ``figure`` to ``path`` atomically, in the format its suffix names."""
    path = Path(path)
    atomic_write(
        path,
        lambda handle: figure.savefig(handle, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or None),
    )
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
                rows.append(
                    {
                        "variant": phase["variant"],
                        "phase": phase["phase"],
                        "step": step,
                        "metric": metric,
                        "value": float(value),
                    }
                )
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
            sns.lineplot(
                data=part, x="step", y="value", hue="curve", style="curve", markers=True, dashes=False, ax=axis
            )
        axis.set_title(variant if variant == phase else f"{variant}: {phase}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss (completion tokens)")
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi)
    return figure


DPO_PANELS = (
    ("rewards", "implicit reward"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
)


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


# ---- notebook 06: evaluation and analysis figures ------------------------------------------------------
def _no_data(axis: Any, note: str = "no data") -> None:
    """Mark a panel that has nothing to draw (empty or all-NaN input) instead of raising."""
    axis.text(0.5, 0.5, note, ha="center", va="center", transform=axis.transAxes, color="0.4")
    axis.set_xticks([])
    axis.set_yticks([])


def _finish(figure: Any, path: str | Path | None, dpi: int) -> Any:
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path, dpi)
    return figure


ACCURACY_PANELS = (("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2"))


def _accuracy_bars(
    axis: Any, part: Any, column: str, tasks: list[str], variants: list[str], colors: dict[str, Any]
) -> bool:
    """Grouped bars (x = task, one bar per variant) with the CI columns as error bars; False when all values are NaN."""
    import numpy as np

    width = 0.8 / max(len(variants), 1)
    drawn = False
    for slot, variant in enumerate(variants):
        rows = part[part["variant"] == variant].drop_duplicates("task").set_index("task").reindex(tasks)
        values = rows[column].astype(float).to_numpy()
        if np.isnan(values).all():
            continue
        low = rows.get(f"{column}_low", rows[column]).astype(float).to_numpy()
        high = rows.get(f"{column}_high", rows[column]).astype(float).to_numpy()
        below = np.where(np.isnan(low), 0, np.clip(values - low, 0, None))
        above = np.where(np.isnan(high), 0, np.clip(high - values, 0, None))
        x = np.arange(len(tasks)) - 0.4 + width * (slot + 0.5)
        axis.bar(
            x,
            np.nan_to_num(values),
            width,
            color=colors[variant],
            label=variant,
            yerr=np.vstack([below, above]),
            capsize=2,
            error_kw={"elinewidth": 0.8},
        )
        drawn = True
    axis.set_xticks(range(len(tasks)), tasks)
    return drawn


def accuracy_by_task(
    summary: Any,
    path: str | Path | None = None,
    dpi: int = 120,
    protocol: str | None = None,
    grader: str | None = "official",
) -> Any:
    """Acc@t1 and Acc@t2 per task (overall last) and variant with confidence-interval error bars, one row of
    two panels per evaluation protocol, for one grader."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(summary)
    needed = {"variant", "task", "acc_t1", "acc_t2"}
    if not needed <= set(frame.columns):
        frame = pd.DataFrame(columns=sorted(needed | {"protocol", "grader"}))
    if "protocol" not in frame:
        frame["protocol"] = protocol or ""
    if grader is not None and "grader" in frame:
        frame = frame[frame["grader"] == grader]
    protocols = [protocol] if protocol is not None else list(dict.fromkeys(frame["protocol"])) or [""]
    figure, axes = plt.subplots(len(protocols), 2, figsize=(12, 3.4 * len(protocols)), sharey=True, squeeze=False)
    every_variant = list(dict.fromkeys(frame["variant"]))
    colors = dict(zip(every_variant, sns.color_palette(n_colors=max(len(every_variant), 1))))  # one colour per variant
    for row, name in zip(axes, protocols):
        part = frame[frame["protocol"] == name]
        tasks = [task for task in dict.fromkeys(part["task"]) if task != "overall"]
        tasks += ["overall"] if "overall" in set(part["task"]) else []
        variants = list(dict.fromkeys(part["variant"]))
        for axis, (column, label) in zip(row, ACCURACY_PANELS):
            if not _accuracy_bars(axis, part, column, tasks, variants, colors):
                _no_data(axis, "no data" if len(part) == 0 else f"no {label} (no second turn)")
            else:
                axis.set_ylim(0, 1)
            axis.set_title(f"{name}: {label}" if name else label)
        row[0].set_ylabel("accuracy")
        handles: dict[str, Any] = {}  # label -> bar, over both panels (a variant without Acc@t2 is only in the first)
        for axis in row:
            for handle, label in zip(*axis.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        if handles:
            row[1].legend(
                handles.values(),
                handles.keys(),
                title="variant",
                fontsize="small",
                title_fontsize="small",
                loc="upper left",
                bbox_to_anchor=(1.01, 1),
            )
    if grader is not None:
        figure.suptitle(f"grader: {grader}")
    return _finish(figure, path, dpi)


def transition_heatmap(matrices: dict[str, Any], path: str | Path | None = None, dpi: int = 120) -> Any:
    """Counts of first-turn outcomes (rows) against final outcomes (columns), one annotated heatmap per
    entry of ``matrices`` (title -> 4x4 DataFrame), three panels per row."""
    import math

    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    items = list(matrices.items()) or [("", None)]
    columns = min(3, len(items))
    rows = math.ceil(len(items) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 4 * rows), squeeze=False)
    for axis, (title, matrix) in zip(axes.flat, items):
        frame = pd.DataFrame(matrix) if matrix is not None else pd.DataFrame()
        values = frame.apply(pd.to_numeric, errors="coerce").astype(float) if frame.size else frame
        if not values.size or values.isna().all().all():
            _no_data(axis)
        else:
            labels = values.map(lambda v: "" if pd.isna(v) else (f"{int(v)}" if float(v).is_integer() else f"{v:.3g}"))
            sns.heatmap(values, annot=labels, fmt="", cmap="Blues", cbar=False, linewidths=0.5, ax=axis)
            axis.set_xlabel("final outcome")
            axis.set_ylabel("turn-1 outcome")
            axis.tick_params(axis="x", rotation=30)
            axis.tick_params(axis="y", rotation=0)
        axis.set_title(title)
    for axis in list(axes.flat)[len(items) :]:
        axis.set_visible(False)
    return _finish(figure, path, dpi)


LENGTH_KINDS = ("turn-1 answer", "reflection", "turn-2 answer")


def length_distributions(frame: Any, path: str | Path | None = None, dpi: int = 120) -> Any:
    """Token lengths of first answers, reflections and second answers (one panel each, stacked), per source
    (stage 02 data, each evaluated variant) and task, from :func:`reflectevo.analysis.length_frame`."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    data = pd.DataFrame(frame)
    if not {"source", "task", "kind", "tokens"} <= set(data.columns):
        data = pd.DataFrame(columns=["source", "task", "kind", "tokens"])
    data = data.assign(tokens=pd.to_numeric(data["tokens"], errors="coerce")).dropna(subset=["tokens"])
    kinds = [kind for kind in LENGTH_KINDS if kind in set(data["kind"])] + [
        kind for kind in dict.fromkeys(data["kind"]) if kind not in LENGTH_KINDS
    ]
    kinds = kinds or list(LENGTH_KINDS)
    sources = list(dict.fromkeys(data["source"]))
    tasks = list(dict.fromkeys(data["task"]))
    width = max(7.0, 1.0 + 0.35 * max(len(sources), 1) * max(len(tasks), 1))
    figure, axes = plt.subplots(len(kinds), 1, figsize=(min(width, 18.0), 3.0 * len(kinds)), squeeze=False)
    for axis, kind in zip(axes[:, 0], kinds):
        part = data[data["kind"] == kind]
        if len(part):
            sns.boxplot(
                data=part, x="source", y="tokens", hue="task", order=sources, hue_order=tasks, ax=axis, showfliers=False
            )
            axis.tick_params(axis="x", rotation=15)
            axis.legend(
                title="task", fontsize="small", title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1)
            )
            axis.set_xlabel("")
            axis.set_ylabel("tokens")
        else:
            _no_data(axis)
        axis.set_title(kind)
    return _finish(figure, path, dpi)


def error_localisation(table: Any, path: str | Path | None = None, dpi: int = 120) -> Any:
    """Where in the failed first attempt reflections' words point (histogram of the mean relative position,
    by second-trial success) and how often they name the wrong answer (rate per task and success), from
    :func:`reflectevo.analysis.error_localisation`; a lexical proxy, not a check that the true error was found."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    data = pd.DataFrame(table)
    if not {"task", "success", "names_wrong_answer", "position"} <= set(data.columns):
        data = pd.DataFrame(columns=["task", "success", "names_wrong_answer", "position"])
    data = data.assign(
        outcome=data["success"].map(lambda value: "second trial correct" if bool(value) else "second trial wrong"),
        position=pd.to_numeric(data["position"], errors="coerce"),
        named=pd.to_numeric(
            data["names_wrong_answer"].map(lambda v: None if v is None or pd.isna(v) else float(v)), errors="coerce"
        ),
    )
    hue_order = [name for name in ("second trial correct", "second trial wrong") if name in set(data["outcome"])]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    positions = data.dropna(subset=["position"])
    if len(positions):
        sns.histplot(
            data=positions,
            x="position",
            hue="outcome",
            hue_order=hue_order,
            bins=10,
            binrange=(0, 1),
            stat="proportion",
            common_norm=False,
            multiple="dodge",
            shrink=0.9,
            ax=left,
        )
        left.set_xlabel("mean relative position of repeated words (0 = start, 1 = end)")
        left.set_ylabel("share of reflections")
    else:
        _no_data(left, "no reflections" if len(data) == 0 else "no repeated words")
    left.set_title("Where reflections point in the failed attempt")
    named = data.dropna(subset=["named"])
    if len(named):
        pooled = named.assign(task="all") if named["task"].nunique() > 1 else named.iloc[0:0]
        rates = pd.concat([named, pooled]).groupby(["task", "outcome"], sort=False)["named"].mean().reset_index()
        sns.barplot(data=rates, x="task", y="named", hue="outcome", hue_order=hue_order, ax=right)
        right.set_ylim(0, 1)
        right.set_xlabel("task")
        right.set_ylabel("share naming the wrong answer")
    else:
        _no_data(right, "no reflections" if len(data) == 0 else "no extracted wrong answers")
    right.set_title("Reflections that name the wrong answer")
    return _finish(figure, path, dpi)


# ---- self-evolution over rounds ------------------------------------------------------------------------
STABILITY_PANELS = (
    ((("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2")), "accuracy (eval split)", (0, 1)),
    ((("wrong_to_right", "wrong → right"), ("right_to_wrong", "right → wrong")), "answers (eval split)", None),
    ((("reflection_length", "mean reflection length"),), "tokens", None),
    ((("d_plus_yield", "D+ yield"),), "D+ per reflection", (0, 1)),
)


def stability(table: Any, path: str | Path | None = None, dpi: int = 120) -> Any:
    """The stability table of :func:`reflectevo.analysis.stability_table` across rounds: Acc@t1 and Acc@t2,
    the answers reflection fixed and broke, the mean reflection length and the D+ yield, one panel each,
    so collapse or a first answer that gets worse while correction looks better is visible."""
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(table)
    figure, axes = plt.subplots(1, len(STABILITY_PANELS), figsize=(4 * len(STABILITY_PANELS), 3.4))
    rounds = [int(number) for number in frame["round"]] if "round" in frame else []
    for axis, (series, label, limits) in zip(axes, STABILITY_PANELS):
        drawn = False
        for column, name in series:
            values = pd.to_numeric(frame[column], errors="coerce") if column in frame else pd.Series(dtype=float)
            if len(values) and values.notna().any():
                axis.plot(rounds, values.to_numpy(), marker="o", label=name)
                drawn = True
        if not drawn:
            _no_data(axis)
        else:
            axis.set_xticks(rounds)
            axis.set_xlabel("round")
            axis.set_ylabel(label)
            if limits:
                axis.set_ylim(*limits)
            else:
                axis.set_ylim(bottom=0)  # counts and lengths: a change reads against zero, not against a zoomed axis
            if len(series) > 1:
                axis.legend(fontsize="small")
        axis.set_title(" / ".join(name for _, name in series))
    return _finish(figure, path, dpi)

"""Markdown tables of data frames."""

from __future__ import annotations

from typing import Any


def _cell(value: Any) -> str:
    import pandas as pd

    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4f}".rstrip("0").rstrip(".")
    return " ".join(str(value).split()).replace("|", r"\|")


def markdown_table(frame: Any) -> str:
    """A DataFrame as a GitHub markdown table (no ``tabulate`` needed). The index is a column unless it is
    the default 0..n-1 range; NaN and None are empty cells, floats show at most 4 decimals."""
    import pandas as pd

    keep_index = not (isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0 and frame.index.step == 1)
    header = ([_cell(frame.index.name or "")] if keep_index else []) + [_cell(column) for column in frame.columns]
    if not header:
        return "*(empty table)*"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in zip(frame.index, frame.itertuples(index=False, name=None)):
        cells = ([_cell(label)] if keep_index else []) + [_cell(value) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    if len(frame) == 0:
        lines.append("| " + " | ".join(["(no rows)"] + [""] * (len(header) - 1)) + " |")
    return "\n".join(lines)

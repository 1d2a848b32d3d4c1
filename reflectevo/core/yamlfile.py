"""Params files read as YAML: a duplicated key or a syntax error is a ConfigError naming file:line."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reflectevo.errors import ConfigError


# ---- loading -----------------------------------------------------------------------------------
def read_sections(path: str | Path, sections: Sequence[str]) -> dict[str, Any]:
    """Read a params YAML file into its top-level ``sections`` (not yet validated)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{_yaml_line(exc, text)}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a params file: its lists or mappings are nested too deeply") from None
    if data is None:  # an empty file, or comments only: most likely truncated or the wrong file
        raise ConfigError(
            f"{path}: the params file is empty; a params file is a mapping of sections "
            f"({', '.join(sections)}) and states at least one"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a params file is a mapping of sections ({', '.join(sections)}), got {type(data).__name__}"
        )
    return data


def _yaml_line(exc: Exception, text: str) -> str:
    """``:line`` of a YAML error, for a ``file:line`` message ("" when PyYAML gives no position)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f":{mark.line + 1}"
    position = getattr(exc, "position", None)  # a ReaderError (a control character) has a character index
    return f":{text.count(chr(10), 0, position) + 1}" if isinstance(position, int) else ""


@functools.cache
def _unique_key_loader() -> type:
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error: plain YAML
    keeps the last one silently, so a second ``sft:`` section would replace the first unnoticed."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _value in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # "<<: *defaults" merges are overridden on purpose
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node.start_mark.line + 1)
                    except TypeError:
                        continue  # an unhashable key: SafeLoader reports it
                    if first != key_node.start_mark.line + 1:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"key {key!r} is given twice (first on line {first}); keep one",
                            key_node.start_mark,
                        )
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader

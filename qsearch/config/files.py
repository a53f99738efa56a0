"""Reading spec and config files, with limits.

A spec is small, hand-written YAML (or JSON, which YAML reads). What a file can do to the
validator is bounded before anything is parsed into values: its size, its nesting depth and
how far YAML aliases would expand (an "alias bomb" of a few hundred bytes expands to billions
of nodes). Every problem is one :class:`~qsearch.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qsearch.errors import ConfigError

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000


def _expanded_size(node: Any, memo: dict[int, int], depth: int, where: str) -> int:
    """Nodes the YAML graph has once every alias is expanded (memoised per node, so an alias
    bomb is measured without expanding it)."""
    import yaml

    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise ConfigError(where, "a YAML alias refers to itself (recursive anchor)")
        return memo[key]
    if depth > MAX_DEPTH:
        raise ConfigError(where, f"nested deeper than {MAX_DEPTH} levels")
    memo[key] = -1
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(c, memo, depth + 1, where) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, depth + 1, where)
                    + _expanded_size(v, memo, depth + 1, where) for k, v in node.value)
    memo[key] = size
    if size > MAX_NODES:
        raise ConfigError(where, f"expands to more than {MAX_NODES} YAML nodes (through "
                          "aliases); write the values out, a spec needs far fewer")
    return size


def read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON file as a mapping, after checking what it is and how big it is."""
    import yaml

    where = str(path)
    p = Path(path)
    if p.is_dir():
        raise ConfigError(where, "is a directory; give the path of a YAML spec file inside it")
    if not p.exists():
        raise ConfigError(where, "file not found")
    if not p.is_file():
        raise ConfigError(where, "is not a regular file")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(where, f"is {size} bytes; a spec file may be at most "
                          f"{MAX_FILE_BYTES} bytes")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(where, f"is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if "\x00" in text:
        raise ConfigError(where, "contains NUL bytes; it is not a text file")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded_size(node, {}, 0, where)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "\t" in text and "\t" in str(problem) or "'\\t'" in str(e):
            raise ConfigError(where, f"a tab is used for indentation{line}; YAML indents with "
                              "spaces only") from None
        raise ConfigError(where, f"not valid YAML/JSON{line}: {problem}") from None
    except RecursionError:
        raise ConfigError(where, f"nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ConfigError(where, "the file must contain a mapping at the top level "
                          f"(got {type(data).__name__})")
    return data

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
#: Characters of scalar text once aliases are expanded: a long string aliased thousands of
#: times stays under MAX_NODES but would make every message that shows it enormous.
MAX_EXPANDED_CHARS = 4 * MAX_FILE_BYTES


def _expanded_size(node: Any, memo: dict[int, tuple[int, int]], depth: int,
                   where: str) -> tuple[int, int]:
    """(nodes, scalar characters) the YAML graph has once every alias is expanded (memoised
    per node, so an alias bomb is measured without expanding it). Also rejects a mapping that
    gives the same key twice (YAML would silently keep the last one)."""
    import yaml

    key = id(node)
    if key in memo:
        if memo[key][0] < 0:
            raise ConfigError(where, "a YAML alias refers to itself (recursive anchor)")
        return memo[key]
    if depth > MAX_DEPTH:
        raise ConfigError(where, f"nested deeper than {MAX_DEPTH} levels")
    memo[key] = (-1, 0)
    size, chars = 1, 0
    children: list[Any] = []
    if isinstance(node, yaml.ScalarNode):
        chars = len(node.value)
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                if (k.tag, k.value) in seen:
                    raise ConfigError(where, f"line {k.start_mark.line + 1}: key "
                                      f"{_short(k.value)} is given twice (first at line "
                                      f"{seen[k.tag, k.value]}); keep one")
                seen[k.tag, k.value] = k.start_mark.line + 1
            children += [k, v]
    for c in children:
        n, m = _expanded_size(c, memo, depth + 1, where)
        size, chars = size + n, chars + m
        if size > MAX_NODES:
            raise ConfigError(where, f"expands to more than {MAX_NODES} YAML nodes (through "
                              "aliases); write the values out, a spec needs far fewer")
        if chars > MAX_EXPANDED_CHARS:
            raise ConfigError(where, f"expands to more than {MAX_EXPANDED_CHARS} characters "
                              "of text (through aliases); write the values out")
    memo[key] = (size, chars)
    return size, chars


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 1] + "…")


def read_mapping(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """Read a YAML or JSON file as a mapping, after checking what it is and how big it is.

    Every problem is one ConfigError naming the file: not found, a directory, not a regular
    file, unreadable, too big, not UTF-8, NUL bytes, tabs used for indentation, invalid YAML,
    an alias bomb, nesting too deep, a key given twice, empty, or not a mapping at the top."""
    import yaml

    where = str(path)
    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(where, "is a directory; give the path of a YAML file inside it")
        if not p.exists():
            raise ConfigError(where, "file not found")
        if not p.is_file():
            raise ConfigError(where, "is not a regular file")
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(where, f"is {size} bytes; a {what} may be at most "
                              f"{MAX_FILE_BYTES} bytes")
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:  # permission denied, a broken mount, a name too long
        raise ConfigError(where, f"cannot be read: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(where, f"is over {MAX_FILE_BYTES} bytes; a {what} may be at most "
                          f"{MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(where, f"is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if "\x00" in text:
        raise ConfigError(where, "contains NUL bytes; it is not a text file")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            raise ConfigError(where, f"is empty; a {what} is a YAML mapping of `key: value` "
                              "lines")
        _expanded_size(node, {}, 0, where)
        data = yaml.safe_load(text)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "'\\t'" in str(problem) and mark is not None:
            before = text.splitlines()[mark.line][: mark.column] if text.splitlines() else ""
            if before.strip():
                raise ConfigError(where, f"a tab{line}, column {mark.column + 1} is not "
                                  "allowed there; replace tabs with spaces") from None
            raise ConfigError(where, f"a tab is used for indentation{line}; YAML indents "
                              "with spaces only: replace tabs with spaces") from None
        raise ConfigError(where, f"not valid YAML/JSON{line}: {problem}") from None
    except RecursionError:
        raise ConfigError(where, f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # e.g. an integer literal over Python's 4300-digit limit
        why = "a number with thousands of digits" if "digits" in str(e) else \
            f"a value that cannot be read ({str(e).splitlines()[0][:80]})"
        raise ConfigError(where, f"holds {why}; write a plain value") from None
    if not isinstance(data, dict):
        kind = {"list": "a YAML list", "str": "a single string"}.get(
            type(data).__name__, f"a single {type(data).__name__}")
        raise ConfigError(where, f"holds {kind} at the top level; a {what} is a mapping of "
                          "`key: value` lines")
    return data

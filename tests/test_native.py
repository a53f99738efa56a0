"""Building and loading native kernels (qsearch.quant.native): one build per source and
machine in the cache folder, loaded with ctypes; a machine that cannot have them says why
without a warning, a failing compiler warns once and leaves nothing half-built."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import warnings

import pytest

from qsearch.quant import native

SOURCE = "int twice(int x) { return 2 * x; }\n"

needs_build = pytest.mark.skipif(
    native.NativeLibrary("probe", SOURCE, {})._missing() is not None or not native.compiler(),
    reason="needs Linux x86-64 and a C compiler")


def _lib(**kw) -> native.NativeLibrary:
    return native.NativeLibrary("twice", SOURCE, {"twice": (ctypes.c_int, [ctypes.c_int])},
                                **kw)


@needs_build
def test_builds_once_into_the_cache_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("QSEARCH_CACHE", str(tmp_path))
    lib = _lib()
    assert lib.load().twice(21) == 42 and lib.status() == "native"
    built = list(tmp_path.glob("native/twice-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert _lib().load().twice(4) == 8  # a new process-level object reuses the file
    assert built[0].stat().st_mtime_ns == mtime and len(list(tmp_path.glob("native/*"))) == 1


def test_a_missing_cpu_feature_is_a_reason_not_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("QSEARCH_CACHE", str(tmp_path))
    lib = _lib(needs=("no_such_cpu_flag",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lib.load() is None
    assert lib.status() in ("no no_such_cpu_flag on this CPU", "not an x86-64 Linux CPU")
    assert not list(tmp_path.glob("native/*.so"))


def test_switched_off(monkeypatch):
    monkeypatch.setenv("QSEARCH_COMPILE", "0")
    assert _lib().load() is None and _lib().status() == "off"
    monkeypatch.delenv("QSEARCH_COMPILE")
    lib = _lib()
    lib.enabled = False
    assert lib.load() is None and lib.status() == "off"


BROKEN_CC = """
import ctypes, warnings
from qsearch.quant import native
lib = native.NativeLibrary("twice", "int twice(int x) { return 2 * x; }",
                           {"twice": (ctypes.c_int, [ctypes.c_int])})
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    first, second = lib.load(), lib.load()
print(first is None and second is None, len(w), lib.status())
"""


@needs_build
def test_a_compiler_that_fails_warns_once_and_leaves_nothing(tmp_path):
    env = {**os.environ, "CC": "false", "QSEARCH_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", BROKEN_CC], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.split(maxsplit=2)
    assert out[:2] == ["True", "1"], out
    assert out[2].startswith("false failed"), out
    assert not list(tmp_path.glob("native/*.so"))

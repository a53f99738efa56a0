"""Small C kernels built once per machine and loaded with ``ctypes``.

Why: a few of qsearch's CPU hot spots are single loops that neither ATen nor ``torch.compile``
run at memory speed (the column gather of LTS's unfrozen channels, the fused LSQ
quantizers), and each call through a compiled graph costs 50-100 us of guards and dispatch.
A plain C loop compiled for the host CPU is both faster and cheaper to call (a few us: ctypes
drops the GIL and calls the function).

How: :class:`NativeLibrary` holds the C source and the functions' signatures. The first call
of :meth:`NativeLibrary.load` in a process compiles the source with ``cc -O3 -march=native``
(plus the library's own flags) into the cache folder (``QSEARCH_CACHE``, ``~/.cache/qsearch``
by default) under a name that hashes the source, the compiler, the flags and the CPU's feature
flags, so a build for another CPU is never loaded, and installs it atomically (concurrent
workers each write a whole file). Everything that keeps a library from loading (not Linux
x86-64, a CPU without the needed features, no C compiler, a failed build) makes ``load``
return None, and the caller runs its torch implementation; a reason that is a fault rather
than a fact of the machine (a failed build) warns once. ``QSEARCH_COMPILE=0`` turns every
native kernel off, as it does the compiled ones.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from qsearch.config import defaults

#: Flags every library is built with. ``-ffp-contract=off``: no fused multiply-adds the
#: torch reference does not do, so float results match it bit for bit;
#: ``-fno-trapping-math -fno-math-errno``: let loops with selects and ``rintf`` vectorise
#: (neither changes a value); ``-fopenmp-simd``: honour ``#pragma omp simd`` (no OpenMP runtime).
BASE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off",
              "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd")


def cpu_flags() -> str:
    """The CPU's feature flags (Linux; elsewhere the processor's name): part of a build's
    name, and what :class:`NativeLibrary` checks its ``needs`` against."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler() -> str | None:
    """The C compiler: ``CC``, else ``cc`` or ``gcc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


class NativeLibrary:
    """C ``source`` compiled on first use and loaded with ``ctypes``.

    ``functions`` maps each exported name to ``(restype, argtypes)``. ``needs`` names CPU
    feature flags the kernels require (e.g. ``("avx512f",)``); a CPU without them gets no
    build and the reason ``no <flag> on this CPU``. :meth:`load` is thread-safe and decides
    once per process."""

    def __init__(self, name: str, source: str,
                 functions: dict[str, tuple[object, list[object]]],
                 needs: tuple[str, ...] = (), flags: tuple[str, ...] = ()):
        self.name = name
        self.source = source
        self.functions = functions
        self.needs = needs
        self.flags = BASE_FLAGS + flags
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._state: str | None = None  # None: not tried; "native"; or why not
        self.enabled = True  # False: callers use their torch path (A/B timing, tests)

    def _missing(self) -> str | None:
        if platform.system() != "Linux" or \
                platform.machine().lower() not in ("x86_64", "amd64"):
            return "not an x86-64 Linux CPU"
        flags = f"{cpu_flags()} "
        for need in self.needs:
            if f" {need} " not in flags:
                return f"no {need} on this CPU"
        return None

    def _build(self) -> ctypes.CDLL | str:
        missing = self._missing()
        if missing:
            return missing
        cc = compiler()
        if not cc:
            return "no C compiler"
        key = hashlib.sha256("\0".join([self.source, cc, *self.flags, cpu_flags()]).encode())
        folder = defaults.cache_root() / "native"
        lib_path = folder / f"{self.name}-{key.hexdigest()[:20]}.so"
        if not lib_path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / f"{self.name}.c"
                src.write_text(self.source)
                out = Path(tmp) / lib_path.name
                done = subprocess.run([cc, *self.flags, str(src), "-o", str(out)],
                                      capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    return f"{cc} failed: {(done.stderr or done.stdout).strip()[:200]}"
                os.replace(out, lib_path)
        lib = ctypes.CDLL(str(lib_path))
        for fn, (restype, argtypes) in self.functions.items():
            getattr(lib, fn).restype = restype
            getattr(lib, fn).argtypes = argtypes
        return lib

    def load(self) -> ctypes.CDLL | None:
        """The library (built on the first call in this machine's cache), or None where it
        cannot be had or native kernels are off; :meth:`status` says why."""
        if not self.enabled or defaults.compile_kernels() == "off":
            return None
        if self._state is None:
            with self._lock:
                if self._state is None:
                    try:
                        built = self._build()
                    except Exception as e:  # noqa: BLE001 - any failure: the torch path
                        built = f"{type(e).__name__}: {e}"
                    if isinstance(built, str):
                        if not _fact_of_the_machine(built):
                            warnings.warn(f"qsearch: native {self.name} kernels unavailable "
                                          f"({built}); using torch", RuntimeWarning,
                                          stacklevel=3)
                        self._state = built
                    else:
                        self._lib, self._state = built, "native"
        return self._lib

    def status(self) -> str:
        """``native`` when loaded (building on first call), ``off`` when switched off, else
        why the library is not used."""
        if not self.enabled or defaults.compile_kernels() == "off":
            return "off"
        self.load()
        return self._state or "not built"


def _fact_of_the_machine(reason: str) -> bool:
    """A reason not to load that is how the machine is (no warning), not a fault."""
    return reason == "not an x86-64 Linux CPU" or reason.startswith("no ")

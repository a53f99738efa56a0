"""Defaults and environment variables, read in one place and only when asked for.

Nothing here runs at import: a value read at import time would freeze whatever the
environment held when the module was first imported (a test, a worker started before the
driver set the variable). Every function reads the environment on each call.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where studies go when neither the spec, ``--storage`` nor ``QSEARCH_STORAGE`` says.
DEFAULT_STORAGE = "sqlite:///qsearch.db"
DEFAULT_CACHE_DIR = "~/.cache/qsearch"

#: Every environment variable qsearch reads, with what it means (``qsearch --help`` lists them).
ENV_VARS: dict[str, str] = {
    "QSEARCH_STORAGE": f"database URL used when none is given (default {DEFAULT_STORAGE})",
    "QSEARCH_CACHE": f"cache folder for FP32 warm starts and the native LTS gather kernel "
                     f"(default {DEFAULT_CACHE_DIR})",
    "QSEARCH_DB_RETRIES": "attempts per database operation on transient errors (default 6)",
    "QSEARCH_DB_RETRY_BASE_S": "first retry back-off in seconds, doubled each time (default 0.2)",
    "QSEARCH_DB_POOL_SIZE": "connections kept per process on PostgreSQL (default 5)",
    "QSEARCH_DB_MAX_OVERFLOW": "extra connections allowed under load (default 5)",
    "QSEARCH_LEASE_TIMEOUT_S": "seconds without heartbeat before a driver lease is stale (60)",
    "QSEARCH_RESOURCE_WAIT_S": "seconds a study waits for an autoscaling cluster to offer a "
                               "node that fits one trial (default 0: fail at once)",
    "QSEARCH_COMPILE": "torch.compile'd quantizer kernels: auto (default: for trials large enough "
                       "to repay compiling them; native C loops, built once per machine, on "
                       "CPU in every trial), 1 for every trial, 0 never (eager kernels: no "
                       "compiled or native ones)",
    "QSEARCH_NO_COMPILE": "1 is QSEARCH_COMPILE=0 (the older name)",
    "QSEARCH_CHANNELS_LAST": "memory layout of conv models in training: auto (default: "
                             "channels-last on CPU, unchanged on CUDA), 1 always, 0 never",
    "QSEARCH_SQLITE_WAL": "SQLite write-ahead log while a study runs: auto (default: unless the "
                          "file is on a network filesystem), 1 always, 0 never",
    "QSEARCH_MALLOC_TUNING": "auto (default: a training process keeps freed host memory for "
                             "reuse, on Linux with glibc), 0 leaves malloc's own settings",
}


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        from qsearch.errors import ConfigError

        raise ConfigError(name, f"must be a number (got {raw!r})") from None


def storage_url(explicit: str | None = None) -> str:
    """The database URL: ``explicit``, else ``QSEARCH_STORAGE``, else the SQLite default."""
    return explicit or os.environ.get("QSEARCH_STORAGE") or DEFAULT_STORAGE


def cache_root(explicit: str | None = None) -> Path:
    """The cache folder: ``explicit``, else ``QSEARCH_CACHE``, else ``~/.cache/qsearch``."""
    return Path(explicit or os.environ.get("QSEARCH_CACHE") or DEFAULT_CACHE_DIR).expanduser()


def db_retries() -> int:
    return max(1, int(_env_float("QSEARCH_DB_RETRIES", 6)))


def db_retry_base_s() -> float:
    return _env_float("QSEARCH_DB_RETRY_BASE_S", 0.2)


def db_pool_size() -> int:
    return int(_env_float("QSEARCH_DB_POOL_SIZE", 5))


def db_max_overflow() -> int:
    return int(_env_float("QSEARCH_DB_MAX_OVERFLOW", 5))


def channels_last() -> str:
    """``QSEARCH_CHANNELS_LAST`` as ``auto``, ``on`` or ``off`` (anything unrecognised: auto)."""
    return _tri_state("QSEARCH_CHANNELS_LAST")


def sqlite_wal() -> str:
    """``QSEARCH_SQLITE_WAL`` as ``auto``, ``on`` or ``off`` (anything unrecognised: auto)."""
    return _tri_state("QSEARCH_SQLITE_WAL")


#: The older switch for the eager kernels (``1`` is ``QSEARCH_COMPILE=0``).
NO_COMPILE_ENV = "QSEARCH_NO_COMPILE"


def compile_kernels() -> str:
    """``QSEARCH_COMPILE`` as ``auto``, ``on`` or ``off``; ``QSEARCH_NO_COMPILE=1`` (the older
    switch) is ``off`` whatever ``QSEARCH_COMPILE`` says."""
    if os.environ.get(NO_COMPILE_ENV, "").strip() not in ("", "0"):
        return "off"
    return _tri_state("QSEARCH_COMPILE")


def malloc_tuning() -> str:
    """``QSEARCH_MALLOC_TUNING`` as ``auto``, ``on`` or ``off`` (anything unrecognised: auto)."""
    return _tri_state("QSEARCH_MALLOC_TUNING")


def _tri_state(name: str) -> str:
    raw = (os.environ.get(name) or "auto").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw in ("1", "on", "true", "yes"):
        return "on"
    return "auto"


def lease_timeout_s() -> float:
    return _env_float("QSEARCH_LEASE_TIMEOUT_S", 60.0)

"""Where a study's log lines go.

The terminal shows qsearch's own lines (warnings and errors of ``qsearch.*`` loggers, the
live table, the summary). Everything the libraries say — Optuna's study messages, Ray's
start-up notices, Tune's progress, Python warnings — goes to ``driver.log`` in the study's
artifacts folder, unless ``--verbose`` asks for all of it on the terminal.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def route_logs(log_file: Path | None, verbose: bool = False) -> Path | None:
    """Configure the root and library loggers for one ``qsearch launch``; returns the file."""
    import optuna

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    import ray  # noqa: F401 - Ray installs its own handlers when imported: replace them

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    for name in ("ray", "ray.tune", "ray.train", "ray.air", "ray.data"):
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            lib.removeHandler(h)
        lib.propagate = True
    logging.captureWarnings(True)
    if verbose or log_file is None:
        logging.basicConfig(level=logging.INFO, format=FORMAT)
        return None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(_OneLine())
    ours = logging.getLogger("qsearch")
    ours.addHandler(console)  # and propagates to the file too
    warnings.simplefilter("default")
    return log_file

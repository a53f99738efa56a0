"""Per-epoch checkpoints: atomic writes, torn-file detection, fall back to the previous one."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
PATTERN = "ckpt-{epoch:05d}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``: a reader
    never sees a half-written file, and a crash leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | Path, epoch: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Save the state after ``epoch`` epochs and keep the ``keep`` newest checkpoints."""
    d = Path(directory)
    path = d / PATTERN.format(epoch=epoch)
    atomic_torch_save(payload, path)
    for old in sorted(d.glob("ckpt-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest checkpoint that loads; a torn or truncated file is skipped with a warning."""
    d = Path(directory)
    if not d.is_dir():
        return None
    for path in sorted(d.glob("ckpt-*.pt"), reverse=True):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, e)
    return None

"""Resume checks shared by the method tests: a run interrupted after an epoch and resumed
from its checkpoint must end exactly where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qsearch.config import TrialConfig
from qsearch.train import TrainResult, train

#: Measured wall-clock figures differ between any two runs.
TIMING = ("epoch_s", "wall_s", "backward_time", "backward_time_ratio")


class _Stop(Exception):
    pass


def assert_resume_is_bit_identical(cfg: TrialConfig, ckpt_dir: Path, stop_epoch: int = 1
                                   ) -> tuple[TrainResult, TrainResult]:
    """Train ``cfg`` straight through, then again stopped after ``stop_epoch`` and resumed
    from ``ckpt_dir``; assert equal final state dicts and per-epoch histories (timings
    aside). Returns (straight, resumed) for method-specific checks."""
    straight = train(cfg)

    def stop(metrics):
        if metrics["epoch"] == stop_epoch:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, report=stop, checkpoint_dir=ckpt_dir)
    resumed = train(cfg, checkpoint_dir=ckpt_dir)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for ha, hb in zip(straight.history, resumed.history, strict=True):
        assert {k: v for k, v in ha.items() if k not in TIMING} == \
            {k: v for k, v in hb.items() if k not in TIMING}
    return straight, resumed

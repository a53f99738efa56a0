"""FP32 warm start, trained once per (model, dataset, seed, recipe) and cached on disk.

The cache key is a content hash of everything that determines the FP32 weights, so trials of a
study (and of later studies) reuse one file. A file lock makes concurrent trials on one machine
wait for the first one instead of all training the same model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.data import DatasetBundle, iterate_batches
from qsearch.models import build_model
from qsearch.train.checkpoint import atomic_torch_save
from qsearch.train.layout import to_training_layout
from qsearch.data.evaluate import evaluate
from qsearch.train.optim import build_optimizer, build_scheduler

if TYPE_CHECKING:
    from qsearch.config import TrialConfig

log = logging.getLogger(__name__)
#: 2: trained on the training split without its validation carve; accuracy is validation.
WARMSTART_VERSION = 2


@dataclass
class WarmStart:
    state_dict: dict[str, torch.Tensor]
    path: Path
    trained_now: bool
    accuracy: float


def cache_key(cfg: TrialConfig) -> str:
    recipe = cfg.warm_start.model_dump(exclude={"cache_dir", "enabled"})
    blob = json.dumps(
        {
            "v": WARMSTART_VERSION,
            "model": cfg.model,
            "dataset": cfg.dataset,
            "data": cfg.data.model_dump(),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "weight_decay": cfg.weight_decay,
            "momentum": cfg.momentum,
            "nesterov": cfg.nesterov,
            "recipe": recipe,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def train_float(cfg: TrialConfig, data: DatasetBundle, device: torch.device) -> tuple[nn.Module, float]:
    """Train the FP32 model with the warm-start recipe on the training split only (never val
    or test); returns (model, validation accuracy) — nan without a validation split."""
    torch.manual_seed(cfg.seed)
    model = to_training_layout(build_model(cfg.model, data.num_classes, data.in_channels),
                               device)
    ws = cfg.warm_start
    opt = build_optimizer(model, ws.optimizer, ws.lr, cfg.momentum, cfg.weight_decay,
                          nesterov=cfg.nesterov)
    sched = build_scheduler(opt, "cosine", ws.epochs)
    for epoch in range(ws.epochs):
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch + 1)
        for x, y in iterate_batches(data, "train", cfg.batch_size, shuffle=True, generator=g):
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    acc, _ = evaluate(model, data, device, cfg.batch_size, split="val")
    return model, acc


_READ: dict[tuple[str, int, int], dict] = {}


def _read_cached(path: Path) -> dict:
    """``torch.load`` of a warm-start file, kept per process by (path, size, mtime): a reused
    worker reads it once. Callers copy the state dict into a model (never mutate it)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _READ:
        if len(_READ) >= 4:
            _READ.pop(next(iter(_READ)))
        _READ[key] = torch.load(path, map_location="cpu", weights_only=True)
    return _READ[key]


def load_or_train(cfg: TrialConfig, data: DatasetBundle, device: torch.device) -> WarmStart:
    d = cfg.warm_start.resolved_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{cfg.model}-{cfg.dataset}-{cache_key(cfg)}.pt"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                blob = _read_cached(path)
                return WarmStart(blob["state_dict"], path, False, float(blob["accuracy"]))
            except Exception as e:  # noqa: BLE001 - a torn cache file is retrained
                log.warning("warm-start cache %s unreadable (%s); retraining", path, e)
        model, acc = train_float(cfg, data, device)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_torch_save({"state_dict": state, "accuracy": acc, "key": path.stem}, path)
        log.info("trained FP32 warm start %s (validation accuracy %.4f)", path.name, acc)
        return WarmStart(state, path, True, acc)

"""The shared QAT trainer: one loop for every trial.

``train(config, report)`` builds the model, loads the cached FP32 warm start, lets a precision
stage (CSQ) pick per-layer bits, converts to LSQ QAT, trains with the enabled methods' hooks,
and after every epoch evaluates, computes the cost-model objectives and calls ``report``.
It knows nothing of Optuna, Ray or SQL.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qsearch.cost import LayerCost, compute_cost, count_macs, extra_param_count, layer_costs
from qsearch.data import load_dataset
from qsearch.errors import CheckpointError, TrialError
from qsearch.methods.plugin import Method, build_methods
from qsearch.models import build_model
from qsearch.quant import Precision, convert
from qsearch.config import TrialConfig
from qsearch.train.checkpoint import load_latest, save_checkpoint
from qsearch.methods.plugin import TrainContext
from qsearch.train.optim import build_optimizer, build_scheduler
from qsearch.train.warmstart import load_or_train

Report = Callable[[dict[str, Any]], None]
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    layers: list[LayerCost]
    model: nn.Module
    config: TrialConfig
    warm_start_trained: bool = False
    weight_bits: dict[str, int] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise TrialError("device=cuda was asked for but CUDA is not available on this machine")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """One trial. Use :func:`train` unless you need the pieces (tests, benchmarks)."""

    def __init__(self, config: TrialConfig, report: Report | None = None,
                 checkpoint_dir: str | Path | None = None):
        self.config = config
        self.report = report
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.device = resolve_device(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        seed_everything(config.seed)
        self.data = load_dataset(config.dataset, config.data)
        self.methods: list[Method] = build_methods(config)
        self.warm = None

    # ------------------------------------------------------------------ set-up
    def _float_model(self) -> nn.Module:
        cfg = self.config
        model = build_model(cfg.model, self.data.num_classes, self.data.in_channels)
        if cfg.warm_start.enabled:
            self.warm = load_or_train(cfg, self.data, self.device)
            model.load_state_dict(self.warm.state_dict)
        return model.to(self.device)

    def setup(self, resume: dict[str, Any] | None) -> TrainContext:
        cfg = self.config
        model = self._float_model()
        n_train = len(self.data.train)
        ctx = TrainContext(
            config=cfg, device=self.device, data=self.data, model=model,
            steps_per_epoch=math.ceil(n_train / cfg.batch_size), report=self.report,
            input_shape=self.data.input_shape,
        )
        if any(m.needs_fp_partner for m in self.methods):
            fp = copy.deepcopy(model).eval()
            for p in fp.parameters():
                p.requires_grad_(False)
            ctx.fp_model = fp

        weight_bits: dict[str, int] = {}
        if resume is not None:
            weight_bits = dict(resume.get("weight_bits", {}))
            ctx.qat_start_epoch = int(resume.get("qat_start_epoch", 0))
        else:
            for m in self.methods:
                bits = m.precision_stage(ctx)
                if bits:
                    weight_bits.update(bits)
        self.weight_bits = weight_bits
        # MACs do not depend on precision; count on the float model so no probe input ever
        # reaches (and initialises) an activation quantizer.
        self.macs = count_macs(model, self.data.input_shape)
        ctx.qlayers = convert(model, Precision.from_config(cfg, weight_bits))
        ctx.model = model.to(self.device)
        for m in self.methods:
            m.attach(ctx)
        ctx.optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        # The QAT schedule spans the epochs left after a precision stage (CSQ), so its LR
        # still anneals fully by the last epoch.
        ctx.scheduler = build_scheduler(ctx.optimizer, cfg.lr_schedule,
                                        cfg.epochs - ctx.qat_start_epoch)
        for m in self.methods:
            m.configure_optimizer(ctx)
        return ctx

    # ------------------------------------------------------------------ loop
    def train_epoch(self, ctx: TrainContext, epoch: int) -> float:
        model, opt = ctx.model, ctx.optimizer
        if opt is None:
            raise RuntimeError("Trainer.train_epoch() needs the context from Trainer.setup()")
        model.train()
        total, count = 0.0, 0
        for x, y in ctx.batches(epoch):
            for m in self.methods:
                m.before_forward(ctx)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            for m in self.methods:
                loss = m.loss(ctx, x, y, logits, loss)
            if not torch.isfinite(loss):
                raise TrialError(f"loss became {float(loss)} at epoch {epoch + 1}, step {ctx.step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for m in self.methods:
                m.after_backward(ctx)
            opt.step()
            for m in self.methods:
                m.after_step(ctx)
            ctx.step += 1
            total += float(loss.detach()) * len(y)
            count += len(y)
        return total / max(1, count)

    def layer_rows(self, ctx: TrainContext) -> list[LayerCost]:
        stats: dict[str, dict[str, float]] = {}
        for m in self.methods:
            for name, st in m.layer_stats(ctx).items():
                stats.setdefault(name, {}).update(st)
        return layer_costs(ctx.model, self.data.input_shape, stats, self.macs)

    def epoch_metrics(self, ctx: TrainContext, train_loss: float) -> dict[str, Any]:
        # Validation only: every epoch's report reaches the scheduler and the sampler. The test
        # split is measured once, in run(), on the final weights (final_test_metrics).
        val_acc, val_loss = ctx.evaluate(split="val")
        rows = self.layer_rows(ctx)
        extra = sum(m.extra_backward_bops(ctx) for m in self.methods)
        cost = compute_cost(rows, extra_param_count(ctx.model, ctx.qlayers), extra)
        out: dict[str, Any] = {
            "epoch": ctx.epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            # Alias of val_accuracy while the search, store and dashboards still read
            # ``accuracy``; it goes once they read objectives from the registry.
            "accuracy": val_acc,
            "size_mb": cost.size_mb,
            "bops": cost.bops,
            "backward_cost": cost.backward_cost,
            "bwd_flops_saved": cost.bwd_flops_saved,
            "lr": ctx.optimizer.param_groups[0]["lr"] if ctx.optimizer else 0.0,
        }
        for m in self.methods:
            out.update({f"{m.name}.{k}": v for k, v in m.metrics(ctx).items()})
        return out

    def final_test_metrics(self, ctx: TrainContext) -> dict[str, float]:
        """``test_accuracy`` and ``test_loss`` of the final weights: the one look at the test
        split a trial gets, after its last epoch (never per epoch, so nothing selects on it)."""
        test_acc, test_loss = ctx.evaluate(split="test")
        return {"test_accuracy": test_acc, "test_loss": test_loss}

    def checkpoint_payload(self, ctx: TrainContext, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config_hash": self.config.content_hash(),
            "epoch": ctx.epoch,
            "step": ctx.step,
            "qat_start_epoch": ctx.qat_start_epoch,
            "weight_bits": self.weight_bits,
            "model": ctx.model.state_dict(),
            "optimizer": ctx.optimizer.state_dict() if ctx.optimizer else {},
            "scheduler": ctx.scheduler.state_dict() if ctx.scheduler else {},
            "methods": {m.name: m.state_dict() for m in self.methods},
            "rng": _rng_state(self.device),
            "history": history,
            "wall_s": wall,
        }

    def restore(self, ctx: TrainContext, ckpt: dict[str, Any]) -> None:
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("config_hash") != self.config.content_hash():
            raise CheckpointError(
                "checkpoint belongs to a different trial configuration; use a fresh checkpoint_dir"
            )
        ctx.model.load_state_dict(ckpt["model"])
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        ctx.scheduler.load_state_dict(ckpt["scheduler"])
        for m in self.methods:
            m.load_state_dict(ckpt["methods"].get(m.name, {}))
        ctx.epoch, ctx.step = int(ckpt["epoch"]), int(ckpt["step"])
        _set_rng_state(ckpt["rng"], self.device)

    def run(self) -> TrainResult:
        cfg = self.config
        start = time.perf_counter()
        ckpt = load_latest(self.checkpoint_dir) if self.checkpoint_dir else None
        ctx = self.setup(ckpt)
        history: list[dict[str, Any]] = []
        wall_before = 0.0
        if ckpt is not None:
            self.restore(ctx, ckpt)
            history = list(ckpt["history"])
            wall_before = float(ckpt.get("wall_s", 0.0))
        else:
            ctx.epoch = max(ctx.epoch, ctx.qat_start_epoch)
        while ctx.epoch < cfg.epochs:
            t0 = time.perf_counter()
            train_loss = self.train_epoch(ctx, ctx.epoch)
            for m in self.methods:
                m.epoch_end(ctx)
            ctx.scheduler.step()
            ctx.epoch += 1
            metrics = self.epoch_metrics(ctx, train_loss)
            metrics["epoch_s"] = time.perf_counter() - t0
            metrics["wall_s"] = wall_before + time.perf_counter() - start
            history.append(metrics)
            if self.checkpoint_dir:
                save_checkpoint(self.checkpoint_dir, ctx.epoch,
                                self.checkpoint_payload(ctx, history, metrics["wall_s"]))
            if self.report:
                self.report(dict(metrics))
        final = dict(history[-1]) if history else self.epoch_metrics(ctx, float("nan"))
        final.update(self.final_test_metrics(ctx))
        final["epochs"] = ctx.epoch
        final["wall_s"] = wall_before + time.perf_counter() - start
        return TrainResult(
            metrics=final, history=history, layers=self.layer_rows(ctx), model=ctx.model,
            config=cfg, warm_start_trained=bool(self.warm and self.warm.trained_now),
            weight_bits={n: q.w_bits for n, q in ctx.qlayers.items()},
        )


def train(config: TrialConfig, report: Report | None = None,
          checkpoint_dir: str | Path | None = None) -> TrainResult:
    """Train one trial; ``report(metrics)`` is called after every epoch. With
    ``checkpoint_dir``, every epoch is checkpointed and an existing checkpoint is resumed."""
    return Trainer(config, report, checkpoint_dir).run()

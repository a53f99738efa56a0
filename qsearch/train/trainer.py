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
from qsearch.methods.plugin import Method, Stage, build_methods
from qsearch.models import build_model
from qsearch.train.host_memory import keep_freed_memory
from qsearch.train.kernels import compile_pays
from qsearch.train.layout import to_training_layout
from qsearch.quant import Precision, convert, fused
from qsearch.config import TrialConfig
from qsearch.train.checkpoint import load_latest, save_checkpoint
from qsearch.train.costs import TrainingCosts, fp32_reference_backward_s
from qsearch.methods.plugin import TrainContext
from qsearch.train.optim import build_optimizer, build_scheduler, param_groups
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
        keep_freed_memory()  # host-memory reuse for the whole process (train/host_memory.py)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        seed_everything(config.seed)
        self.data = load_dataset(config.dataset, config.data)
        self.methods: list[Method] = build_methods(config)
        self.warm = None
        #: Executed FLOPs and measured backward time of every training step (all stages).
        self.costs = TrainingCosts(self.device)
        self._fp32_ref_s: float | None = None
        self._stage_resume: dict[str, Any] | None = None  # a stage checkpoint to resume from
        self._t_start = time.perf_counter()
        self._wall_before = 0.0  # wall time of the attempts before a resume
        self._kernels: fused.KernelChoice | None = None  # set by run() (train/kernels.py)

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
        ctx.stage_runner = lambda stage: self.run_stage(ctx, stage)
        ctx.costs = self.costs
        if any(m.needs_fp_partner for m in self.methods):
            fp = copy.deepcopy(model).eval()
            for p in fp.parameters():
                p.requires_grad_(False)
            ctx.fp_model = fp

        # MACs do not depend on precision; count on the float model so no probe input ever
        # reaches (and initialises) an activation quantizer. (Before any precision stage, so
        # the stage's reports carry the training-cost figures too.)
        self.macs = count_macs(model, self.data.input_shape)
        if self._kernels is not None:  # inside run(): small trials skip the compilation
            self._kernels.compiled = compile_pays(sum(self.macs.values()), n_train, cfg.epochs)
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
        ctx.qlayers = convert(model, Precision.from_config(cfg, weight_bits))
        ctx.model = to_training_layout(model, self.device)
        if ctx.fp_model is not None:
            ctx.fp_model = to_training_layout(ctx.fp_model, self.device)
        for m in self.methods:
            m.attach(ctx)
        groups = param_groups(model, cfg.weight_decay)
        for m in self.methods:  # e.g. TR gives each quantized layer its own LR group
            groups = m.param_groups(ctx, groups)
        ctx.optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.momentum,
                                        cfg.weight_decay, groups=groups, nesterov=cfg.nesterov)
        # The QAT schedule spans the epochs left after a precision stage (CSQ), so its LR
        # still anneals fully by the last epoch.
        ctx.scheduler = build_scheduler(ctx.optimizer, cfg.lr_schedule,
                                        cfg.epochs - ctx.qat_start_epoch)
        for m in self.methods:
            m.configure_optimizer(ctx)
        return ctx

    # ------------------------------------------------------------------ loop
    def _step(self, ctx: TrainContext, model: nn.Module, opt: torch.optim.Optimizer,
              hooks: list[Method] | list[Stage], x: torch.Tensor, y: torch.Tensor,
              where: str) -> torch.Tensor:
        """The one training step: hooks, task loss, NaN guard, backward, optimizer step.

        Every GEMM from ``before_forward`` to ``after_backward`` is counted and the backward
        part (the ``loss`` hooks' extra forwards and ``loss.backward()``) is timed, into
        ``self.costs`` (:mod:`qsearch.train.costs`)."""
        with self.costs.step(model, len(y)):
            for h in hooks:
                h.before_forward(ctx)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            with self.costs.timed():
                for h in hooks:
                    loss = h.loss(ctx, x, y, logits, loss)
            if not torch.isfinite(loss):
                raise TrialError(f"loss became {float(loss.detach())} at {where}, step {ctx.step}")
            opt.zero_grad(set_to_none=True)
            with self.costs.timed():
                loss.backward()
            for h in hooks:
                h.after_backward(ctx)
        opt.step()
        for h in hooks:
            h.after_step(ctx)
        ctx.step += 1
        return loss.detach()

    def train_step(self, ctx: TrainContext, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One QAT step of ``ctx.model`` on (x, y) with every enabled method's hooks
        (before_forward, loss, after_backward, after_step); raises :class:`TrialError` on a
        non-finite loss. Returns the (detached) loss that was minimised."""
        if ctx.optimizer is None:
            raise RuntimeError("Trainer.train_step() needs the context from Trainer.setup()")
        return self._step(ctx, ctx.model, ctx.optimizer, self.methods, x, y,
                          f"epoch {ctx.epoch + 1}")

    def train_epoch(self, ctx: TrainContext, epoch: int) -> float:
        if ctx.optimizer is None:
            raise RuntimeError("Trainer.train_epoch() needs the context from Trainer.setup()")
        ctx.model.train()
        total, count = 0.0, 0
        for x, y in ctx.batches(epoch):
            loss = self.train_step(ctx, x, y)
            total += float(loss) * len(y)
            count += len(y)
        return total / max(1, count)

    # ------------------------------------------------------------------ stages
    def run_stage(self, ctx: TrainContext, stage: Stage) -> list[dict[str, Any]]:
        """Train ``stage`` (see :class:`~qsearch.methods.plugin.Stage`) over the global epochs
        ``ctx.epoch .. ctx.epoch + stage.epochs - 1``, reporting and checkpointing every epoch;
        resumes from a matching stage checkpoint. Leaves ``ctx.epoch`` after the stage and
        returns the stage's per-epoch reports."""
        cfg = self.config
        first = ctx.epoch
        opt = build_optimizer(stage.model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay,
                              groups=stage.param_groups(ctx), nesterov=cfg.nesterov)
        history: list[dict[str, Any]] = []
        stage.epoch = 0
        ck = self._stage_resume
        if ck is not None:
            st = ck["stage"]
            if st["name"] != stage.name:
                raise CheckpointError(f"checkpoint of stage {st['name']!r}, but this trial runs "
                                      f"stage {stage.name!r}; use a fresh checkpoint_dir")
            stage.model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            stage.load_state_dict(st["state"])
            self.costs.load_state_dict(ck.get("costs", {}))
            stage.epoch, first = int(st["epoch"]), int(st["first_epoch"])
            history = list(st["history"])
            ctx.step = int(ck["step"])
            _set_rng_state(ck["rng"], self.device)
            self._stage_resume = None
        while stage.epoch < stage.epochs:
            t0 = time.perf_counter()
            epoch = first + stage.epoch
            ctx.epoch = epoch
            stage.model.train()
            total, count = 0.0, 0
            for i, (x, y) in enumerate(ctx.batches(epoch)):
                stage.batch = i
                loss = self._step(ctx, stage.model, opt, [stage], x, y,
                                  f"stage {stage.name} epoch {stage.epoch + 1}")
                total += float(loss) * len(y)
                count += len(y)
            stage.epoch_end(ctx)
            stage.epoch += 1
            acc, val_loss = ctx.evaluate(stage.model, split="val")
            metrics: dict[str, Any] = {
                "epoch": epoch + 1, "stage": stage.name, "train_loss": total / max(1, count),
                "val_loss": val_loss, "val_accuracy": acc, "accuracy": acc,  # alias, as below
                **stage.metrics(ctx),
                **self.costs.metrics(self.macs, self.fp32_reference_s()),
                "epoch_s": time.perf_counter() - t0,
                "wall_s": self._wall_before + time.perf_counter() - self._t_start,
            }
            history.append(metrics)
            if self.checkpoint_dir:
                save_checkpoint(self.checkpoint_dir, epoch + 1, {
                    "format": CHECKPOINT_FORMAT,
                    "config_hash": self.config.content_hash(),
                    "step": ctx.step,
                    "rng": _rng_state(self.device),
                    "wall_s": metrics["wall_s"],
                    "costs": self.costs.state_dict(),
                    "stage": {"name": stage.name, "epoch": stage.epoch, "first_epoch": first,
                              "model": stage.model.state_dict(), "optimizer": opt.state_dict(),
                              "state": stage.state_dict(), "history": history},
                })
            if self.report:
                self.report(dict(metrics))
        ctx.epoch = first + stage.epochs
        return history

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
            # Modelled (METHODS.md §7): bit-operations on low-precision training hardware.
            "backward_bops": cost.backward_cost,
            # Old name of backward_bops, kept while the store and dashboards move to the
            # objective registry.
            "backward_cost": cost.backward_cost,
            "bwd_flops_saved": cost.bwd_flops_saved,
            "lr": ctx.optimizer.param_groups[0]["lr"] if ctx.optimizer else 0.0,
        }
        # Executed FLOPs and measured backward time over the whole trial so far.
        out.update(self.costs.metrics(self.macs, self.fp32_reference_s()))
        for m in self.methods:
            out.update({f"{m.name}.{k}": v for k, v in m.metrics(ctx).items()})
        return out

    def fp32_reference_s(self) -> float:
        """Backward seconds per sample of a plain FP32 step of this model on this device
        (measured once per worker process, :func:`fp32_reference_backward_s`)."""
        if self._fp32_ref_s is None:
            cfg = self.config
            batch = max(1, min(cfg.batch_size, len(self.data.train)))
            self._fp32_ref_s = fp32_reference_backward_s(
                cfg.model, self.data.num_classes, self.data.in_channels, self.data.input_shape,
                batch, self.device)
        return self._fp32_ref_s

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
            "costs": self.costs.state_dict(),
        }

    def _check_checkpoint(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("config_hash") != self.config.content_hash():
            raise CheckpointError(
                "checkpoint belongs to a different trial configuration; use a fresh checkpoint_dir"
            )

    def restore(self, ctx: TrainContext, ckpt: dict[str, Any]) -> None:
        self._check_checkpoint(ckpt)
        ctx.model.load_state_dict(ckpt["model"])
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        ctx.scheduler.load_state_dict(ckpt["scheduler"])
        for m in self.methods:
            m.load_state_dict(ckpt["methods"].get(m.name, {}))
        ctx.epoch, ctx.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.costs.load_state_dict(ckpt.get("costs", {}))
        _set_rng_state(ckpt["rng"], self.device)

    def run(self) -> TrainResult:
        with fused.trial_kernels() as self._kernels:
            try:
                return self._run()
            finally:
                self._kernels = None

    def _run(self) -> TrainResult:
        cfg = self.config
        start = self._t_start = time.perf_counter()
        ckpt = load_latest(self.checkpoint_dir) if self.checkpoint_dir else None
        if ckpt is not None and "stage" in ckpt:  # killed during a precision stage
            self._check_checkpoint(ckpt)
            self._stage_resume, ckpt = ckpt, None
            self._wall_before = float(self._stage_resume.get("wall_s", 0.0))
        ctx = self.setup(ckpt)
        if self._stage_resume is not None:
            raise CheckpointError(f"checkpoint of stage {self._stage_resume['stage']['name']!r}, "
                                  "which this trial does not run; use a fresh checkpoint_dir")
        history: list[dict[str, Any]] = []
        wall_before = self._wall_before
        if ckpt is not None:
            self.restore(ctx, ckpt)
            history = list(ckpt["history"])
            wall_before = self._wall_before = float(ckpt.get("wall_s", 0.0))
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

"""Block replacement on the full-precision counterpart, BWRF (METHODS.md §6).

The quantized model Q and its frozen FP32 partner F (the warm-start model) are cut into the
same n blocks by the split the model declares in the registry. One ordinary forward of Q gives
the logits z_Q and, through forward hooks on the split's tap modules, the block outputs
h_1..h_(n-1). Each h_i then runs through F's remaining blocks and head, giving the logits z_i of
the mixed model M_i = F_(i+1..n) o Q_(1..i); z_F = F(x) is the teacher. The loss is

    CE(z_Q, y) + l0 KD(z_Q, z_F) + sum_i [a_i CE(z_i, y) + b_i KD(z_i, z_F)],
    KD(z, z_F) = tau^2 KL(softmax(z_F / tau) || softmax(z / tau)),

with a_i = b_i = ``branch_weight`` (the paper's weights are not public; METHODS.md documents
this reconstruction). F stays in eval mode with frozen parameters: gradients pass *through*
its suffix into Q's blocks, but F never changes. Hooks live only between ``before_forward`` and
``loss``, so evaluation, inference and export see the plain quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from qsearch.cost import FP32_BITS, count_macs
from qsearch.errors import ConfigError, TrialError
from qsearch.methods.blockrep_config import BlockRepConfig
from qsearch.methods.plugin import Method

if TYPE_CHECKING:
    from qsearch.models.registry import ModelSplit
    from qsearch.config import TrialConfig
    from qsearch.methods.plugin import TrainContext


def kd_loss(z: torch.Tensor, z_teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(z_teacher/tau) || softmax(z/tau)), averaged over the batch."""
    log_p = F.log_softmax(z / tau, dim=1)
    log_t = F.log_softmax(z_teacher / tau, dim=1)
    return F.kl_div(log_p, log_t, reduction="batchmean", log_target=True) * tau * tau


@dataclass
class BranchLosses:
    """The pieces of one step's BWRF loss (tensors keep their graph)."""

    total: torch.Tensor
    kd_q: torch.Tensor | None
    branch_ce: list[torch.Tensor]
    branch_kd: list[torch.Tensor]
    branch_logits: list[torch.Tensor]


def block_macs(split: ModelSplit, macs: dict[str, int], model: nn.Module) -> tuple[list[int], int]:
    """Forward MACs per sample of each block and of the head, from per-layer ``macs``.

    Every conv/linear layer must belong to exactly one block or the head; a layer missing or
    counted twice means the split is wrong, which would silently corrupt both training and cost.
    """
    owner: dict[int, int] = {}
    parts = [*split.blocks, split.head]
    for k, part in enumerate(parts):
        for m in part.modules():
            owner.setdefault(id(m), k)
    totals = [0] * len(parts)
    for name, n in macs.items():
        k = owner.get(id(model.get_submodule(name)))
        if k is None:
            raise TrialError(f"block split leaves layer {name!r} out of every block and the head")
        totals[k] += n
    return totals[:-1], totals[-1]


class BlockReplacement(Method):
    """BWRF: extra mixed-model branches through the frozen FP partner's suffix."""

    needs_fp_partner = True
    config: BlockRepConfig

    def __init__(self, config: BlockRepConfig):
        super().__init__(config)
        self.taps: list[str] = []
        self.suffixes: list[nn.Module] = []
        self.fp_model: nn.Module | None = None
        self._handles: list[Any] = []
        self._captured: dict[str, torch.Tensor] = {}
        self.extra_bops = 0.0
        self.fp32_backward_bops = 0.0
        self.block_macs: list[int] = []
        self.head_macs = 0
        self.suffix_macs: list[int] = []
        self._stats: dict[str, float] = {}
        self._stats_epoch = -1

    # ------------------------------------------------------------------ set-up
    @property
    def uses_branches(self) -> bool:
        return self.config.branch_weight > 0

    @property
    def uses_teacher(self) -> bool:
        return self.config.kd_weight > 0 or self.config.branch_weight > 0

    def attach(self, ctx: TrainContext) -> None:
        from qsearch.models import model_entry

        fp = ctx.fp_model
        if fp is None:
            raise TrialError("block replacement needs the FP32 partner (ctx.fp_model)")
        split_fn = model_entry(ctx.config.model).split
        if split_fn is None:  # BlockRepConfig.check normally catches this first
            raise ConfigError("methods.blockrep.enabled",
                              f"model {ctx.config.model!r} has no split")
        gran = self.config.granularity
        qsplit, fsplit = split_fn(ctx.model, gran), split_fn(fp, gran)
        n = len(qsplit.blocks)
        if n < 2 or len(fsplit.blocks) != n:
            raise ConfigError("methods.blockrep.granularity",
                              f"model {ctx.config.model!r} splits into {n} block(s) at {gran!r}; "
                              "block replacement needs at least 2")
        self.fp_model = fp.eval()
        self.taps = qsplit.names[:-1]
        # Branch i (0-based) feeds h_(i+1) through F's blocks i+1..n-1 and head.
        self.suffixes = [nn.Sequential(*fsplit.blocks[i + 1:], fsplit.head) for i in range(n - 1)]
        self._count_cost(fsplit, fp, ctx.input_shape)

    def _count_cost(self, fsplit: ModelSplit, fp: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Extra bit-ops per sample, FP parts at 32x32 bits (METHODS.md §7 conventions): the
        teacher forward, and per branch its suffix forward plus the activation-gradient (dX)
        backward through it (F's weights are frozen, so no dW)."""
        macs = count_macs(fp, input_shape)
        blocks, head = block_macs(fsplit, macs, fp)
        per_mac = FP32_BITS * FP32_BITS
        suffix = [sum(blocks[i + 1:]) + head for i in range(len(blocks) - 1)]
        extra = 0.0
        if self.uses_teacher:
            extra += sum(macs.values()) * per_mac
        if self.uses_branches:
            extra += sum(2 * s * per_mac for s in suffix)
        self.extra_bops = float(extra)
        first = next(iter(macs))
        self.fp32_backward_bops = float(sum(n * per_mac * (1 if k == first else 2)
                                            for k, n in macs.items()))
        self.block_macs, self.head_macs, self.suffix_macs = blocks, head, suffix

    @property
    def num_branches(self) -> int:
        return len(self.suffixes)

    # ------------------------------------------------------------------ every step
    def before_forward(self, ctx: TrainContext) -> None:
        """Hook the quantized model's block outputs for this step's forward only."""
        self._remove_hooks()
        if not self.uses_branches:
            return
        self._captured = {}
        for name in self.taps:
            mod = ctx.model.get_submodule(name)
            self._handles.append(mod.register_forward_hook(self._capture(name)))

    def _capture(self, name: str):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            self._captured[name] = out

        return hook

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def compute(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                loss: torch.Tensor, hidden: list[torch.Tensor]) -> BranchLosses:
        """The BWRF loss from the step's quantized logits and captured block outputs."""
        cfg = self.config
        if self.fp_model is None:
            raise RuntimeError("block replacement: compute() before attach() set the FP partner")
        if self.fp_model.training:  # someone called .train() on the model tree: undo it
            self.fp_model.eval()
        total, kd_q = loss, None
        ces: list[torch.Tensor] = []
        kds: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        if not self.uses_teacher:
            return BranchLosses(total, kd_q, ces, kds, outs)
        with torch.no_grad():
            z_f = self.fp_model(x)
        if cfg.kd_weight > 0:
            kd_q = kd_loss(logits, z_f, cfg.tau)
            total = total + cfg.kd_weight * kd_q
        if self.uses_branches:
            for h, suffix in zip(hidden, self.suffixes, strict=True):
                z = suffix(h)
                outs.append(z)
                ces.append(F.cross_entropy(z, y))
                kds.append(kd_loss(z, z_f, cfg.tau))
            scale = cfg.branch_weight / (len(outs) if cfg.branch_reduction == "mean" else 1)
            total = total + scale * (torch.stack(ces).sum() + torch.stack(kds).sum())
        return BranchLosses(total, kd_q, ces, kds, outs)

    def loss(self, ctx: TrainContext, x: torch.Tensor, y: torch.Tensor,
             logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        try:
            hidden: list[torch.Tensor] = []
            if self.uses_branches:
                missing = [t for t in self.taps if t not in self._captured]
                if missing:
                    raise TrialError(f"block replacement saw no output of {missing} in this "
                                     "step's forward; the model's split does not match it")
                hidden = [self._captured[t] for t in self.taps]
            parts = self.compute(x, y, logits, loss, hidden)
        finally:
            self._remove_hooks()
            self._captured = {}
        self._record(ctx.epoch, parts, y)
        return parts.total

    @torch.no_grad()
    def _record(self, epoch: int, parts: BranchLosses, y: torch.Tensor) -> None:
        if epoch != self._stats_epoch:  # first step of an epoch: start fresh means
            self._stats_epoch = epoch
            self._stats = {"steps": 0, "kd_q": 0.0, "branch_ce": 0.0, "branch_kd": 0.0,
                           "correct": 0.0, "seen": 0.0}
        s = self._stats
        s["steps"] += 1
        if parts.kd_q is not None:
            s["kd_q"] += float(parts.kd_q)
        if parts.branch_ce:
            s["branch_ce"] += float(torch.stack(parts.branch_ce).mean())
            s["branch_kd"] += float(torch.stack(parts.branch_kd).mean())
            for z in parts.branch_logits:
                s["correct"] += float((z.argmax(1) == y).sum())
                s["seen"] += len(y)

    # ------------------------------------------------------------------ every epoch
    def epoch_end(self, ctx: TrainContext) -> None:
        self._remove_hooks()

    def metrics(self, ctx: TrainContext) -> dict[str, float]:
        """Per-epoch means over steps: KD of Q, per-branch CE/KD, mixed-model train accuracy,
        and the extra cost (bit-ops per sample, and as a share of FP32 backward bit-ops)."""
        s = self._stats or {"steps": 0}
        steps = max(1, int(s["steps"]))
        out = {
            "branches": float(self.num_branches if self.uses_branches else 0),
            "kd_q": s.get("kd_q", 0.0) / steps,
            "branch_ce": s.get("branch_ce", 0.0) / steps,
            "branch_kd": s.get("branch_kd", 0.0) / steps,
            "branch_train_acc": s.get("correct", 0.0) / max(1.0, s.get("seen", 0.0)),
            "extra_bops": self.extra_bops,
            "extra_backward_cost": self.extra_bops / max(1.0, self.fp32_backward_bops),
        }
        return out

    # ------------------------------------------------------------------ cost model
    def extra_backward_bops(self, ctx: TrainContext) -> float:
        return self.extra_bops

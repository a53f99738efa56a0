"""LTS (METHODS.md §2): exact rules on hand-made tensors, real freezing in the trainer,
bit-identical resume, real GEMM savings, and the digits acceptance runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _resume import assert_resume_is_bit_identical
from torch.utils.flop_counter import FlopCounterMode

from qsearch.errors import ConfigError
from qsearch.methods.lts import LTS, ema_update, freeze, freeze_channels, level_error, threshold
from qsearch.quant import functional
from qsearch.quant.functional import BackwardOptions
from qsearch.train import train
from qsearch.train.trainer import Trainer

# ----------------------------------------------------------------------------- exact rules


def test_level_error_is_the_distance_to_the_clipped_level():
    # 2-bit signed grid: levels -2..1; step 0.5 so w/s = 2w exactly.
    w = torch.tensor([0.1, 0.24, -0.9, 2.3, -3.1])
    e, q = level_error(w, torch.tensor([0.5]), qn=2, qp=1)
    assert q.tolist() == [0.0, 0.0, -2.0, 1.0, -2.0]
    # In range: plain rounding error. Clipped: 2.3 -> 4.6 is clipped to 1 and carries e = 3.6
    # (the unclipped rule would give 0.4); -3.1 -> -6.2 is clipped to -2 and carries e = 4.2.
    assert e.tolist() == pytest.approx([0.2, 0.48, 0.2, 3.6, 4.2], abs=1e-6)


def test_overshooting_weight_never_freezes():
    # A weight parked 5.02 levels past Qp rounds to an integer 0.02 away (the unclipped rule's
    # e), below any useful theta, but its forward level is Qp, 5.02 away: it must not freeze.
    qn, qp, step = 2, 1, torch.tensor([0.5])
    w = torch.tensor([(qp + 5.02) * 0.5, 0.5 * 0.5 + 0.0])  # [overshoot, mid-way between 0 and 1]
    d = torch.zeros(2)
    prev = torch.zeros(2, dtype=torch.int8)
    mask = torch.zeros(2, dtype=torch.bool)
    for t in range(50):
        e, q = level_error(w, step, qn, qp)
        lv = q.to(torch.int8)
        ema_update(d, e, lv, prev, 0.9, first=t == 0)
        prev = lv
    assert freeze(mask, d, 0.1) == 0
    assert d[0].item() == pytest.approx(5.02, abs=1e-4)
    assert not mask.any()


def test_ema_starts_at_error_then_averages_and_resets_on_transition():
    m = 0.9
    d = torch.full((4,), 7.0)
    prev = torch.zeros(4, dtype=torch.int8)
    e0 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    lv0 = torch.tensor([0, 1, -1, 0], dtype=torch.int8)
    ema_update(d, e0, lv0, prev, m, first=True)
    assert d.tolist() == pytest.approx(e0.tolist())  # d starts at e, no transition check

    e1 = torch.tensor([0.3, 0.0, 0.1, 0.5])
    lv1 = torch.tensor([0, 1, 0, 0], dtype=torch.int8)  # element 2 changed level -1 -> 0
    ema_update(d, e1, lv1, lv0, m, first=False)
    expect = [m * a + (1 - m) * b for a, b in zip(e0.tolist(), e1.tolist())]
    expect[2] = 1.0
    assert d.tolist() == pytest.approx(expect, abs=1e-6)

    e2 = torch.tensor([0.0, 0.0, 0.0, 0.0])
    ema_update(d, e2, lv1, lv1, m, first=False)  # no transition: plain EMA, incl. from 1.0
    assert d.tolist() == pytest.approx([m * x for x in expect], abs=1e-6)


@pytest.mark.parametrize(("mode", "t", "expect"), [
    ("linear-growth", 9, None), ("linear-growth", 10, 0.0), ("linear-growth", 35, 0.25),
    ("linear-growth", 60, 0.5), ("linear-growth", 109, 0.99),
    ("sine-growth", 9, None), ("sine-growth", 10, 0.0), ("sine-growth", 35, math.sin(math.pi / 8)),
    ("sine-growth", 60, math.sin(math.pi / 4)), ("sine-growth", 109, math.sin(math.pi / 2 * 0.99)),
    ("fixing", 0, None), ("fixing", 10, 0.1), ("fixing", 109, 0.1),
])
def test_threshold_schedules(mode, t, expect):
    got = threshold(mode, 0.1, t, warmup=10, total=110)
    if expect is None:
        assert got is None
    else:
        assert got == pytest.approx(expect)


def test_freeze_is_permanent():
    mask = torch.zeros(5, dtype=torch.bool)
    d = torch.tensor([0.05, 0.2, 0.5, 0.01, 1.0])
    assert freeze(mask, d, None) == 0 and not mask.any()  # warm-up: nothing freezes
    assert freeze(mask, d, 0.1) == 2
    assert mask.tolist() == [True, False, False, True, False]
    d.fill_(1.0)  # every element transitions: still frozen
    assert freeze(mask, d, 0.1) == 0
    assert mask.tolist() == [True, False, False, True, False]
    assert freeze(mask, torch.tensor([1.0, 0.3, 1.0, 1.0, 1.0]), 0.3) == 1
    assert mask.tolist() == [True, True, False, True, False]


# ----------------------------------------------------------------------------- real savings


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_dw_channels_matches_full_gradient_and_skips_flops(groups):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    w = torch.randn(8, 8 // groups, 3, 3, requires_grad=True)
    gy = torch.randn(4, 8, 6, 6)
    torch.nn.functional.conv2d(x, w, None, 1, 1, 1, groups).backward(gy)
    full = w.grad.clone()
    keep = torch.tensor([1, 2, 5])
    w.grad = None
    opts = BackwardOptions(dw_channels=keep)
    with FlopCounterMode(display=False) as fc:
        functional.conv2d(x, w, None, 1, 1, 1, groups, opts).backward(gy)
    torch.testing.assert_close(w.grad[keep], full[keep], rtol=1e-4, atol=1e-4)
    others = torch.ones(8, dtype=torch.bool)
    others[keep] = False
    assert bool((w.grad[others] == 0).all())
    fwd = 2 * x.shape[0] * 36 * w.numel()  # forward conv FLOPs
    if groups == 1:
        # FlopCounterMode counts a grouped conv's weight gradient as if ungrouped, so the
        # exact FLOP check is for dense convs; depthwise skips channels the same way.
        assert fc.get_total_flops() == fwd + fwd * keep.numel() // 8


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_freeze_channels_freezes_whole_channels_in_any_layout(layout):
    """The mask of a channels-last weight is channels-last too (trainers on CPU use that
    layout), and a reshape of it is a copy: freezing must write the mask itself. Fails when
    the new rows are written through ``mask.reshape(...)``."""
    dist = torch.ones(4, 3, 3, 3)
    dist[1] = 0.01
    dist[3, 0] = 0.0  # one element low, the channel's mean is not
    mask = torch.zeros(4, 3, 3, 3, dtype=torch.bool).contiguous(memory_format=layout)
    assert freeze_channels(mask, dist, theta=0.1) == 27
    assert mask[1].all() and not mask[[0, 2, 3]].any()
    assert freeze_channels(mask, dist, theta=0.1) == 0  # already frozen: nothing new


@pytest.mark.parametrize("kernel,padding,rows", [((3, 3), 0, 2), ((3, 3), 2, 8), ((1, 1), 0, 3),
                                                 ((3, 1), (1, 0), 5), ((3, 3), 1, 12)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gathered_dw_rows_equal_the_dense_gradient(kernel, padding, rows, layout):
    """Up to ``SWAP_MAX_ROWS`` gathered rows (on CPU, any number that is not a multiple of
    ``DIRECT_DW_BLOCK``) take the swapped-conv form of dW, the others the direct one (as do
    rows not fewer than the input channels); both must give the dense gradient's rows for every padding (including none and
    more than half the kernel) and non-square kernels, in both memory layouts (a channels-last
    gradient is gathered as columns of its (N*H*W, C) matrix). Fails on a wrong flip,
    transpose or swapped padding, or gathered columns mapped back in the wrong order."""
    torch.manual_seed(0)
    x = torch.randn(3, 10, 7, 6).contiguous(memory_format=layout)  # > 8 input channels
    w = torch.randn(16, 10, *kernel).contiguous(memory_format=layout).requires_grad_(True)
    y = torch.nn.functional.conv2d(x, w, None, 1, padding)
    gy = torch.randn(y.shape).contiguous(memory_format=layout)
    y.backward(gy)
    full = w.grad.clone()
    keep = torch.randperm(16)[:rows].sort().values
    # The gathered routine itself: through conv2d, convs with a fan-in this small compute
    # their dW in full on CPU (test_small_fan_in_and_channels_last_depthwise_compute_dw_in_full).
    got = functional._gathered_weight_grad(x, w, gy, 1, padding, 1, 1, keep)
    torch.testing.assert_close(got[keep], full[keep], rtol=1e-5, atol=1e-5)
    others = torch.ones(16, dtype=torch.bool)
    others[keep] = False
    assert bool((got[others] == 0).all())


@pytest.mark.parametrize("case", ["stem", "depthwise-cl", "depthwise-nchw", "wide"])
def test_small_fan_in_and_channels_last_depthwise_compute_dw_in_full(case):
    """On CPU, frozen rows are gathered out of the dW GEMM only where that is cheaper: not for
    an ungrouped conv with a fan-in under GATHER_MIN_FAN_IN (a 3-channel stem) nor for a
    channels-last depthwise conv, which run the full GEMM and zero the frozen rows. The
    gradient is the same either way; the FLOP meter and FlopCounterMode must both see the GEMM
    that really ran. Fails when the rule is dropped (the meter and FlopCounterMode then count
    only the kept rows for the stem) or when the full GEMM's frozen rows are not zeroed."""
    from qsearch.quant.flops import FlopMeter, FlopTotals

    torch.manual_seed(0)
    cin, cout, groups, layout = {
        "stem": (3, 16, 1, torch.channels_last),
        "depthwise-cl": (16, 16, 16, torch.channels_last),
        "depthwise-nchw": (16, 16, 16, torch.contiguous_format),
        "wide": (16, 16, 1, torch.channels_last),  # fan-in 144: gathered
    }[case]
    x = torch.randn(4, cin, 8, 8).contiguous(memory_format=layout)
    w = torch.randn(cout, cin // groups, 3, 3).contiguous(memory_format=layout)
    w.requires_grad_(True)
    gy = torch.randn(4, cout, 8, 8).contiguous(memory_format=layout)
    torch.nn.functional.conv2d(x, w, None, 1, 1, 1, groups).backward(gy)
    full = w.grad.clone()
    keep = torch.tensor([0, 3, 4, 9])
    w.grad = None
    totals = FlopTotals()
    with FlopMeter(totals), FlopCounterMode(display=False) as fc:
        functional.conv2d(x, w, None, 1, 1, 1, groups,
                          BackwardOptions(dw_channels=keep)).backward(gy)
    torch.testing.assert_close(w.grad[keep], full[keep], rtol=1e-5, atol=1e-5)
    frozen = torch.ones(cout, dtype=torch.bool)
    frozen[keep] = False
    assert bool((w.grad[frozen] == 0).all())
    in_full = case in ("stem", "depthwise-cl")
    assert (functional.gathered_dw_rows(keep, w, groups, gy) is None) == in_full
    dense_dw = 2 * gy.numel() * w[0].numel()
    assert totals.dw == (dense_dw if in_full else dense_dw * keep.numel() // cout)
    if groups == 1:  # FlopCounterMode ignores groups in a conv's backward (see flops.py)
        fwd = 2 * gy.numel() * w[0].numel()
        assert fc.get_total_flops() == fwd + totals.dw


def test_dw_channels_linear():
    torch.manual_seed(0)
    x, gy = torch.randn(5, 6), torch.randn(5, 4)
    w = torch.randn(4, 6, requires_grad=True)
    (x @ w.t()).backward(gy)
    full = w.grad.clone()
    w.grad = None
    with FlopCounterMode(display=False) as fc:
        functional.linear(x, w, None, BackwardOptions(dw_channels=torch.tensor([0, 3]))).backward(gy)
    assert fc.get_total_flops() == 2 * 5 * 6 * 4 + 2 * 5 * 6 * 2  # forward + half the dW GEMM
    torch.testing.assert_close(w.grad[[0, 3]], full[[0, 3]])
    assert bool((w.grad[[1, 2]] == 0).all())


# ----------------------------------------------------------------------------- in the trainer


def _trainer(tiny_config, **over):
    tr = Trainer(tiny_config(**over))
    ctx = tr.setup(None)
    return tr, ctx


def _epoch(tr, ctx):
    tr.train_epoch(ctx, ctx.epoch)
    for m in tr.methods:
        m.epoch_end(ctx)
    ctx.scheduler.step()
    ctx.epoch += 1


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_frozen_weights_stay_bit_identical(tiny_config, opt):
    lts_cfg = {"enabled": True, "mode": "fixing", "rate": 0.25, "warmup_frac": 0.2}
    tr, ctx = _trainer(tiny_config, epochs=3, optimizer=opt, lr=0.02 if opt == "sgd" else 2e-3,
                       momentum=0.9, weight_decay=5e-3, methods={"lts": lts_cfg})
    lts = next(m for m in tr.methods if isinstance(m, LTS))
    _epoch(tr, ctx)
    masks = {n: q.lts_frozen.clone() for n, q in lts.layers.items()}
    weights = {n: q.weight.detach().clone() for n, q in lts.layers.items()}
    assert 0.0 < sum(int(m.sum()) for m in masks.values()) < sum(m.numel() for m in masks.values())
    _epoch(tr, ctx)
    moved = 0
    for n, q in lts.layers.items():
        mask, w = masks[n], q.weight.detach()
        assert torch.equal(w[mask], weights[n][mask]), f"frozen weights of {n} changed"
        assert bool(q.lts_frozen[mask].all()), "an element unfroze"
        state = ctx.optimizer.state.get(q.weight, {})
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in state:
                assert bool((state[key][q.lts_frozen] == 0).all()), f"{key} of frozen not zero"
        moved += int((w[~mask] != weights[n][~mask]).sum())
    assert moved > 0  # the unfrozen weights did train


def test_fully_frozen_layers_skip_weight_gradient(tiny_config):
    lts_cfg = {"enabled": True, "mode": "fixing", "rate": 1.0, "warmup_frac": 0.5}
    tr, ctx = _trainer(tiny_config, epochs=2, methods={"lts": lts_cfg})
    lts = next(m for m in tr.methods if isinstance(m, LTS))
    _epoch(tr, ctx)
    assert all(q.weight.requires_grad for q in lts.layers.values())
    weights = {n: q.weight.detach().clone() for n, q in lts.layers.items()}
    _epoch(tr, ctx)  # theta = 1 >= every d: all freeze at the first post-warm-up step
    for n, q in lts.layers.items():
        assert not q.weight.requires_grad and q.weight.grad is None
        assert not q.w_quant.step.requires_grad
        assert torch.equal(q.weight.detach(), weights[n])
    m = lts.metrics(ctx)
    assert m["frozen_fraction"] == 1.0
    assert m["updates_eliminated"] == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("methods", [
    {"lts": {"enabled": True, "warmup_frac": 0.1}},
    {"lts": {"enabled": True, "mode": "sine-growth", "warmup_frac": 0.1},
     "tr": {"enabled": True, "momentum": 0.9}},
], ids=["lts", "lts+tr"])
def test_resume_is_bit_identical(tiny_config, tmp_path, methods):
    cfg = tiny_config(epochs=4, w_bits=2, a_bits=2, methods=methods)
    full, _ = assert_resume_is_bit_identical(cfg, tmp_path, stop_epoch=2)
    assert "stage2.0.0.lts_frozen" in full.model.state_dict()
    assert full.metrics["lts.updates_eliminated"] > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4])
def test_digits_channel_lts_saves_a_quarter_of_executed_backward_at_the_same_accuracy(
        tiny_config, bits):
    """Acceptance (issue: honest costs): W{bits}A{bits}, 6 epochs after a 4-epoch warm start,
    channel granularity, sine-growth threshold with 10% warm-up, seeds 0-2: on average >= 25%
    of the quantized layers' backward FLOPs are really skipped (the trainer's meter), the
    counted figure agrees in every run (every frozen element sits in a frozen channel), the
    executed ``backward_flops`` objective falls accordingly, and the mean validation accuracy
    is within 1 point of the same runs without LTS.

    Why three seeds: the validation split is 270 images, so one seed's 1 point is under 3
    images; seed 0 alone at W2A2 sat 1.1 points below (0.9815 vs 0.9926) while seeds 1 and 2
    were 0.4 below. Deterministic at fixed seeds and thread count; measured when written:
    executed 0.35/0.35/0.35 (W2A2), 0.31/0.28/0.26 (W4A4); mean accuracy -0.62 / -0.25
    points. Mutations that fail it: freezing nothing (saving 0); element granularity
    (executed ~0.1 while counted ~0.34). Digits is near saturation here, so over-freezing is
    not caught by the accuracy check; the saving checks carry the power."""
    lts_cfg = {"enabled": True, "granularity": "channel", "mode": "sine-growth",
               "warmup_frac": 0.1}
    refs, gots = [], []
    for seed in (0, 1, 2):
        common = {"epochs": 6, "w_bits": bits, "a_bits": bits, "seed": seed,
                  "warm_start": {"epochs": 4}}
        refs.append(train(tiny_config(**common)).metrics)
        gots.append(train(tiny_config(**common, methods={"lts": lts_cfg})).metrics)

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    print(f"W{bits}A{bits}: val acc {mean(refs, 'val_accuracy'):.4f} -> "
          f"{mean(gots, 'val_accuracy'):.4f}, executed "
          f"{[round(g['lts.flops_saved_executed'], 3) for g in gots]}, backward_flops "
          f"{mean(refs, 'backward_flops'):.3f} -> {mean(gots, 'backward_flops'):.3f}")
    assert mean(gots, "lts.flops_saved_executed") >= 0.25
    for g in gots:
        assert g["lts.flops_saved_counted"] == pytest.approx(g["lts.flops_saved_executed"],
                                                             abs=0.01)
    assert mean(gots, "backward_flops") < mean(refs, "backward_flops") - 0.2
    assert mean(gots, "val_accuracy") >= mean(refs, "val_accuracy") - 0.01


# ----------------------------------------------------------------------------- config + CLI


def test_config_accepts_lts_and_rejects_unquantized_models(tiny_config):
    cfg = tiny_config(methods={"lts": {"enabled": True, "mode": "fixing", "rate": 0.2}})
    assert cfg.methods.lts.enabled
    with pytest.raises(ConfigError) as e:
        tiny_config(w_bits=32, a_bits=32, first_bits=None, last_bits=None,
                    methods={"lts": {"enabled": True}})
    assert e.value.field == "methods.lts.enabled"


def test_cli_json_has_lts_metrics(capsys):
    from qsearch.cli import main

    rc = main(["train", "--json", "--set", "epochs=2", "--set", "device=cpu",
               "--set", "warm_start.epochs=3", "--set", "methods.lts.enabled=true",
               "--set", "methods.lts.warmup_frac=0"])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(line)
    assert out["lts.updates_eliminated"] > 0
    assert {"lts.frozen_fraction", "lts.bwd_flops_saved"} <= out.keys()

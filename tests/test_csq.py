"""CSQ (METHODS.md §5): bit-plane layers, budget regularizer, read-out, two-stage trials."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from qsearch.errors import ConfigError
from qsearch.methods.csq import (
    Budget,
    CSQConfig,
    harden,
    layer_rules,
    make_budget,
    open_fraction,
    regularizer,
    temperature,
)
from qsearch.methods.csq_layers import BitConv2d, BitLinear, binary_expansion, plane_bits


def _conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(3.0)
    return conv


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("planes", [5, 7])
def test_reconstruction_at_init_is_within_one_level(planes):
    conv = _conv()
    q = BitConv2d.from_float(conv, planes, a_bits=32)
    w0 = conv.weight.detach()
    level = float(w0.abs().max()) / (2**planes - 1)
    err = (q.planes_weight().detach() - w0).abs().max()
    assert err <= level * 0.5 + 1e-6  # rounding to the n-bit grid, nothing else
    # ... and a different conv input gives the same output as the float layer (up to that).
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(q(x), conv(x), atol=level * 8 * 9 * 6)


def test_binary_expansion_round_trips():
    w = torch.tensor([0.5, -0.25, 0.0, 1.0, -1.0, 0.126])
    p, n, s = binary_expansion(w, 3)
    e = torch.tensor([4.0, 2.0, 1.0]) / 7
    back = s * torch.tensordot(e, p - n, dims=1)
    assert s == 1.0
    assert torch.allclose(back, torch.round(w * 7) / 7)
    assert ((p == 0) | (n == 0)).all()  # sign-magnitude: one side is empty


@pytest.mark.parametrize(("start", "k"), [(0, 1), (0, 3), (2, 4), (1, 2), (1, 5)])
def test_k_planes_are_counted_as_k_plus_one_bits_on_the_grid_they_use(start, k):
    """k hard planes at high temperature: every weight is an integer multiple of the last
    plane's step with |level| <= 2^k - 1, all 2^(k+1) - 1 levels of that sign-magnitude grid
    occur, so it needs k + 1 bits; the layer reports k + 1 (mutation: counting k fails the
    ``w_bits`` assert, counting k + 2 too), and the signed (k+1)-bit LSQ grid stage 2 trains,
    [-2^k, 2^k - 1], holds every level while a k-bit grid cannot."""
    planes = 6
    torch.manual_seed(k)
    q = BitLinear.from_float(nn.Linear(256, 64), planes, a_bits=32)
    with torch.no_grad():  # random trained-looking bits, away from the undecided 0
        q.pbits.copy_(torch.randn_like(q.pbits).sign() * (0.5 + torch.rand_like(q.pbits)))
        q.nbits.copy_(torch.randn_like(q.nbits).sign() * (0.5 + torch.rand_like(q.nbits)))
    q.set_pattern([1 if start <= j < start + k else 0 for j in range(planes)])
    q.beta = 1e4
    w = q.planes_weight().detach().double()
    step = float(q.scale.detach()) * float(q.exps[start + k - 1])
    level = w / step
    assert torch.allclose(level, level.round(), atol=1e-4)
    levels = level.round().unique()
    assert len(levels) == 2 ** (k + 1) - 1  # every level of the grid is used
    assert levels.abs().max() == 2**k - 1
    assert q.w_bits == plane_bits(k) == k + 1
    b = q.w_bits  # signed b-bit LSQ: [-2^(b-1), 2^(b-1) - 1]
    assert -(2 ** (b - 1)) <= levels.min() and levels.max() <= 2 ** (b - 1) - 1
    assert len(levels) > 2 ** (b - 1)  # ... and b - 1 bits could not hold them


def test_gate_openness_is_sigmoid_at_least_one_half():
    """The reference reads a gate as open when sigmoid(beta*m) >= 0.5: m = 0 is open (the
    initial state), a negative m closed (mutation ``gates > 0`` reads the first plane closed)."""
    q = BitLinear.from_float(nn.Linear(8, 4), 4, a_bits=32)
    with torch.no_grad():
        q.gates.copy_(torch.tensor([0.0, 0.3, -1e-3, -0.2]))
    q.beta = 50.0
    assert q.raw_pattern() == [1, 1, 0, 0]
    assert q.w_bits == 3  # two planes + the sign


def test_temperature_schedule():
    assert temperature(0.0, 3.0, 200.0) == 1.0
    assert temperature(1.5, 3.0, 200.0) == pytest.approx(200**0.5)
    assert temperature(3.0, 3.0, 200.0) == 200.0
    assert temperature(5.0, 3.0, 200.0) == 200.0  # held after the ticket


# ----------------------------------------------------------------------------- budget loop


def _layers(beta: float = 2.0):
    layers = {"a": BitConv2d.from_float(_conv(1), 4, 32), "b": BitLinear.from_float(
        nn.Linear(32, 8), 4, 32)}
    for q in layers.values():
        q.beta = beta
        with torch.no_grad():
            q.gates.copy_(torch.tensor([0.3, 0.2, -0.1, -0.4]))
    return layers


@pytest.mark.parametrize("integral", [0.0, 0.3])
def test_regularizer_gradient_sign_flips_across_the_budget(integral):
    layers = _layers()
    weights = {"a": 1.5, "b": 0.5}
    rho = open_fraction(layers, {"a": 0.75, "b": 0.25})
    assert rho == pytest.approx(0.5)  # two of four gates open in both layers
    signs = []
    for target in (0.25 + integral, 0.75 + integral):  # rho above, then below the budget
        for q in layers.values():
            q.gates.grad = None
        regularizer(layers, weights, rho, target, lam=1e-2, integral=integral).backward()
        g = torch.cat([layers["a"].gates.grad, layers["b"].gates.grad])
        assert (g != 0).all()
        signs.append(g.sign().unique().tolist())
        # size-aware: the bigger layer's gates are pushed harder
        assert layers["a"].gates.grad.abs().sum() > layers["b"].gates.grad.abs().sum()
    assert signs == [[1.0], [-1.0]]  # above budget: descent closes gates; below: opens them


def test_readout_of_known_gate_patterns():
    raw = {"x": [1, 1, 1, 0, 0, 0, 0, 0],  # contiguous: kept
           "y": [1, 1, 0, 1, 0, 0, 0, 0],  # gap: 3 planes, best window by gate logits
           "z": [0, 0, 0, 0, 0, 0, 0, 0]}  # no plane: clamped to one plane (2 bits)
    scores = {"x": [3, 2, 1, -1, -2, -3, -4, -5],
              "y": [0.1, 2, -1, 3, 0.5, -2, -3, -4],
              "z": [5, -0.5, -1, -2, -3, -4, -5, -6]}
    h = harden(raw, scores, None, 0.0)
    assert h.bits() == {"x": 4, "y": 4, "z": 2}  # planes + the sign bit
    assert h.windows == {"x": (0, 3), "y": (1, 3), "z": (0, 1)}
    assert h.noncontiguous == {"y": "11010000 -> 01110000"}
    assert h.projected == 0 and not h.projection_fired


def test_fallback_projection_meets_the_budget_cheapest_planes_first():
    """enforce_budget only: it fires when the windows miss the band and says how many planes
    it moved; bits are planes + 1."""
    numel = {"x": 1000, "y": 3000}
    budget = Budget(numel, pinned_bits=0, extra_params=0, target_bits=3.0)  # 12000 bits
    scores = {"x": [9, 8, 7, 6, -1, -2], "y": [9, 8, 0.5, 0.4, 0.3, -1]}
    # 4 + 3 planes -> 5000 + 12000 bits: y's weak LSB planes go first, then one plane of x
    # (closing y's second plane would undershoot the 2% band).
    h = harden({"x": [1, 1, 1, 1, 0, 0], "y": [1, 1, 1, 0, 0, 0]}, scores, budget, tol=0.02)
    assert h.bits() == {"x": 3, "y": 3}
    assert h.projection_fired and h.projected == 3
    # In band already: the projection does not fire.
    h = harden({"x": [1, 1, 0, 0, 0, 0], "y": [1, 1, 0, 0, 0, 0]}, scores, budget, tol=0.02)
    assert not h.projection_fired and h.projected == 0
    # Below the budget planes are opened, highest gate logit first.
    h = harden({"x": [1, 0, 0, 0, 0, 0], "y": [1, 0, 0, 0, 0, 0]}, scores, budget, tol=0.02)
    assert budget.avg_bits(h.bits()) == pytest.approx(3.0, abs=0.06)
    assert h.bits() == {"x": 6, "y": 2}  # a y plane (3000 bits) would overshoot the band
    assert h.projection_fired and h.projected == 4


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_field(tiny_config):
    with pytest.raises(ConfigError, match="^epochs"):
        tiny_config(epochs=1, methods={"csq": {"enabled": True}})
    with pytest.raises(ConfigError, match="methods.csq.target_bits"):  # 6 planes: 7 bits max
        tiny_config(methods={"csq": {"enabled": True, "target_bits": 7.5, "planes": 6}})
    tiny_config(methods={"csq": {"enabled": True, "target_bits": 7, "planes": 6}})
    with pytest.raises(ConfigError, match="methods.csq.planes"):  # 8 planes would be 9 bits
        tiny_config(methods={"csq": {"enabled": True, "planes": 8}})
    cfg = CSQConfig(enabled=True, target_mb=1e-4)
    with pytest.raises(ConfigError, match="methods.csq.target_mb"):
        make_budget(cfg, {"a": 1000}, pinned_bits=0, extra_params=0)
    assert make_budget(CSQConfig(enabled=True, target_mb=0.002), {"a": 4000}, 0, 0).target_bits == 4.0
    with pytest.raises(ConfigError, match="methods.csq.target_mb"):  # 6 planes: 7 bits at most
        make_budget(CSQConfig(enabled=True, target_mb=0.004), {"a": 4000}, 0, 0)


# ----------------------------------------------------------------------------- trials


def _uniform_size_mb(cfg, bits: int) -> float:
    """size_mb of the same model at uniform ``bits`` (first/last as configured), untrained."""
    from qsearch.cost import compute_cost, extra_param_count, layer_costs
    from qsearch.data import load_dataset
    from qsearch.models import build_model
    from qsearch.quant import Precision, convert

    data = load_dataset(cfg.dataset, cfg.data)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    q = convert(model, Precision(w_bits=bits, a_bits=cfg.a_bits, first_bits=cfg.first_bits,
                                 last_bits=cfg.last_bits))
    return compute_cost(layer_costs(model, data.input_shape), extra_param_count(model, q)).size_mb


SEARCHED = ("stage2.0.0", "stage3.0")  # tiny-cnn's middle convs; first/last stay at 8 bits


def _search(tiny_config, target: float, seed: int = 0, **csq):
    """A CSQ trial long enough for the budget loop to settle (stage 1: 4 epochs of 17 steps),
    projection off unless ``csq`` turns it on; the warm start of benchmarks/bench_csq.py (8
    epochs), whose table docs/METHODS.md reports. (From a 3-epoch warm start the 4-bit target
    landed at 5.33 bits at the default ``integral_gain``: the task loss of a less-trained
    model still pulls planes open when the ticket is drawn.)"""
    from qsearch.train import train

    cfg = tiny_config(epochs=8, seed=seed, warm_start={"epochs": 8}, methods={"csq": {
        "enabled": True, "target_bits": target, "enforce_budget": False, **csq}})
    return train(cfg)


@pytest.mark.parametrize("target", [3, 4])
def test_regularizer_meets_the_budget_without_projection(tiny_config, target):
    """Projection off: the budget term alone brings the searched layers within 5% of the
    target average bits (sign bit counted). On tiny-cnn one plane of a searched layer is
    1/3 or 2/3 of a bit of the average, so 5% means the exact combination.

    Mutation: ``lam: 0`` (no budget term) leaves the task loss to open planes: at 4 bits it
    landed at 5.67 bits (+42%) and fails; at 3 bits the ramped gates start on the budget and
    ``lam: 0`` can stay in band, so there the power is in the 4-bit case and in
    :func:`test_mixed_bits_among_the_searched_layers`. Chance of a false failure: none at a
    fixed torch build and thread count (the run is deterministic); a build that changes the
    trajectory draws a new outcome, and in the benchmark setting 9 of 9 (target, seed) runs
    were in band, which bounds that chance only loosely (roughly below 1 in 4 at 95%)."""
    r = _search(tiny_config, target)
    m = r.metrics
    assert abs(m["csq.avg_bits"] / target - 1) <= 0.05, r.weight_bits
    assert m["csq.projection_fired"] == 0 and m["csq.planes_moved"] == 0
    # The figures agree: size_mb is the budget's size of the found bits, the bits are those
    # stage 2 trained, and the stage-1 accuracy is reported beside the final one.
    assert m["size_mb"] == pytest.approx(m["csq.budget_mb"], rel=0.05)
    assert {r_.name: r_.w_bits for r_ in r.layers} == r.weight_bits
    assert 0.0 < m["csq.stage1_accuracy"] <= 1.0 and m["accuracy"] > 0.9


def test_mixed_bits_among_the_searched_layers(tiny_config):
    """Target 3.5 bits: no uniform width of the two searched convs is within 5% (3 and 4 bits
    are 14% off), every in-band combination gives them different bits, so meeting the band
    without projection proves the search mixes bits among the searched layers (the fixed
    8-bit first/last layers do not count). Mutation: ``lam: 0`` lands at 6.33 bits (+81%); a
    search that could only move both layers together could not pass. Chance of a false
    failure: none at a fixed torch build and thread count; seeds 0, 1, 2 of this setting all
    passed when it was written (with an 8-epoch warm start too)."""
    r = _search(tiny_config, 3.5)
    bits = {n: r.weight_bits[n] for n in SEARCHED}
    assert abs(r.metrics["csq.avg_bits"] / 3.5 - 1) <= 0.05, bits
    assert len(set(bits.values())) == 2
    assert r.metrics["csq.projection_fired"] == 0


def test_without_the_regularizer_the_budget_is_missed_and_the_fallback_reports(tiny_config):
    """The mutation of the budget test, run: ``lam: 0`` (task loss alone) misses the 5% band;
    with ``enforce_budget`` the projection then fires, says how many planes it moved and
    brings the size into the band."""
    r = _search(tiny_config, 4, lam=0.0, enforce_budget=True)
    m = r.metrics
    assert abs(m["csq.search_avg_bits"] / 4 - 1) > 0.05
    assert m["csq.projection_fired"] == 1 and m["csq.planes_moved"] >= 1
    assert abs(m["csq.avg_bits"] / 4 - 1) <= 0.05


@pytest.fixture(scope="module")
def csq_trial(tmp_path_factory):
    from qsearch.config import parse_trial_config
    from qsearch.train import train

    ckpt = tmp_path_factory.mktemp("csq-ckpt")
    cfg = parse_trial_config({"model": "tiny-cnn", "dataset": "digits", "epochs": 3,
                              "batch_size": 256, "device": "cpu", "warm_start": {"epochs": 3},
                              "methods": {"csq": {"enabled": True, "target_bits": 3}}})
    return cfg, ckpt, train(cfg, checkpoint_dir=ckpt)


def test_exported_layer_config_reproduces_size_with_qsearch_train(csq_trial, tmp_path, capsys):
    from qsearch.cli import main

    cfg, _, result = csq_trial
    exported = cfg.model_dump(mode="json")
    exported["methods"]["csq"]["enabled"] = False
    exported.update(epochs=1, layers=layer_rules(result.weight_bits))
    path = tmp_path / "exported.yaml"
    path.write_text(yaml.safe_dump(exported))
    capsys.readouterr()
    assert main(["train", str(path), "--json"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["size_mb"] == result.metrics["size_mb"]  # exactly


def test_resume_does_not_rerun_the_search(csq_trial):
    from qsearch.train import train

    cfg, ckpt, result = csq_trial
    again = train(cfg, checkpoint_dir=ckpt)  # the last checkpoint is the finished trial
    assert again.weight_bits == result.weight_bits
    assert again.metrics["size_mb"] == result.metrics["size_mb"]
    assert again.metrics["csq.avg_bits"] == result.metrics["csq.avg_bits"]
    blob = torch.load(sorted(ckpt.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert blob["qat_start_epoch"] == 2 and blob["weight_bits"] == {
        k: v for k, v in result.weight_bits.items() if k in blob["weight_bits"]}


# ----------------------------------------------------------------------------- stage 1 in the shared loop


class _Killed(Exception):
    pass


def test_kill_and_resume_mid_search_stage_is_bit_identical(tiny_config, tmp_path):
    """Stage 1 runs in the trainer's loop with a checkpoint per epoch: a trial killed after
    stage-1 epoch 1 (budget loop running), resumed, killed again after epoch 2 (ticket drawn,
    hard pattern in the stage state) and resumed again goes on inside stage 1 each time and
    ends exactly where an uninterrupted one ends."""
    from _resume import TIMING

    from qsearch.train import train

    # 5 epochs: stage 1 = epochs 1-3 with the ticket between 1.5 epochs and its deadline
    # 1.5 + 0.2 * 1.5 = 1.8 (it waits for an in-band pattern), stage 2 = epochs 4-5.
    cfg = tiny_config(epochs=5, batch_size=256, methods={"csq": {
        "enabled": True, "target_bits": 3, "epochs_frac": 0.6, "ticket_frac": 0.5,
        "ticket_wait": 0.2}})

    def untimed(ms):  # wall-clock and measured-time fields differ between any two runs
        return [{k: v for k, v in m.items() if k not in TIMING and "time" not in k} for m in ms]

    seen: list[dict] = []
    straight = train(cfg, report=seen.append)
    assert [m.get("stage") for m in seen] == ["csq.search"] * 3 + [None] * 2
    assert seen[0]["csq.beta"] < seen[1]["csq.beta"] == 200.0  # the ticket is in epoch 2

    again: list[dict] = []
    for stop in (1, 2):
        def kill(metrics, stop=stop):
            again.append(metrics)
            if metrics["epoch"] == stop:
                raise _Killed

        with pytest.raises(_Killed):
            train(cfg, report=kill, checkpoint_dir=tmp_path)
        blob = torch.load(sorted(tmp_path.glob("ckpt-*.pt"))[-1], weights_only=True)
        assert blob["stage"]["name"] == "csq.search" and blob["stage"]["epoch"] == stop
        assert (blob["stage"]["state"]["hard"] is None) == (stop == 1)
    resumed = train(cfg, report=again.append, checkpoint_dir=tmp_path)
    # Each attempt went on inside stage 1 (no epoch re-run); every report is the same.
    assert [m["epoch"] for m in again] == [1, 2, 3, 4, 5]
    assert untimed(again) == untimed(seen)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.weight_bits == straight.weight_bits
    assert untimed([resumed.metrics]) == untimed([straight.metrics])
    assert untimed(resumed.history) == untimed(straight.history)


def test_nan_in_search_stage_raises_trial_error_naming_the_stage(tiny_config, monkeypatch):
    import qsearch.methods.csq as csq_module
    from qsearch.errors import TrialError
    from qsearch.train import train

    calls = {"n": 0}
    real = csq_module.regularizer

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(csq_module, "regularizer", poisoned)
    seen: list[dict] = []
    cfg = tiny_config(epochs=2, methods={"csq": {"enabled": True, "target_bits": 3}})
    with pytest.raises(TrialError, match=r"loss became nan at stage csq\.search epoch 1, step 2"):
        train(cfg, report=seen.append)
    assert seen == []  # nothing reported, the stage stopped at the poisoned step

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
from qsearch.methods.csq_layers import BitConv2d, BitLinear, binary_expansion


def _conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(3.0)
    return conv


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("planes", [6, 8])
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


@pytest.mark.parametrize(("start", "bits"), [(0, 3), (2, 4), (0, 2), (3, 5)])
def test_hard_gates_high_temperature_give_a_b_bit_grid(start, bits):
    planes = 8
    q = BitLinear.from_float(nn.Linear(64, 32), planes, a_bits=32)
    with torch.no_grad():  # random trained-looking bits, away from the undecided 0
        q.pbits.copy_(torch.randn_like(q.pbits).sign() * (0.5 + torch.rand_like(q.pbits)))
        q.nbits.copy_(torch.randn_like(q.nbits).sign() * (0.5 + torch.rand_like(q.nbits)))
    pattern = [1 if start <= j < start + bits else 0 for j in range(planes)]
    q.set_pattern(pattern)
    q.beta = 1e4
    w = q.planes_weight().detach().double()
    step = float(q.scale.detach()) * float(q.exps[start + bits - 1])
    k = w / step
    assert torch.allclose(k, k.round(), atol=1e-4)
    k = k.round()
    assert k.abs().max() <= 2**bits - 1
    assert len(k.unique()) > 2**bits  # the grid is used, not a degenerate subset
    assert q.w_bits == bits


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
           "z": [1, 0, 0, 0, 0, 0, 0, 0]}  # one plane: clamped to the 2-bit minimum
    scores = {"x": [3, 2, 1, -1, -2, -3, -4, -5],
              "y": [0.1, 2, -1, 3, 0.5, -2, -3, -4],
              "z": [5, -0.5, -1, -2, -3, -4, -5, -6]}
    h = harden(raw, scores, None, 0.0)
    assert h.bits() == {"x": 3, "y": 3, "z": 2}
    assert h.windows == {"x": (0, 3), "y": (1, 3), "z": (0, 2)}
    assert h.noncontiguous == {"y": "11010000 -> 01110000"}
    assert h.projected == 0


def test_budget_projection_meets_the_budget_cheapest_planes_first():
    numel = {"x": 1000, "y": 3000}
    budget = Budget(numel, pinned_bits=0, extra_params=0, target_bits=3.0)
    scores = {"x": [9, 8, 7, 6, -1, -2, -3, -4], "y": [9, 8, 0.5, 0.4, 0.3, -1, -2, -3]}
    # 19000 bits for a 12000 budget: y's weak LSB planes go first, then one plane of x
    # (closing y's third plane would undershoot the 2% band).
    h = harden({"x": [1, 1, 1, 1, 0, 0, 0, 0], "y": [1, 1, 1, 1, 1, 0, 0, 0]}, scores,
               budget, tol=0.02)
    assert h.bits() == {"x": 3, "y": 3}
    assert h.projected == 3
    # A small overshoot is fixed in the layer whose plane fits, not the cheapest logit.
    h = harden({"x": [1, 1, 1, 1, 0, 0, 0, 0], "y": [1, 1, 1, 0, 0, 0, 0, 0]}, scores,
               budget, tol=0.02)
    assert h.bits() == {"x": 3, "y": 3}
    assert h.projected == 1
    # Below the budget planes are opened, highest gate logit first.
    h = harden({"x": [1, 1, 0, 0, 0, 0, 0, 0], "y": [1, 1, 0, 0, 0, 0, 0, 0]}, scores,
               budget, tol=0.02)
    assert budget.avg_bits(h.bits()) == pytest.approx(3.0, abs=0.06)
    assert h.bits() == {"x": 6, "y": 2}  # a y plane (3000 bits) would overshoot the band


# ----------------------------------------------------------------------------- config


def test_config_errors_name_the_field(tiny_config):
    with pytest.raises(ConfigError, match="^epochs"):
        tiny_config(epochs=1, methods={"csq": {"enabled": True}})
    with pytest.raises(ConfigError, match="methods.csq.target_bits"):
        tiny_config(methods={"csq": {"enabled": True, "target_bits": 7, "planes": 6}})
    cfg = CSQConfig(enabled=True, target_mb=1e-4)
    with pytest.raises(ConfigError, match="methods.csq.target_mb"):
        make_budget(cfg, {"a": 1000}, pinned_bits=0, extra_params=0)
    assert make_budget(CSQConfig(enabled=True, target_mb=0.002), {"a": 4000}, 0, 0).target_bits == 4.0


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


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_digits_budget_is_met_with_mixed_bits(tiny_config, bits):
    """Budget b = the size of uniform b-bit LSQ (first/last at 8 bits); CSQ searches every
    layer (search_edges), so even b = 2 leaves room for unequal bits."""
    from qsearch.train import train

    budget = _uniform_size_mb(tiny_config(), bits)
    # Batch 128: stage 2 (one epoch here) needs enough steps to recover 2-bit accuracy; the
    # accuracy floor was set with Nesterov momentum (SGD is plain heavy-ball by default now).
    cfg = tiny_config(epochs=3, batch_size=128, nesterov=True, methods={"csq": {
        "enabled": True, "target_mb": budget, "search_edges": True}})
    seen: list[dict] = []
    result = train(cfg, report=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3]  # stage 1 reports its epochs too
    assert seen[0]["csq.stage"] == 1 and "csq.stage" not in seen[-1]
    size = result.metrics["size_mb"]
    assert abs(size - budget) / budget <= 0.05
    assert result.metrics["csq.budget_mb"] == pytest.approx(budget)
    assert len(set(result.weight_bits.values())) > 1
    assert {r.name: r.w_bits for r in result.layers} == result.weight_bits
    assert result.metrics["accuracy"] > 0.5


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
    assert again.metrics["csq.avg_bits"] == pytest.approx(3.0, abs=0.15)
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

    # 5 epochs: stage 1 = epochs 1-3 with the ticket at 1.5 epochs, stage 2 = epochs 4-5.
    cfg = tiny_config(epochs=5, batch_size=256, methods={"csq": {
        "enabled": True, "target_bits": 3, "epochs_frac": 0.6, "ticket_frac": 0.5}})

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

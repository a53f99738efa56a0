"""Per-layer precision rules: exact module name > ``re:`` regex > first/last > default, and
rules that cannot apply are ConfigErrors naming ``layers.<rule>``."""

from __future__ import annotations

import pytest

from qsearch.errors import ConfigError
from qsearch.models import build_model
from qsearch.quant import LayerPrecision, Precision, convert, quantizable_layers, resolve_precision
from qsearch.config import parse_trial_config


@pytest.fixture
def tiny():
    return build_model("tiny-cnn", 10, 1)


def test_tiny_cnn_layer_names(tiny):
    # The names the rules below refer to; if the model changes this test says why.
    assert quantizable_layers(tiny) == ["stage1.0", "stage2.0.0", "stage3.0", "fc"]


def test_default_and_first_last(tiny):
    plan = resolve_precision(tiny, Precision(w_bits=3, a_bits=5, first_bits=8, last_bits=6))
    assert plan == {
        "stage1.0": LayerPrecision(8, 8),
        "stage2.0.0": LayerPrecision(3, 5),
        "stage3.0": LayerPrecision(3, 5),
        "fc": LayerPrecision(6, 6),
    }
    plan = resolve_precision(tiny, Precision(w_bits=3, a_bits=5, first_bits=None, last_bits=None))
    assert set(plan.values()) == {LayerPrecision(3, 5)}


def test_exact_beats_regex_beats_first_last_beats_default(tiny):
    prec = Precision(
        w_bits=4, a_bits=4, first_bits=8, last_bits=8,
        rules={
            "stage1.0": (2, 3),          # exact: beats the regex below and the first-layer 8
            "re:stage[13].*": (5, 6),    # regex: matches stage1.0 and stage3.0
            "re:f.": (7, None),          # regex beats the last-layer rule; a falls back to 8
        },
    )
    plan = resolve_precision(tiny, prec)
    assert plan["stage1.0"] == LayerPrecision(2, 3)
    assert plan["stage2.0.0"] == LayerPrecision(4, 4)  # nothing matches: the default
    assert plan["stage3.0"] == LayerPrecision(5, 6)
    assert plan["fc"] == LayerPrecision(7, 8)


def test_partial_rule_falls_back_per_field(tiny):
    plan = resolve_precision(tiny, Precision(w_bits=4, a_bits=3, rules={"stage2.0.0": (None, 6)}))
    assert plan["stage2.0.0"] == LayerPrecision(4, 6)


def test_regex_must_match_whole_name(tiny):
    # "stage" alone would match as a prefix but not as a full match: it matches no layer.
    with pytest.raises(ConfigError) as e:
        resolve_precision(tiny, Precision(rules={"re:stage": (2, 2)}))
    assert e.value.field == "layers.re:stage"


def test_rule_matching_no_layer_is_config_error(tiny):
    with pytest.raises(ConfigError) as e:
        resolve_precision(tiny, Precision(rules={"stage9.conv": (2, 2)}))
    assert e.value.field == "layers.stage9.conv"
    assert "layers.stage9.conv" in str(e.value)
    assert "stage1.0" in str(e.value)  # the message lists what exists


def test_bad_regex_is_config_error(tiny):
    with pytest.raises(ConfigError) as e:
        resolve_precision(tiny, Precision(rules={"re:stage(": (2, 2)}))
    assert e.value.field == "layers.re:stage("
    assert "regular expression" in str(e.value)


def test_rules_from_trial_config_apply_through_convert(tiny):
    cfg = parse_trial_config({
        "model": "tiny-cnn", "w_bits": 3, "a_bits": 4,
        "layers": {"stage3.0": {"w_bits": 2}, "re:stage2.*": {"a_bits": 6}},
    })
    qlayers = convert(tiny, Precision.from_config(cfg))
    bits = {n: (q.w_bits, q.a_bits) for n, q in qlayers.items()}
    assert bits == {"stage1.0": (8, 8), "stage2.0.0": (3, 6), "stage3.0": (2, 4), "fc": (8, 8)}


def test_unknown_layer_in_trial_config_fails_the_trial(tiny_config):
    from qsearch.train import train

    cfg = tiny_config(layers={"stage7.conv": {"w_bits": 2}}, epochs=1)
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert e.value.field == "layers.stage7.conv"


def test_layer_rule_bits_validated_by_spec():
    with pytest.raises(ConfigError) as e:
        parse_trial_config({"layers": {"fc": {"w_bits": 9}}})
    assert e.value.field == "layers.fc.w_bits"

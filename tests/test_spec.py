"""TrialConfig validation: every bad value is a ConfigError naming the dotted field."""

from __future__ import annotations

import json

import pytest

from qsearch.errors import ConfigError
from qsearch.config import (
    TrialConfig,
    apply_overrides,
    load_trial_config,
    parse_trial_config,
    set_dotted,
)


def _field_of(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_trial_config(data)
    assert str(e.value).startswith(f"{e.value.field}: ")
    return e.value.field


@pytest.mark.parametrize(
    "data,field",
    [
        ({"epocs": 3}, "epocs"),                                   # unknown key
        ({"warm_start": {"epoch": 3}}, "warm_start.epoch"),        # unknown nested key
        ({"w_bits": 9}, "w_bits"),
        ({"a_bits": 1}, "a_bits"),
        ({"first_bits": 16}, "first_bits"),
        ({"layers": {"fc": {"a_bits": 0}}}, "layers.fc.a_bits"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"model": "resnet-1000"}, "model"),
        ({"dataset": "imagenet-21k"}, "dataset"),
        ({"lr": -0.1}, "lr"),
        ({"lr": 0}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr_schedule": "exp"}, "lr_schedule"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
        ({"version": 2}, "version"),
    ],
)
def test_bad_value_names_the_field(data, field):
    assert _field_of(data) == field


def test_unknown_key_message_says_so():
    with pytest.raises(ConfigError, match="unknown field"):
        parse_trial_config({"epocs": 3})


def test_bad_bits_message_lists_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        parse_trial_config({"w_bits": 9})
    assert "2..8 or 32" in str(e.value) and "9" in str(e.value)


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError) as e:
        parse_trial_config({"model": "resnet-1000"})
    assert "resnet20" in str(e.value)


@pytest.mark.parametrize(
    "data,field",
    [
        # LTS freezes weights on the LSQ grid: with every weight at 32 bits there is no grid.
        ({"w_bits": 32, "first_bits": 32, "last_bits": 32, "methods": {"lts": {"enabled": True}}},
         "methods.lts.enabled"),
        # Block replacement trains against the FP32 warm-start partner.
        ({"warm_start": {"enabled": False}, "methods": {"blockrep": {"enabled": True}}},
         "methods.blockrep.enabled"),
    ],
)
def test_bad_method_combination_names_the_field(data, field):
    assert _field_of(data) == field


def test_good_config_and_defaults():
    cfg = parse_trial_config({"model": "resnet20", "dataset": "synthetic", "w_bits": 2,
                              "layers": {"fc": {"w_bits": 8}}})
    assert isinstance(cfg, TrialConfig)
    assert (cfg.w_bits, cfg.a_bits, cfg.first_bits, cfg.last_bits) == (2, 4, 8, 8)
    assert cfg.layers["fc"].w_bits == 8 and cfg.layers["fc"].a_bits is None
    assert cfg.methods.enabled() == []


def test_assignment_is_validated():
    cfg = parse_trial_config({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's own error on assignment
        cfg.w_bits = 11


def test_content_hash_is_stable_and_sensitive():
    a = parse_trial_config({"w_bits": 3})
    b = parse_trial_config({"w_bits": 3})
    c = parse_trial_config({"w_bits": 2})
    assert a.content_hash() == b.content_hash() != c.content_hash()
    # a JSON round trip gives the same config
    again = parse_trial_config(json.loads(a.model_dump_json()))
    assert again == a and again.content_hash() == a.content_hash()


def test_overrides_parse_yaml_scalars_and_dotted_keys():
    out = apply_overrides({}, ["w_bits=3", "warm_start.enabled=false", "lr=0.001",
                               "layers.layer1.0.conv1.w_bits=2", "model=resnet20"])
    assert out == {"w_bits": 3, "warm_start": {"enabled": False}, "lr": 0.001,
                   "layers": {"layer1.0.conv1": {"w_bits": 2}}, "model": "resnet20"}
    cfg = parse_trial_config(out)
    assert cfg.layers["layer1.0.conv1"].w_bits == 2
    # YAML 1.1 reads "1e-3" as a string; the typed field still gets the number.
    assert parse_trial_config(apply_overrides({}, ["lr=1e-3"])).lr == 1e-3


@pytest.mark.parametrize("item,field", [("w_bits", "--set"), ("=3", "--set")])
def test_malformed_override(item, field):
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, [item])
    assert e.value.field == field


def test_override_into_a_value_is_an_error():
    data = {"lr": 0.1}
    with pytest.raises(ConfigError) as e:
        set_dotted(data, "lr.x", 1)
    assert e.value.field == "lr.x"


def test_load_from_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("model: resnet20\nepochs: 7\nwarm_start:\n  epochs: 2\n")
    cfg = load_trial_config(str(path), ["epochs=3"])
    assert (cfg.model, cfg.epochs, cfg.warm_start.epochs) == ("resnet20", 3, 2)

    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError) as e:
        load_trial_config(str(bad))
    assert e.value.field == str(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_trial_config(str(tmp_path / "missing.yaml"))

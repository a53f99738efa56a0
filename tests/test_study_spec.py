"""Study spec validation: every mistake is a ConfigError naming the key, before any write."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qsearch.cli import main
from qsearch.errors import ConfigError
from qsearch.search.space import build_sampler, build_scheduler, optuna_space
from qsearch.config import load_study_spec, parse_study_spec

ROOT = Path(__file__).resolve().parents[1]


def good(**over):
    spec = {"name": "s", "base": {"epochs": 3},
            "search_space": {"w_bits": {"type": "categorical", "choices": [2, 4]},
                             "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
                             "first_bits": {"type": "int", "low": 4, "high": 8},
                             "momentum": 0.8}}
    spec.update(over)
    return spec


def test_good_spec_builds_configs_and_search_objects():
    spec = parse_study_spec(good(scheduler={"type": "asha", "grace_period": 1}))
    assert spec.storage == "sqlite:///qsearch.db"
    assert set(spec.searched()) == {"w_bits", "lr", "first_bits"}
    cfg = spec.trial_config({"w_bits": 2, "lr": 0.01, "first_bits": 6})
    assert (cfg.w_bits, cfg.lr, cfg.first_bits, cfg.momentum, cfg.epochs) == (2, 0.01, 6, 0.8, 3)
    dists = optuna_space(spec)
    assert dists["lr"].log and dists["first_bits"].high == 8
    assert type(build_sampler(spec)).__name__ == "NSGAIISampler"
    assert build_scheduler(spec)._max_t == 3
    assert spec.spec_hash() == parse_study_spec(good(scheduler={"type": "asha", "grace_period": 1})).spec_hash()


@pytest.mark.parametrize("over, field, words", [
    ({"search_space": {"w_bitz": {"type": "categorical", "choices": [2]}}}, "search_space.w_bitz", "unknown"),
    ({"search_space": {"methods.lts.warmup_fracc": {"type": "float", "low": 0, "high": 1}}},
     "search_space.methods.lts.warmup_fracc", "warmup_frac"),
    ({"search_space": {"methods.lts": {"type": "categorical", "choices": [1]}}}, "search_space.methods.lts", "section"),
    ({"search_space": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "search_space.lr", "empty range"),
    ({"search_space": {"lr": {"type": "float", "low": 0.1, "high": 0.1}}}, "search_space.lr", "empty range"),
    ({"search_space": {"lr": {"type": "float", "low": 0.01, "high": 50}}}, "search_space.lr", "50"),
    ({"search_space": {"w_bits": {"type": "categorical", "choices": [2, 9]}}}, "search_space.w_bits", "9"),
    ({"search_space": {"w_bits": {"type": "int", "low": 2, "high": 12}}}, "search_space.w_bits", "9"),
    ({"search_space": {"optimizer": {"type": "categorical", "choices": ["sgd", "lion"]}}},
     "search_space.optimizer", "lion"),
    ({"search_space": {"w_bits": {"type": "categorical", "choices": []}}}, "search_space.w_bits", "empty"),
    ({"sampler": {"type": "cmaes"}}, "sampler.type", "nsga2"),
    ({"objectives": ["accuracy"]}, "objectives", "two"),
    ({"objectives": ["accuracy", "latency"]}, "objectives", "latency"),
    ({"scheduler": {"type": "asha", "grace_period": 3}}, "scheduler.grace_period", None),
    ({"base": {"epochz": 3}}, "base.epochz", "unknown"),
    ({"budget": {"num_trials": 0}}, "budget.num_trials", None),
    ({"resources": {"gpu": -1}}, "resources.gpu", None),
    ({"artifacts": {"dir": "s3://bucket/x"}}, "artifacts.dir", "artifacts.checkpoints"),
    ({"failure": {"max_failures": -1}}, "failure.max_failures", None),
])
def test_bad_spec_names_the_key(over, field, words):
    with pytest.raises(ConfigError) as e:
        parse_study_spec(good(**over))
    assert e.value.field.startswith(field), str(e.value)
    if words:
        assert words in str(e.value)


def test_checkpoints_may_be_an_object_store_uri():
    spec = parse_study_spec(good(artifacts={"dir": "/shared/a", "checkpoints": "s3://b/ckpt"}))
    from qsearch.search.driver import checkpoints_path

    assert checkpoints_path(spec) == "s3://b/ckpt"
    assert checkpoints_path(parse_study_spec(good(artifacts={"dir": "/shared/a"}))) == \
        "/shared/a/ray_results"


def test_fractional_gpu_and_name_override(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(good(resources={"cpu": 1, "gpu": 0.5})))
    spec = load_study_spec(p, storage="postgresql://u:pw@h/db", name="other")
    assert (spec.resources.gpu, spec.name, spec.storage) == (0.5, "other", "postgresql://u:pw@h/db")


def test_quickstart_spec_is_valid():
    spec = load_study_spec(ROOT / "studies" / "quickstart.yaml")
    assert spec.dataset == "digits" and spec.model == "tiny-cnn"
    assert {"val_accuracy", "size_mb"} <= set(spec.objectives) and len(spec.objectives) == 3
    assert spec.scheduler.metric == "val_accuracy"
    assert {"w_bits", "a_bits", "first_bits", "last_bits", "lr"} <= set(spec.searched())
    assert spec.scheduler.type == "pareto" and spec.budget.max_concurrent == 2


@pytest.mark.parametrize("bad", [
    {"search_space": {"nope": {"type": "categorical", "choices": [1]}}},
    {"search_space": {"lr": {"type": "float", "low": 1, "high": 0.5}}},
    {"sampler": {"type": "bogus"}},
    {"objectives": ["size_mb"]},
])
def test_cli_launch_with_bad_spec_exits_2_and_writes_nothing(tmp_path, capsys, bad):
    db = tmp_path / "q.db"
    spec = good(storage=f"sqlite:///{db}", **bad)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(spec))
    assert main(["launch", str(p), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert not db.exists()


def test_bad_spec_on_postgres_writes_nothing(tmp_path, pg_url, capsys):
    from sqlalchemy import create_engine, inspect

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(good(storage=pg_url, objectives=["accuracy"])))
    assert main(["launch", str(p), "--quiet"]) == 2
    eng = create_engine(pg_url)
    try:
        assert inspect(eng).get_table_names() == []
    finally:
        eng.dispose()

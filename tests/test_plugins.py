"""A method and an objective added from outside the product, through the registries alone.

The plug-in lives in files this test writes (two modules: a torch-free config module that
registers the ``echo`` method and the ``echo_score`` objective, and the handler). Nothing in
qsearch/ names it; it reaches spec validation, the trainer, the store, ``qsearch pareto``
and export because the registries carry it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from qsearch.errors import ConfigError

CONFIG_MODULE = '''
"""Torch-free half of the echo plug-in: its config section and its objective."""
from pydantic import Field

from qsearch.config.methods import MethodConfig, register_method
from qsearch.config.objectives import Objective, register_objective


class EchoConfig(MethodConfig):
    strength: float = Field(0.5, ge=0.0, le=1.0)


register_objective(Objective("echo_score", "minimize", "echo score", unit="arb",
                             kind="computed", metric_key="echo.score"))
register_method("echo", EchoConfig, order=60, handler="qsearch_echo_handler:Echo")
'''

HANDLER_MODULE = '''
"""The echo method: counts the training steps it saw; its score is strength * steps / 1000."""
from qsearch.methods.plugin import Method


class Echo(Method):
    def __init__(self, config):
        super().__init__(config)
        self.steps = 0

    def after_step(self, ctx):
        self.steps += 1

    def metrics(self, ctx):
        return {"score": self.config.strength * self.steps / 1000, "steps": float(self.steps)}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "qsearch_echo_plugin.py").write_text(CONFIG_MODULE)
    (d / "qsearch_echo_handler.py").write_text(HANDLER_MODULE)
    monkeypatch.syspath_prepend(str(d))
    yield d
    from qsearch.config.methods import unregister_method
    from qsearch.config.objectives import unregister_objective

    unregister_method("echo")
    unregister_objective("echo_score")
    for mod in ("qsearch_echo_plugin", "qsearch_echo_handler"):
        sys.modules.pop(mod, None)


def _spec(name: str, storage: str, **extra) -> dict:
    spec = {
        "name": name, "storage": storage, "model": "tiny-cnn", "dataset": "digits",
        "base": {"plugins": ["qsearch_echo_plugin"], "epochs": 1, "batch_size": 128,
                 "device": "cpu", "warm_start": {"epochs": 1},
                 "methods": {"echo": {"enabled": True}}},
        "objectives": ["size_mb", "echo_score"],
        "budget": {"num_trials": 3, "max_concurrent": 1},
        "sampler": {"type": "random", "seed": 0},
        "search_space": {"methods.echo.strength": {"type": "float", "low": 0.1, "high": 0.9},
                         "w_bits": {"type": "categorical", "choices": [2, 4, 8]}},
    }
    spec.update(extra)
    return spec


def test_plugin_reaches_spec_validation_and_the_trainer(plugin_dir, tmp_path):
    from qsearch.config import parse_study_spec
    from qsearch.config.objectives import get_objective
    from qsearch.train import train

    spec = parse_study_spec(_spec("echo", f"sqlite:///{tmp_path / 'q.db'}"))
    assert spec.directions == ["minimize", "minimize"]
    assert get_objective("echo_score").axis_title == "echo score (arb, computed)"

    bad = _spec("echo", "sqlite:///x.db")
    bad["search_space"]["methods.echo.strength"]["high"] = 2.0  # EchoConfig allows <= 1
    with pytest.raises(ConfigError) as e:
        parse_study_spec(bad)
    assert e.value.field == "search_space.methods.echo.strength"

    typo = _spec("echo", "sqlite:///x.db")
    typo["base"]["methods"]["echo"]["strenght"] = 0.3
    with pytest.raises(ConfigError) as e:
        parse_study_spec(typo)
    assert e.value.field == "base.methods.echo.strenght"

    cfg = spec.trial_config({"methods.echo.strength": 0.25, "w_bits": 4})
    result = train(cfg)
    steps = result.metrics["echo.steps"]
    assert steps > 0
    assert result.metrics["echo.score"] == pytest.approx(0.25 * steps / 1000)


def test_a_plugin_that_cannot_be_imported_is_a_config_error(tmp_path):
    from qsearch.config import parse_study_spec

    spec = _spec("echo", "sqlite:///x.db")
    spec["base"]["plugins"] = ["no_such_plugin_module"]
    with pytest.raises(ConfigError) as e:
        parse_study_spec(spec)
    assert e.value.field == "base.plugins"
    assert "PYTHONPATH" in str(e.value)


def _cli(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qsearch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_plugin_study_reaches_store_pareto_and_export(plugin_dir, tmp_path):
    """A real study (local Ray, SQLite) of the plug-in: its objective is stored by name, read
    back by ``qsearch pareto --format json``, and the export re-evaluates."""
    work = tmp_path / "work"
    work.mkdir()
    db = work / "q.db"
    (work / "spec.yaml").write_text(yaml.safe_dump(_spec("echo-study", f"sqlite:///{db}")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(plugin_dir), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "QSEARCH_CACHE": str(tmp_path / "cache")}
    run = _cli(["launch", "spec.yaml", "--quiet"], work, env)
    assert run.returncode == 0, run.stderr[-3000:]

    front = _cli(["pareto", "echo-study", "--storage", f"sqlite:///{db}", "--format", "json"],
                 work, env)
    assert front.returncode == 0, front.stderr
    doc = json.loads(front.stdout)
    points = doc["points"] if isinstance(doc, dict) else doc
    assert points, doc
    for p in points:
        strength = p["params"]["methods.echo.strength"]
        assert p["echo_score"] > 0
        assert p["echo_score"] < strength  # strength * steps / 1000 with steps < 1000

    out = work / "best.json"
    exp = _cli(["export", "echo-study", "--storage", f"sqlite:///{db}", "--pick", "knee",
                "-o", str(out)], work, env)
    assert exp.returncode == 0, exp.stderr
    assert json.loads(out.read_text())["config"]["methods"]["echo"]["enabled"] is True
    ev = _cli(["eval", str(out)], work, env)
    assert ev.returncode == 0, ev.stderr
    assert "match" in ev.stdout, textwrap.shorten(ev.stdout, 500)

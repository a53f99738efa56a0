"""A corpus of bad study specs: every one is refused by ``qsearch launch`` before any work.

Each case is a mutation of ``studies/quickstart.yaml`` (or raw bytes, for files that are not
well-formed text), written to its own file. Every case must exit 2 with one short message
(at most 3 lines, no traceback) that names the field or the file, and leave the working
directory empty: no ``qsearch.db``, no ``qsearch_artifacts``. Most cases run in this process
through :func:`qsearch.cli.main` (fast); a handful run as real ``python -m qsearch`` processes.
Also here: unit tests of the resource, storage-URL and per-layer checks the cases rely on.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from qsearch.cli import main
from qsearch.config import parse_study_spec
from qsearch.config.urls import check_storage_url, explain_database_error, probe_database
from qsearch.errors import ConfigError
from qsearch.search import preflight

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "studies" / "quickstart.yaml"


def quickstart() -> dict[str, Any]:
    return yaml.safe_load(QUICKSTART.read_text())


def _set(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation: set ``a.b.c`` (``search_space`` keys may contain dots: ``ss:<key>``)."""
    def mutate(spec: dict[str, Any]) -> None:
        if dotted.startswith("ss:"):
            spec.setdefault("search_space", {})[dotted[3:]] = value
            return
        *path, last = dotted.split(".")
        node = spec
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda spec: spec.pop(key, None)


def _rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        spec[new] = spec.pop(old)
    return mutate


def _bomb() -> bytes:
    """The "billion laughs": 9 levels of 9 aliases, a few hundred bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for c in "bcdefghi":
        lines.append(f"{c}: &{c} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = c
    return ("\n".join(lines) + "\nname: *i\n").encode()


QS_TEXT = QUICKSTART.read_bytes()
CAT = {"type": "categorical", "choices": [2, 4]}

#: id -> (mutation of the quickstart mapping | raw file bytes | "dir" | "missing",
#:        text the one-line message must contain)
CASES: dict[str, tuple[Any, str]] = {
    # files that are not well-formed text
    "file-not-utf8": (QS_TEXT.replace(b"name: quickstart", b"name: quick\xff\xfestart"),
                      "not UTF-8"),
    "file-latin1": ("# caf\xe9\n".encode("latin-1") + QS_TEXT, "not UTF-8"),
    "file-alias-bomb": (_bomb(), "expands to more than"),
    "file-long-string-aliased": (b's: &s "' + b"x" * 400_000 + b'"\nname: ['
                                 + b",".join([b"*s"] * 20_000) + b"]\n", "characters"),
    "file-tab-indent": (QS_TEXT.replace(b"\n  epochs: 4", b"\n\tepochs: 4"),
                        "tab is used for indentation"),
    "file-directory": ("dir", "is a directory"),
    "file-missing": ("missing", "file not found"),
    "file-empty": (b"", "is empty"),
    "file-only-comments": (b"# nothing here\n\n", "is empty"),
    "file-top-level-list": (b"- name: quickstart\n- model: tiny-cnn\n", "YAML list"),
    "file-top-level-scalar": (b"quickstart\n", "top level"),
    "file-nul-bytes": (QS_TEXT + b"\x00\x00", "NUL"),
    "file-invalid-yaml": (QS_TEXT + b"\nbudget: {num_trials: 4\n", "not valid YAML"),
    "file-duplicate-key": (QS_TEXT + b"\nname: again\n", "given twice"),
    "file-huge-integer": (QS_TEXT + b"\nseed_note: " + b"9" * 5000 + b"\n", "digits"),
    "file-too-big": (QS_TEXT + b"#" + b"x" * (1 << 20) + b"\n", "bytes"),
    # study-level fields
    "unknown-field": (_rename("search_space", "serach_space"), "did you mean search_space"),
    "unknown-field-lists-fields": (_set("owner", "me"), "reference_point"),
    "version": (_set("version", 2), "version"),
    "name-missing": (_drop("name"), "name"),
    "name-bad-chars": (_set("name", "my study!"), "name"),
    "storage-postgres-scheme": (_set("storage", "postgres://u:secret@db.example/qs"),
                                "postgresql+psycopg://"),
    "storage-in-memory": (_set("storage", "sqlite://"), "in-memory"),
    "storage-folder-missing": (_set("storage", "sqlite:///no-such-folder/q.db"),
                               "does not exist"),
    "storage-not-a-url": (_set("storage", "qsearch.db"), "not a database URL"),
    "storage-unknown-scheme": (_set("storage", "mongodb://h/db"), "unknown database scheme"),
    "model-unknown": (_set("model", "resnet9000"), "model"),
    "dataset-unknown": (_set("dataset", "mnist-ish"), "dataset"),
    # base.*
    "base-epochs-zero": (_set("base.epochs", 0), "base.epochs"),
    "base-unknown-key": (_set("base.epochz", 3), "base.epochz"),
    "base-model-conflict": (_set("base.model", "resnet20"), "base.model"),
    "base-device": (_set("base.device", "tpu"), "base.device"),
    "base-warm-start": (_set("base.warm_start.epochs", 0), "base.warm_start.epochs"),
    "base-method-unknown": (_set("base.methods.nope", {"enabled": True}), "nope"),
    "base-layers-bad-regex": (_set("base.layers", {"re:conv[": {"w_bits": 2}}),
                              "regular expression"),
    "base-layers-no-such-layer": (_set("base.layers", {"conv1": {"w_bits": 2}}),
                                  "quantizable layers of tiny-cnn are"),
    "base-layers-regex-no-match": (_set("base.layers", {"re:conv.*": {"w_bits": 2}}),
                                   "matches no layer"),
    "base-layers-bad-bits": (_set("base.layers", {"fc": {"w_bits": 9}}), "base.layers"),
    # objectives
    "objectives-unknown": (_set("objectives", ["size_mb", "latency"]), "latency"),
    "objectives-one": (_set("objectives", ["size_mb"]), "objectives"),
    "objectives-duplicate": (_set("objectives", ["size_mb", "size_mb"]), "distinct"),
    # budget / resources
    "budget-num-trials": (_set("budget.num_trials", 0), "budget.num_trials"),
    "budget-max-concurrent": (_set("budget.max_concurrent", 0), "budget.max_concurrent"),
    "budget-unknown-key": (_set("budget.trials", 4), "budget.trials"),
    "budget-time-limit": (_set("budget.time_limit_s", -5), "budget.time_limit_s"),
    "resources-cpu-zero": (_set("resources.cpu", 0), "resources.cpu"),
    "resources-gpu-negative": (_set("resources.gpu", -1), "resources.gpu"),
    "resources-too-many-cpus": (_set("resources.cpu", 4096), "no node has more than"),
    "resources-gpu-without-gpus": (_set("resources.gpu", 1), "has no GPU"),
    "resources-fractional-gpu-without-gpus": (_set("resources.gpu", 0.25), "a share of one"),
    # sampler / scheduler
    "sampler-type": (_set("sampler.type", "cmaes"), "sampler.type"),
    "sampler-options": (_set("sampler.options", [1, 2]), "sampler.options"),
    "scheduler-type": (_set("scheduler.type", "hyperband"), "scheduler.type"),
    "scheduler-grace-period": (_set("scheduler.grace_period", 4), "scheduler.grace_period"),
    "scheduler-reduction-factor": (_set("scheduler.reduction_factor", 1), "reduction_factor"),
    # search space
    "space-missing": (_drop("search_space"), "nothing to search"),
    "space-empty": (_set("search_space", {}), "nothing to search"),
    "space-only-fixed": (_set("search_space", {"w_bits": 4}), "nothing to search"),
    "space-unknown-path": (_set("ss:w_bitz", CAT), "search_space.w_bitz"),
    "space-float-empty-range": (_set("ss:lr", {"type": "float", "low": 0.1, "high": 0.01}),
                                "empty range"),
    "space-float-log-zero": (_set("ss:lr", {"type": "float", "low": 0, "high": 0.1,
                                            "log": True}), "log scale"),
    "space-int-step": (_set("ss:epochs", {"type": "int", "low": 2, "high": 6, "step": 0}),
                       "search_space.epochs"),
    "space-categorical-empty": (_set("ss:w_bits", {"type": "categorical", "choices": []}),
                                "empty choices"),
    "space-value-rejected": (_set("ss:w_bits", {"type": "categorical", "choices": [2, 9]}),
                             "search_space.w_bits"),
    "space-unknown-type": (_set("ss:lr", {"type": "normal", "mean": 0.01}), "search_space.lr"),
    "space-section": (_set("ss:warm_start", CAT), "section"),
    "space-layer-no-such-layer": (_set("ss:layers.conv9.w_bits", CAT), "no layer 'conv9'"),
    "space-layer-regex-no-match": (_set("ss:layers.re:block.*.w_bits", CAT),
                                   "matches no layer"),
    "space-layer-glob-no-match": (_set("ss:layers.block*.w_bits", CAT), "matches no layer"),
    # reference point, artifacts, failure
    "reference-point-unknown": (_set("reference_point", {"latency": 1.0}), "latency"),
    "reference-point-not-a-number": (_set("reference_point", {"size_mb": "big"}),
                                     "reference_point.size_mb"),
    "artifacts-dir-uri": (_set("artifacts.dir", "s3://bucket/x"), "artifacts.checkpoints"),
    "artifacts-keep": (_set("artifacts.keep", "some"), "artifacts.keep"),
    "failure-max-failures": (_set("failure.max_failures", -1), "failure.max_failures"),
    "failure-unknown-key": (_set("failure.retries", 3), "failure.retries"),
}

#: A few cases also go through a real ``python -m qsearch launch`` process.
#: (The layer cases import torch and torchvision: in this process only, where they are loaded.)
SUBPROCESS_CASES = ["file-alias-bomb", "file-directory", "file-not-utf8", "space-missing",
                    "resources-gpu-without-gpus", "storage-postgres-scheme"]


def write_case(case: str, folder: Path) -> Path:
    """The case's spec file (or directory, or missing path) in ``folder``."""
    what, _ = CASES[case]
    path = folder / f"{case}.yaml"
    if what == "dir":
        (path / "inner").mkdir(parents=True)
        (path / "inner" / "spec.yaml").write_bytes(QS_TEXT)
    elif what == "missing":
        pass
    elif isinstance(what, bytes):
        path.write_bytes(what)
    else:
        spec = copy.deepcopy(quickstart())
        what(spec)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def check_refusal(rc: int, out: str, workdir: Path, expect: str) -> None:
    assert rc == 2, out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    assert 1 <= len(lines) <= 3, out
    assert lines[0].startswith("error:"), out
    assert expect in out, f"expected {expect!r} in: {out}"
    assert len(out) < 2000, f"message too long ({len(out)} characters)"
    assert not list(workdir.iterdir()), f"launch wrote {list(workdir.iterdir())}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory, the default storage (sqlite:///qsearch.db) inside it,
    and a machine without GPUs (the GPU cases must not depend on the test host)."""
    wd = tmp_path / "work"
    wd.mkdir()
    monkeypatch.chdir(wd)
    monkeypatch.delenv("QSEARCH_STORAGE", raising=False)
    monkeypatch.delenv(preflight.RESOURCE_WAIT_ENV, raising=False)
    real = preflight.local_resources
    monkeypatch.setattr(preflight, "local_resources",
                        lambda num_cpus=None, count_gpus=True: {**real(num_cpus, False),
                                                                "GPU": 0.0})
    return wd


def test_corpus_is_big_and_covers_every_field_family():
    assert len(CASES) >= 40
    families = {c.split("-")[0] for c in CASES}
    assert {"file", "name", "storage", "model", "dataset", "base", "objectives", "budget",
            "resources", "sampler", "scheduler", "space", "reference", "artifacts",
            "failure", "unknown"} <= families
    spec = quickstart()
    for case, (what, _) in CASES.items():  # a mutation really changes the quickstart spec
        if callable(what):
            changed = copy.deepcopy(spec)
            what(changed)
            assert changed != spec, case


def test_quickstart_itself_passes_the_checks(workdir):
    spec = parse_study_spec(quickstart())
    preflight.check_launch(spec, num_cpus=2)  # the corpus mutates a spec that is fine
    assert not list(workdir.iterdir())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_spec_is_refused_before_any_work(case, workdir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    path = write_case(case, corpus)
    rc = main(["launch", str(path), "--quiet"])
    cap = capsys.readouterr()
    check_refusal(rc, cap.out + cap.err, workdir, CASES[case][1])


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_spec_is_refused_by_the_real_command(case, tmp_path):
    wd, corpus = tmp_path / "work", tmp_path / "corpus"
    wd.mkdir()
    corpus.mkdir()
    path = write_case(case, corpus)
    env = {k: v for k, v in os.environ.items()
           if k not in ("QSEARCH_STORAGE", preflight.RESOURCE_WAIT_ENV)}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", COLUMNS="80")
    r = subprocess.run([sys.executable, "-m", "qsearch", "launch", str(path), "--quiet"],
                       cwd=wd, env=env, capture_output=True, text=True, timeout=120)
    check_refusal(r.returncode, r.stdout + r.stderr, wd, CASES[case][1])


@pytest.mark.parametrize("case", ["space-missing", "resources-too-many-cpus",
                                  "storage-folder-missing"])
def test_bad_spec_refusal_imports_neither_torch_nor_ray(case, tmp_path):
    """Validation that needs no model must stay torch-free (fast, and safe to run anywhere)."""
    path = write_case(case, tmp_path)
    code = ("import sys; from qsearch.cli import main; rc = main(['launch', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'ray', 'optuna') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "HEAVY []" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------- resources


def _spec(**resources: float):
    return parse_study_spec({**quickstart(), "resources": resources})


@pytest.mark.parametrize("resources, cluster, field, words", [
    ({"cpu": 1, "gpu": 1}, {"CPU": 2.0}, "resources.gpu", "has no GPU (1 node: 2 CPU, 0 GPU)"),
    ({"cpu": 1, "gpu": 0.5}, {"CPU": 2.0, "GPU": 0.0}, "resources.gpu", "a share of one"),
    ({"cpu": 4}, {"CPU": 2.0}, "resources.cpu", "no node has more than 2"),
    ({"cpu": 1, "gpu": 2}, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}],
     "resources.gpu", "2 nodes: 16 CPU, 2 GPU in all"),
    ({"cpu": 6}, [{"CPU": 4.0}, {"CPU": 4.0}], "resources.cpu", "at most 4"),
    ({"cpu": 8, "gpu": 1}, [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}], "resources",
     "no single node has both"),
    ({"cpu": 1, "gpu": 1}, [], "resources.gpu", "no node"),
])
def test_resources_no_node_can_satisfy(resources, cluster, field, words):
    with pytest.raises(ConfigError) as e:
        preflight.check_resources(_spec(**resources), cluster)
    assert e.value.field == field and words in str(e.value), str(e.value)


@pytest.mark.parametrize("resources, cluster", [
    ({"cpu": 2}, {"CPU": 2.0}),
    ({"cpu": 1, "gpu": 0.5}, {"CPU": 2.0, "GPU": 1.0}),
    ({"cpu": 4, "gpu": 1}, [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0, "memory": 1e9}]),
])
def test_resources_that_fit(resources, cluster):
    assert preflight.check_resources(_spec(**resources), cluster) is None


def test_autoscaling_warns_instead_of_failing():
    msg = preflight.check_resources(_spec(cpu=1, gpu=1), {"CPU": 2.0}, autoscaling=True)
    assert msg.startswith("resources.gpu:") and "has no GPU" in msg


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_check_cluster_fails_at_once_without_an_autoscaler(monkeypatch):
    monkeypatch.delenv(preflight.RESOURCE_WAIT_ENV, raising=False)
    clock = FakeClock()
    with pytest.raises(ConfigError, match="has no GPU"):
        preflight.check_cluster(_spec(cpu=1, gpu=1), lambda: {"CPU": 2.0}, sleep=clock.sleep,
                                clock=clock)
    assert clock.sleeps == []


def test_check_cluster_waits_for_the_autoscaler_then_times_out(monkeypatch, caplog):
    monkeypatch.setenv(preflight.RESOURCE_WAIT_ENV, "30")
    clock = FakeClock()
    with pytest.raises(ConfigError) as e:
        preflight.check_cluster(_spec(cpu=1, gpu=1), lambda: {"CPU": 2.0}, poll_s=10,
                                sleep=clock.sleep, clock=clock)
    assert e.value.field == "resources.gpu"
    assert "within 30 s" in str(e.value) and preflight.RESOURCE_WAIT_ENV in str(e.value)
    assert clock.t == 30 and len(clock.sleeps) == 3
    assert "waiting up to 30 s" in caplog.text


def test_check_cluster_returns_once_a_node_joins():
    clock = FakeClock()
    nodes = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]])
    preflight.check_cluster(_spec(cpu=1, gpu=1), lambda: next(nodes), wait_s=600, poll_s=5,
                            sleep=clock.sleep, clock=clock)
    assert clock.t == 10


def test_resource_wait_env_must_be_a_number(monkeypatch):
    monkeypatch.setenv(preflight.RESOURCE_WAIT_ENV, "soon")
    with pytest.raises(ConfigError, match=preflight.RESOURCE_WAIT_ENV):
        preflight.resource_wait_s()


# --------------------------------------------------------------------------- layers


def test_layer_rules_use_the_trainers_matching():
    names = ["stage1.0", "stage2.0.0", "stage3.0", "fc"]
    ok = parse_study_spec({**quickstart(), "base": {**quickstart()["base"], "layers": {
        "fc": {"w_bits": 8}, "re:stage[12].*": {"a_bits": 8}}},
        "search_space": {**quickstart()["search_space"],
                         "layers.stage3.0.w_bits": {"type": "categorical", "choices": [2, 4]}}})
    preflight.check_layers(ok, names)
    preflight.check_layers(ok)  # the real tiny-cnn has these layers
    with pytest.raises(ConfigError, match="did you mean stage3.0"):
        bad = parse_study_spec({**quickstart(), "base": {"layers": {"stage3.1": {"w_bits": 2}}}})
        preflight.check_layers(bad, names)
    glob = {**quickstart()["search_space"], "layers.stage*.w_bits": CAT}
    preflight.check_layers(parse_study_spec({**quickstart(), "search_space": glob}), names)
    # A regex must match a whole name, as in the trainer: "stage" matches nothing.
    with pytest.raises(ConfigError, match="matches no layer"):
        preflight.check_layers(parse_study_spec(
            {**quickstart(), "base": {"layers": {"re:stage": {"w_bits": 2}}}}), names)


def test_no_layer_rules_builds_no_model(monkeypatch):
    monkeypatch.setattr(preflight, "model_layer_names", lambda spec: pytest.fail("built"))
    preflight.check_layers(parse_study_spec(quickstart()))


# --------------------------------------------------------------------------- storage URLs


@pytest.mark.parametrize("url, words", [
    ("postgres://u:secret@h/db", "postgresql+psycopg://u:***@h/db"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlite://", "in-memory"),
    ("", "is empty"),
    ("mysql+nosuchdriver://h/db", "unknown database scheme"),
])
def test_storage_url_names_the_fix(url, words):
    with pytest.raises(ConfigError) as e:
        check_storage_url(url)
    assert words in str(e.value) and "secret" not in str(e.value)


def test_sqlite_storage_folder_and_directory(tmp_path):
    check_storage_url(f"sqlite:///{tmp_path / 'q.db'}")
    with pytest.raises(ConfigError, match="is a directory"):
        check_storage_url(f"sqlite:///{tmp_path}")
    with pytest.raises(ConfigError, match="does not exist"):
        check_storage_url(f"sqlite:///{tmp_path / 'nope' / 'q.db'}")
    check_storage_url(f"sqlite:///{tmp_path / 'nope' / 'q.db'}", create=False)  # readers


@pytest.mark.parametrize("url", ["postgresql+psycopg://u@h/db", "postgresql://u@h/db",
                                 "postgresql+psycopg2://u@h/db"])
def test_missing_postgres_driver_says_what_to_install(url, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ConfigError, match=r'pip install "qsearch\[postgres\]"'):
        check_storage_url(url)


def test_nonexistent_database_message_is_one_line_with_the_fix():
    err = RuntimeError('connection failed: connection to server at "127.0.0.1", port 5432 '
                       'failed: FATAL:  database "qs_missing" does not exist')
    msg = explain_database_error(err, "postgresql+psycopg://postgres@127.0.0.1:5432/qs_missing")
    assert msg and "createdb -h 127.0.0.1 -p 5432 -U postgres qs_missing" in msg
    assert "\n" not in msg
    assert explain_database_error(RuntimeError("Connection refused"), "postgresql://h/d") is None


def _pg_reachable() -> bool:
    try:
        import psycopg

        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                        connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.postgres
def test_launch_on_a_database_that_does_not_exist(workdir, tmp_path, capsys):
    if not _pg_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is unreachable under CI=true")
        pytest.skip("PostgreSQL on 127.0.0.1:5432 unreachable")
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/qs_no_such_database"
    with pytest.raises(ConfigError, match="createdb"):
        probe_database(url)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**quickstart(), "storage": url}))
    rc = main(["launch", str(spec), "--quiet"])
    cap = capsys.readouterr()
    check_refusal(rc, cap.out + cap.err, workdir, "does not exist")
    rc = main(["studies", "--storage", url])
    cap = capsys.readouterr()
    check_refusal(rc, cap.out + cap.err, workdir, "createdb")


# --------------------------------------------------------------------------- friction


def test_version(capsys):
    from qsearch import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qsearch {__version__}"


def test_study_files_name_commands_that_exist():
    """Every ``qsearch <command>`` a shipped study's comments suggest is a real command."""
    import re

    import typer

    from qsearch.cli import _register_commands, app

    _register_commands()
    commands = set(typer.main.get_command(app).commands)
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        comments = [ln for ln in path.read_text().splitlines() if ln.lstrip().startswith("#")]
        for cmd in re.findall(r"\bqsearch ([a-z][a-z_-]*)", "\n".join(comments)):
            assert cmd in commands, f"{path.name} suggests `qsearch {cmd}`"


@pytest.mark.postgres
def test_store_api_does_not_retry_a_database_that_does_not_exist(monkeypatch):
    """An API caller (no CLI probe) gets one StorageError with the fix, at once: a missing
    database is permanent, so the store must not spend its retries on it. Mutation: treat
    every non-SQLite OperationalError as transient (the old rule) -> the retry counter and
    the message checks fail."""
    if not _pg_reachable():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is unreachable under CI=true")
        pytest.skip("PostgreSQL on 127.0.0.1:5432 unreachable")
    from qsearch.errors import StorageError
    from qsearch.store import engine

    attempts = []
    real = engine.is_transient
    monkeypatch.setattr(engine, "is_transient", lambda e: attempts.append(e) or real(e))
    db = engine.Database("postgresql+psycopg://postgres@127.0.0.1:5432/qs_no_such_database",
                         retries=3)
    with pytest.raises(StorageError) as e:
        db.has_schema()
    assert "createdb" in str(e.value) and "\n" not in str(e.value)
    assert len(attempts) == 1 and not real(attempts[0])

"""Running on a cluster: a real multi-node Ray cluster on this host, real PostgreSQL.

The cluster (``tests/ray_cluster.py``, its own process) has a head node with no GPU and two
worker nodes with 2 CPUs and one *logical* GPU each (Ray schedules by declared resources; no
CUDA is needed, and a trial with ``device: auto`` then trains on the CPU). Drivers are real
``qsearch launch --ray-address`` processes. The faults are real too: a node's raylet and
workers are killed, a trial's worker process gets SIGKILL, the database kills the driver's
connections with ``pg_terminate_backend``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pytest
from _search_helpers import PG_ADMIN, start_driver, stored_trials, tiny_spec, wait_for
from optuna.trial import TrialState
from sqlalchemy import create_engine, text

from qsearch.store import Store, queries

HERE = Path(__file__).parent
EPOCHS = 6


class LocalCluster:
    """Drives ``tests/ray_cluster.py``: add and remove nodes of a live Ray cluster."""

    def __init__(self, head_cpus: float = 1.0):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ray_cluster.py"), str(head_cpus)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        hello = self._read(120)
        self.address: str = hello["address"]
        self.nodes: dict[int, str] = {0: hello["nodes"][0]}

    def _read(self, timeout: float) -> dict[str, Any]:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()))
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise RuntimeError("the Ray cluster harness did not answer")
        return json.loads(box[0])

    def _send(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(120)

    def add_worker(self, num_cpus: int = 2, num_gpus: int = 1) -> str:
        reply = self._send(cmd="add", num_cpus=num_cpus, num_gpus=num_gpus)
        self.nodes[reply["index"]] = reply["node_id"]
        return reply["node_id"]

    def remove(self, node_id: str) -> None:
        index = next(i for i, n in self.nodes.items() if n == node_id)
        self._send(cmd="remove", index=index)
        del self.nodes[index]

    def workers(self) -> set[str]:
        return {n for i, n in self.nodes.items() if i != 0}

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(head_cpus=1)
    try:
        c.add_worker()
        c.add_worker()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module", autouse=True)
def warm_start_cached():
    """Train the tiny specs' FP32 warm start once, so concurrent first trials do not all
    train it at the same time (the cache directory is the session's QSEARCH_CACHE)."""
    from qsearch.config import parse_trial_config
    from qsearch.train import train

    train(parse_trial_config({"model": "tiny-cnn", "dataset": "digits", "epochs": 1,
                              "device": "cpu", "warm_start": {"epochs": 2}}))


def cluster_spec(name: str, url: str, tmp_path: Path, **over: Any) -> dict[str, Any]:
    """Slow enough trials (batch 16, 6 epochs, ~1 s an epoch) to be caught mid-run."""
    spec = tiny_spec(name, url, tmp_path, resources={"cpu": 1, "gpu": 0.5}, **over)
    spec["base"] = {"epochs": EPOCHS, "batch_size": 16, "device": "auto",
                    "warm_start": {"epochs": 2}}
    return spec


class Driver:
    """One ``qsearch launch SPEC --ray-address ADDR`` process."""

    def __init__(self, spec: dict[str, Any], tmp_path: Path, address: str):
        self.name = spec["name"]
        self.proc, self.log = start_driver(spec, tmp_path, "--ray-address", address)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"driver {self.name} did not finish:\n{self.tail()}") from None
        assert self.proc.returncode == 0, f"driver {self.name} failed:\n{self.tail()}"

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])

    def kill(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)


def check_records(url: str, study_name: str, num_trials: int) -> optuna.Study:
    """Exactly ``num_trials`` Optuna trials, none RUNNING, and every record in the store:
    a row per trial with Optuna's state and values, epochs 1..E once each, layer records,
    and one Pareto snapshot per COMPLETE trial whose front is Optuna's best_trials."""
    study = optuna.load_study(study_name=study_name, storage=url)
    trials = study.trials
    assert len(trials) == num_trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    store = Store(url, create=False)
    try:
        rows = {r["number"]: r for r in queries.trials(store, study_name)}
        assert sorted(rows) == [t.number for t in trials]
        for t in trials:
            row = rows[t.number]
            assert row["state"] == t.state.name
            if t.state != TrialState.COMPLETE:
                continue
            assert [row[o] for o in ("accuracy", "size_mb", "backward_cost")] == \
                pytest.approx(t.values)
            epochs = [r["epoch"] for r in queries.epoch_metrics(store, study_name, t.number)]
            assert epochs == list(range(1, EPOCHS + 1))
            assert queries.layer_records(store, study_name, t.number)
        n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
        assert len(queries.pareto_snapshots(store, study_name)) == n_complete
        _, front = queries.pareto_front(store, study_name)
        assert {p["trial_number"] for p in front} == {t.number for t in study.best_trials}
    finally:
        store.dispose()
    return study


# ----------------------------------------------------------------------------- tests


def test_gpu_packing_and_a_lost_worker_node(cluster, pg_url, tmp_path):
    """gpu: 0.5 runs two trials per logical GPU at once; a worker node dies mid-study; its
    trials resume on the other node from their last epoch checkpoint; the study completes
    on PostgreSQL with exactly num_trials trials, none duplicated, none lost."""
    n = 6
    spec = cluster_spec("packing", pg_url, tmp_path, budget={"num_trials": n,
                                                              "max_concurrent": 4},
                        failure={"max_failures": 2})
    driver = Driver(spec, tmp_path, cluster.address)
    try:
        def packed():
            running = [r for r in stored_trials(pg_url, "packing")
                       if r["state"] == "RUNNING" and r["placement"] and r["epochs_completed"] >= 1]
            slots = Counter((r["placement"]["node_id"], tuple(r["placement"]["gpu_ids"]))
                            for r in running)
            shared = [slot for slot, k in slots.items() if k >= 2]
            return (running, shared[0]) if shared else None

        running, (node, gpus) = wait_for(packed, 300, "two trials sharing one GPU",
                                           driver.proc, driver.log)
        assert node in cluster.workers() and len(gpus) == 1
        victims = {r["number"] for r in running if r["placement"]["node_id"] == node}
        assert len(victims) == 2
        assert all(r["placement"]["device"] == "cpu" for r in running)  # no CUDA here
        workers_before = cluster.workers()
        cluster.remove(node)  # the node's raylet and its workers die, as with a lost machine
        driver.wait(600)
    finally:
        driver.kill()
        cluster.add_worker()  # back to two workers for the next tests

    study = check_records(pg_url, "packing", n)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # Ray spread the trials over both GPU workers by their requests (never on the GPU-less head).
    first = {t.user_attrs["placements"][0]["node_id"] for t in study.trials}
    assert first <= workers_before | cluster.workers() and len(first & workers_before) == 2
    rows = {r["number"]: r for r in stored_trials(pg_url, "packing")}
    store = Store(pg_url, create=False)
    try:
        for number in victims:
            assert rows[number]["retries"] >= 1
            assert rows[number]["placement"]["node_id"] != node  # finished elsewhere
            attempts = study.trials[number].user_attrs["placements"]
            assert attempts[0]["node_id"] == node and len(attempts) == 1 + rows[number]["retries"]
            # The restart resumed from a checkpoint (epoch k >= 1): epochs 1..k were reported
            # by the first attempt only, k+1.. by the second; none twice.
            curve = queries.epoch_metrics(store, "packing", number)
            resumed = {r["epoch"]: r["metrics"]["resumed_from_epoch"] for r in curve
                       if "resumed_from_epoch" in r["metrics"]}
            k = max(resumed.values())
            assert 1 <= k < EPOCHS
            assert all(v == (0 if e <= k else k) for e, v in resumed.items())
    finally:
        store.dispose()


def test_killed_trial_process_is_retried_then_fails(cluster, tmp_path):
    """SIGKILL (as from the OOM killer) on a trial's worker: restarted from its checkpoint
    while failures <= max_failures, then FAIL; Optuna hears of each trial exactly once."""
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    spec = cluster_spec("killed", url, tmp_path, budget={"num_trials": 3, "max_concurrent": 3},
                        failure={"max_failures": 1})
    driver = Driver(spec, tmp_path, cluster.address)
    killed: dict[int, list[int]] = {0: [], 1: []}  # trial number -> pids killed

    def kill_when_running(number: int) -> None:
        def target():
            for r in stored_trials(url, "killed"):
                pid = (r["placement"] or {}).get("pid")
                if r["number"] == number and r["state"] == "RUNNING" and pid and \
                        pid not in killed[number] and r["epochs_completed"] >= 1:
                    return pid
            return None

        pid = wait_for(target, 300, f"trial {number} running", driver.proc, driver.log)
        os.kill(pid, signal.SIGKILL)
        killed[number].append(pid)

    try:
        kill_when_running(0)  # once: retried, then completes
        kill_when_running(1)  # twice with max_failures=1: FAIL
        kill_when_running(1)
        driver.wait(600)
    finally:
        driver.kill()

    study = check_records(url, "killed", 3)
    rows = {r["number"]: r for r in stored_trials(url, "killed")}
    t0, t1, t2 = study.trials
    assert t0.state == TrialState.COMPLETE and rows[0]["retries"] == 1
    assert t0.user_attrs["qsearch_retries"] == 1
    assert t1.state == TrialState.FAIL and rows[1]["retries"] == 1
    assert t1.user_attrs["qsearch_counted"] and t1.user_attrs["epochs_completed"] >= 1
    assert "died" in t1.user_attrs["error"].lower() or "actor" in t1.user_attrs["error"].lower()
    assert t2.state == TrialState.COMPLETE and rows[2]["retries"] == 0
    assert len(killed[1]) == 2 and killed[1][0] != killed[1][1]


def test_dropped_database_connections_lose_no_records(cluster, pg_url, tmp_path):
    """pg_terminate_backend on every connection of the study's database, again and again
    while the study runs: the driver reconnects and every record is there at the end."""
    n = 5
    spec = cluster_spec("dropped", pg_url, tmp_path, budget={"num_trials": n,
                                                              "max_concurrent": 2})
    spec["base"]["batch_size"] = 32
    dbname = pg_url.rsplit("/", 1)[1]
    driver = Driver(spec, tmp_path, cluster.address)
    terminated = 0
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
        try:
            while driver.running():
                time.sleep(0.7)
                terminated += _terminate(admin, dbname)
        finally:
            admin.close()
        driver.wait(60)
    finally:
        driver.kill()
    assert terminated >= 5, "the test should have dropped connections while the study ran"
    study = check_records(pg_url, "dropped", n)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def _terminate(admin: psycopg.Connection, dbname: str) -> int:
    rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchall()
    return sum(1 for (ok,) in rows if ok)


def test_four_studies_at_once_on_an_empty_database(cluster, pg_url, tmp_path):
    """Four drivers start together on a database with no tables: the schema is created
    exactly once, and all four studies finish."""
    specs = [cluster_spec(f"multi-{i}", pg_url, tmp_path / f"s{i}",
                          budget={"num_trials": 2, "max_concurrent": 1},
                          sampler={"type": "random", "seed": i}) for i in range(4)]
    for i, spec in enumerate(specs):
        (tmp_path / f"s{i}").mkdir()
        spec["base"].update(epochs=2, batch_size=64)
    drivers = [Driver(spec, tmp_path, cluster.address) for spec in specs]
    try:
        for d in drivers:
            d.wait(600)
    finally:
        for d in drivers:
            d.kill()
    eng = create_engine(Store(pg_url, create=False).sqlalchemy_url)
    try:
        with eng.connect() as c:
            assert c.execute(text("SELECT count(*) FROM qsearch_schema_version")).scalar() == 1
            assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            assert c.execute(text("SELECT count(*) FROM qsearch_studies")).scalar() == 4
    finally:
        eng.dispose()
    for spec in specs:
        study = optuna.load_study(study_name=spec["name"], storage=pg_url)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2

"""The study driver: ``launch(spec)`` runs (or resumes) a study to its budget.

Order of work, and why:

1. The spec is already validated (nothing is written for a bad spec).
2. The store makes sure its tables exist, creates or finds the study row and takes the
   driver lease — a second live driver is refused with the holder's host and pid.
3. The ordinary Optuna study on the same URL is created/loaded (metric names = objectives).
   Trials a crashed driver left RUNNING are marked FAIL "driver lost" before anything new
   starts; they do not use up budget. Finished trials do: only the remainder is run.
   When the store says trials are left, Ray starts while Optuna's storage is opened
   (:func:`storage_while_ray_starts`); a finished study never starts Ray.
4. Ray (local unless an address is given) runs the trials through a Tune Tuner with our
   searcher over Optuna's ask/tell, resources per trial, concurrency limit and scheduler; the Tune
   callback writes every event to the store and a Pareto snapshot per completed trial.
5. However the run ends (budget, time limit, Ctrl-C, lost lease, error), trials still open
   are marked FAIL "interrupted" and the lease is released: nothing stays RUNNING.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from qsearch import protocol as P
from qsearch.config.defaults import cache_root
from qsearch.config.objectives import get_objective
from qsearch.errors import ConfigError, StorageError
from qsearch.search.space import build_sampler, build_scheduler, optuna_space
from qsearch.store import Store, StudyRecord, optuna_storage
from qsearch.store.journal import WalWhileRunning
from qsearch.store.store import DB_RETRIES
from qsearch.config import StudySpec

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class LaunchResult:
    study: str
    status: str  # finished | stopped | interrupted (Ctrl-C)
    counted: int  # trials that used up budget (COMPLETE + PRUNED + FAIL, not lost)
    complete: int
    pruned: int
    failed: int
    lost: int  # FAIL trials that did not count (driver lost, interrupted)
    wall_s: float


# --------------------------------------------------------------------------- helpers


def artifacts_dir(spec: StudySpec) -> Path:
    """Absolute: Ray workers run in their own working directories."""
    if spec.artifacts.dir:
        return Path(spec.artifacts.dir).expanduser().resolve()
    url = make_url(spec.storage)
    if url.get_backend_name() == "sqlite" and url.database:
        return Path(url.database).expanduser().resolve().parent / "qsearch_artifacts"
    return Path.cwd().resolve() / "qsearch_artifacts"


def checkpoints_path(spec: StudySpec) -> str:
    """Ray Tune's storage path (trial checkpoints): a shared path or an ``s3://``-style URI."""
    return spec.artifacts.checkpoints or str(artifacts_dir(spec) / "ray_results")


def with_absolute_cache(spec: StudySpec) -> StudySpec:
    """The spec with ``warm_start.cache_dir`` made absolute (from the spec or
    ``QSEARCH_CACHE``), so every trial's config names the same cache wherever its worker
    runs (Tune runs each trial in its own working directory). Only the configs sent to
    workers change; the stored spec and its hashes stay as the user wrote them."""
    ws = spec.base.get("warm_start") or {}
    root = cache_root(ws.get("cache_dir")).resolve()
    base = copy.deepcopy(spec.base)
    base.setdefault("warm_start", {})["cache_dir"] = str(root)
    return spec.model_copy(update={"base": base})


def objective_keys(spec: StudySpec) -> list[str]:
    """The trainer metric keys the scheduler and searcher read (an error result carries NaN
    for each, so Tune's checks pass)."""
    keys = [get_objective(o).metric_key for o in spec.objectives]
    if spec.scheduler.type != "none":
        keys.append(get_objective(spec.scheduler.metric).metric_key)
    return list(dict.fromkeys(keys))


def _check_storage_url(spec: StudySpec) -> None:
    try:
        url = make_url(spec.storage)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's URL
        raise ConfigError("storage", f"not a database URL: {e}") from None
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError("storage", "an in-memory SQLite database cannot be shared by the "
                          "driver and Optuna; use a file, e.g. sqlite:///qsearch.db")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or reuse) Ray. Locally this always starts a private instance
    (``address="local"``, GCS on a free port, no dashboard), so it neither joins a stray
    cluster nor collides with a Redis on 6379; ``address`` connects to a cluster."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # qsearch handles Ctrl-C itself (Interrupt): it must know, to record the trials it stops
    # as interrupted and exit 130.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing
    # Every epoch checkpoint (num_to_keep=1) forces a Tune experiment snapshot; qsearch resumes
    # studies from Optuna, not from those snapshots, so their "excessive sync" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Without Tune's file loggers, its end-of-run analysis warns that result.json is absent.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # configure_logging=False: Ray's lines reach the root logger, which route_logs sends to
    # the study's driver.log (the terminal keeps qsearch's own lines); workers' own output
    # stays in Ray's session logs (log_to_driver=False), the trials' results reach the store.
    kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True,
                              "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise StorageError(f"cannot start/connect Ray (address {address or 'local'}): "
                           f"{str(e).splitlines()[0]}") from e


def _trials_left_in_store(store: Store, study_id: int, budget: int) -> bool:
    """Whether the qsearch store says the study has trials left to run (its own record of
    counted finished trials; Optuna, read later, decides). Only a hint for starting Ray
    early: a study that is finished does not start Ray at all."""
    from qsearch.store import queries

    done = sum(t.counted and t.state in ("COMPLETE", "PRUNED", "FAIL")
               for t in queries.study_trials(store, study_id))
    return done < budget


def import_tune_side() -> None:
    """Import the modules a study needs once Ray is up: Ray Tune (with its pandas and Ray
    Data, about a second) and qsearch's searcher, callback, stopper, display and trainable.
    :func:`launch` imports them itself; :func:`storage_while_ray_starts` calls this on its
    second thread so the imports overlap Ray's start-up, which mostly waits on Ray's own
    processes. A module both threads need is imported once (Python's per-module import
    locks); importing it again afterwards is a no-op."""
    import importlib

    for name in ("ray.tune", "qsearch.search.callback", "qsearch.search.display",
                 "qsearch.search.searcher", "qsearch.search.stopper",
                 "qsearch.search.trainable", "qsearch.search.preflight",
                 "qsearch.search.pareto_rungs"):
        importlib.import_module(name)


def storage_while_ray_starts(store: Store, spec: StudySpec, study_id: int,
                             ray_address: str | None, num_cpus: int | None
                             ) -> tuple[optuna.storages.BaseStorage, StorageError | None]:
    """``optuna_storage(store)`` (opening Optuna's tables takes about a second), with Ray's
    start-up overlapping it when the store says trials are left and Ray is not up yet:
    ``init_ray`` runs on this thread (Ray's signal handlers and child processes belong to the
    main thread); the storage is opened on another, which then imports the Ray Tune side of
    the driver (:func:`import_tune_side`, about a second more) while Ray is still starting.
    Returns the storage and the error Ray's start raised, if any: it matters only if trials
    are left to run."""
    import ray

    if ray.is_initialized() or not _trials_left_in_store(store, study_id,
                                                         spec.budget.num_trials):
        return optuna_storage(store), None
    from concurrent.futures import ThreadPoolExecutor

    def open_then_import() -> optuna.storages.BaseStorage:
        storage = optuna_storage(store)
        import_tune_side()
        return storage

    with ThreadPoolExecutor(1, thread_name_prefix="qsearch-optuna-storage") as pool:
        opening = pool.submit(open_then_import)
        ray_error = None
        try:
            init_ray(ray_address, num_cpus)
        except StorageError as e:
            ray_error = e
        return opening.result(), ray_error


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in FINISHED and t.user_attrs.get(P.ATTR_COUNTED, True)]


def reap_lost_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, store: Store,
                     study_id: int, reason: str = "driver lost") -> list[int]:
    """Mark trials left RUNNING (by a crashed driver) FAIL in Optuna and in the store."""
    lost = []
    optuna_study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(optuna_study_id, t.number)
        for k, v in {P.ATTR_ERROR: reason, P.ATTR_DETAIL: reason, P.ATTR_COUNTED: False}.items():
            storage.set_trial_user_attr(trial_id, k, v)
        study.tell(t.number, state=TrialState.FAIL)
        store.trial_finished(study_id, t.number, state="FAIL", detail=reason, counted=False,
                             error=reason)
        lost.append(t.number)
    if lost:
        log.warning("study %s: trials %s were left RUNNING by a lost driver; marked FAIL",
                    study.study_name, lost)
    return lost


class Heartbeat(threading.Thread):
    """Refreshes the driver lease; sets ``lost`` if another driver took it over."""

    def __init__(self, store: Store, study_id: int, token: str, interval_s: float):
        super().__init__(name="qsearch-heartbeat", daemon=True)
        self.store, self.study_id, self.token, self.interval_s = store, study_id, token, interval_s
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                if not self.store.heartbeat(self.study_id, self.token):
                    log.error("driver lease lost (taken over by another driver); stopping")
                    self.lost = True
                    return
            except StorageError as e:  # a blip: keep trying, the lease is stale only after 60 s
                log.warning("heartbeat failed: %s", e)


class Interrupt:
    """Ctrl-C during a study: the first SIGINT asks Tune to stop every trial (through the
    stopper below), so their rows end FAIL "interrupted" and uncounted and the next launch
    re-runs them; a second SIGINT aborts at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: stopping the running trials (Ctrl-C again to abort now)")

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


#: What may change when a study resumes (the rest defines which trials are comparable).
RESUMABLE_FIELDS = {"storage", "budget", "resources", "artifacts", "failure"}


def resume_spec(spec: StudySpec, stored_yaml: str) -> StudySpec:
    """The spec a relaunch of an existing study runs with.

    A study stored by an older qsearch may hash differently although the user changed
    nothing (a field added since, a default renamed). Then the stored spec is parsed with
    this qsearch: where the relaunched spec differs from it only in fields its author did not
    set, the stored search settings win (with a notice); a difference in a field the author
    set is a real change of the search and an error."""
    from qsearch.config import parse_study_spec

    try:
        stored = parse_study_spec(yaml.safe_load(stored_yaml))
    except Exception as e:  # noqa: BLE001 - an unreadable stored spec is a changed search
        raise ConfigError("spec", f"study {spec.name!r} exists, but its stored spec no longer "
                          f"parses ({e}); launch it under a new --name") from None
    if stored.search_hash() == spec.search_hash():
        return spec
    new = _flat(spec.model_dump(mode="json", exclude=RESUMABLE_FIELDS))
    old = _flat(stored.model_dump(mode="json", exclude=RESUMABLE_FIELDS))
    changed = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))
    explicit = spec.explicit_paths()
    mine = [k for k in changed if any(k == p or k.startswith(p + ".") for p in explicit)]
    if mine:
        raise ConfigError("spec", f"study {spec.name!r} already exists with a different search "
                          f"({', '.join(mine[:4])}{' ...' if len(mine) > 4 else ''} changed); "
                          "launch it under a new --name")
    log.warning("study %s: resuming with its stored settings for %s (defaults of this qsearch "
                "differ)", spec.name, ", ".join(changed))
    return stored.model_copy(update={k: getattr(spec, k) for k in RESUMABLE_FIELDS})


def _open_study(spec: StudySpec, store: Store) -> tuple[StudyRecord, StudySpec]:
    art = artifacts_dir(spec)
    rec, created = store.create_or_get_study(
        spec.name, spec_yaml=spec.to_yaml(), spec_hash=spec.spec_hash(),
        search_hash=spec.search_hash(), objectives=list(spec.objectives),
        directions=list(spec.directions), artifacts_dir=str(art))
    if not created and rec.search_hash != spec.search_hash():
        spec = resume_spec(spec, rec.spec_yaml)
    return rec, spec


# --------------------------------------------------------------------------- launch


def launch(spec: StudySpec, *, ray_address: str | None = None, num_cpus: int | None = None,
           display: bool = True, console: Any = None) -> LaunchResult:
    """Run or resume ``spec`` until ``budget.num_trials`` trials have finished."""
    from qsearch.search.expand import expand_search_space
    from qsearch.search.known import known_values

    t0 = time.perf_counter()
    _check_storage_url(spec)

    store = Store(spec.storage, retries=1)  # a wrong or unreachable URL fails fast...
    rec, spec = _open_study(spec, store)
    token = store.acquire_lease(rec.id)
    store.retries = DB_RETRIES  # ...while a running study rides out connection drops
    # The lease holder runs a local SQLite file in WAL mode (store/journal.py says why and when
    # not). The switch goes first with no connection open, so every one gets its settings.
    wal = WalWhileRunning(store.engine)
    store.engine.dispose()
    wal.start()
    if rec.spec_hash != spec.spec_hash():  # budget/resources changed: keep the newest spec
        store.update_spec(rec.id, spec.to_yaml(), spec.spec_hash())
    hb = Heartbeat(store, rec.id, token, interval_s=5.0)
    hb.start()
    status = "stopped"
    searcher = None
    storage = None
    interrupt = Interrupt()
    try:
        storage, ray_error = storage_while_ray_starts(store, spec, rec.id, ray_address,
                                                      num_cpus)
        study = optuna.create_study(study_name=spec.name, storage=storage,
                                    directions=list(spec.directions), load_if_exists=True)
        if [d.name.lower() for d in study.directions] != list(spec.directions):
            raise ConfigError("objectives", f"Optuna study {spec.name!r} has directions "
                              f"{[d.name.lower() for d in study.directions]}; use a new --name")
        with warnings.catch_warnings():  # stable in practice; Optuna still tags it experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.objectives))
        study.set_user_attr("qsearch_spec_hash", spec.spec_hash())
        reap_lost_trials(study, storage, store, rec.id)
        done = len(counted_trials(study))
        remaining = spec.budget.num_trials - done
        if remaining <= 0:
            status = "finished"
            return _result(spec.name, study, status, t0)

        if ray_error is not None:
            raise ray_error
        init_ray(ray_address, num_cpus)  # a no-op when Ray started above
        # Imported above on the storage thread while Ray started (when it started there).
        from ray import tune

        from qsearch.search.callback import StoreCallback
        from qsearch.search.display import LiveDisplay
        from qsearch.search.preflight import check_cluster
        from qsearch.search.searcher import StudySearcher
        from qsearch.search.stopper import LeaseStopper
        from qsearch.search.trainable import run_trial

        check_cluster(spec)  # what a trial asks for against the nodes (waits if autoscaling)
        # Layer patterns (layers.*.w_bits) become one dimension per layer of the model.
        run_spec = with_absolute_cache(expand_search_space(spec))
        n_before = len(study.trials)
        sampler = build_sampler(run_spec, seed_offset=n_before)
        # The same study, loaded with the spec's sampler (seeded past the trials it holds).
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
        if run_spec.sampler.sensitivity and n_before == 0:
            enqueue_sensitivity_seeds(run_spec, study)
        searcher = StudySearcher(run_spec, study, storage, optuna_space(run_spec),
                                 budget=remaining, known=known_values)
        view = LiveDisplay(spec.name, spec.budget.num_trials, done, console=console,
                           objectives=list(spec.objectives),
                           enabled=display)
        callback = StoreCallback(store, rec.id, spec, searcher, on_event=view.event)
        searcher.record = _deferred(callback)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, study=spec.name, cpus=spec.resources.cpu,
                                 artifacts_dir=str(artifacts_dir(spec)),
                                 objective_keys=objective_keys(spec),
                                 repeats=spec.repeats),
            {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})

        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=build_scheduler(run_spec),
                num_samples=remaining,
                max_concurrent_trials=spec.budget.max_concurrent,
                time_budget_s=spec.budget.time_limit_s, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}",
                storage_path=checkpoints_path(spec), callbacks=[callback],
                stop=LeaseStopper(hb, interrupt), verbose=0,
                # A dead worker process or node restarts the trial from its last epoch
                # checkpoint; the trainer's own errors never reach Tune as errors.
                failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
        with view, interrupt:
            searcher.interrupt = interrupt
            tuner.fit()
        # A storage failure while asking for a trial ends Tune's loop through the searcher
        # (it reports FINISHED); the study stops with that error, as from the callback.
        failure = callback.failure or searcher.failure
        if failure is not None:
            raise failure
        _close_open_trials(searcher, store, rec.id)  # before the result counts them
        status = "finished" if len(counted_trials(study)) >= spec.budget.num_trials else "stopped"
        if interrupt.requested and status != "finished":
            status = "interrupted"
        return _result(spec.name, study, status, t0)
    finally:
        if searcher is not None:
            _close_open_trials(searcher, store, rec.id)  # after an error: none closed yet
            # Nothing this driver started may stay RUNNING (e.g. a trial Optuna created twice
            # when a dropped connection made a commit look failed).
            try:
                reap_lost_trials(searcher.study, storage, store, rec.id, reason="interrupted")
            except Exception as e:  # noqa: BLE001 - the next launch reaps them instead
                log.warning("could not close the study's open trials: %s", e)
        hb.stop_event.set()
        hb.join(timeout=10)
        try:
            store.release_lease(rec.id, token, "stopped" if status == "interrupted" else status)
        except StorageError as e:  # pragma: no cover - the lease goes stale on its own
            log.warning("could not release the driver lease: %s", e)
        store.dispose()
        if storage is not None:
            storage.dispose()
        wal.restore()  # a finished study is one self-contained file again


def enqueue_sensitivity_seeds(spec: StudySpec, study: optuna.Study) -> list[dict[str, Any]]:
    """First trials of a new study that spend bits where the warm-started model is most
    sensitive (Hutchinson per-layer Hessian traces, cached beside the warm start); the
    sampler takes over after them. The profile is kept as a study attr, so the dashboards
    can show it from the database (the cache file may live on another machine)."""
    from dataclasses import asdict

    from qsearch.search.sensitivity import seed_configs, sensitivity_profile

    prof = sensitivity_profile(spec.base_config())
    study.set_user_attr(P.ATTR_SENSITIVITY, {
        "estimator": "hutchinson", "probes": prof.probes, "batches": prof.batches,
        "warm_start": prof.warm_start, "layers": [asdict(v) for v in prof.layers.values()]})
    seeds = seed_configs(spec, prof.as_dict(), spec.sampler.sensitivity_seeds)
    for params in seeds:
        study.enqueue_trial(params, skip_if_exists=True)
    log.info("study %s: %d sensitivity-guided first trials enqueued", spec.name, len(seeds))
    return seeds


def _deferred(callback: Any) -> Any:
    """The searcher's recorder: writes through the callback, keeping a store failure for
    ``on_step_begin`` like every other trial event (raised inside ``suggest``, Tune would
    end the experiment with a traceback)."""

    def record(*args: Any) -> None:
        if callback.failure is not None:
            return
        try:
            callback.record_outside_tune(*args)
        except Exception as e:  # noqa: BLE001 - re-raised by on_step_begin
            log.error("recording a trial event failed; stopping the study: %s", e)
            callback.failure = e

    return record


def _close_open_trials(searcher: Any, store: Store, study_id: int) -> None:
    """Trials Tune abandoned (Ctrl-C, time limit, lease lost) end FAIL, not RUNNING."""
    for trial_id in searcher.open_trials():
        number = searcher.numbers.get(trial_id)
        try:  # the database may be what stopped the study: the next launch reaps the rest
            outcome = searcher.fail(trial_id, "interrupted: the driver stopped before the "
                                    "trial finished", counted=False, detail="interrupted")
            if number is not None and outcome is not None:
                store.trial_finished(study_id, number, state="FAIL", detail=outcome.detail,
                                     counted=False, error=outcome.error)
        except Exception as e:  # noqa: BLE001 - Optuna's or qsearch's storage, still down
            log.warning("could not record trial %s as interrupted: %s", number, e)


def _result(name: str, study: optuna.Study, status: str, t0: float) -> LaunchResult:
    trials = study.get_trials(deepcopy=False)
    counted = counted_trials(study)
    return LaunchResult(
        study=name, status=status, counted=len(counted),
        complete=sum(t.state == TrialState.COMPLETE for t in trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(t.state == TrialState.FAIL and t.user_attrs.get(P.ATTR_COUNTED, True)
                   for t in trials),
        lost=sum(t.state == TrialState.FAIL and not t.user_attrs.get(P.ATTR_COUNTED, True)
                 for t in trials),
        wall_s=time.perf_counter() - t0)

"""Honest accuracy (issue #20): train on train, select on val, report test once.

The validation split is carved from the training split, stratified by class, with a seed of
its own (``data.split_seed``) — the same for every trial of a study whatever its seed; the
trainer reports validation figures every epoch and measures the test split once, at the end.
"""

from __future__ import annotations

import math

import pytest
import torch

from qsearch.config import parse_study_spec, parse_trial_config
from qsearch.config import objectives as registry
from qsearch.data import iterate_batches, load_dataset
from qsearch.data.evaluate import evaluate
from qsearch.data.registry import DatasetBundle, dataset_entry, list_datasets
from qsearch.data.splits import stratified_carve
from qsearch.errors import ConfigError, DataError
from qsearch.train import Trainer, train

OFFLINE = ["digits", "synthetic"]


def _bundle(dataset: str, **data) -> DatasetBundle:
    cfg = parse_trial_config({"dataset": dataset, "data": data})
    return load_dataset(cfg.dataset, cfg.data)


def _labels(ds) -> torch.Tensor:
    return ds.tensors[1]


# ----------------------------------------------------------------------------- the data


@pytest.mark.parametrize("dataset", OFFLINE)
def test_train_val_test_are_disjoint_and_cover_the_data(dataset):
    b = _bundle(dataset)
    idx = b.split_indices
    assert set(idx) == {"train", "val", "test"}
    for name in ("train", "val", "test"):
        assert len(idx[name]) == len(b.split(name)) > 0, name
        assert len(set(idx[name].tolist())) == len(idx[name]), f"{name} repeats a sample"
    sets = {k: set(v.tolist()) for k, v in idx.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    n = len(b.train) + len(b.val) + len(b.test)
    assert sets["train"] | sets["val"] | sets["test"] == set(range(n))

    # The indices describe the real tensors: without a carve the training split is the whole
    # pool, and every validation sample is the pool sample its index names. The test split
    # is the same tensors whether or not validation is carved out of train.
    whole = _bundle(dataset, val_fraction=0)
    assert whole.val is None
    assert torch.equal(whole.split_indices["test"], idx["test"])
    assert torch.equal(whole.test.tensors[0], b.test.tensors[0])
    row = {int(j): k for k, j in enumerate(whole.split_indices["train"])}
    for name in ("train", "val"):
        pos = torch.tensor([row[int(j)] for j in idx[name]])
        assert torch.equal(b.split(name).tensors[0], whole.train.tensors[0][pos]), name
        assert torch.equal(b.split(name).tensors[1], whole.train.tensors[1][pos]), name


@pytest.mark.parametrize("dataset", OFFLINE)
def test_split_is_the_same_whatever_the_trial_seed(dataset):
    """Trainer() seeds every RNG with the trial seed before loading the data; the carve must
    not notice (it has its own seed, data.split_seed)."""
    base = {"model": "tiny-cnn" if dataset == "digits" else "resnet20", "dataset": dataset,
            "device": "cpu", "warm_start": {"enabled": False}}
    if dataset == "synthetic":
        base["data"] = {"num_samples": 256}
    splits = []
    for seed in (0, 1, 12345):
        data = Trainer(parse_trial_config({**base, "seed": seed})).data
        splits.append(data)
    for other in splits[1:]:
        for name in ("train", "val", "test"):
            assert torch.equal(other.split_indices[name], splits[0].split_indices[name]), name
        assert torch.equal(other.val.tensors[0], splits[0].val.tensors[0])
    # ...while the split seed does choose the validation images.
    moved = Trainer(parse_trial_config({**base, "data": {**base.get("data", {}),
                                                         "split_seed": 1}})).data
    assert not torch.equal(moved.split_indices["val"], splits[0].split_indices["val"])
    assert torch.equal(moved.split_indices["test"], splits[0].split_indices["test"])


@pytest.mark.parametrize("dataset", OFFLINE)
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.33])
def test_validation_is_stratified_by_class(dataset, fraction):
    b = _bundle(dataset, val_fraction=fraction)
    train, val = _labels(b.train), _labels(b.val)
    pool = torch.cat([train, val])
    for c in range(b.num_classes):
        n_pool, n_val = int((pool == c).sum()), int((val == c).sum())
        assert abs(n_val - fraction * n_pool) <= 1, (c, n_val, n_pool)
    assert abs(len(val) - fraction * len(pool)) <= b.num_classes


def test_carve_edge_cases():
    kept, carved = stratified_carve([0, 0, 1, 1, 1], 0.0, seed=0)
    assert kept.tolist() == [0, 1, 2, 3, 4] and carved.numel() == 0
    kept, carved = stratified_carve([0, 1, 2, 3], 0.1, seed=0)  # rounds to none: one anyway
    assert carved.numel() == 1 and len(kept) == 3
    with pytest.raises(DataError, match="val_fraction"):
        stratified_carve([0], 0.5, seed=0)


def test_iterate_batches_has_a_val_split_and_no_val_without_a_carve():
    b = _bundle("digits")
    got = torch.cat([y for _, y in iterate_batches(b, "val", 100, shuffle=False)])
    assert torch.equal(got, _labels(b.val))
    with pytest.raises(ValueError, match="split"):
        next(iterate_batches(b, "valid", 100, shuffle=False))
    whole = _bundle("digits", val_fraction=0)
    with pytest.raises(DataError, match="val_fraction"):
        next(iterate_batches(whole, "val", 100, shuffle=False))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert all(math.isnan(v) for v in evaluate(model, whole, torch.device("cpu"), 64))


def test_every_dataset_says_where_its_validation_split_comes_from():
    for name in list_datasets():
        assert "val" in dataset_entry(name).validation, name
    assert "valid/" in dataset_entry("imagefolder").validation


# ----------------------------------------------------------------------------- the trainer


def test_trainer_reports_validation_per_epoch_and_test_once_at_the_end(tiny_config,
                                                                       monkeypatch):
    """Every access to a split goes through DatasetBundle.split: record them next to the
    reports. Warm start and training read train and val only; test is read once, after the
    last report, and its figures appear in the final metrics only."""
    events: list[str] = []
    real_split = DatasetBundle.split

    def spy(self, name):
        events.append(name)
        return real_split(self, name)

    monkeypatch.setattr(DatasetBundle, "split", spy)
    reports: list[dict] = []

    def report(m: dict) -> None:
        events.append("report")
        reports.append(m)

    cfg = tiny_config(epochs=2, warm_start={"epochs": 2})
    result = train(cfg, report=report)

    assert [r["epoch"] for r in reports] == [1, 2]
    for m in [*reports, *result.history]:
        assert 0 <= m["val_accuracy"] <= 1 and m["val_loss"] > 0
        assert m["accuracy"] == m["val_accuracy"]  # the alias, until the search reads val_*
        assert not {k for k in m if k.startswith("test")}, m
    assert events.count("test") == 1
    assert events.index("test") > max(i for i, e in enumerate(events) if e == "report")
    warm = events[: events.index("report")]  # warm start and the first epoch
    assert "test" not in warm and {"train", "val"} <= set(warm)

    final = result.metrics
    assert final["val_accuracy"] == reports[-1]["val_accuracy"]
    data = load_dataset(cfg.dataset, cfg.data)
    cpu = torch.device("cpu")
    assert (final["test_accuracy"], final["test_loss"]) == pytest.approx(
        evaluate(result.model, data, cpu, cfg.batch_size, split="test"))
    assert final["val_accuracy"] == pytest.approx(
        evaluate(result.model, data, cpu, cfg.batch_size, split="val")[0])
    assert final["test_accuracy"] > 0.8


def test_warm_start_trains_on_train_only_and_scores_on_val(monkeypatch):
    from qsearch.train.warmstart import train_float

    cfg = parse_trial_config({"model": "tiny-cnn", "dataset": "digits", "device": "cpu",
                              "warm_start": {"epochs": 2}})
    data = load_dataset(cfg.dataset, cfg.data)
    events: list[str] = []
    real_split = DatasetBundle.split
    monkeypatch.setattr(DatasetBundle, "split",
                        lambda self, name: events.append(name) or real_split(self, name))
    _, acc = train_float(cfg, data, torch.device("cpu"))
    assert events == ["train", "train", "val"]  # two epochs, one evaluation
    model, _ = train_float(cfg, data, torch.device("cpu"))
    assert acc == evaluate(model, data, torch.device("cpu"), cfg.batch_size, split="val")[0]


def test_training_without_a_validation_split_reports_nan_and_still_tests(tiny_config):
    result = train(tiny_config(epochs=1, data={"val_fraction": 0}, warm_start={"epochs": 1}))
    assert math.isnan(result.history[-1]["val_accuracy"])
    assert 0 < result.metrics["test_accuracy"] <= 1


# ----------------------------------------------------------------------------- the spec


def _spec(**over):
    spec = {"name": "s", "base": {"epochs": 2},
            "search_space": {"w_bits": {"type": "categorical", "choices": [2, 4]}}}
    spec.update(over)
    return spec


def test_spec_defaults_select_on_validation():
    spec = parse_study_spec(_spec(scheduler={"type": "asha"}))
    assert spec.objectives[0] == "val_accuracy"
    assert spec.scheduler.metric == "val_accuracy"
    assert spec.base_config().data.val_fraction > 0
    val = registry.get_objective("val_accuracy")
    assert (val.direction, val.kind, val.label, val.optimizable) == (
        "maximize", "measured", "validation accuracy", True)
    assert not registry.get_objective("test_accuracy").optimizable
    assert "test split" in registry.get_objective("accuracy").label


def test_spec_without_validation_data_is_rejected():
    with pytest.raises(ConfigError) as e:
        parse_study_spec(_spec(base={"epochs": 2, "data": {"val_fraction": 0}}))
    assert e.value.field == "base.data.val_fraction"
    assert "validation" in str(e.value) and "test split" in str(e.value)
    with pytest.raises(ConfigError) as e:  # a fixed value in the space is the same thing
        parse_study_spec(_spec(search_space={"w_bits": 4, "data.val_fraction": 0}))
    assert e.value.field == "base.data.val_fraction"
    with pytest.raises(ConfigError) as e:
        parse_study_spec(_spec(search_space={
            "data.val_fraction": {"type": "float", "low": 0.1, "high": 0.3}}))
    assert e.value.field == "search_space.data.val_fraction"


def test_test_accuracy_is_reported_not_optimized():
    with pytest.raises(ConfigError) as e:
        parse_study_spec(_spec(objectives=["test_accuracy", "size_mb"]))
    assert e.value.field == "objectives"
    assert "reported, not optimized" in str(e.value) and "bias" in str(e.value)


def test_digits_copy_in_the_cache_is_what_scikit_learn_loads(tmp_path, monkeypatch):
    """The digits copy under the cache folder (read by fresh workers instead of importing
    scikit-learn) holds exactly ``load_digits()``'s arrays; a torn copy is ignored and
    rewritten. Fails if the copy changes values or dtypes, or a torn file is trusted."""
    import numpy as np
    from sklearn.datasets import load_digits

    from qsearch.data.builtin import DIGITS_CACHE, _digits_arrays

    monkeypatch.setenv("QSEARCH_CACHE", str(tmp_path))
    ref = load_digits()
    for _ in ("written", "read back"):
        images, target = _digits_arrays()
        assert images.dtype == ref.images.dtype and target.dtype == ref.target.dtype
        assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)
    copy = tmp_path / DIGITS_CACHE
    copy.write_bytes(copy.read_bytes()[:100])  # torn
    images, _ = _digits_arrays()
    assert np.array_equal(images, ref.images)
    with np.load(copy) as z:  # rewritten whole
        assert np.array_equal(z["images"], ref.images)

"""The shared QAT trainer end to end on digits/tiny-cnn: metrics, bit-identical resume,
torn-checkpoint fallback, the FP32 warm-start cache and data errors."""

from __future__ import annotations

import os

import pytest
import torch

from qsearch.data import load_dataset
from qsearch.errors import CheckpointError, DataError
from qsearch.quant import LSQQuantizer, QuantLayer
from qsearch.config import parse_trial_config
from qsearch.train import Trainer, train
from qsearch.train.checkpoint import load_latest, save_checkpoint


class Interrupt(Exception):
    """Raised from the report callback to stop a run after a given epoch, as a crash would."""


def _stop_after(epoch: int):
    seen: list[dict] = []

    def report(metrics: dict) -> None:
        seen.append(metrics)
        if metrics["epoch"] >= epoch:
            raise Interrupt

    return report, seen


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_training_reports_every_epoch_and_learns(tiny_config):
    cfg = tiny_config(epochs=2, w_bits=4, a_bits=4)
    reports: list[dict] = []
    result = train(cfg, report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2]
    for key in ("accuracy", "val_accuracy", "size_mb", "bops", "backward_cost", "train_loss",
                "val_loss", "lr", "epoch_s", "wall_s"):
        assert key in reports[-1], key
    assert result.metrics["epochs"] == 2
    # the returned model is the quantized one, with learned (moved) step sizes
    qlayers = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLayer)}
    assert len(qlayers) == 4
    assert result.weight_bits == {"stage1.0": 8, "stage2.0.0": 4, "stage3.0": 4, "fc": 8}
    steps = [m for m in result.model.modules() if isinstance(m, LSQQuantizer)]
    assert all(bool(q.initialized) for q in steps)
    # Weight steps are initialised from the (cached, deterministic) warm-start weights when the
    # layers are built: every one must have moved from that init, by more than round-off
    # (the 8-bit fc's step moves least: ~6e-4 relative in 2 epochs).
    init = Trainer(cfg).setup(None).qlayers
    for name, q in qlayers.items():
        s0, s1 = init[name].w_quant.step.item(), q.w_quant.step.item()
        assert abs(s1 - s0) > 1e-5 * s0, (name, s0, s1)
    assert [r["lr"] for r in reports][0] > [r["lr"] for r in reports][1]  # cosine schedule


def test_qat_from_scratch_beats_the_untrained_model_by_a_margin(tiny_config):
    """Without a warm start the converted W4A4 model starts at chance (0.10 on digits); two
    epochs of the shared loop must lift validation accuracy by more than 0.4 (measured: to
    ~0.80) and lower the training loss from epoch to epoch. Fails if the optimizer never
    steps, the gradients never reach the weights or the LR schedule collapses to zero."""
    cfg = tiny_config(epochs=2, w_bits=4, a_bits=4, warm_start={"enabled": False})
    trainer = Trainer(cfg)
    ctx = trainer.setup(None)
    untrained, _ = ctx.evaluate()
    losses = []
    for epoch in range(cfg.epochs):
        losses.append(trainer.train_epoch(ctx, epoch))
        ctx.scheduler.step()
    trained, _ = ctx.evaluate()
    print(f"val accuracy untrained {untrained:.3f} -> trained {trained:.3f}; losses {losses}")
    assert untrained < 0.25
    assert trained > untrained + 0.4
    assert losses[1] < 0.9 * losses[0]


def test_resume_is_bit_identical_and_survives_a_torn_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config(epochs=3, w_bits=3, a_bits=4)
    straight = train(cfg, checkpoint_dir=tmp_path / "straight")

    ckdir = tmp_path / "interrupted"
    report, seen = _stop_after(2)
    with pytest.raises(Interrupt):
        Trainer(cfg, report, checkpoint_dir=ckdir).run()
    assert [m["epoch"] for m in seen] == [1, 2]
    files = sorted(p.name for p in ckdir.glob("ckpt-*.pt"))
    assert files == ["ckpt-00001.pt", "ckpt-00002.pt"]

    # Resume from epoch 2 in a fresh Trainer (as a new process would).
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    for name in files:
        (resumed_dir / name).write_bytes((ckdir / name).read_bytes())
    resumed = train(cfg, checkpoint_dir=resumed_dir)
    assert resumed.metrics["epochs"] == 3
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    _assert_same_state(resumed.model, straight.model)
    assert resumed.metrics["accuracy"] == straight.metrics["accuracy"]

    # A torn newest checkpoint (crash while copying it, disk full) falls back to epoch 1.
    newest = ckdir / "ckpt-00002.pt"
    blob = newest.read_bytes()
    newest.write_bytes(blob[: len(blob) // 3])
    assert int(load_latest(ckdir)["epoch"]) == 1
    fallback = train(cfg, checkpoint_dir=ckdir)
    assert [h["epoch"] for h in fallback.history] == [1, 2, 3]
    _assert_same_state(fallback.model, straight.model)


def test_checkpoint_of_another_config_is_rejected(tiny_config, tmp_path):
    report, _ = _stop_after(1)
    with pytest.raises(Interrupt):
        Trainer(tiny_config(epochs=2), report, checkpoint_dir=tmp_path).run()
    with pytest.raises(CheckpointError, match="different trial configuration"):
        train(tiny_config(epochs=2, lr=0.01), checkpoint_dir=tmp_path)


def test_checkpoint_rotation_and_empty_dir(tmp_path):
    assert load_latest(tmp_path / "none") is None
    for epoch in range(1, 5):
        save_checkpoint(tmp_path, epoch, {"epoch": epoch})
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00003.pt", "ckpt-00004.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    for p in tmp_path.glob("ckpt-*.pt"):
        p.write_bytes(b"")  # every checkpoint torn: start from scratch
    assert load_latest(tmp_path) is None


def test_warm_start_cache_is_reused(tiny_config, tmp_path):
    cache = tmp_path / "cache"
    cfg = tiny_config(epochs=1, warm_start={"epochs": 2, "cache_dir": str(cache)})
    first = train(cfg)
    assert first.warm_start_trained
    files = list((cache / "warmstart").glob("*.pt"))
    assert len(files) == 1
    mtime = os.stat(files[0]).st_mtime_ns

    second = Trainer(cfg).run()
    assert not second.warm_start_trained
    assert os.stat(files[0]).st_mtime_ns == mtime
    assert list((cache / "warmstart").glob("*.pt")) == files
    # QAT hyperparameters do not change the FP32 recipe: the same file serves them too
    other = train(tiny_config(epochs=1, w_bits=2, lr=0.01,
                              warm_start={"epochs": 2, "cache_dir": str(cache)}))
    assert not other.warm_start_trained
    assert os.stat(files[0]).st_mtime_ns == mtime

    # A torn cache file is retrained rather than crashing the trial.
    files[0].write_bytes(b"torn")
    again = train(cfg)
    assert again.warm_start_trained
    _assert_same_state(again.model, first.model)  # same seed, same recipe, same result


def test_cifar10_missing_without_download_is_a_data_error(tmp_path):
    cfg = parse_trial_config({"dataset": "cifar10",
                              "data": {"root": str(tmp_path / "nope"), "download": False}})
    with pytest.raises(DataError) as e:
        load_dataset(cfg.dataset, cfg.data)
    assert "data.download" in str(e.value)
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(DataError):
        Trainer(cfg)

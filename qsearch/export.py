"""Export a chosen trial (config + per-layer precision + weights) and re-check it.

``export_trial`` writes a versioned JSON (or YAML, by extension) document with the full
TrialConfig, the per-layer precision map, the objective values and provenance, and copies the
trial's final weights next to it (``<name>.pt``). ``evaluate_export`` rebuilds the model
from the document alone — TrialConfig + per-layer weight bits through
``Precision.from_config`` and ``convert`` — loads the weights and re-measures accuracy and
size, which must equal the stored values.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qsearch import __version__
from qsearch.errors import CheckpointError, ConfigError
from qsearch.search.pareto import knee_index
from qsearch.store import Store, queries, utcnow

EXPORT_FORMAT = "qsearch-export"
EXPORT_VERSION = 1
RULES = ("max-accuracy", "min-size", "knee")


def select_trial(store: Store, study: str, *, trial: int | None = None, rule: str | None = None,
                 max_size_mb: float | None = None, min_accuracy: float | None = None,
                 max_backward_cost: float | None = None) -> int:
    """Trial number to export: ``trial`` itself (must be COMPLETE), or the ``rule``'s pick
    among the latest stored Pareto front after the optional filters."""
    rec = queries.require_study(store, study)
    if trial is not None:
        row = queries.trial(store, study, trial)
        if row["state"] != "COMPLETE":
            raise ConfigError("--trial", f"trial {trial} is {row['state']}, only COMPLETE "
                              "trials have final weights to export")
        return trial
    rule = rule or "knee"
    if rule not in RULES:
        raise ConfigError("--pick", f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    _, points = queries.pareto_front(store, study)
    if not points:
        raise ConfigError("study", f"study {study!r} has no completed trial yet")
    acc = accuracy_objective(rec.objectives)
    cost = next((o for o in rec.objectives if o.startswith("backward")), None)

    def value(p: Any, name: str | None) -> float:
        v = p.value(name) if name and hasattr(p, "value") else (p[name] if name else None)
        return float("nan") if v is None else float(v)

    pts = [p for p in points
           if (max_size_mb is None or value(p, "size_mb") <= max_size_mb)
           and (min_accuracy is None or value(p, acc) >= min_accuracy)
           and (max_backward_cost is None or value(p, cost) <= max_backward_cost)]
    if not pts:
        raise ConfigError("filters", f"none of the {len(points)} Pareto trials meets the "
                          "--max-size-mb/--min-accuracy/--max-backward-cost limits")
    if rule == "max-accuracy":
        return min(pts, key=lambda p: (-value(p, acc), value(p, "size_mb"),
                                       p["trial_number"]))["trial_number"]
    if rule == "min-size":
        return min(pts, key=lambda p: (value(p, "size_mb"), -value(p, acc),
                                       p["trial_number"]))["trial_number"]
    objs, dirs = rec.objectives, rec.directions
    vals = np.array([[value(p, o) for o in objs] for p in pts], dtype=float)
    return pts[knee_index(vals, dirs)]["trial_number"]


def accuracy_objective(objectives: list[str]) -> str | None:
    """The study's accuracy objective: ``val_accuracy`` (since validation splits), or
    ``accuracy`` for a study stored before them."""
    return next((o for o in ("val_accuracy", "accuracy") if o in objectives), None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_trial(store: Store, study: str, number: int, out: str | Path) -> dict[str, Any]:
    """Write the export document to ``out`` (.json, .yaml/.yml) and the weights beside it."""
    out = Path(out)
    if out.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise ConfigError("--output", "the export file must end in .json, .yaml or .yml")
    rec = queries.require_study(store, study)
    row = queries.trial(store, study, number)
    if row["state"] != "COMPLETE":
        raise ConfigError("--trial", f"trial {number} is {row['state']}; export COMPLETE trials")
    src = Path(row["weights_path"]) if row.get("weights_path") else None
    if src is None or not src.is_file():
        raise CheckpointError(f"trial {number} has no saved weights (only Pareto trials keep "
                              f"them unless the spec says artifacts.keep: all): {src}")
    layers = queries.layer_records(store, study, number)
    weights = out.with_suffix(".pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, weights)
    doc = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "provenance": {"study": study, "trial": number, "spec_hash": rec.spec_hash,
                       "qsearch_version": __version__, "storage": store.masked_url,
                       "exported_at": utcnow().isoformat() + "Z"},
        # Every value the store holds for the trial, by name (optimized and reported ones,
        # e.g. test_accuracy); ``accuracy`` is the figure `qsearch eval` compares first.
        "objectives": {**dict(row.values), "accuracy": row.value(
            accuracy_objective(rec.objectives) or "accuracy")},
        "config": row["config"],
        "precision": {r["name"]: {k: r[k] for k in ("kind", "w_bits", "a_bits", "g_bits",
                                                    "params", "macs", "frozen_fraction")}
                      for r in layers},
        "weights": {"file": weights.name, "sha256": _sha256(weights)},
    }
    text = yaml.safe_dump(doc, sort_keys=False) if out.suffix.lower() in (".yaml", ".yml") \
        else json.dumps(doc, indent=2)
    out.write_text(text)
    return doc


def load_export(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "export file not found")
    doc = yaml.safe_load(p.read_text())  # JSON is YAML
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ConfigError(str(path), "not a qsearch export (format field missing)")
    if doc.get("version") != EXPORT_VERSION:
        raise ConfigError(f"{path}: version", f"export version {doc.get('version')} is not "
                          f"supported (this qsearch reads version {EXPORT_VERSION})")
    return doc


def rebuild_model(doc: dict[str, Any], path: str | Path) -> tuple[Any, Any, Any]:
    """(model, TrialConfig, dataset) rebuilt from an export and its weights file."""
    import torch

    from qsearch.data import load_dataset
    from qsearch.models import build_model
    from qsearch.quant import Precision, convert
    from qsearch.config import parse_trial_config

    cfg = parse_trial_config(doc["config"], prefix="config")
    weights = Path(path).parent / doc["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError(f"weights file {weights} of export {path} is missing")
    if _sha256(weights) != doc["weights"].get("sha256"):
        raise CheckpointError(f"weights file {weights} does not match the export's sha256")
    data = load_dataset(cfg.dataset, cfg.data)
    model = build_model(cfg.model, data.num_classes, data.in_channels)
    bits = {name: int(p["w_bits"]) for name, p in doc["precision"].items()}
    convert(model, Precision.from_config(cfg, bits))
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    # Methods may keep extra buffers (LTS masks ...) in the state dict; the model's own
    # tensors must all be there.
    missing, _unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if missing:
        raise CheckpointError(f"weights in {weights} lack {len(missing)} tensors of the rebuilt "
                              f"model (e.g. {missing[0]}); the export does not match its config")
    return model, cfg, data


def evaluate_export(path: str | Path) -> dict[str, Any]:
    """Re-measure accuracy and size of an exported model; compare with the stored values."""
    import torch

    from qsearch.cost import compute_cost, extra_param_count, layer_costs
    from qsearch.quant import quant_layers
    from qsearch.data.evaluate import evaluate

    doc = load_export(path)
    model, cfg, data = rebuild_model(doc, path)
    # A trial's ``accuracy`` is the per-epoch alias of val_accuracy since validation splits
    # exist (its config has data.val_fraction); before, it was measured on the test split.
    # The test split itself is the same either way (the validation carve comes out of train).
    split = "val" if "val_fraction" in (doc["config"].get("data") or {}) else "test"
    cpu = torch.device("cpu")
    acc, _ = evaluate(model, data, cpu, cfg.batch_size, split=split)
    test_acc, _ = evaluate(model, data, cpu, cfg.batch_size, split="test")
    rows = layer_costs(model, data.input_shape)
    size = compute_cost(rows, extra_param_count(model, quant_layers(model))).size_mb
    stored = doc["objectives"]
    stored_test = stored.get("test_accuracy")
    return {"accuracy": acc, "accuracy_split": split, "test_accuracy": test_acc,
            "size_mb": size, "stored_accuracy": stored.get("accuracy"),
            "stored_test_accuracy": stored_test, "stored_size_mb": stored.get("size_mb"),
            "match": bool(stored.get("accuracy") is not None
                          and abs(acc - stored["accuracy"]) < 1e-9
                          and (stored_test is None or abs(test_acc - stored_test) < 1e-9)
                          and abs(size - stored["size_mb"]) < 1e-9)}

"""Objective values known from a trial's config alone, before any training.

A size bound (``constraints: {size_mb: {max: ...}}``) can be checked without training: the
size is the weights at their bit widths plus the FP32 extras, which the config and the model
fix. The driver uses this to skip trials that cannot be feasible. The figure is computed with
the same functions the trainer reports ``size_mb`` with, so the two always agree (tested).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qsearch.config import TrialConfig


@functools.lru_cache(maxsize=16)
def _shape(dataset: str, data_json: str) -> tuple[tuple[int, int, int], int]:
    import json

    from qsearch.config.trial import DataConfig
    from qsearch.data import load_dataset

    bundle = load_dataset(dataset, DataConfig.model_validate(json.loads(data_json)))
    return bundle.input_shape, bundle.num_classes


def known_values(cfg: TrialConfig) -> dict[str, float]:
    """``{"size_mb": ...}`` for ``cfg``, or ``{}`` when the size is not fixed by the config (a
    method picks the bits during training) or the dataset cannot be read here."""
    if cfg.precision_set_by_method():
        return {}
    try:
        shape, classes = _shape(cfg.dataset, cfg.data.model_dump_json())
    except Exception:  # noqa: BLE001 - e.g. CIFAR not on the driver machine: train to know
        return {}
    from qsearch.cost import compute_cost, count_macs, extra_param_count, layer_costs
    from qsearch.models import build_model
    from qsearch.quant import Precision, convert

    model = build_model(cfg.model, classes, shape[0])
    macs = count_macs(model, shape)
    qlayers = convert(model, Precision.from_config(cfg, {}))
    cost = compute_cost(layer_costs(model, shape, {}, macs), extra_param_count(model, qlayers))
    return {"size_mb": float(cost.size_mb)}

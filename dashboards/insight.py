"""What a study learned beyond its front: the per-layer sensitivity its seeds came from and
the parameter importance per objective. Both are read through Optuna's public API on the
read-only storage (:meth:`dashboards.readonly.Source.optuna_storage`); nothing is written.

* Sensitivity: the driver keeps the Hutchinson profile it seeded from as the study attr
  ``qsearch_sensitivity`` (:func:`qsearch.search.driver.enqueue_sensitivity_seeds`), so the
  dashboard needs neither the cache file (which may be on another machine) nor torch.
* Importance: :func:`qsearch.search.importance.param_importances` (what ``qsearch
  importance`` prints), imported only when asked for; results are kept per (database,
  study, number of trials) so a live refresh does not recompute an unchanged study.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from dashboards.readonly import Source
from qsearch import protocol as P
from qsearch.errors import QsearchError, StorageError

_CACHE: OrderedDict[tuple[str, str, int], Any] = OrderedDict()
_CACHE_SIZE = 32


def _study_id(src: Source, name: str) -> int | None:
    """The Optuna study id, or None when the database has no such Optuna study (or no Optuna
    tables at all: a store written through qsearch's API only)."""
    try:
        return src.optuna_storage().get_study_id_from_name(name)
    except (KeyError, StorageError):
        return None


def sensitivity(src: Source, name: str) -> dict[str, Any] | None:
    """The study's per-layer sensitivity record (``estimator``, ``probes``, ``batches``,
    ``layers``: one dict per layer as :class:`qsearch.search.sensitivity.LayerSensitivity`),
    or None when it has none (sampler.sensitivity off, or an older driver)."""
    sid = _study_id(src, name)
    if sid is None:
        return None
    rec = src.optuna_storage().get_study_user_attrs(sid).get(P.ATTR_SENSITIVITY)
    return rec if isinstance(rec, dict) else None


def importances(src: Source, name: str, n_trials: int) -> list[Any] | str:
    """Parameter importance per objective of the study (Optuna's PED-ANOVA), or a sentence
    saying why there is none. ``n_trials`` (the caller's count of finished trials) keys the
    cache."""
    key = (src.url, name, int(n_trials))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    import optuna

    from qsearch.search.importance import param_importances

    out: list[Any] | str
    if _study_id(src, name) is None:
        out = "no Optuna trials for this study (importance is computed from them)"
    else:
        try:
            study = optuna.load_study(study_name=name, storage=src.optuna_storage())
            out = param_importances(study)
        except QsearchError as e:
            out = str(e)
        except Exception as e:  # noqa: BLE001 - an evaluator's refusal: say it, show the rest
            out = f"importance not computed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out

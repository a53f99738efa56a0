"""The search service: spec -> Optuna sampler via Ray Tune -> trials -> store.

Heavy imports (Ray, the trainer) happen inside functions so ``qsearch studies`` and the
dashboards stay quick to start.
"""

from qsearch.search.pareto import (
    default_reference,
    hypervolume,
    knee_index,
    nondominated_sort,
    pareto_front_mask,
)

__all__ = ["default_reference", "hypervolume", "knee_index", "launch", "nondominated_sort",
           "pareto_front_mask"]


def launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin lazy re-export
    """See :func:`qsearch.search.driver.launch`."""
    from qsearch.search.driver import launch as _launch

    return _launch(*args, **kwargs)

"""The search service: spec -> Optuna sampler via Ray Tune -> trials -> store.

Heavy imports (Ray, the trainer) happen inside functions so ``qsearch studies`` and the
dashboards stay quick to start.
"""

__all__ = ["default_reference", "hypervolume", "knee_index", "launch", "nondominated_sort",
           "pareto_front_mask"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: numpy loads only when a front is computed
    if name in __all__ and name != "launch":
        from qsearch.search import pareto

        return getattr(pareto, name)
    raise AttributeError(f"module 'qsearch.search' has no attribute {name!r}")


def launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - thin lazy re-export
    """See :func:`qsearch.search.driver.launch`."""
    from qsearch.search.driver import launch as _launch

    return _launch(*args, **kwargs)

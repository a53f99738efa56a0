"""Whether a trial compiles the fused quantizer kernels (``QSEARCH_COMPILE=auto``).

Why: compiling the kernels (:mod:`qsearch.quant.fused`) is paid once per worker process, about
2 s on this project's 2-core CPU machine even with inductor's on-disk cache warm (dynamo's
tracing and guards; measured as the first ``train()`` of a fresh process: 4.5 s compiled
against 2.2 s eager, 0.3 s for either afterwards). What they save grows with the work: on
ResNet-20, channels-last, batch 128, one thread (``python benchmarks/bench_trainer.py --only
fp32-cl,qsearch-cl,qsearch-cl-eager --threads 1 --clock cpu``) a compiled step took 463.8 ms
against 492.0 ms eager, about 0.22 ms per sample or 5e-12 s per forward MAC. So compiling
repays itself from about 4e11 training MACs: one CIFAR-10 epoch of ResNet-20 is 1.8e12, a
quickstart trial (tiny-cnn, digits, 4 epochs) 5e9, which now skips the compilation.

The estimate is the float model's forward MACs per sample times the training samples times
the epochs; it ignores what methods add (a teacher, a CSQ bit search), so it errs towards
eager for small trials only. The choice is made from the config alone, so a trial's numerics
(compiled and eager stochastic rounding draw different noise) never depend on which trials
ran before it in the same worker. ``QSEARCH_COMPILE=1`` compiles for every trial, ``0`` never.
"""

from __future__ import annotations

from qsearch.config import defaults

#: Training forward MACs from which compiling the kernels repays itself (see above).
COMPILE_MIN_MACS = 4e11


def compile_pays(macs_per_sample: float, train_samples: int, epochs: int) -> bool:
    """Whether this trial compiles the fused kernels (``QSEARCH_COMPILE``: ``auto`` decides
    by :data:`COMPILE_MIN_MACS`, ``on`` always, ``off`` never)."""
    setting = defaults.compile_kernels()
    if setting != "auto":
        return setting == "on"
    return float(macs_per_sample) * train_samples * epochs >= COMPILE_MIN_MACS

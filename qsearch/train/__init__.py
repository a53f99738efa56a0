"""The shared QAT trainer (knows nothing of Optuna, Ray or SQL)."""

from qsearch.data.evaluate import evaluate
from qsearch.methods.plugin import TrainContext
from qsearch.train.trainer import TrainResult, Trainer, resolve_device, train

__all__ = ["TrainContext", "TrainResult", "Trainer", "evaluate", "resolve_device", "train"]

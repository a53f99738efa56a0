"""qsearch: hyperparameter and mixed-precision search for quantization-aware training."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qsearch")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["__version__"]

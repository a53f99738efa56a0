"""LSQ fake quantization, quantized layers, per-layer precision rules and ``convert``."""

from qsearch.quant.convert import convert, quant_layers
from qsearch.quant.functional import BackwardOptions
from qsearch.quant.layers import QConv2d, QLinear, QuantLayer
from qsearch.quant.lsq import LSQQuantizer, level_bounds, lsq_quantize
from qsearch.quant.precision import LayerPrecision, Precision, quantizable_layers, resolve_precision

__all__ = [
    "BackwardOptions",
    "LSQQuantizer",
    "LayerPrecision",
    "Precision",
    "QConv2d",
    "QLinear",
    "QuantLayer",
    "convert",
    "level_bounds",
    "lsq_quantize",
    "quant_layers",
    "quantizable_layers",
    "resolve_precision",
]

"""Deployment exports other tools load: ONNX with QDQ, an encodings sidecar, a true size report
and an ONNX Runtime check. Torch-side; never imports the search or the store."""

from qsearch.deploy.encodings import build_encodings, encodings_path, write_encodings
from qsearch.deploy.onnx_eval import compare_with_torch, evaluate_onnx, load_onnx, onnx_metadata
from qsearch.deploy.onnx_export import LayerQuant, OnnxExport, export_onnx, export_summary
from qsearch.deploy.size import format_size_report, size_report

__all__ = [
    "LayerQuant",
    "OnnxExport",
    "build_encodings",
    "compare_with_torch",
    "encodings_path",
    "evaluate_onnx",
    "export_onnx",
    "export_summary",
    "format_size_report",
    "load_onnx",
    "onnx_metadata",
    "size_report",
    "write_encodings",
]

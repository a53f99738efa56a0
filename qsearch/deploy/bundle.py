"""One trial's deployment files: ``<name>.onnx`` + ``<name>.encodings.json`` (+ a size report).

The caller (``qsearch export --format onnx``) rebuilds the trial's model from its JSON export
(:func:`qsearch.export.rebuild_model`) and hands it here with the provenance; this module
knows nothing of the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qsearch.deploy.encodings import write_encodings
from qsearch.deploy.onnx_export import export_onnx
from qsearch.deploy.size import size_report


def write_deploy_files(model: Any, cfg: Any, data: Any, onnx_path: str | Path, *,
                       study: str | None = None, trial: int | None = None,
                       objectives: dict[str, Any] | None = None,
                       act_types: str = "int8") -> dict[str, Any]:
    """Write the ONNX model (metadata: study, trial, stored accuracy/size, dataset and its
    options, input shape, trial config) and its encodings sidecar; return the file names and
    the size report."""
    obj = objectives or {}
    meta = {"study": study, "trial": trial, "stored_accuracy": obj.get("accuracy"),
            "stored_test_accuracy": obj.get("test_accuracy"),
            "stored_size_mb": obj.get("size_mb"), "dataset": cfg.dataset,
            "data": cfg.data.model_dump(mode="json"), "batch_size": cfg.batch_size,
            "model": cfg.model, "config": cfg.model_dump(mode="json")}
    exp = export_onnx(model, tuple(data.input_shape), onnx_path, metadata=meta,
                      act_types=act_types)
    enc = write_encodings(exp)
    rep = size_report(exp.path, study_size_mb=obj.get("size_mb"))
    return {"onnx": exp.path.name, "encodings": enc.name, "size": rep}

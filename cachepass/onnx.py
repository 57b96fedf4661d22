"""Import shim: ``cachepass.onnx`` is `cachepass.exported.onnx` (the path the README named until the export package)."""

from cachepass.exported.onnx import OPSET, Session, export_onnx, replace_bool_where  # noqa: F401

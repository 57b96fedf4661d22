"""Import shim: ``cachepass.tensorrt`` is `cachepass.exported.tensorrt` (the path the README named until the export package)."""

from cachepass.exported.tensorrt import MAX_OPSET, compile_exported, problems  # noqa: F401

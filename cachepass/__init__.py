"""cachepass: DBCache + TaylorSeer step caching compiled into the graph as a torch.cond.

The names below import their module on first use, so ``cachepass --help`` and ``import cachepass``
do not load torch; submodules (``cachepass.reference``, ``cachepass.exported.tensorrt``, ...) load the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "compile": ("cachepass.api", "compile"),
    "explain": ("cachepass.api", "explain"),
    "reset": ("cachepass.api", "reset"),
    "stats": ("cachepass.api", "stats"),
    "release": ("cachepass.api", "release"),
    "export": ("cachepass.exported.program", "export"),
    "load_exported": ("cachepass.exported.program", "load"),
    "export_onnx": ("cachepass.exported.onnx", "export_onnx"),
    "Form": ("cachepass.backend", "Form"),
    "Inner": ("cachepass.inner", "Inner"),
    "MaskPolicy": ("cachepass.config", "MaskPolicy"),
    "StepCacheConfig": ("cachepass.config", "StepCacheConfig"),
    "BlockDiscoveryError": ("cachepass.errors", "BlockDiscoveryError"),
    "CachepassError": ("cachepass.errors", "CachepassError"),
    "PassError": ("cachepass.errors", "PassError"),
    "UnsupportedGraphError": ("cachepass.errors", "UnsupportedGraphError"),
    "UnitStats": ("cachepass.state.runtime", "UnitStats"),
    "OffloadStats": ("cachepass.offload.runtime", "OffloadStats"),
    "offload_stats": ("cachepass.api", "offload_stats"),
    "OffloadConfig": ("cachepass.offload.plan", "OffloadConfig"),
    "OffloadPlan": ("cachepass.offload.plan", "OffloadPlan"),
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        module, attribute = _NAMES[name]
        value = getattr(importlib.import_module(module), attribute)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'cachepass' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])

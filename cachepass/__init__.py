"""cachepass: DBCache + TaylorSeer step caching compiled into the graph as a torch.cond."""

from cachepass.api import compile, explain, reset, stats
from cachepass.exported import export, load as load_exported
from cachepass.onnx import export_onnx
from cachepass.backend import Form
from cachepass.inner import Inner
from cachepass.config import MaskPolicy, StepCacheConfig
from cachepass.errors import BlockDiscoveryError, CachepassError, PassError, UnsupportedGraphError
from cachepass.runtime import UnitStats
from cachepass.piecewise.offload import OffloadStats, offload_stats
from cachepass.piecewise.offload_plan import OffloadConfig, OffloadPlan

__all__ = [
    "BlockDiscoveryError",
    "CachepassError",
    "Form",
    "Inner",
    "MaskPolicy",
    "OffloadConfig",
    "OffloadPlan",
    "OffloadStats",
    "PassError",
    "StepCacheConfig",
    "UnitStats",
    "UnsupportedGraphError",
    "compile",
    "explain",
    "export",
    "export_onnx",
    "load_exported",
    "offload_stats",
    "reset",
    "stats",
]

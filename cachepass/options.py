"""The options of a stepcache compile: parsed and checked once, typed from then on.

``cachepass.compile``, ``cachepass.explain``, the ``stepcache`` backend (``torch.compile(...,
options={...})``) and ``cachepass.api.compile_options`` all go through `parse_options`; everything
after it reads `CompileOptions` fields. Bad values raise ``ValueError`` naming the field and what is
allowed; options that cannot run on the model's device raise `CachepassError` (`CompileOptions.cudagraphs_on`,
`CompileOptions.check_offload_device`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any, Mapping

import torch

from cachepass.analysis import sequence_parallel
from cachepass.config import StepCacheConfig
from cachepass.cudagraphs.conditional_nodes import unavailable_reason as conditional_nodes_unavailable
from cachepass.cudagraphs.graphed import CudaGraphs
from cachepass.errors import CachepassError
from cachepass.inner import INDUCTOR_MODES, Inner
from cachepass.offload.plan import OffloadConfig

log = logging.getLogger(__name__)


OPTION_KEYS = (
    "config",
    "calibrator_config",
    "inner",
    "glue",
    "mode",
    "form",
    "cudagraphs",
    "offload",
    "sequence_parallel_group",
)


class Form(str, enum.Enum):
    """How the rewritten graph runs."""

    # the default: split at blocks and conds; each distinct piece compiled once; conds run by the executor
    PIECEWISE = "piecewise"
    ONE_GRAPH = "one-graph"  # the whole graph, with its torch.cond, to the inner compiler (the export form)


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Every option of a stepcache compile, parsed and checked once (`parse_options`)."""

    config: StepCacheConfig
    inner: Inner = Inner.INDUCTOR
    mode: str | None = None
    form: Form = Form.PIECEWISE
    cudagraphs: CudaGraphs | None = None  # None: the fastest form that runs (`CompileOptions.default_cudagraphs`)
    offload: OffloadConfig | None = None  # stream block weights from pinned host memory (piecewise form)
    sequence_parallel_group: Any = sequence_parallel.AUTO  # "auto", None, or a ProcessGroup (context parallel)
    glue: Inner | None = None  # compiler of the pieces between blocks; None: `CompileOptions.default_glue`

    def check_offload_device(self, device: torch.device) -> None:
        if self.offload is None or device.type == "cuda" or self.offload.allow_cpu:
            return
        raise CachepassError(f"stepcache option offload needs a CUDA device; the model runs on {device.type} "
                             "(offload.allow_cpu=True runs the slot logic with CPU copies, for tests)")

    def cudagraphs_on(self, device: torch.device, sharded: bool = False) -> CudaGraphs:
        """What the piecewise program runs with on ``device``; an explicit request that cannot run raises.

        Not set: the fastest path that runs here (`default_cudagraphs`), logged with the reason.
        """
        if self.cudagraphs is None:
            chosen, reason = self.default_cudagraphs(device, sharded)
            log.info("stepcache: cudagraphs=%r by default: %s (the cudagraphs option sets it)", chosen.value, reason)
            return chosen
        if self.cudagraphs is not CudaGraphs.OFF and device.type != "cuda":
            raise CachepassError(f"stepcache option cudagraphs={self.cudagraphs.value!r} needs a CUDA device; "
                                 f"the model runs on {device.type}. Use cudagraphs='off'")
        if self.cudagraphs is CudaGraphs.CONDITIONAL:
            reason = conditional_nodes_unavailable(device)
            if reason is not None:
                raise CachepassError(f"stepcache option cudagraphs='conditional' cannot run here: {reason}. "
                                     "cudagraphs='piecewise' needs none of it (one host sync per cache unit)")
        return self.cudagraphs

    def glue_on(self, device: torch.device) -> Inner:
        """The compiler of the glue pieces (everything but the blocks: embeddings, decisions, the output head).

        Set: as set. Not set: `default_glue` for ``device``, logged where it is not ``inner``.
        """
        if self.glue is not None:
            return self.glue
        chosen, reason = self.default_glue(device)
        if chosen is not self.inner:
            log.info("stepcache: glue=%r by default: %s (the glue option sets it)", chosen.value, reason)
        return chosen

    def default_glue(self, device: torch.device) -> tuple[Inner, str]:
        """The glue's compiler when the option is not set, and why.

        With Inductor the glue runs as traced (``eager``), on every device, as regional compile leaves it; one rule
        for every device and CUDA-graph mode, so turning graphs off does not change which glue runs (a glue chosen by
        the graph mode made the outputs differ in the last bits on 2026-12-04). Compiling it
        was measured against running it as traced, interleaved in one process each:

        - H200 (torch 2.11, `bench/results/nvidia-h200-2026-12-05-glue-*.md`, cold starts in
          `cold_start-nvidia-h200-2026-12-05-*`): a cold first call of Wan2.1-1.3B's 30 blocks 17.9 s against 10.0 s
          (regional compile 8.5 s), a new shape 8.3 against 4.4 s (4.9); the compiled glue made a generation under the
          default CUDA graphs 1.0% faster at 33 frames, 0.8% for FLUX 1024 and 7.0% at one frame (0.223 vs 0.239 s).
        - CPU, 2 cores: Inductor compiles each glue kernel with the C++ compiler, 17-22 s per shape for the small
          30-block Wan, for a generation 4-9% faster (`cpu-2026-12-05-glue-wan-small-30.md`).

        ``glue='inductor'`` compiles the glue: worth it for long runs of few-token calls, and without CUDA graphs,
        where every glue kernel is a launch.
        """
        if self.inner is Inner.INDUCTOR:
            cost = {"cuda": "7-8 s of an H200's cold start, 1-7% of a generation under CUDA graphs",
                    "cpu": "about 20 s per shape in C++ compiles on 2 cores, 4-9% of a generation"}.get(
                device.type, f"not measured on {device.type}")
            return Inner.EAGER, f"as regional compile leaves it (compiling it: {cost}; glue='inductor' compiles it)"
        return self.inner, f"inner={self.inner.value!r}"

    def default_cudagraphs(self, device: torch.device, sharded: bool = False) -> tuple[CudaGraphs, str]:
        """The fastest form that runs on ``device`` with these options, and why it was chosen."""
        if device.type != "cuda":
            return CudaGraphs.OFF, f"the model runs on {device.type}"
        if self.mode == "max-autotune-no-cudagraphs":
            return CudaGraphs.OFF, f"mode={self.mode!r}"
        if self.offload is not None:
            return CudaGraphs.OFF, ("with offload, CUDA graphs were no faster than none on the one workload measured "
                                    "(Wan 1.3B, 9 frames, H200, one generation each: 0.913 s conditional, 0.893 s "
                                    "without); pass cudagraphs='conditional' to use them")
        if sharded:
            return CudaGraphs.PIECEWISE, ("the model is sharded and NCCL collectives inside IF/ELSE bodies are not "
                                          "verified: one host read of each decision per call")
        reason = conditional_nodes_unavailable(device)
        if reason is not None:
            return CudaGraphs.PIECEWISE, f"IF/ELSE nodes cannot run here ({reason}): one host read per decision"
        return CudaGraphs.CONDITIONAL, "CUDA graphs joined by IF/ELSE nodes, one launch per call and no host sync"


def parse_options(options: Mapping[str, Any] | None, mode: str | None = None) -> CompileOptions:
    """Validate ``options`` (and torch.compile's ``mode``) into `CompileOptions`: the one parser of every entry."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"stepcache got unknown option(s) {unknown}; allowed options: {list(OPTION_KEYS)}")
    config = coerce_config(options.get("config"), options.get("calibrator_config"))
    inner = _enum_option(options, "inner", Inner.INDUCTOR)
    glue = _enum_option(options, "glue", Inner.INDUCTOR) if options.get("glue") is not None else None
    form = _enum_option(options, "form", Form.PIECEWISE)
    mode = options.get("mode", mode)
    cudagraphs = _enum_option(options, "cudagraphs", CudaGraphs.OFF) if "cudagraphs" in options else None
    if form is Form.ONE_GRAPH and cudagraphs not in (None, CudaGraphs.OFF):
        raise ValueError(f"stepcache option cudagraphs={cudagraphs.value!r} needs form='piecewise': Inductor does not "
                         "capture a graph that contains torch.cond (torch 2.11-2.14)")
    offload = OffloadConfig.parse(options.get("offload"))
    if offload is not None and form is Form.ONE_GRAPH:
        raise ValueError("stepcache option offload needs form='piecewise': the executor issues the copies between pieces")
    if mode is not None:
        if inner is not Inner.INDUCTOR:
            raise ValueError(f"stepcache option mode={mode!r} only applies to inner='inductor' (got "
                             f"inner={inner.value!r})")
        if mode not in INDUCTOR_MODES:
            raise ValueError(f"stepcache option mode={mode!r} is invalid; allowed: {list(INDUCTOR_MODES)}")
    group = sequence_parallel.check_option(options.get("sequence_parallel_group", sequence_parallel.AUTO))
    return CompileOptions(config, inner, mode, form, cudagraphs, offload, group, glue)


def _enum_option(options: Mapping[str, Any], key: str, default: enum.Enum) -> Any:
    kind = type(default)
    try:
        return kind(options.get(key, default))
    except ValueError:
        raise ValueError(
            f"stepcache option {key}={options[key]!r} is invalid; allowed: {[k.value for k in kind]}"
        ) from None


def coerce_config(config: Any, calibrator_config: Any = None) -> StepCacheConfig:
    """Our config, a dict of its fields, or cache-dit's ``DBCacheConfig`` (+ ``TaylorSeerCalibratorConfig``)."""
    if config is None:
        raise ValueError("stepcache needs options={'config': ...}: a StepCacheConfig, a dict of its fields, "
                         "or a cache-dit DBCacheConfig")
    if calibrator_config is not None and isinstance(config, (StepCacheConfig, Mapping)):
        raise ValueError("stepcache option calibrator_config goes with a cache-dit DBCacheConfig only; "
                         "set taylorseer_order on StepCacheConfig instead")
    if isinstance(config, StepCacheConfig):
        return config
    if isinstance(config, Mapping):
        return StepCacheConfig.from_dict(config)
    if hasattr(config, "Fn_compute_blocks"):
        return StepCacheConfig.from_cache_dit(config, calibrator_config)
    raise ValueError(
        f"stepcache option config has type {type(config).__name__}; allowed: StepCacheConfig, dict, "
        "cache_dit.DBCacheConfig"
    )

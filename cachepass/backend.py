"""The ``stepcache`` torch.compile backend: parse options, run the passes, hand off to the inner compiler.

    torch.compile(model, backend="stepcache", options={"config": cfg, "inner": "inductor", "mode": None,
                                                      "form": "piecewise", "cudagraphs": None,
                                                      "offload": None})

The backend copies Dynamo's graph, outlines each cache unit's middle blocks, rewrites them into a
``torch.cond`` with device-resident state (see `cachepass.passes`), compiles the result with the
inner compiler and returns a function that appends the state tensors to every call. The piecewise
form (the default) splits the graph and compiles each distinct piece once (`cachepass.piecewise`);
on CUDA its program may run as CUDA graphs (``cudagraphs``, or ``mode="reduce-overhead"``) and stream
block weights from host memory (``offload``, `cachepass.offload.runtime`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from cachepass.analysis.blocks import Discovery, plan_cache_units
from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError, UnsupportedGraphError
from cachepass.inner import INDUCTOR_MODES, Inner, asks_for_cudagraphs, inner_compile
from cachepass.analysis import sequence_parallel
from cachepass.passes import cache_passes, outline_passes, run_passes, split_before_first_block
from cachepass.piecewise.compile import PieceCompiler
from cachepass.cudagraphs.conditional_nodes import unavailable_reason as conditional_nodes_unavailable
from cachepass.cudagraphs.graphed import CudaGraphs, GraphedProgram
from cachepass.piecewise.execute import build_program
from cachepass.offload.runtime import ProgramOffload
from cachepass.offload.plan import OffloadConfig
from cachepass.state.layout import StateLayout
from cachepass.state.runtime import StateSet
from cachepass.analysis.timestep import find_timestep_input
from cachepass.unit import OutlinedUnit, UnitSpec

log = logging.getLogger("cachepass")


OPTION_KEYS = ("config", "calibrator_config", "inner", "mode", "form", "cudagraphs", "offload", "sequence_parallel_group")


class Form(str, enum.Enum):
    """How the rewritten graph runs."""

    PIECEWISE = "piecewise"  # the default: split at blocks and conds; each distinct piece compiled once; conds run by the executor
    ONE_GRAPH = "one-graph"  # the whole graph, with its torch.cond, to the inner compiler (the export form)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    config: StepCacheConfig
    inner: Inner = Inner.INDUCTOR
    mode: str | None = None
    form: Form = Form.PIECEWISE
    cudagraphs: CudaGraphs | None = None  # None: as ``mode`` asks (reduce-overhead, max-autotune: piecewise)
    offload: OffloadConfig | None = None  # stream block weights from pinned host memory (piecewise form)
    sequence_parallel_group: Any = sequence_parallel.AUTO  # "auto", None, or a ProcessGroup (context parallel)

    def check_offload_device(self, device: torch.device) -> None:
        if self.offload is None or device.type == "cuda" or self.offload.allow_cpu:
            return
        raise CachepassError(f"stepcache option offload needs a CUDA device; the model runs on {device.type} "
                             "(offload.allow_cpu=True runs the slot logic with CPU copies, for tests)")

    def cudagraphs_on(self, device: torch.device) -> CudaGraphs:
        """What the piecewise program runs with on ``device``; an explicit request that cannot run raises."""
        if self.cudagraphs is None:
            asked = self.inner is Inner.INDUCTOR and asks_for_cudagraphs(self.mode)
            if asked and device.type != "cuda":
                log.info("stepcache: mode=%r asks for CUDA graphs; the model runs on %s, so it runs without them",
                         self.mode, device.type)
            return CudaGraphs.PIECEWISE if asked and device.type == "cuda" else CudaGraphs.OFF
        if self.cudagraphs is not CudaGraphs.OFF and device.type != "cuda":
            raise CachepassError(f"stepcache option cudagraphs={self.cudagraphs.value!r} needs a CUDA device; "
                                 f"the model runs on {device.type}. Use cudagraphs='off'")
        if self.cudagraphs is CudaGraphs.CONDITIONAL:
            reason = conditional_nodes_unavailable(device)
            if reason is not None:
                raise CachepassError(f"stepcache option cudagraphs='conditional' cannot run here: {reason}. "
                                     "cudagraphs='piecewise' needs none of it (one host sync per cache unit)")
        return self.cudagraphs


def parse_options(options: Mapping[str, Any] | None, mode: str | None = None) -> BackendOptions:
    """Validate ``options`` (and torch.compile's ``mode``) into `BackendOptions`."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"stepcache got unknown option(s) {unknown}; allowed options: {list(OPTION_KEYS)}")
    config = coerce_config(options.get("config"), options.get("calibrator_config"))
    inner = _enum_option(options, "inner", Inner.INDUCTOR)
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
            raise ValueError(f"stepcache option mode={mode!r} only applies to inner='inductor' (got inner={inner.value!r})")
        if mode not in INDUCTOR_MODES:
            raise ValueError(f"stepcache option mode={mode!r} is invalid; allowed: {list(INDUCTOR_MODES)}")
    group = sequence_parallel.check_option(options.get("sequence_parallel_group", sequence_parallel.AUTO))
    return BackendOptions(config, inner, mode, form, cudagraphs, offload, group)


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


# ---------------------------------------------------------------------------- graph building
def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh GraphModule over a copy of ``gm``'s graph (Dynamo re-reads the original after we return)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    graph._codegen = gm.graph._codegen
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def outline_graph(gm: fx.GraphModule, config: StepCacheConfig,
                  sequence_parallel_group: Any = None) -> tuple[fx.GraphModule, list[UnitSpec], Discovery]:
    """Find the cache units and outline their middle blocks; returns the outlined graph and the units.

    ``sequence_parallel_group`` (see `cachepass.analysis.sequence_parallel`): None refuses a graph with collectives.
    """
    gm = run_passes(gm, [split_before_first_block])
    plans, discovery = plan_cache_units(gm, config)
    discovery.parallel = sequence_parallel.find_sequence_parallel(gm, discovery, sequence_parallel_group)
    gm = run_passes(gm, outline_passes(plans))
    return gm, outlined_units(gm), discovery


def outlined_units(gm: fx.GraphModule) -> list[UnitSpec]:
    return [
        gm.get_submodule(n.target).spec
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OutlinedUnit)
    ]


def stepcache(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
              options: Mapping[str, Any] | None = None) -> Callable:
    """torch.compile backend: DBCache + TaylorSeer step caching as a ``torch.cond`` in one graph."""
    start = time.perf_counter()
    opts = parse_options(options, mode)
    _warn_if_never_caches(opts.config)
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs):
        raise CachepassError(
            "stepcache compiles inference graphs (its state is updated in place): call the model under "
            "torch.no_grad() or torch.inference_mode(), as diffusers pipelines do"
        )
    _require_static_shapes(example_inputs)
    gm, units, discovery = outline_graph(copy_graph_module(gm), opts.config, opts.sequence_parallel_group)
    for skipped in discovery.skipped:
        log.info("stepcache: not a cache unit: %s", skipped)
    timestep = find_timestep_input(gm, opts.config)
    layout = StateLayout(units, opts.config, timestep=timestep)
    gm = run_passes(gm, cache_passes(layout, timestep, discovery.parallel))
    if discovery.parallel is not None:
        log.info("stepcache: %s: one all-reduce per cache unit per call", discovery.parallel.describe())
    device = units[0].hidden.device
    states = StateSet(layout, device, _anchor_index(example_inputs), gm)
    log.info("stepcache: %d cache unit(s) (%s), %.1f MiB of state per model instance, form=%s, inner=%s, %s",
             len(units), ", ".join(u.name for u in units), layout.nbytes / 2**20, opts.form.value, opts.inner.value,
             timestep.describe() if timestep else "no timestep input: generations counted in calls")
    inputs = [*example_inputs, *static_example_state(example_inputs, layout, device)]
    passes_done = time.perf_counter()
    if opts.form is Form.PIECEWISE:
        cudagraphs = opts.cudagraphs_on(device)
        if cudagraphs is CudaGraphs.CONDITIONAL and discovery.parallel is not None:
            raise CachepassError("stepcache option cudagraphs='conditional' is not supported on a sharded model: "
                                 "NCCL collectives inside CUDA-graph IF/ELSE bodies are not verified. "
                                 "cudagraphs='piecewise' runs it (one host read of each decision per call)")
        opts.check_offload_device(device)
        # the executor captures CUDA graphs over whole stretches of pieces; Inductor must not capture each piece
        compiler = PieceCompiler(lambda piece, piece_inputs: inner_compile(piece, piece_inputs, opts.inner, opts.mode,
                                                                           cudagraphs=False))
        program, states.plan = build_program(gm, inputs, compiler, {u.name for u in units})
        log.info("stepcache: piecewise, %d block pieces, cudagraphs=%s; %s; backend %.1f s (passes %.1f s, compiles: %s)",
                 len(states.plan.blocks), cudagraphs.value, compiler.count, time.perf_counter() - start,
                 passes_done - start, compiler.count.timings())
        offload = None
        if opts.offload is not None:
            offload = ProgramOffload(gm, units, opts.config, opts.offload, device, cudagraphs is not CudaGraphs.OFF)
            offload.attach(program)
        if cudagraphs is CudaGraphs.OFF:
            return _with_state(program.forward, states, offload)
        on_capture = offload.begin_capture if offload is not None else lambda: None
        return _with_state(GraphedProgram(program, device, cudagraphs, len(layout.specs), on_capture), states, offload)
    compiled = _compile_one_graph(gm, inputs, opts)
    log.info("stepcache: one graph; backend %.1f s (passes %.1f s)", time.perf_counter() - start, passes_done - start)
    return _with_state(compiled, states)


def _require_static_shapes(example_inputs: Sequence[Any]) -> None:
    symbolic = [str(t) for t in example_inputs if isinstance(t, torch.SymInt)]
    symbolic += [str(tuple(t.shape)) for t in example_inputs
                 if isinstance(t, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in t.shape)]
    if symbolic:
        raise UnsupportedGraphError(
            f"torch.compile traced this call with symbolic sizes ({', '.join(symbolic[:3])}): dynamic=True, or "
            "torch.compile's default dynamic=None after a shape change, makes sizes symbolic. stepcache compiles one "
            "static graph, with its own state, per shape: use cachepass.compile(model, config), or pass "
            "dynamic=False to torch.compile"
        )


_WARNED_NEVER_CACHES: set[StepCacheConfig] = set()


def _warn_if_never_caches(config: StepCacheConfig) -> None:
    reason = config.never_caches
    if reason is not None and config not in _WARNED_NEVER_CACHES:
        _WARNED_NEVER_CACHES.add(config)
        log.warning("stepcache: this config never caches a step (%s); every call runs all blocks", reason)


def static_example_state(example_inputs: Sequence[Any], layout: StateLayout, device: torch.device) -> list:
    """Example state inputs: fake tensors with static shapes in Dynamo's fake mode (real ones without it).

    AOTAutograd gives real example inputs it has no Dynamo context for symbolic sizes (torch 2.11),
    and the guards Inductor then emits on them have no source: Dynamo fails building its guards.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return [spec.allocate(device) for spec in layout.specs]
    with fake_mode:
        return [torch.empty(spec.shape, dtype=spec.dtype, device=device) for spec in layout.specs]


def _anchor_index(example_inputs: Sequence[Any]) -> int | None:
    """Position of a model parameter among the graph inputs: it identifies the model instance."""
    return next((i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)), None)


def _compile_one_graph(gm: fx.GraphModule, inputs: list, opts: BackendOptions) -> Callable:
    _warn_if_cudagraphs_asked(opts, "Inductor does not capture a graph that contains torch.cond (torch 2.11-2.14)")
    return inner_compile(gm, inputs, opts.inner, opts.mode)


def _warn_if_cudagraphs_asked(opts: BackendOptions, why: str) -> None:
    if opts.inner is Inner.INDUCTOR and asks_for_cudagraphs(opts.mode):
        log.warning("stepcache: mode=%r asks for CUDA graphs, but %s; it runs without CUDA graphs (form=%s)",
                    opts.mode, why, opts.form.value)


def _with_state(compiled: Callable, states: StateSet, offload: ProgramOffload | None = None) -> Callable:
    """Dynamo calls the backend's function with the graph inputs; append the caller's state tensors."""

    def run(*args):
        state = states.for_call(args)
        with state.one_call_at_a_time():
            state.before_call()
            if offload is not None:
                args = offload.begin(args, state)  # the pieces read the streamed weights from their slots
            out = compiled(*args, *state.tensors)
            if offload is not None:
                offload.end()
            state.after_call()
        return out

    return run

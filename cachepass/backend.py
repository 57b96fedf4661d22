"""The ``stepcache`` torch.compile backend: parse the options, rewrite the graph, hand it to the executor.

    torch.compile(model, backend="stepcache", options={"config": cfg, "inner": "inductor", "mode": None,
                                                      "form": "piecewise", "cudagraphs": None,
                                                      "offload": None})

The backend rewrites Dynamo's graph (`cachepass.pipeline`: the cache units' middle blocks become a
``torch.cond`` over device-resident state), compiles it and returns a function that appends the
caller's state tensors to every call. The piecewise form (the default) splits the graph and compiles
each distinct piece once (`cachepass.piecewise`); features attach to its program as `ProgramHooks`:
offload (`cachepass.offload`) streams block weights, and on CUDA the program may run as CUDA graphs
(`cachepass.cudagraphs`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx

from cachepass.config import StepCacheConfig
from cachepass.cudagraphs.graphed import CudaGraphs, GraphedProgram
from cachepass.decision.branches import numbers_read_in_branches
from cachepass.errors import CachepassError
from cachepass.inner import Inner, asks_for_cudagraphs, inner_compile
from cachepass.leaf_weights import LeafWeights
from cachepass.offload.runtime import ProgramOffload
from cachepass.options import CompileOptions, Form, parse_options
from cachepass.piecewise.compile import PieceCompiler
from cachepass.piecewise.execute import build_program
from cachepass.piecewise.hooks import NO_HOOKS, ProgramHooks
from cachepass.piecewise.host_inputs import HostInputs
from cachepass.pipeline import Rewritten, rewrite, static_example_state
from cachepass.state.layout import StateLayout
from cachepass.state.runtime import StateSet
from cachepass.state.sizes import SizeSymbols

log = logging.getLogger(__name__)


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
    host = HostInputs.find(gm, example_inputs, _accelerator_of(example_inputs))
    example_inputs = host.retarget(gm, example_inputs)
    rewritten = rewrite(gm, opts.config, sequence_parallel_group=opts.sequence_parallel_group,
                        bind_weights=opts.form is Form.PIECEWISE)
    units, layout, timestep, parallel = rewritten.units, rewritten.layout, rewritten.timestep, rewritten.discovery.parallel
    for skipped in rewritten.discovery.skipped:
        log.info("stepcache: not a cache unit: %s", skipped)
    if parallel is not None:
        log.info("stepcache: %s: one all-reduce per cache unit per call", parallel.describe())
    device = units[0].hidden.device
    sizes = SizeSymbols.of(example_inputs, layout.symbols)
    log.info("stepcache: %d cache unit(s) (%s), %.1f MiB of state per model instance%s, form=%s, inner=%s, %s",
             len(units), ", ".join(u.name for u in units), _state_nbytes(layout, sizes, example_inputs) / 2**20,
             f" at this shape; sizes symbolic in {', '.join(map(str, sizes.symbols))} (one program for every shape)"
             if sizes else "", opts.form.value, opts.inner.value,
             timestep.describe() if timestep else "no timestep input: generations counted in calls")
    leaf_weights = LeafWeights.of(rewritten.graph)  # after Dynamo's inputs: the block leaves' weights
    inputs = [*example_inputs, *leaf_weights.compiled_with(example_inputs, fake=opts.form is not Form.PIECEWISE),
              *static_example_state(example_inputs, layout, device)]
    passes_done = time.perf_counter()
    if opts.form is Form.ONE_GRAPH:
        compiled = _compile_one_graph(rewritten.graph, inputs, opts)
        log.info("stepcache: one graph; backend %.1f s (passes %.1f s)", time.perf_counter() - start,
                 passes_done - start)
        return _with_state(compiled, StateSet(layout, device, _anchor_index(example_inputs), rewritten.graph,
                                              sizes=sizes), leaf_weights, host=host)
    cudagraphs = opts.cudagraphs_on(device, sharded=parallel is not None)
    if cudagraphs is CudaGraphs.CONDITIONAL and parallel is not None:
        raise CachepassError("stepcache option cudagraphs='conditional' is not supported on a sharded model: "
                             "NCCL collectives inside CUDA-graph IF/ELSE bodies are not verified. "
                             "cudagraphs='piecewise' runs it (one host read of each decision per call)")
    opts.check_offload_device(device)
    hooks = _program_hooks(rewritten, opts, device, graphed=cudagraphs is not CudaGraphs.OFF)
    glue = opts.glue_on(device)

    def inner_for(kind: str) -> Inner:
        return opts.inner if kind == "block" else glue

    def compile_piece(piece: fx.GraphModule, piece_inputs: list, kind: str) -> Callable:
        # the executor captures CUDA graphs over whole stretches of pieces; Inductor must not capture each piece
        return inner_compile(piece, piece_inputs, inner_for(kind), opts.mode, cudagraphs=False)

    compiler = PieceCompiler(compile_piece, needs_examples=lambda kind: inner_for(kind) is not Inner.EAGER)
    program, plan = build_program(rewritten.graph, inputs, compiler, {u.name for u in units}, hooks)
    log.info("stepcache: piecewise, %d block pieces, cudagraphs=%s, glue=%s; %s; backend %.1f s (passes %.1f s, "
             "compiles: %s)", len(plan.blocks), cudagraphs.value, glue.value, compiler.count,
             time.perf_counter() - start, passes_done - start, compiler.count.timings())
    states = StateSet(layout, device, _anchor_index(example_inputs), rewritten.graph, plan, hooks.reset, sizes)
    if cudagraphs is CudaGraphs.OFF:
        return _with_state(program.forward, states, leaf_weights, hooks, host)
    graphed = GraphedProgram(program, device, cudagraphs, len(layout.specs), hooks, chosen_by_default=opts.cudagraphs is None,
                             sizes=sizes)
    return _with_state(graphed, states, leaf_weights, hooks, host)


def _program_hooks(rewritten: Rewritten, opts: CompileOptions, device: torch.device, graphed: bool) -> ProgramHooks:
    """The features that attach to the piecewise program (offload), or none."""
    if opts.offload is None:
        return NO_HOOKS
    return ProgramOffload(rewritten.graph, rewritten.units, opts.config, opts.offload, device, graphed)


def _state_nbytes(layout: StateLayout, sizes: SizeSymbols | None, example_inputs: Sequence[Any]) -> int:
    """Bytes of one model instance's state at the traced call's shape."""
    return (layout.concrete(sizes, sizes.hints(example_inputs)) if sizes else layout).nbytes


_WARNED_NEVER_CACHES: set[StepCacheConfig] = set()


def _warn_if_never_caches(config: StepCacheConfig) -> None:
    reason = config.never_caches
    if reason is not None and config not in _WARNED_NEVER_CACHES:
        _WARNED_NEVER_CACHES.add(config)
        log.warning("stepcache: this config never caches a step (%s); every call runs all blocks", reason)


def _accelerator_of(example_inputs: Sequence[Any]) -> torch.device:
    """The device the graph's tensors are on besides the host (the CPU when all are)."""
    return next((t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type != "cpu"),
                torch.device("cpu"))


def _anchor_index(example_inputs: Sequence[Any]) -> int | None:
    """Position of a model parameter among the graph inputs: it identifies the model instance."""
    return next((i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)), None)


def _compile_one_graph(gm: fx.GraphModule, inputs: list, opts: CompileOptions) -> Callable:
    _warn_if_cudagraphs_asked(opts, "Inductor does not capture a graph that contains torch.cond (torch 2.11-2.14)")
    read = numbers_read_in_branches(gm)
    if read:
        raise CachepassError(
            f"stepcache form='one-graph' cannot take this graph: the middle blocks read {_some(read)} as numbers "
            "from tensor inputs (Dynamo does not specialize module floats such as a norm's eps under dynamic=True), "
            "and inside torch.cond's branches such a read is data-dependent. Use form='piecewise' (the default), or "
            "dynamic=None / False")
    try:
        return inner_compile(gm, inputs, opts.inner, opts.mode)
    except RuntimeError as error:
        if "cond's output stride" not in str(error):
            raise
        raise CachepassError(
            "stepcache form='one-graph' cannot take this graph with symbolic sizes: torch.cond rejected the output "
            f"strides of its branches ({str(error).split('. ')[0]}). Use form='piecewise' (the default), or "
            "dynamic=False for one static program per shape") from None


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _warn_if_cudagraphs_asked(opts: CompileOptions, why: str) -> None:
    if opts.inner is Inner.INDUCTOR and asks_for_cudagraphs(opts.mode):
        log.warning("stepcache: mode=%r asks for CUDA graphs, but %s; it runs without CUDA graphs (form=%s)",
                    opts.mode, why, opts.form.value)


def _with_state(compiled: Callable, states: StateSet, leaf_weights: LeafWeights, hooks: ProgramHooks = NO_HOOKS,
                host: HostInputs | None = None) -> Callable:
    """Dynamo calls the backend's function with the graph inputs; append the block leaves' weights (read from the
    model called) and the caller's state tensors.

    Host inputs the model only moves to the device are passed as their device copies. The program's
    hooks see the call begin (offload hands the pieces the streamed weights' slots) and end.
    """

    def run(*args):
        args = (*args, *leaf_weights())
        if host is not None:
            args = host.move(args)
        state = states.for_call(args)
        with state.one_call_at_a_time():
            state.before_call()
            args = hooks.begin_call(args, state)
            out = compiled(*args, *state.tensors)
            hooks.end_call()
            state.after_call()
        return out

    return run

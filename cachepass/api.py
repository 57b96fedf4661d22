"""Public entry points: ``compile``, ``stats``, ``reset``, ``explain``."""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch
from torch import nn

from cachepass import block_regions, block_scope, symbolic_latents
from cachepass.analysis.blocks import example_value
from cachepass.analysis.sequence_parallel import SequenceParallel
from cachepass.analysis.timestep import TimestepInput
from cachepass.backend import stepcache
from cachepass.block_scope.chosen import ChosenBlocks
from cachepass.compat import trace_functional_all_gather
from cachepass.compile_scope import calls_of_compiled_model
from cachepass.config import StepCacheConfig
from cachepass.cudagraphs import memory as graph_memory
from cachepass.cudagraphs.graphed import CudaGraphs
from cachepass.errors import BlockDiscoveryError, BlockScopeUnfitError, CachepassError
from cachepass.exported.program import ExportedState, capture
from cachepass.fastvideo_stages import compile_fastvideo, is_fastvideo
from cachepass.fastvideo_stages import dits as fastvideo_dits
from cachepass.offload.host_start import check_budget_fits, place_for_offload
from cachepass.offload.plan import OffloadPlan, choose_residency, plan_generation
from cachepass.offload.runtime import OffloadStats, check_not_offloaded_by_fastvideo, check_not_offloaded_by_hooks, model_bytes
from cachepass.offload.runtime import offload_stats as module_offload_stats
from cachepass.options import CompileOptions, Form, parse_options
from cachepass.piecewise.compile import CompileCount, PieceCompiler
from cachepass.piecewise.execute import Plan, build_program
from cachepass.pipeline import Rewritten, rewrite, static_example_state
from cachepass.pipelines import DIT_COMPONENTS, compile_pipeline, is_pipeline
from cachepass.state.runtime import RuntimeState, UnitStats, current_state, states_of
from cachepass.unit import UnitSpec

log = logging.getLogger(__name__)

# original module -> the config cachepass.compile gave it: reset / stats on it are no-ops before its first call
_COMPILED_ORIGINALS: "weakref.WeakKeyDictionary[nn.Module, StepCacheConfig]" = weakref.WeakKeyDictionary()
SCOPES = ("model", "blocks")  # cachepass.compile's scope: the whole model, or each block list (`cachepass.block_scope`)
_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, ChosenBlocks]" = weakref.WeakKeyDictionary()  # default compile -> its blocks


def compile(model: nn.Module, config: Any = None, *, calibrator_config: Any = None, inner: str = "inductor",
            mode: str | None = None, form: str = "piecewise", cudagraphs: str | None = None,
            offload: Any = None, sequence_parallel_group: Any = "auto", fullgraph: bool = True,
            max_shapes: int | None = None, device: Any = None, glue: str | None = None,
            dynamic: bool | str | None = None, scope: str | None = None) -> nn.Module:
    """``torch.compile(model, backend="stepcache", ...)`` with the options checked up front.

    ``model`` may also be a diffusers pipeline: its DiT components are compiled in place and the pipeline
    is returned; ``config=None`` then takes cache-dit's defaults with the family's CFG layout
    (`cachepass.pipelines`). A FastVideo pipeline or ``DenoisingStage`` likewise (`cachepass.fastvideo_stages`).
    A module needs a config.

    ``config`` is a `StepCacheConfig`, a dict of its fields, or a cache-dit ``DBCacheConfig``
    (then ``calibrator_config`` may be its ``TaylorSeerCalibratorConfig``). ``form`` is
    ``"piecewise"`` (the default: each distinct block compiled once, conds run by an executor) or
    ``"one-graph"`` (the rewritten graph with its ``torch.cond`` to the inner compiler, as export sees it).
    ``cudagraphs`` (piecewise form, CUDA): ``"piecewise"`` captures the pieces between cache
    decisions as CUDA graphs and reads each decision on the host; ``"conditional"`` joins them with
    IF/ELSE nodes into one graph launch with no host sync (needs cuda-bindings); ``"off"``. Not
    set: the fastest that runs (`CompileOptions.default_cudagraphs`: conditional on CUDA, off on the
    CPU and with offload), logged. ``glue``: the compiler of the pieces between blocks (default:
    ``inner``, except ``"eager"`` with Inductor, as regional compile leaves the glue, logged;
    `CompileOptions.default_glue` gives the measured trade-offs). ``offload`` (piecewise form):
    ``{"budget": "8GB", "slots": 2}`` keeps that many bytes of weights on the device and streams the
    other blocks from pinned host memory, planned from the cache schedule (`OffloadConfig`).
    ``device``: where the model runs (default: where its weights are). With ``offload`` and a model
    on the CPU (as ``from_pretrained`` leaves it), the non-block weights move to ``device`` now and
    every block is packed into pinned host memory, so the device never holds more than the budget.
    Without offload the model moves there (``model.to(device)``).
    ``sequence_parallel_group`` (context parallel, `cachepass.analysis.sequence_parallel`): ``"auto"`` finds
    the group that shards the tokens from the graph's collectives, and every rank then takes the
    same decision from one all-reduce per cache unit; a ``ProcessGroup`` names it; None refuses a
    sharded graph. ``dynamic`` is torch.compile's: None (the default) compiles the first shape with
    static sizes and, at the first call of another shape, once more with the sizes that changed
    symbolic: that program runs every later resolution or batch size with no compile (as regional
    compile's blocks do), each shape with its own cache state (`cachepass.state.sizes`). False compiles
    every shape with static sizes (the fastest kernels per shape, a compile per shape); True makes sizes
    symbolic from the first call. ``"latents"`` makes the sizes of the model's latents argument symbolic from the first
    call, the others as with None: no compile at a new resolution, the symbolic program's kernels at the first one
    (`cachepass.symbolic_latents`; piecewise form; under ``scope="blocks"`` every size of the list programs' inputs).
    With ``form="one-graph"`` None means False (logged). Dynamo allows
    ``torch._dynamo.config.recompile_limit`` (8) graphs per function, shared by every shape and every compile of
    the model's class in the process; ``max_shapes`` raises that limit (process-wide) when larger, and each
    compile's first call makes room for its own graph.
    ``scope``: ``"model"`` compiles the whole model as one graph; ``"blocks"`` compiles each block list alone, as
    regional compile does, and returns ``model`` itself with the model-level code run as it is
    (`cachepass.block_scope`: a shorter trace at a warm start and at a new shape, no CUDA graph or compiled code
    around the model-level code; not with ``offload``). None (the default) chooses (`_chosen_scope`, logged): the
    block scope where it can run, inside a whole-model compile that takes over where a list's loop does not fit it
    (`cachepass.block_scope.chosen`).
    Options that cannot run on the model's device raise here.
    """
    if is_pipeline(model) or is_fastvideo(model):
        compile_components = compile_pipeline if is_pipeline(model) else compile_fastvideo
        return compile_components(model, config, compile, calibrator_config=calibrator_config, inner=inner, mode=mode,
                                  form=form, cudagraphs=cudagraphs, offload=offload, glue=glue,
                                  sequence_parallel_group=sequence_parallel_group, fullgraph=fullgraph,
                                  max_shapes=max_shapes, device=device, dynamic=dynamic, scope=scope)
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"cachepass.compile scope={scope!r} is invalid; allowed: None (chosen), "
                         f"{', '.join(map(repr, SCOPES))}")
    if dynamic is not None and not isinstance(dynamic, bool) and dynamic != symbolic_latents.OPTION:
        raise ValueError(f"cachepass.compile dynamic={dynamic!r} is invalid; allowed: None, True, False or "
                         f"{symbolic_latents.OPTION!r}")
    if max_shapes is not None and (isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1):
        raise ValueError(f"cachepass.compile max_shapes={max_shapes!r} is invalid; allowed: an integer >= 1 or None")
    model = _original_module(model)
    _reject_compiler_disabled(model)
    options = {"config": config, "inner": inner, "form": form}
    if calibrator_config is not None:
        options["calibrator_config"] = calibrator_config
    if mode is not None:
        options["mode"] = mode
    if cudagraphs is not None:
        options["cudagraphs"] = cudagraphs
    if glue is not None:
        options["glue"] = glue
    if offload is not None:
        options["offload"] = offload
    if sequence_parallel_group != "auto":
        options["sequence_parallel_group"] = sequence_parallel_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trace_functional_all_gather()
    parsed = parse_options(options)
    if dynamic is None and parsed.form is Form.ONE_GRAPH:
        dynamic = False
        log.info("stepcache: form='one-graph' compiles each shape with static sizes (dynamic=False): at a second "
                 "shape traced with symbolic sizes torch.cond rejected the branches' output strides (Wan, torch 2.13); "
                 "dynamic=True asks for symbolic sizes from the first call")
    symbolic = dynamic == symbolic_latents.OPTION
    if symbolic and parsed.form is not Form.PIECEWISE:
        raise CachepassError(f"cachepass.compile dynamic='latents' takes form='piecewise' (here "
                             f"form={parsed.form.value!r}): the one-graph form compiles each shape statically. Use "
                             "dynamic=True or None")
    if scope == "blocks" and parsed.offload is not None:
        raise CachepassError("cachepass.compile scope='blocks' does not take offload: the offload plan streams the "
                             "blocks of the whole model's program; use scope='model' or no scope (the default then "
                             "compiles the whole model)")
    if scope == "blocks" and _sharded(sequence_parallel_group):
        raise CachepassError("cachepass.compile scope='blocks' is not verified under context parallel (a process group "
                             "of several ranks); use scope='model' or no scope (the default then compiles the whole "
                             "model, which finds the sharding in the graph)")
    target = _target_device(model, device)
    check_not_offloaded_by_fastvideo(model)
    if parsed.offload is not None:
        check_not_offloaded_by_hooks(model)
    _check_device_options(parsed, target)
    if parsed.offload is not None:
        check_budget_fits(model, parsed.offload)
        place_for_offload(model, target)  # the device gets the non-block weights; the blocks wait in host memory
    elif device is not None:
        model.to(target)
    if max_shapes is not None:
        _raise_recompile_limit(max_shapes, "max_shapes")
    block_scope.remove(model)
    chosen = scope is None
    if chosen:
        scope = _chosen_scope(parsed, sequence_parallel_group)
    if scope == "blocks":
        runner_options = dict(inner=inner, mode=mode, form=form, cudagraphs=cudagraphs, glue=glue, fullgraph=fullgraph,
                              sequence_parallel_group=sequence_parallel_group, max_shapes=max_shapes, scope="model",
                              dynamic=None if symbolic else dynamic)  # the list scope marks its programs' inputs
        try:
            scoped = block_scope.compile_block_lists(model, parsed.config,
                                                     lambda runner, config: compile(runner, config, **runner_options),
                                                     symbolic_sizes=symbolic, only_entered=chosen)
        except BlockScopeUnfitError as unfit:
            if not chosen:
                raise
            log.info("stepcache: scope='model' (chosen: %s)", unfit)
        else:
            if not chosen:
                _COMPILED_ORIGINALS[model] = block_scope.scope_of(model).config
                return scoped
            log.info("stepcache: scope='blocks' (chosen: each block list compiled alone, as regional compile does; the "
                     "whole model is compiled instead where a list's loop does not fit; scope='model' compiles it "
                     "always)")
    latents = symbolic_latents.SymbolicLatents(model) if symbolic else None
    compiled = torch.compile(model, backend=stepcache, fullgraph=fullgraph, dynamic=None if symbolic else dynamic,
                             options=options)
    blocks = ChosenBlocks(model) if block_scope.scope_of(model) is not None else None
    if blocks is not None:
        _CHOSEN[compiled] = blocks
    compiled.forward = _with_clear_errors(compiled.forward, model, latents, blocks)
    _COMPILED_ORIGINALS[model] = parsed.config
    return compiled


def _chosen_scope(options: CompileOptions, sequence_parallel_group: Any) -> str:
    """The scope a compile with none given takes before any call: ``"blocks"`` unless an option needs the whole
    model's program (logged); `cachepass.block_scope.chosen` gives way to the whole model at a call that does not
    fit, and `compile` where the model has no block list."""
    if options.form is Form.ONE_GRAPH:
        why = "form='one-graph' is the whole model's graph"
    elif options.offload is not None:
        why = "offload plans the copies of the whole model's program"
    elif _sharded(sequence_parallel_group):
        why = "context parallel: the whole model's graph names the sharding"
    else:
        return "blocks"
    log.info("stepcache: scope='model' (chosen: %s)", why)
    return "model"


def _sharded(sequence_parallel_group: Any) -> bool:
    """A process group is named, or this process is one of several ranks."""
    return sequence_parallel_group not in ("auto", None) or (
        torch.distributed.is_available() and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1)


def _original_module(model: nn.Module) -> nn.Module:
    """``model``, or the module a ``torch.compile`` wrapper holds: compiling a compiled module (a notebook cell run
    twice, a pipeline compiled twice, a module torch.compile'd first) compiles its original with these options."""
    if not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return model
    how = "cachepass.compile" if compile_options(model) is not None else "torch.compile"
    log.warning("stepcache: this %s is already compiled by %s; compiling its original module with these options "
                "instead (the earlier compile is not used by the result)", type(model._orig_mod).__name__, how)
    return model._orig_mod


def _target_device(model: nn.Module, device: Any) -> torch.device:
    """The device the compiled model runs on: ``device``, or where its weights are."""
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"cachepass.compile device={device!r} is invalid; allowed: a torch.device or a string "
                             "such as 'cuda' or 'cuda:1'") from None
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_device_options(options: CompileOptions, device: torch.device) -> None:
    """Options that cannot run on the model's device fail here, not at its first call."""
    if options.form is not Form.PIECEWISE:
        return
    if options.cudagraphs is not None:
        options.cudagraphs_on(device)
    options.check_offload_device(device)


def _raise_recompile_limit(graphs: int, why: str) -> None:
    if graphs > torch._dynamo.config.recompile_limit:
        log.info("stepcache: torch._dynamo.config.recompile_limit %d -> %d (%s)",
                 torch._dynamo.config.recompile_limit, graphs, why)
        torch._dynamo.config.recompile_limit = graphs


def _graphs_of(model: nn.Module) -> int:
    """Dynamo's compiled graphs (cache entries) of ``model``'s forward, for every config and shape in the process."""
    code = getattr(type(model).forward, "__code__", None)
    return len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)) if code is not None else 0


def _with_clear_errors(forward, model: nn.Module, latents: symbolic_latents.SymbolicLatents | None = None,
                       blocks: ChosenBlocks | None = None):
    """``forward`` raising cachepass's own errors as they are, not inside Dynamo's wrapper (whose footer asks
    for a PyTorch bug report), and Dynamo's recompile limit with its cause and fix.

    Dynamo's limit counts the graphs of the model class's forward over every compile: a compile's first
    call gets room for its own graph (nine configs of one class at one shape need nine graphs), its
    further shapes count against the limit (``max_shapes``). ``latents``: marks each call's latents dynamic first.
    ``blocks`` (the default scope): the model runs under its block scope while that lasts, ``forward`` after it.
    """
    first = [True]
    regions = block_regions.block_lists(model) if block_regions.enabled() else ()

    def call(*args, **kwargs):
        nonlocal regions
        if blocks is not None and blocks.active:
            done, out = blocks.call(args, kwargs)
            if done:
                return out
        if latents is not None:
            latents.mark(args, kwargs)
        if first[0]:
            first[0] = False
            graphs = _graphs_of(model)
            if graphs >= torch._dynamo.config.recompile_limit:
                _raise_recompile_limit(graphs + 1, f"a new config of {type(model).__name__}: {graphs} graphs of its "
                                                   "forward exist in this process")
        try:
            if regions:
                try:
                    with block_regions.marked(model, regions), calls_of_compiled_model():
                        return forward(*args, **kwargs)
                except torch._dynamo.exc.TorchDynamoException as error:
                    after_tracing = (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.FailOnRecompileLimitHit)
                    if isinstance(error, after_tracing) and not block_regions.caused_by_a_leaf(error):
                        raise
                    block_regions.refuse(regions, error)  # Dynamo failed tracing: nothing ran yet
                    regions = ()
            with calls_of_compiled_model():
                return forward(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as failed:
            if isinstance(failed.inner_exception, (CachepassError, ValueError)):
                raise failed.inner_exception.with_traceback(None) from None
            raise
        except torch._dynamo.exc.FailOnRecompileLimitHit as hit:
            raise CachepassError(_recompile_limit_message(model)) from hit

    return call


def _recompile_limit_message(model: nn.Module) -> str:
    name = type(model).__name__
    limit = torch._dynamo.config.recompile_limit
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return (f"{name} was called with gradients enabled; stepcache compiles inference graphs: call the model under "
                "torch.no_grad() or torch.inference_mode(), as diffusers pipelines do (Dynamo's recompile limit of "
                f"{limit} graphs was hit tracing this call)")
    return (f"Dynamo's recompile limit (torch._dynamo.config.recompile_limit={limit} graphs per forward) was hit for "
            f"{name}.forward: every input shape of every config compiled for {name} in this process takes a graph of "
            f"its own ({_graphs_of(model)} now). Pass cachepass.compile(..., max_shapes=N) with N >= shapes x configs "
            "(it raises the limit process-wide)")


def _reject_compiler_disabled(model: nn.Module) -> None:
    """A ``torch.compiler.disable``d forward is a graph break: name it before tracing fails on it.

    Also a forward that dispatches to a disabled copy of itself unless the instance's
    ``_compile_forward_enabled`` is set (FastVideo's attention, ``fastvideo.attention.layer``).
    """
    for path, module in model.named_modules():
        forward = module.__dict__.get("forward", type(module).forward)
        if _dispatches_to_disabled(forward) and getattr(module, "_compile_forward_enabled", True) is False:
            raise CachepassError(
                f"{path or 'the model'} ({type(module).__module__}.{type(module).__name__}).forward runs a "
                "torch.compiler.disable'd copy of itself unless the instance's _compile_forward_enabled is set, a graph "
                "break; stepcache needs the whole model in one graph. For FastVideo, call "
                "fastvideo's _enable_regional_attention_compile(transformer) (it sets the flag on the model's attention "
                "modules) or set FASTVIDEO_DISABLE_ATTENTION_COMPILE=0 before the model is built")
        if getattr(forward, "_torchdynamo_disable", False):
            raise CachepassError(
                f"{path or 'the model'} ({type(module).__name__}).forward is wrapped in torch.compiler.disable, "
                "a graph break; stepcache needs the whole model in one graph. Remove the wrapper. FastVideo wraps "
                "its attention unless FASTVIDEO_DISABLE_ATTENTION_COMPILE=0 is set before fastvideo is imported "
                "(or call fastvideo's _enable_regional_attention_compile(transformer) first)"
            )


def _dispatches_to_disabled(forward: Any) -> bool:
    """Whether ``forward`` closes over a ``torch.compiler.disable``d function (a dispatcher that may call it)."""
    cells = getattr(getattr(forward, "__func__", forward), "__closure__", None) or ()
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(value) and getattr(value, "_torchdynamo_disable", False):
            return True
    return False


def stats(model: Any) -> list[UnitStats] | dict[str, list[UnitStats]]:
    """Per cache unit, the cached steps and residual diffs of each CFG stream (reads device state).

    ``model`` is the compiled module (its own compile's state only), the original module (the
    state used last), or a module of an exported program (``program.module()``, its own state).
    A stepcache-compiled module that has not run yet has no units: ``[]``. A pipeline (diffusers',
    FastVideo's, or a FastVideo ``DenoisingStage``) gives each DiT's by its name:
    ``{"transformer": [...], "transformer_2": [...]}``.
    """
    dits = _pipeline_dits(model)
    if dits is not None:
        return {name: stats(dit) for name, dit in dits.items()}
    if hasattr(model, "stepcache_stats"):
        return model.stepcache_stats()
    scoped = _block_scope_of(model)
    if scoped is not None:  # one program per block list, each with its own units
        return [unit for program in scoped.programs for unit in stats(program)]
    exported = ExportedState.of(model)
    if exported is not None:
        return exported.stats()
    states = _scoped_states(model)
    return states[-1].stats() if states else []


def reset(model: Any) -> None:
    """Make the next call start a new generation at step 0 (every compiled shape of ``model``).

    Before the first call there is nothing to reset (the state starts fresh): a no-op. A pipeline resets
    each of its DiTs (its calls begin generations by themselves; this is for a loop run by hand).
    """
    dits = _pipeline_dits(model)
    if dits is not None:
        for dit in dits.values():
            reset(dit)
        return
    if hasattr(model, "stepcache_reset"):
        model.stepcache_reset()
        return
    exported = ExportedState.of(model)
    if exported is not None:
        exported.reset()
        return
    for state in _scoped_states(model):
        state.reset()


def release(model: Any) -> int:
    """Free the device memory ``model``'s CUDA graphs hold (every shape); its next call captures again.

    ``model``: the compiled module, the original one, or a pipeline (its DiT components; diffusers' or
    FastVideo's, or a FastVideo ``DenoisingStage``).

    Graph sets beyond ``$CACHEPASS_MAX_GRAPH_SETS`` per device (8) are dropped least recently
    replayed first without this; a device with no graphs left gives its memory pool back. Returns
    the graph sets dropped (0 before the first call, or without CUDA graphs).
    """
    dits = _pipeline_dits(model)
    if dits is not None:
        return sum(release(dit) for dit in dits.values())
    _require_module("release", model)
    dropped = graph_memory.release({id(state.tensors[0]) for state in states_of(model)})
    log.info("stepcache: released %d CUDA graph set(s) of %s", dropped, type(model).__name__)
    return dropped


def offload_stats(model: Any) -> OffloadStats | None | dict[str, OffloadStats | None]:
    """What offload did for ``model`` (the compiled module or the original one); None before its first call or
    without offload. A pipeline (diffusers', FastVideo's, or a FastVideo ``DenoisingStage``) gives each DiT's by
    component name."""
    dits = _pipeline_dits(model)
    if dits is not None:
        return {name: offload_stats(dit) for name, dit in dits.items()}
    _require_module("offload_stats", model)
    return module_offload_stats(model)


def _require_module(entry: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"cachepass.{entry} expects a compiled module, the original nn.Module, a diffusers pipeline "
                        f"or a FastVideo pipeline or DenoisingStage, got {type(model).__name__}")


def _pipeline_dits(target: Any) -> dict[str, nn.Module] | None:
    """The DiTs of a diffusers pipeline, a FastVideo pipeline or a FastVideo ``DenoisingStage`` by component name;
    None for anything else."""
    if is_pipeline(target):
        return {name: target.components[name] for name in DIT_COMPONENTS if target.components.get(name) is not None}
    if is_fastvideo(target):
        return fastvideo_dits(target)
    return None


def _scoped_states(model: Any) -> list[RuntimeState]:
    """The states a stats / reset call on ``model`` means, least recently used first.

    A module compiled with the stepcache backend, or the original module ``cachepass.compile``
    compiled, has its compile's config: only states of that config count (one model compiled twice
    keeps two scopes; none before the first call). Another original module: all its states, and an
    error if it has none (it was never compiled with stepcache, or never called).
    """
    scoped = _block_scope_of(model)
    if scoped is not None:  # the list programs' states (their config's clock input is the list scope's)
        return [s for s in states_of(model) if s.layout.config == scoped.config]
    options = compile_options(model)
    config = options.config if options is not None else (
        _COMPILED_ORIGINALS.get(model) if isinstance(model, nn.Module) else None)
    if config is None:
        current_state(model)  # raises the "no stepcache state" error if there is none
        return states_of(model)
    return [s for s in states_of(model) if s.layout.config == config]


def _block_scope_of(model: Any) -> block_scope.BlockScope | None:
    """The block scope that runs ``model`` (the original module, or the default compile while its block scope lasts)."""
    chosen = _CHOSEN.get(model) if isinstance(model, nn.Module) else None
    if chosen is not None:
        return chosen.scope if chosen.active else None
    return block_scope.scope_of(model)


def compile_options(model: Any) -> CompileOptions | None:
    """The stepcache options of a ``torch.compile``d module, or None if it is not one."""
    ctx = getattr(model, "dynamo_ctx", None)
    backend = getattr(ctx, "callback", None)
    while backend is not None and not hasattr(backend, "compiler_fn"):
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    if backend is None or backend.compiler_fn is not stepcache:
        return None
    return parse_options(backend.kwargs.get("options"), backend.kwargs.get("mode"))


@dataclasses.dataclass
class Explanation:
    """What the stepcache pass finds in a model for one input signature."""

    units: list[UnitSpec]
    skipped: list[str]
    state_bytes: dict[str, int]
    config: StepCacheConfig
    timestep: TimestepInput | None  # the input that tells steps and generations apart (None: calls are counted)
    plan: Plan  # what the piecewise executor runs per call
    compiles: CompileCount  # pieces and distinct compiled pieces of the piecewise form
    offload: OffloadPlan | None = None  # with ``offload=``: residency and the copies of one generation
    parallel: SequenceParallel | None = None  # context parallel: the ranks every decision is reduced over

    def __str__(self) -> str:
        lines = [f"stepcache: {len(self.units)} cache unit(s)",
                 self.timestep.describe() + " (a timestep that does not decrease starts a new generation)"
                 if self.timestep else "no timestep input: generations are counted in calls"]
        for unit in self.units:
            lines.append(unit.describe())
            lines.append(f"  state  {self.state_bytes[unit.name] / 2**20:.2f} MiB "
                         f"({self.config.num_streams} stream(s))")
        for skipped in self.skipped:
            lines.append(f"not cached: {skipped}")
        if self.parallel is not None:
            lines.append(f"{self.parallel.describe()}: one all-reduce per cache unit per call")
        lines.append(f"piecewise plan ({self.compiles}):")
        lines.append(self.plan.describe("  "))
        if self.offload is not None:
            lines.append(self.offload.describe())
        return "\n".join(lines)


def _piecewise_plan(rewritten: Rewritten) -> tuple[Plan, CompileCount]:
    """The plan the piecewise form would run (pieces are not compiled)."""
    inputs = [example_value(n) for n in rewritten.graph.graph.nodes if n.op == "placeholder"][:-len(rewritten.layout.specs)]
    state = static_example_state(inputs, rewritten.layout, rewritten.units[0].hidden.device)
    compiler = PieceCompiler(lambda piece, piece_inputs, kind: piece.forward)
    _, plan = build_program(rewritten.graph, [*inputs, *state], compiler, {u.name for u in rewritten.units})
    return plan, compiler.count


def capture_graph(model: nn.Module, *args, **kwargs) -> torch.fx.GraphModule:
    """The Dynamo graph of ``model(*args, **kwargs)`` (fullgraph, static shapes), as a backend sees it.

    The call runs once, eagerly; the returned graph is a copy the caller may rewrite.
    """
    return capture(model, args, kwargs).graph


def explain(model: nn.Module, *example_args, config: Any = None, offload: Any = None, cudagraphs: str | None = None,
            sequence_parallel_group: Any = "auto", **example_kwargs) -> Explanation:
    """Trace ``model`` once (it runs eagerly) and report the cache units the pass would build.

    The options are `compile`'s (``config`` defaults to ``StepCacheConfig()``). With ``offload`` (needs
    ``config.num_inference_steps``) it also plans one generation of layerwise offload: which blocks
    stay resident, which copies go when, bytes moved. Calls the threshold decides are planned as
    computed (the most bytes); ``cudagraphs`` other than ``"off"`` plans the captured form (each
    captured stretch loads what it runs).
    """
    dits = _pipeline_dits(model)
    if dits is not None or not isinstance(model, nn.Module):
        which = f"a DiT of the pipeline ({', '.join(dits)})" if dits else "an nn.Module"
        raise TypeError(f"cachepass.explain traces one module with one call's arguments: pass {which}, "
                        f"got {type(model).__name__}")
    given = config is not None
    opts = parse_options({"config": config if given else StepCacheConfig(), "offload": offload,
                          "cudagraphs": cudagraphs or CudaGraphs.OFF.value,
                          "sequence_parallel_group": sequence_parallel_group})
    try:
        rewritten = rewrite(capture_graph(model, *example_args, **example_kwargs), opts.config,
                            sequence_parallel_group=opts.sequence_parallel_group, bind_weights=True)  # as compiled
    except BlockDiscoveryError as error:
        if given:
            raise
        raise BlockDiscoveryError(
            f"{error} (explain used the default StepCacheConfig(), cache-dit's Fn=8 Bn=0, "
            "since no config was given: pass config=StepCacheConfig(num_head_blocks=...))"
        ) from None
    units, layout, discovery = rewritten.units, rewritten.layout, rewritten.discovery
    plan, compiles = _piecewise_plan(rewritten)
    offload_plan = None
    if opts.offload is not None:
        block_bytes, nonblock_bytes = model_bytes(model, [path for u in units for path in u.block_paths])
        residency = choose_residency(units, block_bytes, nonblock_bytes, opts.offload)
        offload_plan = plan_generation(residency, units, opts.config, graphed=opts.cudagraphs is not CudaGraphs.OFF)
    report = Explanation(units, discovery.skipped, {u.name: layout.unit_nbytes(u) for u in units}, opts.config,
                         rewritten.timestep, plan, compiles, offload_plan, discovery.parallel)
    log.debug("%s", report)
    return report

"""The compared setups. Each builds a callable from the workload's model; cached ones report decisions.

cache-dit variants follow its docs and CLI: ``enable_cache`` on the transformer, then either
``torch.compile`` of the whole transformer or ``compile_repeated_blocks()``, both after
``cache_dit.set_compile_configs()`` (its recommended Inductor settings, restored afterwards).
The other variants compile under the run's Inductor settings (``compare.py --inductor-config``):
PyTorch's defaults, or cache-dit's for every variant, to compare like for like.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

import cachepass
from bench.offload import nonblock_bytes
from bench.workloads import Workload


@dataclasses.dataclass
class Context:
    workload: Workload
    model: nn.Module
    config: cachepass.StepCacheConfig
    compile_backend: str
    shared: dict = dataclasses.field(default_factory=dict)  # the decisions the ideal replays


@dataclasses.dataclass
class Prepared:
    fn: Callable
    before_generation: Callable[[], None] = lambda: None
    # per unit: cached steps per stream
    decisions: Callable[[], list[tuple[list[int], list[int]]] | None] = lambda: None
    cleanup: Callable[[], None] = lambda: None


def _compile(ctx: Context, model, mode: str | None = None):
    if mode is not None and ctx.compile_backend != "inductor":
        raise RuntimeError(f"mode={mode!r} needs the inductor backend (got --compile-backend {ctx.compile_backend})")
    return torch.compile(model, backend=ctx.compile_backend, mode=mode, fullgraph=True, dynamic=False)


def eager(ctx: Context) -> Prepared:
    return Prepared(ctx.model)


def _cloning(fn):
    """CUDA-graph outputs are overwritten by the next replay; the CFG loop keeps one across a call."""

    def call(*args, **kwargs):
        return tuple(t.clone() for t in fn(*args, **kwargs))

    return call


def compiled(ctx: Context, mode: str | None = None) -> Prepared:
    fn = _compile(ctx, ctx.model, mode)
    return Prepared(fn if mode is None else _cloning(fn))


def cache_dit_compile_settings() -> Callable[[], None]:
    """Apply ``cache_dit.set_compile_configs()`` (its Dynamo and Inductor settings); returns the undo."""
    import cache_dit

    saved = (torch._dynamo.config.save_config(), torch._inductor.config.save_config())
    cache_dit.set_compile_configs()

    def restore():
        torch._dynamo.config.load_config(saved[0])
        torch._inductor.config.load_config(saved[1])

    return restore


def cache_dit_variant(ctx: Context, compile_how: str | None = None) -> Prepared:
    import cache_dit

    # cache-dit patches the module it caches: run it on a copy, with the original off the device
    # so that peak memory counts one set of weights
    device = next(ctx.model.parameters()).device
    ctx.model.to("cpu")
    model = copy.deepcopy(ctx.model).to(device)
    db, taylor = ctx.config.to_cache_dit()
    cache_dit.enable_cache(model, cache_config=db, calibrator_config=taylor)
    fn: Any = model
    if compile_how is not None:
        # Inductor settings are the run's (--inductor-config), the same for every variant: cache-dit's own
        # set_compile_configs() turns on coordinate-descent tuning, which inflated this variant's cold start
        if compile_how == "whole":
            fn = torch.compile(model, backend=ctx.compile_backend)
        else:
            model.compile_repeated_blocks(backend=ctx.compile_backend)

    def cleanup():
        model.to("cpu")
        ctx.model.to(device)

    return Prepared(fn, lambda: cache_dit.refresh_context(model), lambda: cache_dit_decisions(model), cleanup)


def cache_dit_decisions(model) -> list[tuple[list[int], list[int]]]:
    manager = model._context_manager
    return [(manager.get_context(n).get_cached_steps(), manager.get_context(n).get_cfg_cached_steps())
            for n in model._context_names]


def _rebuild(ctx: Context) -> None:
    """After an offload variant the weights live elsewhere: the next variant gets the model anew (same seed), unless
    every variant has its own copy (``--interleave``)."""
    if ctx.shared.get("own_model_copies"):
        return
    device = ctx.shared["device"]
    ctx.model = None
    torch.cuda.empty_cache()
    ctx.model, _ = ctx.workload.setup(device)


def cache_dit_group_offload(ctx: Context, cache_first: bool = False) -> Prepared:
    """diffusers group offloading (block level, one block per group, prefetch on a stream) + cache-dit: the hooks
    then the cache (the order that cached no step on 2026-11-28), or the cache then the hooks."""
    import cache_dit

    model = ctx.model.to("cpu")
    db, taylor = ctx.config.to_cache_dit()
    if cache_first:
        cache_dit.enable_cache(model, cache_config=db, calibrator_config=taylor)
    model.enable_group_offload(onload_device=ctx.shared["device"], offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    if not cache_first:
        cache_dit.enable_cache(model, cache_config=db, calibrator_config=taylor)
    return Prepared(model, lambda: cache_dit.refresh_context(model), lambda: cache_dit_decisions(model),
                    lambda: _rebuild(ctx))


def stepcache(ctx: Context, inner: str = "inductor", mode: str | None = None, form: str = "piecewise",
              cudagraphs: str | None = None, offload: dict | None = None, glue: str | None = None,
              scope: str | None = None, dynamic: str | None = None) -> Prepared:
    """Outputs need no clone: with CUDA graphs the executor returns copies (see cachepass.cudagraphs.graphed)."""
    fn = cachepass.compile(ctx.model, ctx.config, inner=inner, mode=mode, form=form, cudagraphs=cudagraphs,
                           offload=offload, glue=glue, scope=scope, dynamic=dynamic)

    def decisions():
        return [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(ctx.model)]

    return Prepared(fn, decisions=decisions)


def stepcache_symbolic(ctx: Context) -> Prepared:
    """The default compile called once at another resolution first (two more latent columns of a video latents
    input, or 32 more image tokens of FLUX's packed latents with their position ids): the workload's shape is then
    its second, and the timed generations run the program Dynamo traced with symbolic sizes (Inductor's
    dynamic-shape kernels), against the static program of ``stepcache`` (in a process of its own: `SYMBOLIC`)."""
    prepared = stepcache(ctx)
    compiled, first = prepared.fn, [True]

    def fn(*args, **kwargs):
        if first[0]:
            first[0] = False
            compiled(*args, **_another_resolution(kwargs))  # its own state
        return compiled(*args, **kwargs)

    prepared.fn = fn
    return prepared


def _another_resolution(kwargs: dict) -> dict:
    x, ids = kwargs.get("hidden_states"), kwargs.get("img_ids")
    if x is not None and x.dim() == 5:
        return {**kwargs, "hidden_states": torch.cat([x, x[..., :2]], dim=-1)}
    if x is not None and x.dim() == 3 and ids is not None:  # FLUX: tokens and their ids along the next-to-last dim
        return {**kwargs, "hidden_states": torch.cat([x, x[:, :32]], dim=1),
                "img_ids": torch.cat([ids, ids[..., :32, :]], dim=-2)}
    raise ValueError("stepcache-symbolic needs video latents (hidden_states of 5 dimensions) or FLUX's packed latents "
                     "with img_ids")


def stepcache_offload(ctx: Context, cudagraphs: str | None = None, inner: str = "inductor", glue: str | None = None) -> Prepared:
    """stepcache streaming the blocks that do not fit ``ctx.shared["offload_block_bytes"]`` from pinned host memory."""
    budget = nonblock_bytes(ctx.model, ctx.workload.block_lists) + ctx.shared["offload_block_bytes"]
    on_cpu = {"allow_cpu": True} if ctx.shared["device"].type == "cpu" else {}  # the slot logic with CPU copies: a smoke run
    prepared = stepcache(ctx, inner=inner, cudagraphs=cudagraphs, glue=glue, offload={"budget": budget, **on_cpu})
    prepared.cleanup = lambda: _rebuild(ctx)
    return prepared


def ideal(ctx: Context, mode: str | None = None) -> Prepared:
    """Every computed call on the compiled full model, every cached call on the compiled head-only model."""
    schedule = ctx.shared.get("schedule")
    if schedule is None:
        raise RuntimeError("no cache decisions to replay (stepcache and cache-dit variants both failed)")
    full = _compile(ctx, ctx.model, mode)
    head = _compile(ctx, ctx.workload.head_only(ctx.model), mode)
    if mode is not None:
        full, head = _cloning(full), _cloning(head)
    calls = {"n": 0}

    def dispatch(*args, **kwargs):
        cached = schedule[calls["n"] % len(schedule)]
        calls["n"] += 1
        return (head if cached else full)(*args, **kwargs)

    return Prepared(dispatch, before_generation=lambda: calls.update(n=0), decisions=lambda: ctx.shared.get("decisions"))


def remember_decisions(ctx: Context, decisions: list[tuple[list[int], list[int]]]) -> None:
    """Keep the first cached variant's decisions: the ideal replays them call by call."""
    if "schedule" not in ctx.shared:
        ctx.shared["decisions"] = decisions
        ctx.shared["schedule"] = call_schedule(decisions, ctx.workload.num_steps, ctx.workload.streams)


def call_schedule(decisions: list[tuple[list[int], list[int]]], num_steps: int, streams: int) -> list[bool]:
    """Per transformer call of a generation (conditional first): cached in every unit?"""
    schedule = []
    for step in range(num_steps):
        for stream in range(streams):
            schedule.append(all(step in unit[stream] for unit in decisions))
    return schedule


SYMBOLIC = ("stepcache-symbolic", "stepcache-dynamic-latents")  # variants whose programs have symbolic sizes


def shared_program_conflict(names: list[str]) -> str | None:
    """Why ``names`` cannot run in one process, or None. Dynamo keeps a frame's compiled programs per code object and
    runs the first whose guards pass, so every stepcache variant's model of one class shares the programs of the
    others (a block list's program is `cachepass.block_scope`'s runner's frame whatever the model). A program with
    symbolic sizes passes the guards of every shape: once a `SYMBOLIC` variant has compiled, the other stepcache
    variants' calls would run it, and their rows would time its kernels under their names."""
    symbolic = [n for n in names if n in SYMBOLIC]
    others = [n for n in names if n.startswith("stepcache") and n not in SYMBOLIC]
    if symbolic and (others or len(symbolic) > 1):
        return (f"--variants: {', '.join(symbolic)} compile(s) a program with symbolic sizes, which Dynamo would also "
                f"run for {', '.join(others + symbolic[1:])} in this process (one class's compiled programs are "
                f"shared); run each in a process of its own, e.g. --variants {symbolic[0]},cache-dit+compiled-blocks")
    return None


VARIANTS: dict[str, Callable[[Context], Prepared]] = {
    "eager": eager,
    "compile": compiled,
    "compile-reduce-overhead": lambda ctx: compiled(ctx, "reduce-overhead"),
    "cache-dit": cache_dit_variant,
    "cache-dit+compile": lambda ctx: cache_dit_variant(ctx, "whole"),
    "cache-dit+compiled-blocks": lambda ctx: cache_dit_variant(ctx, "blocks"),
    "stepcache": stepcache,  # the default: on CUDA, conditional CUDA graphs
    "stepcache-no-graphs": lambda ctx: stepcache(ctx, cudagraphs="off"),
    "stepcache-blocks": lambda ctx: stepcache(ctx, scope="blocks"),  # each block list compiled alone (cachepass.block_scope)
    "stepcache-model": lambda ctx: stepcache(ctx, scope="model"),  # the whole model's program
    "stepcache-symbolic": stepcache_symbolic,  # the default at its second shape: the program with symbolic sizes
    # the latents' sizes symbolic from the first call (cachepass.symbolic_latents): a new resolution needs no compile
    "stepcache-dynamic-latents": lambda ctx: stepcache(ctx, dynamic="latents"),
    # the glue pieces' compiler set (the default: as traced under Inductor, cachepass.options.CompileOptions.default_glue)
    "stepcache-glue-inductor": lambda ctx: stepcache(ctx, glue="inductor"),
    "stepcache-glue-aot_eager": lambda ctx: stepcache(ctx, glue="aot_eager"),
    "stepcache-glue-eager": lambda ctx: stepcache(ctx, glue="eager"),
    "stepcache-one-graph": lambda ctx: stepcache(ctx, form="one-graph"),
    "stepcache-piecewise-graphs": lambda ctx: stepcache(ctx, cudagraphs="piecewise"),
    "stepcache-conditional": lambda ctx: stepcache(ctx, cudagraphs="conditional"),
    "stepcache-aot_eager": lambda ctx: stepcache(ctx, inner="aot_eager"),
    "stepcache-eager": lambda ctx: stepcache(ctx, inner="eager"),
    "stepcache-offload": stepcache_offload,
    "stepcache-offload-piecewise": lambda ctx: stepcache_offload(ctx, cudagraphs="piecewise"),
    "stepcache-offload-conditional": lambda ctx: stepcache_offload(ctx, cudagraphs="conditional"),
    "stepcache-offload-aot_eager": lambda ctx: stepcache_offload(ctx, inner="aot_eager"),
    "stepcache-offload-glue-inductor": lambda ctx: stepcache_offload(ctx, glue="inductor"),
    "cache-dit+group-offload": cache_dit_group_offload,  # hooks, then cache
    "cache-dit-first+group-offload": lambda ctx: cache_dit_group_offload(ctx, cache_first=True),
    "ideal": ideal,
    "ideal-reduce-overhead": lambda ctx: ideal(ctx, "reduce-overhead"),
}

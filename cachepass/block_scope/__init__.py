"""``cachepass.compile(model, config, scope="blocks")``: compile each block list, not the whole model.

Regional compile's scope: the model-level code (patch embedding, timestep and text embedders, the output head)
runs as it is, and each block list of two or more blocks of one class runs as one program `cachepass.compile`
makes from a `ListRunner` over it, with the list's cache unit, its clock and its CUDA graphs. Dynamo then traces one
block of the list (the others are leaves, `cachepass.block_regions`) and nothing of the model-level code, whose
trace cost a whole-model compile a warm start's and every new shape's 0.5-0.65 s (CPU, 30-block Wan; bench/NOTES.md).

How a list is reached: each block's ``_compiled_call_impl`` (torch's own slot for a module's replaced call, which
``nn.Module.compile`` and so regional compile fill) routes the model's call of the block here. The first block's
call runs the list's program; each later block's call checks that the model's loop fed it what the block before
returned, as it fed the first call (`feeding.check`). The last block's call returns the list's result, the others
placeholders of its layout with no data (`feeding.HandedOn`: any use of them but handing them on is named, so a loop
that keeps each block's output is never given wrong values). The first call of an argument
structure runs the first block as it is and learns the feeding (`feeding.learn`) from the objects the loop hands on,
then the program. A forward pre-hook
on the model hands each program the inputs the clock reads (the model's timestep and latents arguments, found as
the whole-model compile finds them); a forward hook checks that every list that began also ended.

What the model gives up against ``scope="model"``: CUDA graphs and compiled code around the model-level code
(a launch per kernel of it per call), and the one-graph export (`cachepass.export` traces the whole model either way).
Offload needs the whole model's program, and context parallel is not verified with it: both are refused.
``cachepass.compile`` with no scope takes this one where it fits (`cachepass.block_scope.chosen`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import threading
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn

from cachepass import block_regions
from cachepass.analysis.timestep import AUTO_NAMES, LATENT_NAMES
from cachepass.block_scope import replaced
from cachepass.block_scope.feeding import Feeding, as_outputs, check, handed_on, learn, structure
from cachepass.block_scope.runner import ListRunner
from cachepass.config import StepCacheConfig
from cachepass.errors import BlockScopeUnfitError, CachepassError
from cachepass.symbolic_latents import mark_every_size

log = logging.getLogger(__name__)

_SCOPES: "weakref.WeakKeyDictionary[nn.Module, BlockScope]" = weakref.WeakKeyDictionary()


def scope_of(model: Any) -> BlockScope | None:
    """The block scope ``cachepass.compile(model, ..., scope="blocks")`` gave ``model``, or None."""
    return _SCOPES.get(model) if isinstance(model, nn.Module) else None


def compile_block_lists(model: nn.Module, config: StepCacheConfig,
                        compile_runner: Callable[[nn.Module, StepCacheConfig], nn.Module],
                        symbolic_sizes: bool = False, only_entered: bool = False) -> nn.Module:
    """``model`` with each block list run by a program ``compile_runner(runner, runner_config)`` makes; returns it.
    ``symbolic_sizes`` (``dynamic="latents"``): every size of each program's inputs symbolic from its first call
    (`cachepass.symbolic_latents.mark_every_size`). ``only_entered``: see `BlockScope`.

    Compiling a model again replaces its earlier scope.
    """
    remove(model)
    lists = trunk_lists(model)
    _check_uncompiled(lists)
    clock = ClockInputs.of_model(model, config)
    runner_config = dataclasses.replace(config, timestep_input=clock.runner_timestep_input)
    scope = BlockScope(clock, runner_config, [ListScope(path, blocks, runner_config, compile_runner, symbolic_sizes)
                                              for path, blocks in lists.items()], only_entered)
    scope.attach(model)
    _SCOPES[model] = scope
    log.info("stepcache: scope='blocks': %s compiled as %d program(s), the model-level code runs as it is; %s",
             ", ".join(s.path for s in scope.lists), len(scope.lists), clock.describe())
    return model


def trunk_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The block lists the whole-model compile makes cache units of, by path: the shallowest lists of two or more
    blocks of one class (`cachepass.analysis.blocks`; HunyuanVideo's text-refiner blocks, deeper, run as they are)."""
    paths = {id(m): path for path, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    found = {paths[id(blocks)]: blocks for _, blocks in block_regions.block_lists(model, with_refused=True)}
    if not found:
        raise BlockScopeUnfitError(f"scope='blocks': {type(model).__name__} has no list of two or more blocks of one class "
                                   "(an nn.ModuleList); scope='model' finds blocks in the traced graph")
    depth = min(path.count(".") for path in found)
    for path, blocks in found.items():
        if path.count(".") > depth:
            log.info("stepcache: scope='blocks': %s (%d x %s) is nested below the trunk: it runs as it is", path,
                     len(blocks), type(blocks[0]).__name__)
    return {path: blocks for path, blocks in found.items() if path.count(".") == depth}


def _check_uncompiled(lists: dict[str, nn.ModuleList]) -> None:
    """Raise unless every block of ``lists`` is uncompiled (the scope fills each block's compiled-call slot)."""
    for path, blocks in lists.items():
        compiled = [index for index, block in enumerate(blocks) if block._compiled_call_impl is not None]
        if compiled:
            raise BlockScopeUnfitError(f"scope='blocks': {path}.{compiled[0]} is compiled already (nn.Module.compile, "
                                       "regional compile); compile the model from its uncompiled blocks")


def remove(model: nn.Module) -> None:
    """Undo `compile_block_lists` on ``model`` (nothing if it has no block scope)."""
    scope = _SCOPES.pop(model, None)
    if scope is not None:
        scope.detach()
        log.info("stepcache: the block scope of %s is removed", type(model).__name__)


@dataclasses.dataclass(frozen=True)
class ClockInputs:
    """Which of the model's forward arguments the clock reads: the timestep and the latents."""

    signature: inspect.Signature
    timestep: str | None
    latents: str | None
    runner_timestep_input: str | None  # `StepCacheConfig.timestep_input` of the list programs

    @classmethod
    def of_model(cls, model: nn.Module, config: StepCacheConfig) -> ClockInputs:
        signature = inspect.signature(model.forward)
        names = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        wanted = config.timestep_input
        if wanted is None:
            timestep = None
        elif wanted == "auto":
            timestep = next((n for n in AUTO_NAMES if n in names), None)
        elif wanted in names:
            timestep = wanted
        else:
            raise CachepassError(f"StepCacheConfig.timestep_input={wanted!r} is not an argument of "
                                 f"{type(model).__name__}.forward; its arguments are {names} (or use 'auto', or None "
                                 "to count calls)")
        latents = next((n for n in LATENT_NAMES if n in names and n != timestep), None)
        runner = None if timestep is None else ("auto" if wanted == "auto" else "timestep")
        return cls(signature, timestep, latents, runner)

    def values(self, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """The call's timestep and latents (None where the model has no such argument, or the call gives none)."""
        try:
            given = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return None, None  # the model's forward raises its own error
        timestep = given.get(self.timestep) if self.timestep else None
        if timestep is not None and not isinstance(timestep, torch.Tensor):
            raise BlockScopeUnfitError(f"scope='blocks': the clock reads the argument {self.timestep!r}, and this call passes "
                                       f"a {type(timestep).__name__}; pass a tensor (a Python number would compile a program "
                                       "per value), or StepCacheConfig(timestep_input=None) to count calls")
        latents = given.get(self.latents) if self.latents else None
        return timestep, latents if isinstance(latents, torch.Tensor) else None

    def describe(self) -> str:
        if self.timestep is None:
            return "no timestep argument: the clock counts calls"
        return f"the clock reads {self.timestep}" + (f" and {self.latents}" if self.latents else "")


class BlockScope:
    """A model's block lists, each run by its program, and the model hooks that bracket each call. ``only_entered``:
    only calls made within `entered` (the default scope's, through the module `cachepass.compile` returned); the
    model called as it is then runs its blocks as they are."""

    def __init__(self, clock: ClockInputs, config: StepCacheConfig, lists: list[ListScope], only_entered: bool = False):
        self.clock_inputs, self.config, self.lists = clock, config, lists  # config: the list programs'
        self.only_entered = only_entered
        self._entered = threading.local()  # .on: this thread's call is within `entered`
        self._hooks: list = []

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        outer, self._entered.on = getattr(self._entered, "on", False), True
        try:
            yield
        finally:
            self._entered.on = outer

    @property
    def programs(self) -> list[nn.Module]:
        return [s.compiled for s in self.lists]

    def attach(self, model: nn.Module) -> None:
        self._hooks = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                       model.register_forward_hook(self._end, with_kwargs=True)]
        for s in self.lists:
            s.attach()

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for s in self.lists:
            s.detach()

    def _begin(self, _model, args, kwargs) -> None:
        if torch.compiler.is_compiling():  # the whole model traced (export, explain): it sees the plain blocks
            return
        if self.only_entered and not getattr(self._entered, "on", False):
            return
        clock = self.clock_inputs.values(args, kwargs)
        for s in self.lists:
            s.begin(clock)

    def _end(self, _model, _args, _kwargs, _output) -> None:
        if torch.compiler.is_compiling():
            return
        for s in self.lists:
            s.end()


@dataclasses.dataclass
class _Call:
    """One model call's pass over a list."""

    clock: tuple[Any, Any]
    next: int = 0  # the block expected next
    first: tuple[tuple, dict] | None = None  # the first block's arguments
    previous: tuple = ()  # what the block before returned (as a tuple)
    result: Any = None  # the list's result, from its program (the last block's call returns it)
    handed: Any = None  # `HandedOn` placeholders of its layout (the other blocks' calls return them)
    learning: bool = False  # the first call of this argument structure: its feeding is being learned
    feeding: Feeding | None = None  # the feeding: learned so far, or the one the program was made for
    running: bool = False  # the list's program is running (its own calls of the blocks are theirs)
    first_returned_tuple: bool = False  # the first block returned a tuple (not one tensor)


class ListScope:
    """One block list: its program, the feedings learned, and each thread's call in progress (two threads calling
    the model at once meet the program's own check: one state serves one call at a time)."""

    def __init__(self, path: str, blocks: nn.ModuleList, config: StepCacheConfig,
                 compile_runner: Callable[[nn.Module, StepCacheConfig], nn.Module], symbolic_sizes: bool = False):
        self.path, self.blocks, self.symbolic_sizes = path, blocks, symbolic_sizes
        self.feedings: dict[tuple, Feeding] = {}
        self.runner = ListRunner(path.replace(".", "_"), blocks, self.feedings)
        self.compiled = compile_runner(self.runner, config)
        self.leaves = block_regions.leaf_count(blocks)  # blocks 1.. the compile marked as leaves: what a chain takes
        self._attached: list[nn.Module] = []  # the blocks at `attach`: the ones the program was made for
        self.changed: str | None = None  # the first module set in the list since `attach` (`replaced.watch`)
        self._calls = threading.local()  # .call: this thread's `_Call`

    @property
    def _call(self) -> _Call | None:
        return getattr(self._calls, "call", None)

    @_call.setter
    def _call(self, call: _Call | None) -> None:
        self._calls.call = call

    def attach(self) -> None:
        self._attached, self.changed = list(self.blocks), None
        for index, block in enumerate(self._attached):
            block._compiled_call_impl = functools.partial(self.block_called, index)
        replaced.watch(self, ((f"{self.path}.{p}" if p else self.path, m) for p, m in self.blocks.named_modules()))

    def detach(self) -> None:
        replaced.unwatch(self)
        for block in self._attached:
            block._compiled_call_impl = None

    def begin(self, clock: tuple[Any, Any]) -> None:
        if self.changed is not None or len(self.blocks) != len(self._attached):
            self._refuse_changed_modules()
        self._call = _Call(clock)

    def _refuse_changed_modules(self) -> None:
        """A module set in the list after the compile (a block replaced or added, a submodule of a block replaced:
        `cachepass.block_scope.replaced`), or a block removed: the program and the blocks' marks were made for the
        modules the list had (another block or submodule would run the first block's code). Weights replaced are read
        at each call (`cachepass.leaf_weights`)."""
        if self.changed is not None:
            change = f"{self.changed} was set after the compile"
        else:
            change = f"{self.path} has {len(self.blocks)} blocks, {len(self._attached)} at the compile"
        raise BlockScopeUnfitError(f"scope='blocks': {change}; the list's program was made for the modules it had. "
                                   "Compile the model again, or use scope='model' (it compiles for new modules)")

    def end(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.next not in (0, len(self.blocks)):
            raise BlockScopeUnfitError(f"scope='blocks': the model ran {self.path}.0 to {self.path}.{call.next - 1} of "
                                       f"{len(self.blocks)} blocks; scope='blocks' runs a whole list as one program. "
                                       "scope='model' compiles a model that skips blocks")

    def block_called(self, index: int, *args, **kwargs):
        block = self.blocks[index]
        call = self._call
        if call is None or call.running or torch.compiler.is_compiling():  # not the model's loop: the block itself
            return block._call_impl(*args, **kwargs)
        path = f"{self.path}.{index}"
        if index != call.next:
            raise BlockScopeUnfitError(f"scope='blocks': {path} was called where {self.path}.{call.next} was due; a list's "
                                       "blocks must run in order, each once per call. scope='model' compiles this model")
        call.next += 1
        if index == 0:
            call.first = (args, kwargs)
            call.feeding = self.feedings.get(structure(args, kwargs))
            if call.feeding is None:
                call.learning = True
                out = block._call_impl(*args, **kwargs)
                call.previous, call.first_returned_tuple = as_outputs(out, path), isinstance(out, tuple)
                return out
            self._run(call)
            return call.handed
        if call.learning:
            return self._learn(call, index, path, args, kwargs)
        check(call.feeding, path, args, kwargs, call.previous, call.first)
        return call.result if index == len(self.blocks) - 1 else call.handed

    def _learn(self, call: _Call, index: int, path: str, args: tuple, kwargs: dict):
        """A later block of the first call of an argument structure: it learns how the loop fed it. It returns
        placeholders of the first block's output layouts without running (`HandedOn`: the loop only hands them on,
        `learn` checks it at the next block), and the last one returns the program's result."""
        feeding = learn(path, args, kwargs, call.previous, call.first)
        if call.feeding is not None and feeding != call.feeding:
            raise BlockScopeUnfitError(f"scope='blocks': {path} is fed other outputs of the block before it than "
                                       f"{self.path}.1 was; scope='model' compiles this model")
        call.feeding = feeding
        if index < len(self.blocks) - 1:
            call.previous = handed_on(call.previous, self.path)
            return call.previous if call.first_returned_tuple else call.previous[0]
        self.feedings[feeding.structure] = feeding
        log.info("stepcache: scope='blocks': %s feeds %s of each block's outputs to the next block's arguments %s",
                 self.path, [index for _, index in feeding.fed], [key for key, _ in feeding.fed])
        call.learning = False
        self._run(call)
        return call.result

    def _run(self, call: _Call) -> None:
        args, kwargs = call.first
        hooked = _hooks_run(itertools.islice(self.blocks, 1, None))  # not blocks[1:]: a new ModuleList, 80 us a call
        chained = 0 if hooked else self.leaves
        if self.runner.chained != chained:  # a guarded value: the program made for the other is compiled
            log.info("stepcache: scope='blocks': %s: %d block(s) after the first run as one leaf (%s)", self.path,
                     chained, "blocks after the first have hooks" if hooked else "blocks alike")
            self.runner.chained = chained
        call.running = True
        if self.symbolic_sizes:
            mark_every_size((args, kwargs, call.clock))
        try:
            call.result, _, _ = self.compiled(tuple(args), dict(kwargs), *call.clock)
        finally:
            call.running = False
        call.handed = handed_on(as_outputs(call.result, self.path), self.path)
        call.previous = call.handed
        if not isinstance(call.result, tuple):
            call.handed = call.handed[0]


def _hooks_run(blocks) -> bool:
    """Whether calling any of ``blocks`` runs hooks (as `nn.Module._call_impl` finds them): its own or every module's."""
    every = torch.nn.modules.module
    if (every._global_forward_hooks or every._global_forward_pre_hooks or every._global_backward_hooks
            or every._global_backward_pre_hooks):
        return True
    return any(b._forward_hooks or b._forward_pre_hooks or b._backward_hooks or b._backward_pre_hooks for b in blocks)

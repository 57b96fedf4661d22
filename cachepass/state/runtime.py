"""The cache state of each model instance at run time, and the ``stats`` / ``reset`` API.

`StateSet` picks, per call of a compiled graph, the `RuntimeState` of the model instance that runs
it (found through one of its parameters); the state's tensors follow `cachepass.state.layout`. Calls
that do not fit the config set sticky `Mismatch` bits in ``clock.report``; the host reads them without
a sync (a non-blocking copy checked on a later call) and warns once per state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn

from cachepass.errors import CachepassError
from cachepass.state.layout import Mismatch, StateLayout, mismatch_messages
from cachepass.state.sizes import SizeSymbols

log = logging.getLogger(__name__)

DEVICE_REPORT_EVERY = 8  # calls per non-blocking read of the mismatch report on an accelerator


_TICK = itertools.count(1)


class RuntimeState:
    """The state tensors of one model instance for one state layout, plus host-side bookkeeping.

    Shared by every compiled graph with the same layout (a recompile for another dispatch key,
    or the two prompt lengths of a model that carries no text state), so a generation continues
    across them. Freed with the model: the registry drops it when its anchor parameter dies.
    """

    def __init__(self, layout: StateLayout, device: torch.device, anchor_id: int | None, graph=None, plan=None,
                 on_reset: Callable[["RuntimeState"], None] = lambda state: None):
        self.layout = layout
        self.tensors = [spec.allocate(device) for spec in layout.specs]
        self.graph = graph  # the rewritten GraphModule that made it, for inspection
        self.plan = plan  # the piecewise executor's plan (None: the one-graph form)
        self.last_used = 0
        self.mid_pair = False  # separate CFG: the first call of a step ran, its partner is due
        self.anchor_id = anchor_id
        self.reported: dict[Mismatch, str] = {}  # mismatch -> its message when first seen
        self.on_reset = on_reset  # tells the program's features (offload) that a generation starts
        self.num_steps = layout.config.num_inference_steps  # the host's copy of schedule.num_steps (None: unknown)
        if _GENERATION.steps is not None:  # made during a pipeline call that set the step count
            self.set_steps(_GENERATION.steps.get(anchor_id, self.num_steps))
        self._busy = threading.Lock()
        self._report = _ReportReader(self["clock.report"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.layout.index[name]]

    @contextlib.contextmanager
    def one_call_at_a_time(self):
        """A call of this state; another call entering meanwhile (a second thread) is an error, not a wrong result."""
        if not self._busy.acquire(blocking=False):
            raise CachepassError(
                "stepcache: this model was called while another call of it was running (two threads, or two "
                "generations at once): its cache state follows one generation at a time, and the calls of two "
                "would be taken for one. Give each thread its own model instance (compile a copy)")
        try:
            yield
        finally:
            self._busy.release()

    def before_call(self) -> None:
        """Host-side bookkeeping of one call (no device sync)."""
        self.last_used = next(_TICK)
        self._warn_new_mismatches(self._report.latest())
        if not self.layout.config.separate_cfg:
            return
        previous = _LAST_CALLED.get(self.anchor_id) if self.anchor_id is not None else None
        previous = previous() if previous is not None else None
        if previous is not None and previous is not self and previous.mid_pair:
            self._check_cfg_partner(previous)
        self.mid_pair = not self.mid_pair
        if self.anchor_id is not None:
            _LAST_CALLED[self.anchor_id] = weakref.ref(self)

    def after_call(self) -> None:
        self._report.post()

    def _check_cfg_partner(self, previous: "RuntimeState") -> None:
        """The previous call began a CFG pair in another state: a new resolution, or CFG calls of different shapes."""
        previous.mid_pair = False
        hidden = [u.hidden.shape for u in self.layout.units]
        if [u.hidden.shape for u in previous.layout.units] != hidden:
            log.info("stepcache: a call at a new resolution (%s) followed an unpaired CFG call; "
                     "the new shape starts its own generation", hidden)
            return
        differing = sorted(
            f"{a.name} {list(a.shape)} vs {list(b.shape)}"
            for a, b in zip(previous.layout.specs, self.layout.specs) if a.shape != b.shape
        )
        raise CachepassError(
            "separate_cfg=True, but the two CFG calls of one step have inputs of different shapes, so they ran "
            f"different compiled graphs whose carried state differs ({'; '.join(differing) or 'other units'}): "
            "e.g. prompt embeddings of different lengths. Give both calls the same shapes (pad the embeddings), "
            "or call cachepass.reset(model) if the previous generation was abandoned after an odd call"
        )

    def _warn_new_mismatches(self, report: list[int] | None) -> None:
        if report is None:
            return
        for flag, message in mismatch_messages(report, self.num_steps).items():
            if flag not in self.reported:
                self.reported[flag] = message
                log.warning("stepcache: %s", message)

    def warnings(self) -> list[str]:
        """Every mismatch seen so far, as first reported (reads the device state)."""
        self._warn_new_mismatches(self["clock.report"].tolist())
        return [self.reported[flag] for flag in Mismatch if flag in self.reported]

    def reset(self) -> None:
        """Start a new generation at the next call (the graph clears the per-stream state then).

        Also clears a rank divergence: if the other ranks reset too, they are back in step.
        """
        self["clock.calls"].zero_()
        self["clock.report"][0] &= ~int(Mismatch.RANKS_DIVERGED)
        self.reported.pop(Mismatch.RANKS_DIVERGED, None)
        self._report.discard()  # a copy posted before the reset still holds the bit
        self.mid_pair = False
        self.on_reset(self)

    def set_steps(self, num_steps: int | None) -> None:
        """The step count of the generations from now on (None: unknown); ``schedule.num_steps`` in place."""
        if num_steps != self.num_steps:
            self["schedule.num_steps"].fill_(num_steps or 0)
            self.num_steps = num_steps

    def stats(self) -> list["UnitStats"]:
        warnings = self.warnings()
        if Mismatch.RANKS_DIVERGED in self.reported:
            raise CachepassError(f"stepcache: no stats: {self.reported[Mismatch.RANKS_DIVERGED]}")
        return read_stats(self.__getitem__, [(u.index, u.name) for u in self.layout.units],
                          self.layout.config.num_streams, self.layout.capacity, warnings)


def read_stats(read, units: list[tuple[int, str]], streams: int, capacity: int,
               warnings: list[str]) -> list["UnitStats"]:
    """Per cache unit (index, name), its `UnitStats` from the state tensors ``read(name)`` returns."""
    fresh = int(read("clock.calls").item()) == 0
    found = []
    for index, name in units:
        flags = read(f"u{index}.cached_flags").cpu()
        diffs = read(f"u{index}.diffs").cpu()
        per_stream = []
        for s in range(streams):
            if fresh:
                per_stream.append(([], {}))
                continue
            cached = [t for t in range(capacity) if bool(flags[s, t])]
            recorded = {str(t): float(diffs[s, t]) for t in range(capacity) if not math.isnan(float(diffs[s, t]))}
            per_stream.append((cached, recorded))
        cfg_cached, cfg_diffs = per_stream[1] if len(per_stream) > 1 else ([], {})
        found.append(UnitStats(name=name, cached_steps=per_stream[0][0], residual_diffs=per_stream[0][1],
                               cfg_cached_steps=cfg_cached, cfg_residual_diffs=cfg_diffs, warnings=warnings))
    return found


class _ReportReader:
    """Reads ``clock.report`` without a host sync: a non-blocking copy after a call, read once it landed.

    On an accelerator the copy and its event cost several microseconds of host time per call, so
    one call in `DEVICE_REPORT_EVERY` posts one (bookkeeping per call: bench/clock_check.py); warnings come that
    many calls late at most (``stats`` reads the state itself). On the CPU the graph has finished when the
    call returns: read directly.
    """

    def __init__(self, report: torch.Tensor):
        self.report = report
        self.on_device = report.device.type != "cpu"
        self.host = torch.empty(report.shape, dtype=report.dtype, pin_memory=self.on_device)
        self.copied = torch.Event(device=report.device) if self.on_device else None
        self.posted = False
        self.calls = 0

    def post(self) -> None:
        self.calls += 1
        if self.on_device:
            if self.posted or self.calls % DEVICE_REPORT_EVERY:
                return
            self.host.copy_(self.report, non_blocking=True)
            self.copied.record()
        self.posted = True

    def discard(self) -> None:
        """Forget a posted copy not read yet (the report changed on the host since)."""
        self.posted = False

    def latest(self) -> list[int] | None:
        """The report as of the last posted call, if it has landed (never waits)."""
        if not self.posted or (self.on_device and not self.copied.query()):
            return None
        self.posted = False
        return (self.host if self.on_device else self.report).tolist()


class StateSet:
    """Picks, per call of one compiled graph, the state of the model instance that runs it.

    Dynamo reuses a graph for every instance of a model class (parameters are graph inputs), so
    the state is picked per call by the identity of a parameter argument: two transformers of one
    class (Wan 2.2's two experts) each get their own cache state. Graphs with equal layouts share
    the instance's state (see `RuntimeState`).
    """

    def __init__(self, layout: StateLayout, device: torch.device, anchor_index: int | None, graph, plan=None,
                 on_reset: Callable[[RuntimeState], None] = lambda state: None, sizes: SizeSymbols | None = None):
        self.layout, self.device, self.anchor_index, self.graph = layout, device, anchor_index, graph
        self.plan, self.on_reset = plan, on_reset  # the piecewise executor's plan (None: one graph), reset listener
        self.sizes = sizes  # a symbolic layout: where the call's sizes are read (`cachepass.state.sizes`)
        if layout.symbols and sizes is None:
            raise ValueError("a state layout with symbolic sizes needs the SizeSymbols that read them")
        self._concrete: dict[tuple[int, ...], tuple[int, StateLayout]] = {}  # sizes -> (key, layout)
        self._single: dict[int, RuntimeState] = {}  # key -> the state, for a graph with no parameter input

    def layout_for(self, args) -> tuple[int, StateLayout]:
        """The layout of a call's state and its number (graphs with equal layouts share states)."""
        values = self.sizes.values(args) if self.sizes is not None else ()
        found = self._concrete.get(values)
        if found is None:
            layout = self.layout.concrete(self.sizes, values) if self.sizes is not None else self.layout
            found = self._concrete[values] = (_LAYOUT_NUMBERS.setdefault((layout.key, str(self.device)),
                                                                         len(_LAYOUT_NUMBERS)), layout)
        return found

    def for_call(self, args) -> RuntimeState:
        key, layout = self.layout_for(args)
        if self.anchor_index is None:
            if key not in self._single:
                self._single[key] = RuntimeState(layout, self.device, None, self.graph, self.plan, self.on_reset)
            return self._single[key]
        anchor = args[self.anchor_index]
        entry = _REGISTRY.get(id(anchor))
        if entry is None or entry.anchor() is not anchor:
            entry = _REGISTRY[id(anchor)] = _AnchorStates(anchor)
        state = entry.states.get(key)
        if state is None:
            state = entry.states[key] = RuntimeState(layout, self.device, id(anchor), self.graph, self.plan,
                                                     self.on_reset)
        return state


@dataclasses.dataclass
class UnitStats:
    """Per cache unit, the fields of cache-dit's ``CacheStats`` for the current (or last) generation.

    ``cached_steps`` / ``residual_diffs`` belong to the conditional stream, ``cfg_*`` to the
    unconditional one (empty without separate CFG). Diffs are keyed by ``str(step)`` as in cache-dit.
    ``warnings`` lists the `Mismatch` messages seen by this state (the same for every unit).
    """

    name: str
    cached_steps: list[int]
    residual_diffs: dict[str, float]
    cfg_cached_steps: list[int]
    cfg_residual_diffs: dict[str, float]
    warnings: list[str] = dataclasses.field(default_factory=list)  # calls that did not fit the config


# ---------------------------------------------------------------------------- registry
class _AnchorStates:
    """The states of one model instance, keyed by layout; dropped when the anchor parameter dies."""

    def __init__(self, anchor: torch.Tensor):
        self.anchor = weakref.ref(anchor)
        self.states: dict[int, RuntimeState] = {}  # StateSet.layout_for key -> state
        weakref.finalize(anchor, _drop_anchor, id(anchor), self)


def _drop_anchor(anchor_id: int, entry: _AnchorStates) -> None:
    if _REGISTRY.get(anchor_id) is entry:
        del _REGISTRY[anchor_id]
    _LAST_CALLED.pop(anchor_id, None)


_LAYOUT_NUMBERS: dict[tuple, int] = {}  # (layout key, device) -> a number, for StateSet.layout_for

# Compiled graphs are found from the model through one of its parameters (the backend never sees
# the module object): anchor id -> the states of that model instance.
_REGISTRY: dict[int, _AnchorStates] = {}
_LAST_CALLED: dict[int, weakref.ref] = {}  # anchor id -> state of the graph that ran last


class _Generation(threading.local):
    steps: dict[int, int | None] | None = None  # anchor id -> step count, during a pipeline call


_GENERATION = _Generation()


@contextlib.contextmanager
def pipeline_generation(counts: dict[nn.Module, int | None]):
    """A pipeline call: each module's states start a generation of ``counts[module]`` steps, as do those made
    during the call; afterwards, the config's count again (a call outside the pipeline, e.g. through
    ``from_pipe``, is not its continuation: an interrupted call is not reported as a short generation)."""
    by_anchor = {id(p): steps for module, steps in counts.items() for p in itertools.chain(module.parameters(),
                                                                                            module.buffers())}
    for module, steps in counts.items():
        for state in states_of(module):
            state.reset()
            state.set_steps(steps)
    outer, _GENERATION.steps = _GENERATION.steps, by_anchor
    try:
        yield
    finally:
        _GENERATION.steps = outer
        for module in counts:
            for state in states_of(module):
                state.set_steps(state.layout.config.num_inference_steps)


def states_of(model: Any) -> list[RuntimeState]:
    """Every live stepcache state of ``model`` (compiled module or original), least recently used first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected the compiled module or the original nn.Module, got {type(model).__name__}")
    found = []
    for param in itertools.chain(model.parameters(), model.buffers()):
        entry = _REGISTRY.get(id(param))
        if entry is not None and entry.anchor() is param:
            found.extend(s for s in entry.states.values() if s not in found)
    return sorted(found, key=lambda s: s.last_used)


def drop_states(model: nn.Module) -> None:
    """Forget every state of ``model`` (a program no longer called: stats and resets then skip it)."""
    for param in itertools.chain(model.parameters(), model.buffers()):
        entry = _REGISTRY.get(id(param))
        if entry is not None and entry.anchor() is param:
            _drop_anchor(id(param), entry)


def current_state(model: Any) -> RuntimeState:
    """The most recently used state of ``model``."""
    states = states_of(model)
    if not states:
        raise CachepassError(
            f"{type(model).__name__} has no stepcache state: compile it with "
            "torch.compile(model, backend='stepcache', ...) or cachepass.compile(...) and call it first"
        )
    return states[-1]

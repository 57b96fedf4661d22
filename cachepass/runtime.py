"""Device-resident DBCache state of a compiled graph, and the ``stats`` / ``reset`` API.

Every piece of state is a tensor on the model's device whose shape is fixed at compile time; the
compiled graph takes them as extra inputs and updates them in place, so nothing per call is a
Python value Dynamo could guard on. Per CFG stream state is stacked along a leading stream axis.

Layout (S streams, C = step capacity = num_inference_steps, or 1024 without it):

    clock.calls                  []            calls made in the current generation
    schedule.{warmup,mask_compute,mask_static}  [C+1]  per-step constants from the config
    schedule.{stream_ids,step_ids}              [S], [C+1]
    u{i}.prev_residual           [S, *hidden]  head residual of the last computed step
    u{i}.{has_prev,cached_count,streak,last_cached_step,last_compute_step,accumulated_diff}  [S]
    u{i}.{cached_flags,diffs}    [S, C+1]      per-step record for stats (column C is scratch)
    u{i}.slot{k}.terms           [S, K+1, *shape]  TaylorSeer terms dY(0..K) (K=0: plain residual)
    u{i}.slot{k}.valid           [S, K+1]      which terms exist yet

The small per-stream values are reset inside the graph on the first call of a generation; the
large buffers are never cleared, their ``has_prev`` / ``valid`` flags are.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from typing import Any, Iterable

import torch
from torch import nn

from cachepass.config import MaskPolicy, StepCacheConfig
from cachepass.errors import CachepassError
from cachepass.unit import UnitSpec, tensor_nbytes

DEFAULT_STEP_CAPACITY = 1024


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | int | bool = 0
    values: tuple | None = None  # constant contents (schedule tables); None: filled with `fill`
    reset_each_generation: bool = False

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)

    def allocate(self, device: torch.device) -> torch.Tensor:
        if self.values is not None:
            return torch.tensor(self.values, dtype=self.dtype, device=device).reshape(self.shape)
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=device)


def step_capacity(config: StepCacheConfig) -> int:
    return config.num_inference_steps or DEFAULT_STEP_CAPACITY


class StateLayout:
    """Names, shapes and dtypes of every state tensor, in graph-input order."""

    def __init__(self, units: Iterable[UnitSpec], config: StepCacheConfig):
        self.config = config
        self.units = list(units)
        self.capacity = step_capacity(config)
        self.specs: list[TensorSpec] = self._model_specs()
        for unit in self.units:
            self.specs.extend(self._unit_specs(unit))
        self.index = {s.name: i for i, s in enumerate(self.specs)}

    def _model_specs(self) -> list[TensorSpec]:
        cfg, cap, s = self.config, self.capacity, self.config.num_streams
        steps = range(cap + 1)  # the last column stands for "beyond the mask / warmup"
        warmup = set(cfg.warmup_step_indices)
        mask = cfg.steps_computation_mask or ()
        static = cfg.steps_computation_policy is MaskPolicy.STATIC and cfg.steps_computation_mask is not None
        return [
            TensorSpec("clock.calls", (), torch.int64, 0),
            TensorSpec("schedule.warmup", (cap + 1,), torch.bool, values=tuple(t in warmup for t in steps)),
            TensorSpec(
                "schedule.mask_compute",
                (cap + 1,),
                torch.bool,
                values=tuple(t < len(mask) and mask[t] == 1 for t in steps),
            ),
            # cache-dit: with the static policy every step the mask does not force is cached
            TensorSpec(
                "schedule.mask_static",
                (cap + 1,),
                torch.bool,
                values=tuple(static and not (t < len(mask) and mask[t] == 1) for t in steps),
            ),
            TensorSpec("schedule.stream_ids", (s,), torch.int64, values=tuple(range(s))),
            TensorSpec("schedule.step_ids", (cap + 1,), torch.int64, values=tuple(steps)),
        ]

    def _unit_specs(self, unit: UnitSpec) -> list[TensorSpec]:
        cap, s, u = self.capacity, self.config.num_streams, f"u{unit.index}"
        hidden = unit.hidden
        specs = [
            TensorSpec(f"{u}.prev_residual", (s, *hidden.shape), hidden.dtype, 0),
            TensorSpec(f"{u}.has_prev", (s,), torch.bool, False, reset_each_generation=True),
            TensorSpec(f"{u}.cached_count", (s,), torch.int64, 0, reset_each_generation=True),
            TensorSpec(f"{u}.streak", (s,), torch.int64, 0, reset_each_generation=True),
            TensorSpec(f"{u}.last_cached_step", (s,), torch.int64, -2, reset_each_generation=True),
            TensorSpec(f"{u}.last_compute_step", (s,), torch.int64, 0, reset_each_generation=True),
            TensorSpec(f"{u}.accumulated_diff", (s,), torch.float64, 0.0, reset_each_generation=True),
            TensorSpec(f"{u}.cached_flags", (s, cap + 1), torch.bool, False, reset_each_generation=True),
            TensorSpec(f"{u}.diffs", (s, cap + 1), torch.float32, math.nan, reset_each_generation=True),
        ]
        for slot in unit.slots:
            k = self.taylor_order(slot.role)
            specs.append(TensorSpec(f"{u}.slot{slot.slot}.terms", (s, k + 1, *slot.shape), slot.dtype, 0))
            specs.append(TensorSpec(f"{u}.slot{slot.slot}.valid", (s, k + 1), torch.bool, False, reset_each_generation=True))
        return specs

    def taylor_order(self, role: str) -> int:
        cfg = self.config
        return cfg.taylorseer_order if role == "hidden" else cfg.resolved_encoder_taylorseer_order

    def unit_nbytes(self, unit: UnitSpec) -> int:
        prefix = f"u{unit.index}."
        return sum(s.nbytes for s in self.specs if s.name.startswith(prefix))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


_TICK = itertools.count(1)


class RuntimeState:
    """The state tensors of one compiled graph plus the host-side bookkeeping for stats."""

    def __init__(self, layout: StateLayout, device: torch.device, anchor: torch.Tensor | None, graph=None):
        self.layout = layout
        self.tensors = [spec.allocate(device) for spec in layout.specs]
        self.graph = graph  # the rewritten GraphModule, for inspection
        self.last_used = 0
        self.mid_pair = False  # separate CFG: the first call of a step ran, its partner is due
        self.anchor_id = id(anchor) if anchor is not None else None
        if anchor is not None:
            _register(self, anchor)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.layout.index[name]]

    def touch(self) -> None:
        """Host-side bookkeeping of one call (no device access)."""
        self.last_used = next(_TICK)
        if not self.layout.config.separate_cfg:
            return
        previous = _LAST_CALLED.get(self.anchor_id) if self.anchor_id is not None else None
        previous = previous() if previous is not None else None
        if previous is not None and previous is not self and previous.mid_pair:
            raise CachepassError(
                "separate_cfg=True, but the two CFG calls of one step ran different compiled graphs "
                "(their inputs differ in shape, e.g. prompt embeddings of different lengths); "
                "each graph counts steps for itself, so give both calls the same shapes "
                "(pad the embeddings) or call cachepass.reset(model) to start over"
            )
        self.mid_pair = not self.mid_pair
        if self.anchor_id is not None:
            _LAST_CALLED[self.anchor_id] = weakref.ref(self)

    def reset(self) -> None:
        """Start a new generation at the next call (the graph clears the per-stream state then)."""
        self["clock.calls"].zero_()
        self.mid_pair = False

    def stats(self) -> list["UnitStats"]:
        calls = int(self["clock.calls"].item())
        fresh = calls == 0
        return [self._unit_stats(unit, fresh) for unit in self.layout.units]

    def _unit_stats(self, unit: UnitSpec, fresh: bool) -> "UnitStats":
        cap = self.layout.capacity
        flags = self[f"u{unit.index}.cached_flags"].cpu()
        diffs = self[f"u{unit.index}.diffs"].cpu()
        per_stream = []
        for s in range(self.layout.config.num_streams):
            if fresh:
                per_stream.append(([], {}))
                continue
            cached = [t for t in range(cap) if bool(flags[s, t])]
            recorded = {str(t): float(diffs[s, t]) for t in range(cap) if not math.isnan(float(diffs[s, t]))}
            per_stream.append((cached, recorded))
        cfg_cached, cfg_diffs = per_stream[1] if len(per_stream) > 1 else ([], {})
        return UnitStats(
            name=unit.name,
            cached_steps=per_stream[0][0],
            residual_diffs=per_stream[0][1],
            cfg_cached_steps=cfg_cached,
            cfg_residual_diffs=cfg_diffs,
        )


class StateSet:
    """The states of one compiled graph, one per model instance that runs it.

    Dynamo reuses a graph for every instance of a model class (parameters are graph inputs), so
    the state is picked per call by the identity of a parameter argument: two transformers of one
    class (Wan 2.2's two experts) each get their own cache state.
    """

    def __init__(self, layout: StateLayout, device: torch.device, anchor_index: int | None, graph):
        self.layout, self.device, self.anchor_index, self.graph = layout, device, anchor_index, graph
        self._by_anchor: dict[int, tuple[weakref.ref, RuntimeState]] = {}
        self._single: RuntimeState | None = None

    def for_call(self, args) -> RuntimeState:
        if self.anchor_index is None:
            if self._single is None:
                self._single = RuntimeState(self.layout, self.device, None, self.graph)
            return self._single
        anchor = args[self.anchor_index]
        entry = self._by_anchor.get(id(anchor))
        if entry is None or entry[0]() is not anchor:
            entry = (weakref.ref(anchor), RuntimeState(self.layout, self.device, anchor, self.graph))
            self._by_anchor[id(anchor)] = entry
        return entry[1]


@dataclasses.dataclass
class UnitStats:
    """Per cache unit, the fields of cache-dit's ``CacheStats`` for the current (or last) generation.

    ``cached_steps`` / ``residual_diffs`` belong to the conditional stream, ``cfg_*`` to the
    unconditional one (empty without separate CFG). Diffs are keyed by ``str(step)`` as in cache-dit.
    """

    name: str
    cached_steps: list[int]
    residual_diffs: dict[str, float]
    cfg_cached_steps: list[int]
    cfg_residual_diffs: dict[str, float]


# ---------------------------------------------------------------------------- registry
# Compiled graphs are found from the model through one of its parameters (the backend never sees
# the module object): anchor id -> weak references to the states compiled for it.
_REGISTRY: dict[int, list[tuple[weakref.ref, weakref.ref]]] = {}
_LAST_CALLED: dict[int, weakref.ref] = {}  # anchor id -> state of the graph that ran last


def _register(state: RuntimeState, anchor: torch.Tensor) -> None:
    entries = _REGISTRY.setdefault(id(anchor), [])
    entries[:] = [(a, s) for a, s in entries if a() is not None and s() is not None]
    entries.append((weakref.ref(anchor), weakref.ref(state)))


def states_of(model: Any) -> list[RuntimeState]:
    """Every live stepcache state compiled for ``model`` (compiled module or original), newest use last."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected the compiled module or the original nn.Module, got {type(model).__name__}")
    found = []
    for param in itertools.chain(model.parameters(), model.buffers()):
        for anchor, state in _REGISTRY.get(id(param), []):
            if anchor() is param and state() is not None and state() not in found:
                found.append(state())
    return sorted(found, key=lambda s: s.last_used)


def current_state(model: Any) -> RuntimeState:
    states = states_of(model)
    if not states:
        raise CachepassError(
            f"{type(model).__name__} has no stepcache state: compile it with "
            "torch.compile(model, backend='stepcache', ...) or cachepass.compile(...) and call it first"
        )
    return states[-1]

"""One cache unit's state as graph values: reset-adjusted views per CFG stream and the in-place writes."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.proxy import Proxy

from cachepass.decision.clock import Clock
from cachepass.decision.ops import pick_stream
from cachepass.state.layout import StateLayout
from cachepass.unit import UnitSpec


class UnitState:
    """Reset-adjusted views of one unit's state and the pending in-place writes."""

    def __init__(self, layout: StateLayout, unit: UnitSpec, state: dict[str, fx.Node], tracer, clock: Clock):
        self.layout, self.prefix, self.clock = layout, f"u{unit.index}.", clock
        self.state, self.tracer = state, tracer
        self.writes: list[tuple[str, Proxy, Proxy]] = []  # (name, where to write, value): `flush` writes them
        self.effective: dict[str, Proxy] = {}

    def keeps(self, name: str) -> bool:
        """Whether the layout has ``name`` for this unit (some values are kept only for configs that read them)."""
        return self.prefix + name in self.layout.index

    def raw(self, name: str) -> Proxy:
        return Proxy(self.state[self.prefix + name], self.tracer)

    def vector(self, name: str) -> Proxy:
        """The whole [S, ...] tensor; per-generation state reads as its fill value on the first call."""
        if name not in self.effective:
            spec = self.layout.specs[self.layout.index[self.prefix + name]]
            raw = self.raw(name)
            self.effective[name] = torch.where(self.clock.first, spec.fill, raw) if spec.reset_each_generation else raw
        return self.effective[name]

    def current(self, name: str) -> Proxy:
        return pick_stream(self.vector(name), self.clock.stream_selectors)

    def set_current(self, name: str, value) -> None:
        """Write ``value`` into the current stream's entry (row for [S, K] tensors)."""
        mask = self.clock.stream_mask
        if len(self.layout.specs[self.layout.index[self.prefix + name]].shape) == 2:
            mask = mask.unsqueeze(1)
            value = value.unsqueeze(0) if isinstance(value, Proxy) else value
        self.writes.append((name, mask, value))

    def record(self, name: str, value, when: Proxy | None = None) -> None:
        """Write ``value`` into (current stream, current step) of a [S, C+1] table (where ``when`` holds)."""
        cell = self.clock.stream_mask.unsqueeze(1) & self.clock.step_mask.unsqueeze(0)
        if when is not None:
            cell = cell & when
        self.writes.append((name, cell, value))

    def flush(self) -> None:
        """The pending writes, each one masked ``where`` into its state tensor (`cachepass.decision.ops.write_stream`)."""
        for name, mask, value in self.writes:
            torch.where(mask, value, self.vector(name), out=self.raw(name))

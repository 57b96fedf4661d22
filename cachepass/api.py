"""Public entry points: ``compile``, ``stats``, ``reset``, ``explain``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from cachepass.backend import copy_graph_module, outline_graph, parse_options, stepcache
from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError
from cachepass.runtime import StateLayout, UnitStats, current_state, states_of
from cachepass.unit import UnitSpec

log = logging.getLogger("cachepass")


def compile(model: nn.Module, config: Any, *, inner: str = "inductor", mode: str | None = None,
            fullgraph: bool = True) -> nn.Module:
    """``torch.compile(model, backend="stepcache", dynamic=False, ...)`` with the options checked up front.

    ``config`` is a `StepCacheConfig`, a dict of its fields, or a cache-dit ``DBCacheConfig``.
    Shapes are static: a new resolution or batch size compiles once more, with fresh state.
    """
    options = {"config": config, "inner": inner}
    if mode is not None:
        options["mode"] = mode
    parse_options(options)
    return torch.compile(model, backend=stepcache, fullgraph=fullgraph, dynamic=False, options=options)


def stats(model: Any) -> list[UnitStats]:
    """Per cache unit, the cached steps and residual diffs of each CFG stream (reads device state)."""
    if hasattr(model, "stepcache_stats"):
        return model.stepcache_stats()
    return current_state(model).stats()


def reset(model: Any) -> None:
    """Make the next call start a new generation at step 0 (every compiled shape of ``model``)."""
    if hasattr(model, "stepcache_reset"):
        model.stepcache_reset()
        return
    states = states_of(model)
    if not states:
        current_state(model)  # raises the "never compiled" error
    for state in states:
        state.reset()


@dataclasses.dataclass
class Explanation:
    """What the stepcache pass finds in a model for one input signature."""

    units: list[UnitSpec]
    skipped: list[str]
    state_bytes: dict[str, int]
    config: StepCacheConfig

    def __str__(self) -> str:
        lines = [f"stepcache: {len(self.units)} cache unit(s)"]
        for unit in self.units:
            lines.append(unit.describe())
            lines.append(f"  state  {self.state_bytes[unit.name] / 2**20:.2f} MiB "
                         f"({self.config.num_streams} stream(s))")
        for skipped in self.skipped:
            lines.append(f"not cached: {skipped}")
        return "\n".join(lines)


def capture_graph(model: nn.Module, *args, **kwargs) -> torch.fx.GraphModule:
    """The Dynamo graph of ``model(*args, **kwargs)`` (fullgraph, static shapes), as a backend sees it.

    The call runs once, eagerly; the returned graph is a copy the caller may rewrite.
    """
    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(*args, **kwargs)
    if not captured:
        raise CachepassError("Dynamo produced no graph for this call")
    return copy_graph_module(captured[-1])


def explain(model: nn.Module, *example_args, config: StepCacheConfig | None = None,
            **example_kwargs) -> Explanation:
    """Trace ``model`` once (it runs eagerly) and report the cache units the pass would build."""
    config = config or StepCacheConfig()
    gm, units, discovery = outline_graph(capture_graph(model, *example_args, **example_kwargs), config)
    layout = StateLayout(units, config)
    report = Explanation(units, discovery.skipped, {u.name: layout.unit_nbytes(u) for u in units}, config)
    log.debug("%s", report)
    return report

"""The rewrite pipeline every entry uses: Dynamo's graph -> the one-graph form with its cache conds.

    rewritten = rewrite(gm, config)    # outline the cache units, lay out the state, insert the conds

The backend compiles ``rewritten.graph`` (piecewise or as one graph), ``cachepass.explain`` plans it,
export traces it (``narrow`` for TensorRT), and the eager reference runs the outlined graph from
`outline` with its own decision code. The passes themselves are in `cachepass.passes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from cachepass.analysis import sequence_parallel
from cachepass.analysis.blocks import Discovery, plan_cache_units
from cachepass.analysis.timestep import TimestepInput, find_timestep_input
from cachepass.config import StepCacheConfig
from cachepass.passes import before_discovery_passes, cache_passes, outline_passes, run_passes
from cachepass.state.layout import StateLayout
from cachepass.unit import OutlinedUnit, UnitSpec


@dataclasses.dataclass
class Rewritten:
    graph: fx.GraphModule  # the one-graph form: (*graph inputs, *state tensors) -> outputs
    units: list[UnitSpec]
    layout: StateLayout
    timestep: TimestepInput | None  # the input that tells steps and generations apart (None: calls are counted)
    discovery: Discovery  # what block discovery found (skipped lists, the sequence-parallel group)


def rewrite(gm: fx.GraphModule, config: StepCacheConfig, *, sequence_parallel_group: Any = None,
            narrow: bool = False, bind_weights: bool = False) -> Rewritten:
    """Outline ``gm``'s cache units, lay out their state and insert the decision and ``torch.cond``.

    ``gm`` is not modified (a copy is rewritten). ``narrow``: 32-bit state arithmetic (`StateLayout`).
    ``bind_weights``: the block calls name their weights (`cachepass.bound_weights`): for the piecewise executor only.
    """
    outlined, units, discovery = outline(gm, config, sequence_parallel_group, bind_weights)
    timestep = find_timestep_input(outlined, config)
    layout = StateLayout(units, config, narrow, timestep)
    graph = run_passes(outlined, cache_passes(layout, timestep, discovery.parallel))
    return Rewritten(graph, units, layout, timestep, discovery)


def outline(gm: fx.GraphModule, config: StepCacheConfig, sequence_parallel_group: Any = None,
            bind_weights: bool = False) -> tuple[fx.GraphModule, list[UnitSpec], Discovery]:
    """A copy of ``gm`` with each cache unit's middle blocks outlined; returns it, the units and the discovery.

    ``sequence_parallel_group`` (see `cachepass.analysis.sequence_parallel`): None refuses a graph with collectives.
    """
    gm = run_passes(copy_graph_module(gm), before_discovery_passes(bind_weights))
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


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh GraphModule over a copy of ``gm``'s graph (Dynamo re-reads the original after we return)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    graph._codegen = gm.graph._codegen
    return _LazyGraphModule(gm, graph, class_name=type(gm).__name__)


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

"""Rewrite each outlined cache unit into the DBCache decision, a ``torch.cond`` and the state update.

Input: a graph from `outline_middle_blocks` (one ``call_module(stepcache_unit_i)`` per unit).
Output: the same graph with

* one placeholder per state tensor of `cachepass.state.runtime.StateLayout`, appended after the
  original placeholders (the backend's wrapper passes them on every call);
* a clock at the top: generation start, denoising step and CFG stream, told apart by the
  timestep input (a timestep that does not decrease starts a generation), the per-step schedule
  lookups, and `Mismatch` flags for calls that do not fit the config;
* per unit: the head residual ``R = H_F - H_in``, the decision as tensor ops (warmup, mask,
  budgets, ``mean|R_prev - R| / mean|R_prev| < threshold``), then
  ``torch.ops.higher_order.cond(hit, cached, compute, operands)`` where *compute* runs the middle
  blocks and returns their outputs and the TaylorSeer terms of their residual, and *cached* returns
  ``H_F + TaylorSeer(R_M)`` and the terms as they were, per carried slot; then the state update (the
  returned terms written into the stream's row by index, the small values ``where``-selected);
* the clock's state update, last before the output.

No ``.item()`` and no host-side branch is emitted: Dynamo never sees a changing Python value.
The semantics are cache-dit 1.5's DBCache + TaylorSeer; `cachepass.reference` is their eager
statement and the tests hold both to cache-dit.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from cachepass.analysis.blocks import example_value
from cachepass.analysis.sequence_parallel import SequenceParallel
from cachepass.analysis.timestep import TimestepInput
from cachepass.decision.branches import cached_branch, compute_branch, contiguous, without_aliases
from cachepass.decision.clock import Clock, emit_clock
from cachepass.decision.decide import decide, update_counters
from cachepass.decision.ops import pick_stream, write_row, write_stream
from cachepass.decision.taylorseer import update_valid
from cachepass.decision.unit_state import UnitState
from cachepass.errors import UnsupportedGraphError
from cachepass.state.layout import StateLayout
from cachepass.state.sizes import size_inputs, symbol_nodes
from cachepass.unit import OutlinedUnit

log = logging.getLogger(__name__)


def insert_cache_cond(gm: fx.GraphModule, layout: StateLayout, timestep: TimestepInput | None,
                      parallel: SequenceParallel | None = None) -> fx.GraphModule:
    """``call_module(stepcache_unit_i)`` -> decision + ``torch.cond`` + in-place state update.

    ``timestep`` names the placeholder the clock reads to tell steps and generations apart
    (None: the clock counts calls). ``parallel``: the ranks sharding the tokens, over which each
    unit's decision inputs are all-reduced before its cond (`agree_across_ranks`).
    """
    graph = gm.graph
    units = [n for n in graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OutlinedUnit)]
    if not units:
        raise UnsupportedGraphError("insert_cache_cond found no outlined cache unit in the graph")
    state = _add_state_placeholders(graph, layout)
    tracer = GraphAppendingTracer(graph)
    first_compute = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    placeholders = {n.target: Proxy(n, tracer) for n in graph.nodes if n.op == "placeholder"}
    with graph.inserting_before(first_compute):
        proxies = {k: Proxy(v, tracer) for k, v in state.items()}
        clock = emit_clock(layout, proxies, placeholders[timestep.placeholder] if timestep else None,
                            placeholders[timestep.latents] if timestep and timestep.latents else None)
    size_nodes = symbol_nodes(graph)
    for call in units:
        unit = gm.get_submodule(call.target)
        _rewrite_unit(gm, call, unit, layout, clock, state, tracer, parallel, size_nodes)
        gm.delete_submodule(call.target)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        for name, value in {**clock.updates, "clock.report": torch.stack([clock.flags, clock.ended])}.items():
            Proxy(state[name], tracer).copy_(value)
    graph.lint()
    gm.recompile()
    conds = [n for n in graph.nodes if n.target is torch.ops.higher_order.cond]
    if len(conds) != len(units):
        raise UnsupportedGraphError(f"expected {len(units)} torch.cond nodes after the rewrite, found {len(conds)}")
    log.debug("insert_cache_cond: %d units -> %d conds, %d state inputs", len(units), len(conds), len(state))
    return gm


def _add_state_placeholders(graph: fx.Graph, layout: StateLayout) -> dict[str, fx.Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = {}
    with graph.inserting_after(last):
        for spec in reversed(layout.specs):  # inserting_after a fixed node: reverse keeps order
            nodes[spec.name] = graph.placeholder("stepcache_" + spec.name.replace(".", "_"))
            nodes[spec.name].meta["stepcache_shape"] = spec.shape
    return {spec.name: nodes[spec.name] for spec in layout.specs}


def _rewrite_unit(gm, call: fx.Node, unit: OutlinedUnit, layout: StateLayout, clock: Clock, state, tracer,
                  parallel: SequenceParallel | None, size_nodes: dict) -> None:
    spec, cfg, graph = unit.spec, layout.config, gm.graph
    hidden = spec.hidden
    with graph.inserting_before(call):
        region_inputs = contiguous(graph, without_aliases(graph, list(call.args[1:])))
        us = UnitState(layout, spec, state, tracer, clock)
        h_in = Proxy(call.args[0], tracer)
        h_f = Proxy(region_inputs[hidden.input_position], tracer)
        residual, prev = None, None  # kept and compared only where some step runs the similarity test
        if cfg.compares_residuals:
            residual = h_f - h_in
            prev = pick_stream(us.raw("prev_residual"), clock.stream_selectors)
        hit, diff, considered = decide(cfg, us, residual, prev, parallel)

        elapsed = clock.step - us.current("last_compute_step")
        taylor_operands = []
        for slot in spec.slots:
            taylor_operands += [us.raw(f"slot{slot.slot}.terms").node, us.vector(f"slot{slot.slot}.valid").node]
        sizes = size_inputs(region_inputs, size_nodes)  # symbolic sizes: what the branches bind their symbols from
        operands = (*region_inputs, *taylor_operands, clock.stream.node, elapsed.node, *sizes)
        size_values = [example_value(n) for n in sizes]
        cached_gm = cached_branch(spec, layout, [example_value(n) for n in region_inputs], size_values)
        compute_gm = compute_branch(unit.compute, spec, layout, size_values)
        gm.add_submodule(f"{spec.module_name}_cached", cached_gm)
        gm.add_submodule(f"{spec.module_name}_compute", compute_gm)
        cond = graph.call_function(
            torch.ops.higher_order.cond,
            (
                hit.node,
                graph.get_attr(f"{spec.module_name}_cached"),
                graph.get_attr(f"{spec.module_name}_compute"),
                operands,
            ),
        )
        cond.meta["stepcache_unit"] = spec  # as on the outlined call: the piecewise splitter names cond pieces by it
        results = [Proxy(graph.call_function(operator.getitem, (cond, i)), tracer) for i in range(2 * len(spec.slots))]
        outs, terms = results[:len(spec.slots)], results[len(spec.slots):]  # `cachepass.decision.branches`

        computed = ~hit
        update_counters(us, clock, hit, diff, considered)
        if us.keeps("has_prev"):
            us.set_current("has_prev", us.current("has_prev") | computed)
        us.set_current("last_compute_step", torch.where(computed, clock.step, us.current("last_compute_step")))
        if prev is not None:
            write_stream(us.raw("prev_residual"), clock, residual, computed)
        for slot, stored in zip(spec.slots, terms):
            write_row(us.raw(f"slot{slot.slot}.terms"), clock.stream_row, stored)  # a cached call: what was there
            update_valid(us, slot.slot, layout.taylor_order(slot.role), computed, clock)
        us.flush()

    for user in list(call.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(outs[user.args[1]].node)
            graph.erase_node(user)
    if call.users:
        raise UnsupportedGraphError(f"{call.name} has users other than getitem: {list(call.users)}")
    graph.erase_node(call)

"""Outline each unit's middle region into a submodule call.

After this pass the graph holds, per cache unit, one ``call_module(stepcache_unit_i)`` whose
arguments are the hidden states entering block 0 followed by every value the middle blocks read
(carried head outputs, side inputs such as the time embedding and rotary tables, and the middle
blocks' parameters), and whose tuple result replaces every value leaving the middle region. The
submodule (`cachepass.unit.OutlinedUnit`) runs the original middle nodes, so the outlined graph
computes exactly what the input graph did.
"""

from __future__ import annotations

import logging
import operator

from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from cachepass.analysis.blocks import CacheUnitPlan
from cachepass.bound_weights import WeightRef
from cachepass.errors import UnsupportedGraphError
from cachepass.unit import OutlinedUnit, SlotSpec, UnitSpec

log = logging.getLogger(__name__)

_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def outline_middle_blocks(gm: fx.GraphModule, plans: list[CacheUnitPlan]) -> fx.GraphModule:
    """Middle-region nodes of each unit -> one ``call_module`` of an `OutlinedUnit` and ``getitem``s."""
    replaced: dict[fx.Node, fx.Node] = {}
    for plan in plans:
        _remap_plan(plan, replaced)
        replaced.update(_outline_unit(gm, plan))
    gm.graph.lint()
    gm.recompile()
    units = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OutlinedUnit)]
    if len(units) != len(plans):
        raise UnsupportedGraphError(f"outlined {len(units)} units, expected {len(plans)}")
    return gm


def _outline_unit(gm: fx.GraphModule, plan: CacheUnitPlan) -> dict[fx.Node, fx.Node]:
    region = set(plan.region)
    inputs = _region_inputs(plan.region, region)
    _reject_input_mutation(gm, plan, region)
    exits = [s.middle_output for s in plan.slots]

    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = sub.placeholder(node.name)
        env[node].meta.update(node.meta)
    for node in plan.region:
        env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(tuple(env[e] for e in exits))
    compute = _LazyGraphModule(gm, sub, class_name=f"StepcacheMiddle{plan.index}")

    spec = UnitSpec(
        index=plan.index,
        name=plan.list_path,
        block_class=plan.block_class,
        block_paths=tuple(plan.block_paths),
        head=plan.head,
        middle=plan.middle,
        tail=plan.tail,
        slots=tuple(
            SlotSpec(
                slot=s.slot,
                role=s.role,
                input_position=inputs.index(s.middle_input),
                shape=s.shape,
                dtype=s.dtype,
                device=s.device,
                input_name=s.middle_input.name,
                output_name=s.middle_output.name,
            )
            for s in plan.slots
        ),
    )
    gm.add_submodule(spec.module_name, OutlinedUnit(spec, compute))

    graph = gm.graph
    with graph.inserting_before(plan.region[0]):
        call = graph.call_module(spec.module_name, (plan.chain_input, *inputs))
        call.meta["stepcache_unit"] = spec
        outs = []
        for position, exit_node in enumerate(exits):
            out = graph.call_function(operator.getitem, (call, position))
            out.meta.update(exit_node.meta)
            outs.append(out)
    call.meta["example_value"] = tuple(o.meta.get("example_value") for o in outs)
    for exit_node, out in zip(exits, outs):
        exit_node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in region)
    for node in reversed(plan.region):
        graph.erase_node(node)
    log.debug(
        "outline_middle_blocks: %s: %d nodes -> %s(%d inputs, %d outputs)",
        plan.name, len(plan.region), spec.module_name, len(inputs), len(exits),
    )
    return dict(zip(exits, outs))


def _region_inputs(nodes: list[fx.Node], region: set[fx.Node]) -> list[fx.Node]:
    """The values from outside ``region`` its nodes read, in order of first use (a dict: ~800 unbound weights at 30 blocks)."""
    inputs: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in region:
                inputs.setdefault(arg)
    return list(inputs)


def _reject_input_mutation(gm: fx.GraphModule, plan: CacheUnitPlan, region: set[fx.Node]) -> None:
    """torch.cond branches may not mutate their inputs: in-place ops must target region values."""
    changed_in: dict[str, set[int]] = {}  # a body's placeholder positions it changes, found once per body
    for node in plan.region:
        for target in _mutated(gm, node, changed_in):
            # a block weight named by reference (`cachepass.bound_weights`) is a graph input: outside the region too
            if isinstance(target, WeightRef) or (isinstance(target, fx.Node) and target not in region):
                raise UnsupportedGraphError(
                    f"{node.name} ({node.target}) in the middle region of {plan.name} mutates "
                    f"{target.name}, which is computed outside it; a cached step could not skip it"
                )


def _mutated(gm: fx.GraphModule, node: fx.Node, changed_in: dict[str, set[int]]) -> list:
    """The arguments ``node`` changes in place: its first for an in-place op, those a block body (a submodule graph,
    `cachepass.passes.call_block_bodies`) changes in place for a call of it (``changed_in``: by body, what it changes)."""
    if node.op == "call_module" and isinstance(body := gm.get_submodule(node.target), fx.GraphModule):
        if node.target not in changed_in:
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            changed = {arg for inner in body.graph.nodes for arg in _mutated(body, inner, {})}
            changed_in[node.target] = {i for i, placeholder in enumerate(placeholders) if placeholder in changed}
        return [arg for i, arg in enumerate(node.args) if i in changed_in[node.target]]
    inplace = (node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")) or (
        node.op == "call_function" and node.target in _INPLACE_FUNCTIONS
    )
    return [node.args[0]] if inplace and node.args else []


def _remap_plan(plan: CacheUnitPlan, replaced: dict[fx.Node, fx.Node]) -> None:
    """Later units may read values an earlier unit's outlining replaced (FLUX single <- double)."""
    plan.chain_input = replaced.get(plan.chain_input, plan.chain_input)
    for slot in plan.slots:
        slot.middle_input = replaced.get(slot.middle_input, slot.middle_input)

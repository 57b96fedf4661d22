"""Move nodes that do not belong to a middle region out of it, before its first node.

The middle range of a unit can hold nodes that only sit between middle blocks in program order
(top-level code between blocks that does not depend on them), and the region can index into a
tuple produced outside it (``getitem`` of a tuple of rotary tables, for instance). ``torch.cond``
takes tensors and symbolic sizes only, so both kinds move in front of the region; afterwards every
input of the region is a tensor or a symbolic size (a graph traced with symbolic sizes) defined
before its first node.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from cachepass.analysis.blocks import CacheUnitPlan, describe_value, example_value
from cachepass.errors import UnsupportedGraphError
from cachepass.state.sizes import is_symbolic

log = logging.getLogger(__name__)


def hoist_out_of_middle(gm: fx.GraphModule, plans: list[CacheUnitPlan]) -> fx.GraphModule:
    """Independent gap nodes and tuple ``getitem``s inside each middle region -> before the region."""
    for plan in plans:
        first = plan.region[0]
        region = set(plan.region)
        tuple_reads = [n for n in plan.region if _reads_outside_tuple(n, region)]
        for node in tuple_reads:
            region.discard(node)
        plan.region = [n for n in plan.region if n in region]
        to_move = set(plan.hoisted) | set(tuple_reads)
        moving = [n for n in first.graph.nodes if n in to_move]
        for node in moving:
            first.prepend(node)
        plan.hoisted = []
        _check_region_inputs(plan, region)
        log.debug("hoist_out_of_middle: %s: moved %d nodes before the middle region", plan.name, len(moving))
    gm.graph.lint()
    gm.recompile()
    return gm


def _reads_outside_tuple(node: fx.Node, region: set[fx.Node]) -> bool:
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    source = node.args[0]
    return isinstance(source, fx.Node) and source not in region and isinstance(example_value(source), (tuple, list))


def _check_region_inputs(plan: CacheUnitPlan, region: set[fx.Node]) -> None:
    for node in plan.region:
        for arg in node.all_input_nodes:
            if arg in region:
                continue
            if not isinstance(example_value(arg), torch.Tensor) and not is_symbolic(example_value(arg)):
                raise UnsupportedGraphError(
                    f"the middle region of {plan.name} reads {describe_value(arg)} (used by {node.name}), "
                    "which is neither a tensor nor a symbolic size; torch.cond operands must be one of these"
                )

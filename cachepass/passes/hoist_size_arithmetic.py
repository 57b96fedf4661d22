"""Move size arithmetic out of the blocks, to the top of the graph.

In a graph traced with symbolic sizes, Dynamo builds each size expression once (``4*(s42//2)``:
a ``floordiv`` and a ``mul`` of the size symbols) in the first block that needs it, and every later
block reads that node: block discovery would take it for a value the first block hands the second.
Every node whose value is a symbolic size computed from graph inputs and other such sizes alone
moves right after the placeholders and loses its ``nn_module_stack`` (no block owns it): each block
then reads it as a shared outside input. The graph's computation is unchanged; a graph traced with
static sizes has no such node.
"""

from __future__ import annotations

import logging

from torch import fx

from cachepass.analysis.blocks import example_value
from cachepass.state.sizes import is_symbolic

log = logging.getLogger(__name__)


def hoist_size_arithmetic(gm: fx.GraphModule) -> fx.GraphModule:
    """Symbolic sizes computed from inputs and sizes alone -> after the placeholders, outside every block."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return gm
    anchor, sizes = placeholders[-1], set(placeholders)
    moved = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_symbolic(example_value(node)):
            continue
        if not all(arg in sizes for arg in node.all_input_nodes):
            continue
        sizes.add(node)
        node.meta["nn_module_stack"] = {}
        if node.prev is not anchor:
            anchor.append(node)
            moved += 1
        anchor = node
    if moved:
        gm.graph.lint()
        gm.recompile()
        log.debug("hoist_size_arithmetic: moved %d size node(s) before the first computation", moved)
    return gm

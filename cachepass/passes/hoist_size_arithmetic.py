"""Move size arithmetic out of the blocks, to the top of the graph.

In a graph traced with symbolic sizes, Dynamo builds each size expression once (``4*(s42//2)``:
a ``floordiv`` and a ``mul`` of the size symbols) in the first block that needs it, and every later
block reads that node: block discovery would take it for a value the first block hands the second.
The same holds for a number Dynamo reads once from an input under ``dynamic=True`` (FLUX's attention
reads a default argument of diffusers' ``dispatch_attention_fn``, a 0-dim tensor input, by ``.item()`` in
the first block). Every node whose value is a symbolic size computed from graph inputs and other such
sizes alone moves right after the placeholders and loses its ``nn_module_stack`` (no block owns it): each block
then reads it as a shared outside input. It runs first, before `call_block_bodies`: the traced first block
must not hold a value a later block reads. A float or bool read from inputs is instead copied before each of its
users, into the user's module (a ``torch.cond`` takes no float operand). The graph's computation is unchanged; a graph traced with
static sizes has no such node.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from cachepass.analysis.blocks import example_value

log = logging.getLogger(__name__)

_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def hoist_size_arithmetic(gm: fx.GraphModule) -> fx.GraphModule:
    """Symbolic sizes computed from inputs and sizes alone -> after the placeholders, outside every block; symbolic
    floats and bools read from inputs -> a copy in each user's module."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return gm
    anchor, sizes = placeholders[-1], set(placeholders)
    moved = copied = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or not isinstance(example_value(node), _SYMBOLIC):
            continue
        if not all(arg in sizes for arg in node.all_input_nodes):
            continue
        if not isinstance(example_value(node), torch.SymInt):
            copied += _copy_into_users(gm.graph, node)
            continue
        sizes.add(node)
        node.meta["nn_module_stack"] = {}
        if node.prev is not anchor:
            anchor.append(node)
            moved += 1
        anchor = node
    if moved or copied:
        gm.graph.lint()
        gm.recompile()
        log.debug("hoist_size_arithmetic: moved %d size node(s) before the first computation, copied %d number "
                  "read(s) into their users", moved, copied)
    return gm


def _copy_into_users(graph: fx.Graph, node: fx.Node) -> int:
    """A float or bool read from inputs (``.item()`` of a 0-dim tensor input) -> a copy of it before each user, in
    the user's module: no block hands it to the next, and a ``torch.cond`` (which takes no float operand) gets the
    tensor it is read from."""
    users = list(node.users)
    for user in users:
        with graph.inserting_before(user):
            copy = graph.node_copy(node)
        copy.meta["nn_module_stack"] = dict(user.meta.get("nn_module_stack") or {})
        user.replace_input_with(node, copy)
    graph.erase_node(node)
    return len(users)

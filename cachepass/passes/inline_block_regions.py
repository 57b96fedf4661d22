"""Inline the block regions Dynamo traced once (`cachepass.block_regions`) back into the graph.

With a block class marked as a nested compile region, Dynamo traces its forward once and calls the
traced body for every block: ``invoke_subgraph(subgraph_0, "subgraph_0", *operands)`` per block,
each with that block's own weights among the operands, and ``getitem``s of its outputs. This pass
gives each call its own copy of the body (placeholders replaced by the call's operands, the
``getitem``s by the body's outputs) and moves the body's ``nn_module_stack`` paths from the block
it was traced on (``blocks.0``) to the caller's (``blocks.7``). The result has the nodes and module
paths an unmarked trace gives, so every later pass reads it as before.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from cachepass.errors import CachepassError

log = logging.getLogger(__name__)


def inline_block_regions(gm: fx.GraphModule) -> fx.GraphModule:
    calls = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.higher_order.invoke_subgraph]
    traced_on: dict[str, str] = {}  # body -> the block it was traced on: its first call's
    for call in calls:
        body = call.args[0].target
        traced_on.setdefault(body, _block_path(call))
        _inline(gm, call, getattr(gm, body), traced_on[body])
    bodies = set(traced_on)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in bodies and not n.users]:
        gm.graph.erase_node(node)
    for name in bodies:
        delattr(gm, name)
    if calls:
        gm.graph.lint()
        gm.recompile()
        log.info("stepcache: inlined %d block region call(s) of %d traced bod(ies)", len(calls), len(bodies))
    return gm


def _inline(gm: fx.GraphModule, call: fx.Node, body: fx.GraphModule, traced_on: str) -> None:
    caller = _block_path(call)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = call.args[2:]
    if len(placeholders) != len(operands):
        raise CachepassError(f"a block region called at {caller} takes {len(operands)} operands, its body "
                             f"{len(placeholders)}")
    env: dict[fx.Node, object] = dict(zip(placeholders, operands))
    outputs: tuple = ()
    with gm.graph.inserting_before(call):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = tuple(env[a] if isinstance(a, fx.Node) else a for a in node.args[0])
                break
            if node.op == "get_attr":
                raise CachepassError(f"a block region ({traced_on}) reads the attribute {node.target!r} of its traced "
                                     "body; cachepass inlines bodies whose every input is an operand")
            copy = gm.graph.node_copy(node, lambda a: env[a])
            copy.meta = dict(node.meta)
            stack = node.meta.get("nn_module_stack")
            if stack:
                copy.meta["nn_module_stack"] = {f"{key}@{caller}": (_moved(path, traced_on, caller), cls)
                                                for key, (path, cls) in stack.items()}
            env[node] = copy
    for user in list(call.users):
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise CachepassError(f"the outputs of the block region at {caller} are used by {user.format_node()}; "
                                 "cachepass expects getitems")
        user.replace_all_uses_with(outputs[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(call)
    _fresh_example_values(body, operands, env)


def _fresh_example_values(body: fx.GraphModule, operands: tuple, env: dict) -> None:
    """Each copy's own fake values for what leaves it (the body's outputs). Dynamo's values of the body are one
    set for every call: shared between blocks, the values passed from block to block would look like aliases
    to the passes (which then clone cond operands), and the executor maps piece outputs by their storage. An
    output over memory the body made becomes the same view of new memory made once per copy (aliasing among
    the outputs kept, none between copies). Nodes inside a copy keep the body's values: they are read for
    shapes only, within the block's own piece. Where a view changes dtype, the body's values are computed
    again from the operands (`FakeTensorProp`, slower)."""
    values = [a.meta.get("example_value") if isinstance(a, fx.Node) else a for a in operands]
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, torch._subclasses.FakeTensor)}
    if len(modes) != 1:
        raise CachepassError(f"a block region's operands carry fake values of {len(modes)} fake modes, not one: cannot "
                             "give its inlined copy values of its own")
    mode = next(iter(modes.values()))
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    memory = {_storage(p.meta["example_value"]): v for p, v in zip(placeholders, values)
              if isinstance(p.meta.get("example_value"), torch.Tensor) and isinstance(v, torch.Tensor)}
    nodes = list(dict.fromkeys(a for a in body.graph.output_node().args[0] if isinstance(a, fx.Node)))
    nodes = [n for n in nodes if n.op != "placeholder"]
    try:
        with mode:
            fresh = [pytree.tree_map_only(torch.Tensor, lambda v: _view_of(v, memory), n.meta.get("example_value"))
                     for n in nodes]
    except _DtypeView:
        FakeTensorProp(body, mode=mode).propagate_dont_convert_inputs(*values)
        fresh = [n.meta.get("val") for n in nodes]
    for node, value in zip(nodes, fresh):
        env[node].meta["example_value"] = value


class _DtypeView(Exception):
    """A value views memory as another dtype than its owner: remapping it needs the op that made it."""


def _storage(value: torch.Tensor) -> int:
    return value.untyped_storage()._cdata


def _view_of(value: torch.Tensor, memory: dict) -> torch.Tensor:
    key = _storage(value)
    owner = memory.get(key)
    if owner is None:  # memory the body made: new memory for this copy, shared by its views
        owner = memory[key] = torch.empty(value.untyped_storage().nbytes() // value.element_size(), dtype=value.dtype,
                                          device=value.device)
    if owner.dtype != value.dtype:
        raise _DtypeView
    return owner.as_strided(value.shape, value.stride(), value.storage_offset())


def _moved(path: str, traced_on: str, caller: str) -> str:
    """``blocks.0.attn1`` -> ``blocks.7.attn1``; paths outside the block stay."""
    if path == traced_on or path.startswith(traced_on + "."):
        return caller + path[len(traced_on):]
    return path


def _block_path(call: fx.Node) -> str:
    """The block a region call runs: the innermost module on the call's stack (Dynamo records the call inside it)."""
    stack = call.meta.get("nn_module_stack") or {}
    if not stack:
        raise CachepassError(f"{call.format_node()} has no nn_module_stack: cannot place a block region's body")
    return max((path for path, _ in stack.values()), key=len)

"""Give every block leaf (`cachepass.block_regions`) a copy of the first block's traced body.

With block regions on, Dynamo traces the first block of each class inline between an ``enter`` call
(its class name and flattened arguments; the tensors come out of it as ``getitem``s) and a ``leave``
call (its class name and outputs), and every other block of the class is one ``leaf(class_name, path, args, kwargs)``
call, which Dynamo traced without the block's weights. This pass replaces each leaf by a copy of the
body: the body's uses of ``enter``'s tensors become the leaf's arguments at the same flat positions,
its uses of the first block's weights new placeholders for the leaf's block's weights of the same path
(after Dynamo's inputs, marked with their module path for `cachepass.leaf_weights`, which the backend
appends to each call), and the users of the leaf's outputs the copy's outputs (each with the leaf's own
fake value). Module paths move from the first block (``blocks.0``) to the leaf's (``blocks.7``). Then
``enter`` and ``leave`` are removed. The result has the nodes and module paths an unmarked trace gives,
its leaves' weights as inputs of their own, so every later pass reads it as before. A leaf whose call
does not match its body (other constants, a block configured otherwise) raises `BlockLeafError`: the
call is traced again with every block inline.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass

from torch import fx

from cachepass import block_regions
from cachepass.analysis.blocks import normalize_module_path
from cachepass.block_regions import BlockLeafError
from cachepass.leaf_weights import WEIGHT_PATH, fake_like, weight_path

log = logging.getLogger(__name__)


@dataclass
class _Body:
    path: str  # the block it was traced in: blocks.0
    enter: fx.Node
    leave: fx.Node
    nodes: list[fx.Node]  # strictly between enter and leave, in order
    weights: dict[fx.Node, str]  # the block's own weight inputs the body reads -> their path within the block

    @property
    def arguments(self) -> list:
        return list(self.enter.args[1])


def inline_block_regions(gm: fx.GraphModule) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    enters = [n for n in nodes if _calls(n, block_regions.enter)]
    leaves = [n for n in nodes if _calls(n, block_regions.leaf)]
    if not enters and not leaves:
        return gm
    bodies = {e.args[0]: _body(nodes, e) for e in enters}  # by class name, which enter and leaf both record
    inputs = _Inputs(gm)
    for leaf in leaves:
        body = bodies.get(leaf.args[0])
        if body is None:
            raise BlockLeafError(f"the block leaf at {_block_path(leaf)} has no block of its class traced inline")
        _inline(gm, leaf, body, inputs)
    for body in bodies.values():
        _unmark(gm, body)
    gm.graph.lint()
    gm.recompile()
    log.info("stepcache: inlined %d block leaf call(s) from %d traced block(s)", len(leaves), len(bodies))
    return gm


def _calls(node: fx.Node, fn) -> bool:
    return node.op == "call_function" and node.target is fn


def _body(nodes: list[fx.Node], enter: fx.Node) -> _Body:
    start = nodes.index(enter)
    leave = next((n for n in nodes[start + 1:] if _calls(n, block_regions.leave)), None)
    if leave is None:
        raise BlockLeafError(f"the block traced inline at {_block_path(enter)} has no recorded outputs")
    inside = nodes[start + 1:nodes.index(leave)]
    members = set(inside) | {leave}
    for node in inside:
        if node.op in ("get_attr", "call_module") or any(a.op == "get_attr" for a in node.all_input_nodes):
            # a weight or submodule held by the graph, not passed as an input: a copy would use the first block's
            raise BlockLeafError(f"the block traced at {_block_path(enter)} reads {node.format_node()} from the graph "
                                 "module, which its leaves cannot replace")
        outside = [u for u in node.users if u not in members]
        if outside:
            raise BlockLeafError(f"{node.format_node()} inside the block at {_block_path(enter)} is used after it by "
                                 f"{outside[0].format_node()}")
    path = _block_path(enter)
    # parameters and buffers only: a number the block reads from its modules (a norm's eps: an input of its own
    # under dynamic=True) is a plain attribute, which `check_leaf` finds equal in every leaf: they take the first's
    weights = {used: within for node in inside for used in node.all_input_nodes
               if used.op == "placeholder" and (within := _within(used, path)) is not None
               and within.split(".")[-2:-1] in (["_parameters"], ["_buffers"])}
    return _Body(path, enter, leave, inside, weights)


def _inline(gm: fx.GraphModule, leaf: fx.Node, body: _Body, inputs: "_Inputs") -> None:
    caller = _block_path(leaf)
    _, block, args, kwargs = leaf.args
    if normalize_module_path(caller) != block:
        raise BlockLeafError(f"the block leaf for {block} was traced at {caller}")
    block_regions.check_leaf(block)
    env = _argument_map(body, leaf, block_regions.flat_arguments(args, kwargs))
    env.update({used: inputs.weight(f"{block}.{within}", used) for used, within in body.weights.items()})
    copies = []
    with gm.graph.inserting_before(leaf):
        for node in body.nodes:
            if node in env:  # enter's getitems
                continue
            copy = gm.graph.node_copy(node, lambda a: env.get(a, a))  # its meta a copy of the body node's
            stack = node.meta.get("nn_module_stack")
            if stack:
                copy.meta["nn_module_stack"] = {f"{key}@{caller}": (_moved(path, body.path, caller), cls)
                                                for key, (path, cls) in stack.items()}
            env[node] = copy
            copies.append(copy)
    _replace_uses(gm, leaf, body.leave.args[1], leaf.meta.get("example_value"), env, set(copies))
    for copy in reversed(copies):  # what made an output this leaf's caller does not use (Dynamo dropped it there)
        if not copy.users and not copy.is_impure():
            gm.graph.erase_node(copy)


class _Inputs:
    """New placeholders for the leaves' weights, after the graph's last input, in the order they are asked for."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = gm.graph
        self.last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]

    def weight(self, path: str, like: fx.Node) -> fx.Node:
        """The input for the weight at ``path`` (``blocks.7.attn1.to_q._parameters.weight``), laid out as ``like``
        (the first block's, which `check_leaf` found alike)."""
        with self.graph.inserting_after(self.last):
            node = self.last = self.graph.placeholder("leaf_" + re.sub(r"\W", "_", path))
        value = like.meta["example_value"]
        node.meta["example_value"] = fake_like(value.fake_mode, value)  # a fake tensor of its own
        node.meta[WEIGHT_PATH] = path
        return node


def _argument_map(body: _Body, leaf: fx.Node, flat: list) -> dict:
    """enter's getitems -> the leaf's arguments at the same flat tensor positions (constants must agree)."""
    ours = body.arguments
    if len(ours) != len(flat) or any(isinstance(a, fx.Node) != isinstance(b, fx.Node) or
                                     (not isinstance(a, fx.Node) and a != b) for a, b in zip(ours, flat)):
        raise BlockLeafError(f"the block at {_block_path(leaf)} is called with other arguments than the block traced "
                             f"at {body.path}")
    theirs = [b for b in flat if isinstance(b, fx.Node)]
    env = {}
    for user in body.enter.users:
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise BlockLeafError(f"the arguments of the block at {body.path} are used by {user.format_node()}")
        env[user] = theirs[user.args[1]]
    return env


def _within(node: fx.Node, block_path: str) -> str | None:
    """``blocks.7.attn1.to_q._parameters.weight`` -> ``attn1.to_q._parameters.weight`` for ``blocks.7``."""
    path, block = weight_path(node), normalize_module_path(block_path)
    return path[len(block) + 1:] if path is not None and path.startswith(block + ".") else None


def _replace_uses(gm: fx.GraphModule, node: fx.Node, outputs, value, env: dict, copied: set) -> None:
    """``node``'s uses (through ``getitem``s for a tuple) -> ``outputs`` mapped by ``env``; a copied output takes
    ``value``, the leaf's own fake value at that position."""
    if isinstance(outputs, fx.Node):
        new = env.get(outputs, outputs)
        if new in copied and value is not None:
            new.meta["example_value"] = value
        node.replace_all_uses_with(new)
    else:
        for user in list(node.users):
            if user.target is not operator.getitem or not isinstance(user.args[1], int):
                raise BlockLeafError(f"the outputs of the block at {_block_path(node)} are used by "
                                     f"{user.format_node()}")
            index = user.args[1]
            _replace_uses(gm, user, outputs[index], value[index] if value is not None else None, env, copied)
    gm.graph.erase_node(node)


def _unmark(gm: fx.GraphModule, body: _Body) -> None:
    """The first block's enter and leave -> what they record."""
    tensors = [a for a in body.arguments if isinstance(a, fx.Node)]
    for user in list(body.enter.users):
        user.replace_all_uses_with(tensors[user.args[1]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(body.enter)
    _replace_uses(gm, body.leave, body.leave.args[1], None, {}, set())


def _moved(path: str, traced_on: str, caller: str) -> str:
    """``blocks.0.attn1`` -> ``blocks.7.attn1``; paths outside the block stay."""
    if path == traced_on or path.startswith(traced_on + "."):
        return caller + path[len(traced_on):]
    return path


def _block_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        raise BlockLeafError(f"{node.format_node()} has no nn_module_stack: cannot place a block's body")
    return max((path for path, _ in stack.values()), key=len)

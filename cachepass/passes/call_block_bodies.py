"""Make every block of a marked class (`cachepass.block_regions`) one call of its class's traced body.

With block regions on, Dynamo traces the first block of each class inline between an ``enter`` call
(its class name and flattened arguments; the tensors come out of it as ``getitem``s) and a ``leave``
call (its class name and outputs), and every other block of the class is one ``leaf(class_name, path, args, kwargs)``
call, which Dynamo traced without the block's weights (under ``scope="blocks"`` blocks 1.. of a list are one
``chain(class_name, list_path, count, fed, args, kwargs)`` call, which this pass expands into one call per block,
each fed the outputs of the one before as the list's loop feeds them). This pass moves the first block's traced nodes into a
submodule of their own (the body: ``cachepass_block_<i>_<Class>``, its inputs the values those nodes read from
outside them, its outputs the block's flattened outputs) and puts one ``call_module`` of the body, with
``getitem``s of its outputs, in place of the first block and of every leaf:

- the first block's call takes what its nodes read;
- a leaf's call takes its own arguments at the flat positions of ``enter``'s tensors, and new placeholders for its
  block's weights of the same paths (after Dynamo's inputs, marked with their module path for
  `cachepass.leaf_weights`, which the backend appends to each call) where the body reads the first block's; other
  values (a size symbol) are the same for every call.

Each call and its ``getitem``s carry the module stack of the block they stand for, so block discovery sees one
call per block; the piecewise split compiles the body once for all of them. The graph then grows by a call, not
by a copy of the block's nodes, per block: inlining each leaf copied about 130 nodes per block of a Wan, which
the outlining and the split copied again (9 679 node copies at a new shape of a 30-block Wan; with this pass our
backend at that shape went from 0.56-0.70 to 0.38-0.42 s on the CPU, bench/NOTES.md). ``enter`` and ``leave``
are removed. A leaf whose call does not match its body (other constants, a block configured otherwise) raises
`BlockLeafError`: the call is traced again with every block inline, and this pass then has nothing to do.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from cachepass import block_regions
from cachepass.analysis.blocks import normalize_module_path
from cachepass.block_regions import BlockLeafError
from cachepass.leaf_weights import WEIGHT_PATH, fake_like, weight_path

log = logging.getLogger(__name__)

BODY_PREFIX = "cachepass_block_"  # the bodies' submodule names: cachepass_block_0_WanTransformerBlock


@dataclass
class _Body:
    path: str  # the block it was traced in: blocks.0
    enter: fx.Node
    leave: fx.Node
    nodes: list[fx.Node]  # strictly between enter and leave, in order, enter's getitems excluded
    inputs: list[fx.Node]  # the outside values the nodes read, in order of first use: the body's placeholders
    outputs: list[fx.Node]  # the block's flattened outputs: what the body returns
    weights: dict[fx.Node, str]  # the block's own weight inputs among ``inputs`` -> their path within the block
    module: str = ""  # the body's submodule name

    @property
    def arguments(self) -> list:
        return list(self.enter.args[1])


def call_block_bodies(gm: fx.GraphModule, shared_weight_values: bool = False) -> fx.GraphModule:
    """``shared_weight_values``: a leaf's weight placeholder takes the first block's weight's fake value as its
    ``example_value`` instead of one of its own (783 fewer fake tensors at a new shape of a 30-block Wan). Only where
    the weights are bound next (`bind_block_weights`): a graph that passes them as values clones cond operands that
    share a storage (`cachepass.decision.branches.without_aliases`), and would clone those weights."""
    nodes = list(gm.graph.nodes)
    enters = [n for n in nodes if _calls(n, block_regions.enter)]
    leaves = [n for n in nodes if _calls(n, block_regions.leaf)]
    chains = [n for n in nodes if _calls(n, block_regions.chain)]
    if not enters and not leaves and not chains:
        return gm
    bodies = {e.args[0]: _body(nodes, e) for e in enters}  # by class name, which enter and leaf both record
    for index, (name, body) in enumerate(bodies.items()):  # numbered: two classes may share a name
        body.module = BODY_PREFIX + f"{index}_" + re.sub(r"\W", "_", name.rsplit(".", 1)[-1])
        gm.add_submodule(body.module, _body_module(body))
    inputs = _Inputs(gm, shared_weight_values)
    for leaf in leaves:
        body = bodies.get(leaf.args[0])
        if body is None:
            raise BlockLeafError(f"the block leaf at {_block_path(leaf)} has no block of its class traced inline")
        _call_for_leaf(gm, leaf, body, inputs)
    for chain in chains:
        body = bodies.get(chain.args[0])
        if body is None:
            raise BlockLeafError(f"the blocks of {chain.args[1]} chained have no block of their class traced inline")
        _calls_for_chain(gm, chain, body, inputs)
    for body in bodies.values():
        _call_for_first(gm, body)
    gm.graph.lint()
    gm.recompile()
    log.info("stepcache: %d block leaf call(s), %d chain(s) of blocks and %d traced block(s) made calls of %d body "
             "module(s)", len(leaves), len(chains), len(bodies), len(bodies))
    return gm


def _calls(node: fx.Node, fn) -> bool:
    return node.op == "call_function" and node.target is fn


def _body(nodes: list[fx.Node], enter: fx.Node) -> _Body:
    start = nodes.index(enter)
    leave = next((n for n in nodes[start + 1:] if _calls(n, block_regions.leave)), None)
    if leave is None:
        raise BlockLeafError(f"the block traced inline at {_block_path(enter)} has no recorded outputs")
    arguments = {user: user.args[1] for user in enter.users}
    for user in arguments:
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise BlockLeafError(f"the arguments of the block at {_block_path(enter)} are used by {user.format_node()}")
    inside = [n for n in nodes[start + 1:nodes.index(leave)] if n not in arguments]
    members = set(inside) | {leave}
    for node in inside:
        if node.op in ("get_attr", "call_module") or any(a.op == "get_attr" for a in node.all_input_nodes):
            # a weight or submodule held by the graph, not passed as an input: a call could not replace it
            raise BlockLeafError(f"the block traced at {_block_path(enter)} reads {node.format_node()} from the graph "
                                 "module, which its leaves cannot replace")
        outside = [u for u in node.users if u not in members]
        if outside:
            raise BlockLeafError(f"{node.format_node()} inside the block at {_block_path(enter)} is used after it by "
                                 f"{outside[0].format_node()}")
    own = set(inside)
    read: dict[fx.Node, None] = {}
    for node in inside:
        for used in node.all_input_nodes:
            if used not in own:
                read.setdefault(used)
    path = _block_path(enter)
    # parameters and buffers only: a number the block reads from its modules (a norm's eps: an input of its own
    # under dynamic=True) is a plain attribute, which `check_leaf` finds equal in every leaf: they take the first's
    weights = {used: within for used in read
               if used.op == "placeholder" and (within := _within(used, path)) is not None
               and within.split(".")[-2:-1] in (["_parameters"], ["_buffers"])}
    outputs = [n for n in pytree.tree_leaves(leave.args[1]) if isinstance(n, fx.Node)]
    return _Body(path, enter, leave, inside, list(read), outputs, weights)


def _body_module(body: _Body) -> fx.GraphModule:
    """The first block's nodes as a graph of their own: placeholders for ``body.inputs``, the flat outputs returned."""
    graph, env = fx.Graph(), {}
    for value in body.inputs:
        env[value] = graph.placeholder(value.name)
        env[value].meta = dict(value.meta)
    for node in body.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in body.outputs))
    return _LazyGraphModule(torch.nn.Module(), graph, class_name=body.module)


def _call_for_leaf(gm: fx.GraphModule, leaf: fx.Node, body: _Body, inputs: "_Inputs") -> None:
    caller = _block_path(leaf)
    _, block, args, kwargs = leaf.args
    if normalize_module_path(caller) != block:
        raise BlockLeafError(f"the block leaf for {block} was traced at {caller}")
    block_regions.check_leaf(block)
    env = _argument_map(body, leaf, block_regions.flat_arguments(args, kwargs))
    env.update({used: inputs.weight(f"{block}.{within}", used) for used, within in body.weights.items()})
    values = _flat_values(body.leave.args[1], leaf.meta.get("example_value"))
    outputs = _call(gm, leaf, body, [env.get(a, a) for a in body.inputs], leaf.meta, values)
    _replace_uses(leaf, body.leave.args[1], dict(zip(body.outputs, outputs)))
    gm.graph.erase_node(leaf)


def _calls_for_chain(gm: fx.GraphModule, chain: fx.Node, body: _Body, inputs: "_Inputs") -> None:
    """A `block_regions.chain` of blocks 1.. of a list -> one call of the body per block, each fed the outputs of the
    call before it as the chain feeds them, with the module stack of its block (the first block's, its entry made the
    block's)."""
    _, list_path, count, fed, args, kwargs = chain.args
    traced = chain.meta.get("example_value")
    args, kwargs = list(args), dict(kwargs)
    returned = []  # each block's return value, its tensors the getitems of its call
    for index in range(1, count):
        block = f"{list_path}.{index}"
        block_regions.check_leaf(block)
        env = _argument_map(body, chain, block_regions.flat_arguments(args, kwargs), block)
        env.update({used: inputs.weight(f"{block}.{within}", used) for used, within in body.weights.items()})
        value = traced[index - 1] if isinstance(traced, tuple) and len(traced) == count - 1 else None
        meta = {**_chained_meta(chain), "nn_module_stack": _stack_of(body, block)}
        outputs = _call(gm, chain, body, [env.get(a, a) for a in body.inputs], meta,
                        _flat_values(body.leave.args[1], value))
        new = dict(zip(body.outputs, outputs))
        out = pytree.tree_map_only(fx.Node, new.__getitem__, body.leave.args[1])
        returned.append(out)
        block_regions.feed(fed, args, kwargs, out if isinstance(out, tuple) else (out,))
    for user in list(chain.users):
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise BlockLeafError(f"the outputs of the blocks of {list_path} chained are used by {user.format_node()}")
        out = returned[user.args[1]]
        _replace_uses(user, out, {n: n for n in pytree.tree_leaves(out) if isinstance(n, fx.Node)})
        gm.graph.erase_node(user)
    gm.graph.erase_node(chain)


def _chained_meta(chain: fx.Node) -> dict:
    return {k: chain.meta[k] for k in ("stack_trace", "source_fn_stack") if k in chain.meta}


def _stack_of(body: _Body, block: str) -> dict:
    """The first block's module stack with its block's entry made ``block``'s (``blocks.7``): the entries outside the
    block, then the block."""
    stack = body.enter.meta.get("nn_module_stack") or {}
    first = normalize_module_path(body.path)
    outer = {}
    for key, (path, cls) in stack.items():
        if normalize_module_path(path) == first:
            return {**outer, f"cachepass_chain.{block}": (block, cls)}
        outer[key] = (path, cls)
    raise BlockLeafError(f"the module stack of the block traced at {body.path} has no entry for it")


def _call_for_first(gm: fx.GraphModule, body: _Body) -> None:
    """The first block's nodes, its marks and ``enter``'s getitems -> one call of the body."""
    tensors = [a for a in body.arguments if isinstance(a, fx.Node)]
    env = {user: tensors[user.args[1]] for user in body.enter.users}
    values = [n.meta.get("example_value") for n in body.outputs]
    outputs = _call(gm, body.leave, body, [env.get(a, a) for a in body.inputs], body.enter.meta, values)
    _replace_uses(body.leave, body.leave.args[1], dict(zip(body.outputs, outputs)))
    gm.graph.erase_node(body.leave)
    for node in reversed(body.nodes):
        gm.graph.erase_node(node)
    for user in list(body.enter.users):
        user.replace_all_uses_with(env[user])
        gm.graph.erase_node(user)
    gm.graph.erase_node(body.enter)


def _flat_values(structure, value) -> list:
    """The leaf's traced value at each node of the block's output ``structure`` (None where it has none)."""
    nodes = pytree.tree_leaves(structure)
    values = pytree.tree_leaves(value) if value is not None else []
    if len(values) != len(nodes):
        values = [None] * len(nodes)
    return [v for n, v in zip(nodes, values) if isinstance(n, fx.Node)]


def _call(gm: fx.GraphModule, before: fx.Node, body: _Body, args: list, meta: dict, values: list) -> list[fx.Node]:
    """A call of ``body`` with ``args`` before ``before``, and a getitem per output, each with the block's module stack
    (from ``meta``, the caller's), its value in ``values`` and the name of the first block's output."""
    block_meta = {k: meta[k] for k in ("nn_module_stack", "stack_trace", "source_fn_stack") if k in meta}
    with gm.graph.inserting_before(before):
        call = gm.graph.call_module(body.module, tuple(args))
        call.meta.update(block_meta)
        call.meta["example_value"] = tuple(values)
        outputs = []
        for position, (traced, value) in enumerate(zip(body.outputs, values)):
            # named as the first block's output (discovery tells hidden from text states by name where it must)
            out = gm.graph.create_node("call_function", operator.getitem, (call, position), name=traced.name)
            out.meta.update(block_meta)
            out.meta["example_value"] = value
            outputs.append(out)
    return outputs


class _Inputs:
    """New placeholders for the leaves' weights, after the graph's last input, in the order they are asked for."""

    def __init__(self, gm: fx.GraphModule, shared_values: bool):
        self.graph = gm.graph
        self.last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        self.shared_values = shared_values

    def weight(self, path: str, like: fx.Node) -> fx.Node:
        """The input for the weight at ``path`` (``blocks.7.attn1.to_q._parameters.weight``), laid out as ``like``
        (the first block's, which `check_leaf` found alike)."""
        with self.graph.inserting_after(self.last):
            node = self.last = self.graph.placeholder("leaf_" + re.sub(r"\W", "_", path))
        value = like.meta["example_value"]
        node.meta["example_value"] = value if self.shared_values else fake_like(value.fake_mode, value)
        node.meta[WEIGHT_PATH] = path
        return node


def _argument_map(body: _Body, leaf: fx.Node, flat: list, path: str | None = None) -> dict:
    """enter's getitems -> the leaf's arguments at the same flat tensor positions (constants must agree). ``path``:
    the block's, where ``leaf`` stands for more than one (a chain)."""
    ours = body.arguments
    if len(ours) != len(flat) or any(isinstance(a, fx.Node) != isinstance(b, fx.Node) or
                                     (not isinstance(a, fx.Node) and a != b) for a, b in zip(ours, flat)):
        raise BlockLeafError(f"the block at {path or _block_path(leaf)} is called with other arguments than the block "
                             f"traced at {body.path}")
    theirs = [b for b in flat if isinstance(b, fx.Node)]
    return {user: theirs[user.args[1]] for user in body.enter.users}


def _within(node: fx.Node, block_path: str) -> str | None:
    """``blocks.7.attn1.to_q._parameters.weight`` -> ``attn1.to_q._parameters.weight`` for ``blocks.7``."""
    path, block = weight_path(node), normalize_module_path(block_path)
    return path[len(block) + 1:] if path is not None and path.startswith(block + ".") else None


def _replace_uses(node: fx.Node, outputs, new: dict) -> None:
    """``node``'s uses (through ``getitem``s for a tuple) -> what ``new`` maps ``outputs``' nodes to; the getitems
    that only took a tuple apart are removed."""
    if isinstance(outputs, fx.Node):
        node.replace_all_uses_with(new[outputs])
        return
    for user in list(node.users):
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise BlockLeafError(f"the outputs of the block at {_block_path(node)} are used by {user.format_node()}")
        _replace_uses(user, outputs[user.args[1]], new)
        user.graph.erase_node(user)


def _block_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        raise BlockLeafError(f"{node.format_node()} has no nn_module_stack: cannot place a block's body")
    return max((path for path, _ in stack.values()), key=len)

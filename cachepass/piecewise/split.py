"""Split the one-graph form into pieces: glue, one piece per block, and one piece per ``torch.cond``.

Nodes are owned by the outermost block-list item on their ``nn_module_stack`` (``blocks.3``); a new
piece starts wherever the owner changes, and every cond gets a piece of its own (with the
``get_attr`` nodes of its branches), which the executor runs as a host-side branch. Pieces keep the
original node order and return a tuple of what later pieces read, in definition order (the cond
piece: the cond's own tuple); the top-level graph that calls them is the executor's program. Every
module is a lazy GraphModule (its code is generated when it first runs): torch 2.11's
``split_module`` built each piece's code at once, about 1 s per compile on a 30-block model.
A block whose nodes, wiring and traced boundary layouts match an earlier block's shares that
block's module (`_signature`): the split copies each kind of block once, not once per block.
Weights a piece's nodes name (`cachepass.bound_weights.WeightRef`) become its last placeholders, and
the piece's `PieceInfo.weights` names the graph inputs they stand for: the executor appends them.
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from cachepass.analysis.blocks import list_items
from cachepass.bound_weights import WeightRef, refs_in, replace_refs
from cachepass.passes.call_block_bodies import BODY_PREFIX
from cachepass.piecewise.compile import arg_key
from cachepass.state.sizes import hashable, size_inputs, symbol_nodes


class PieceKind(str, enum.Enum):
    GLUE = "glue"  # code outside the blocks: embeddings, the clock, the decision, state updates
    BLOCK = "block"  # one block of a block list
    COND = "cond"  # a cache unit's torch.cond: run by the executor


@dataclasses.dataclass(frozen=True)
class PieceInfo:
    name: str  # attribute of the split graph (``submod_3``)
    kind: PieceKind
    owner: str | None  # block path for block pieces, the cache unit (block list) for conds
    weights: tuple[str, ...] = ()  # the graph inputs its weight placeholders (its last) take, by name


def block_owner(node: fx.Node, block_lists: set[str]) -> str | None:
    """The block of one of ``block_lists`` that ``node`` belongs to (outermost on its module stack)."""
    return next((f"{path}.{index}" for path, index, _ in list_items(node) if path in block_lists), None)


def is_cond(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.cond


def split_pieces(gm: fx.GraphModule, block_lists: set[str]) -> tuple[fx.GraphModule, dict[str, PieceInfo]]:
    """``gm`` -> a graph calling one submodule per piece, and what each piece is.

    ``block_lists`` are the module paths of the block lists whose items become pieces of their own.
    """
    pieces: list[list[fx.Node]] = []
    kinds: list[tuple[PieceKind, str | None]] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if is_cond(node):
            key = (PieceKind.COND, node.meta["stepcache_unit"].name)  # the UnitSpec insert_cache_cond left
        else:
            owner = block_owner(node, block_lists)
            key = (PieceKind.BLOCK, owner) if owner else (PieceKind.GLUE, None)
        if not kinds or key != kinds[-1] or key[0] is PieceKind.COND:
            kinds.append(key)
            pieces.append([])
        pieces[-1].append(node)
    index = {node: i for i, nodes in enumerate(pieces) for node in nodes}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:  # with the first piece that reads it (a cond's branches)
            pieces[min(index[user] for user in node.users)].insert(0, node)
    program = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = program.node_copy(node)
    modules, infos, blocks = {}, {}, {}
    size_nodes = symbol_nodes(gm.graph)
    for i, ((kind, owner), nodes) in enumerate(zip(kinds, pieces)):
        name = f"submod_{i}"
        inputs, outputs = _boundary(nodes, every_block_output=kind is PieceKind.BLOCK)
        inputs += size_inputs(inputs, size_nodes)
        refs = list(dict.fromkeys(r for n in nodes for r in refs_in((n.args, n.kwargs))))
        if kind is PieceKind.BLOCK:  # a block like an earlier one shares its module: no copy of its nodes
            signature = _signature(nodes, inputs, refs, outputs)
            piece = blocks.get(signature)
            if piece is None:
                piece = blocks[signature] = _piece(gm, nodes, inputs, refs, outputs)
        else:
            piece = _piece(gm, nodes, inputs, refs, outputs)
        modules[name], infos[name] = piece, PieceInfo(name, kind, owner, tuple(r.name for r in refs))
        call = program.call_module(name, tuple(env[n] for n in inputs))
        if _returns_the_cond(outputs):
            env[outputs[0]] = call
        else:
            for position, node in enumerate(outputs):
                env[node] = program.call_function(operator.getitem, (call, position))
    program.output(fx.map_arg(gm.graph.output_node().args[0], env.__getitem__))
    return _LazyGraphModule(modules, program), infos


def _boundary(nodes: list[fx.Node], every_block_output: bool = False) -> tuple[list[fx.Node], list[fx.Node]]:
    """The outside values ``nodes`` take (in order of first use) and the values they give to later pieces or the
    output (in definition order: identical blocks make identical pieces). ``every_block_output``: each output of a
    block body's call too where nothing reads it (FLUX's last single block's text states), so that the block's piece
    is its list's others'."""
    mine, inputs = set(nodes), {}
    for node in nodes:
        for used in node.all_input_nodes:
            if used not in mine:
                inputs.setdefault(used, None)
    outputs = [n for n in nodes if any(user not in mine for user in n.users)
               or (every_block_output and not n.users and _takes_a_body_output(n))]
    return list(inputs), outputs


def _takes_a_body_output(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_module" and str(node.args[0].target).startswith(BODY_PREFIX))


def _piece(gm: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], refs: list[WeightRef],
           outputs: list[fx.Node]) -> fx.GraphModule:
    """The piece of ``nodes`` (in graph order), taking ``inputs`` and the weights ``refs`` name, returning ``outputs``."""
    graph, env = fx.Graph(), {}
    for value in inputs:
        env[value] = graph.placeholder(value.name)
        env[value].meta = dict(value.meta)
    weights = {}
    for position, ref in enumerate(refs):
        weights[ref] = graph.placeholder(f"weight_{position}")
        weights[ref].meta["example_value"] = ref.example_value
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        if weights:
            env[node].args, env[node].kwargs = replace_refs(env[node].args, weights), replace_refs(env[node].kwargs, weights)
    graph.output(env[outputs[0]] if _returns_the_cond(outputs) else tuple(env[n] for n in outputs))
    return _LazyGraphModule(gm, graph)


def _signature(nodes: list[fx.Node], inputs: list[fx.Node], refs: list[WeightRef], outputs: list[fx.Node]) -> tuple:
    """What makes two blocks one module: each node's op, target and wiring (by position; a weight by its position among
    ``refs``), and the layouts of the values Dynamo traced at the boundary and of the weights, which the executor's fake
    propagation and the compiler read from it."""
    index = {n: i for i, n in enumerate([*inputs, *refs, *nodes])}
    wiring = tuple((n.op, n.target, arg_key(n.args, index), arg_key(n.kwargs, index)) for n in nodes)
    return (wiring, tuple(_layout(n) for n in inputs), tuple(r.layout for r in refs),
            tuple(index[n] for n in outputs), tuple(_layout(n) for n in outputs))


def _layout(node: fx.Node) -> tuple | None:
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return None
    sizes = (*value.shape, *value.stride(), value.storage_offset())
    return hashable(sizes), value.dtype, value.device


def _returns_the_cond(outputs: list[fx.Node]) -> bool:
    """A cond piece returns the cond's tuple as it is: the executor runs one branch's program in its place."""
    return len(outputs) == 1 and is_cond(outputs[0])

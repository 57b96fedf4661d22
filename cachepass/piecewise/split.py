"""Split the one-graph form into pieces: glue, one piece per block, and one piece per ``torch.cond``.

Nodes are owned by the outermost block-list item on their ``nn_module_stack`` (``blocks.3``); a new
piece starts wherever the owner changes, and every cond gets a piece of its own (with the
``get_attr`` nodes of its branches), which the executor runs as a host-side branch. Pieces keep the
original node order (``split_module(keep_original_order=True)``); the top-level graph that calls
them is the executor's program.
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from cachepass.analysis.blocks import list_items


class PieceKind(str, enum.Enum):
    GLUE = "glue"  # code outside the blocks: embeddings, the clock, the decision, state updates
    BLOCK = "block"  # one block of a block list
    COND = "cond"  # a cache unit's torch.cond: run by the executor


@dataclasses.dataclass(frozen=True)
class PieceInfo:
    name: str  # attribute of the split graph (``submod_3``)
    kind: PieceKind
    owner: str | None  # block path for block pieces, the cache unit (block list) for conds


def block_owner(node: fx.Node, block_lists: set[str]) -> str | None:
    """The block of one of ``block_lists`` that ``node`` belongs to (outermost on its module stack)."""
    return next((f"{path}.{index}" for path, index, _ in list_items(node) if path in block_lists), None)


def is_cond(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.cond


def split_pieces(gm: fx.GraphModule, block_lists: set[str]) -> tuple[fx.GraphModule, dict[str, PieceInfo]]:
    """``gm`` -> a graph calling one submodule per piece, and what each piece is.

    ``block_lists`` are the module paths of the block lists whose items become pieces of their own.
    """
    partition: dict[fx.Node, int] = {}
    kinds: list[tuple[PieceKind, str | None]] = []
    previous = None
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if is_cond(node):
            key = (PieceKind.COND, node.meta["stepcache_unit"].name)  # the UnitSpec insert_cache_cond left
        else:
            owner = block_owner(node, block_lists)
            key = (PieceKind.BLOCK, owner) if owner else (PieceKind.GLUE, None)
        if key != previous or key[0] is PieceKind.COND:
            kinds.append(key)
        partition[node] = len(kinds) - 1
        previous = key
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            partition[node] = min(partition[user] for user in node.users)
    split = split_module(gm, gm, lambda node: partition[node], keep_original_order=True)
    infos = {}
    for index, (kind, owner) in enumerate(kinds):
        name = f"submod_{index}"
        if hasattr(split, name):
            infos[name] = PieceInfo(name, kind, owner)
    for node in list(split.graph.nodes):
        if node.op == "call_module" and infos[node.target].kind is not PieceKind.COND:
            _return_tuple(split, node)
    split.recompile()
    return split, infos


def _return_tuple(split: fx.GraphModule, call: fx.Node) -> None:
    """Make a piece return a tuple (what AOTAutograd and Inductor take) in definition order.

    split_module orders a piece's outputs by where they are used later, so the last block of a
    list would differ from the others only in its output order; definition order makes identical
    blocks identical pieces. The getitems after the call are renumbered to match.
    """
    piece = split.get_submodule(call.target)
    output = piece.graph.output_node()
    value = output.args[0]
    values = list(value) if isinstance(value, (tuple, list)) else ([] if value is None else [value])
    position = {n: i for i, n in enumerate(piece.graph.nodes)}
    order = sorted(range(len(values)), key=lambda i: position[values[i]])
    output.args = (tuple(values[i] for i in order),)
    piece.recompile()
    new_index = {old: new for new, old in enumerate(order)}
    if isinstance(value, (tuple, list)):
        for user in list(call.users):
            user.args = (call, new_index[user.args[1]])
    elif value is not None:
        with split.graph.inserting_after(call):
            first = split.graph.call_function(operator.getitem, (call, 0))
        call.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)

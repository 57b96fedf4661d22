"""Move a sharding split found at the start of a block list's first block out of the block.

diffusers' context parallel splits a model input in a pre-hook of the module its plan names:
Wan's plan names ``blocks.0``, so Dynamo records ``hidden_states.chunk(world)[rank]`` inside the
first block, which then takes the whole sequence and returns a shard, unlike every other block of
the list. A split (``chunk`` / ``split`` / ``tensor_split`` / ``unbind`` of a value computed outside
the block, read by constant ``getitem``) that opens the first block and that the second block does
not have is moved out of it: its nodes lose the block's entries on ``nn_module_stack``, so block
discovery sees the local shard as the block's input. The graph's computation is unchanged.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from cachepass.analysis.blocks import block_nodes_by_list_item, describe_value, normalize_module_path

log = logging.getLogger(__name__)

_SPLIT_METHODS = ("chunk", "split", "tensor_split", "unbind")
_SPLIT_FUNCTIONS = (torch.chunk, torch.split, torch.tensor_split, torch.unbind)


def split_before_first_block(gm: fx.GraphModule) -> fx.GraphModule:
    """The sharding split opening each block list's first block -> outside the block (module stack only)."""
    for path, blocks in block_nodes_by_list_item(gm).items():
        if 0 not in blocks or 1 not in blocks:
            continue
        first, second = blocks[0], blocks[1]
        split = _leading_split(first)
        if not split or len(first) - len(split) != len(second) or _is_split(second[0]):
            continue
        for node in split:
            node.meta["nn_module_stack"] = _outside(node.meta["nn_module_stack"], f"{path}.0")
        shard = next((n for n in split if n.target is operator.getitem), split[0])
        log.info("stepcache: %s.0 opens with a split of %s (a context-parallel shard, %s); it now runs before the block",
                 path, split[0].args[0].name, describe_value(shard))
    return gm


def _is_split(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SPLIT_METHODS
    return node.op == "call_function" and node.target in _SPLIT_FUNCTIONS


def _leading_split(block: list[fx.Node]) -> list[fx.Node]:
    """The split opening ``block`` and its constant ``getitem`` reads right after it, or [] if none."""
    head = block[0]
    own = set(block)
    if not _is_split(head) or not isinstance(head.args[0], fx.Node) or head.args[0] in own:
        return []
    reads = []
    for node in block[1:]:
        if node.target is operator.getitem and node.args[0] is head and isinstance(node.args[1], int):
            reads.append(node)
        else:
            break
    return [head, *reads] if reads else []


def _outside(stack: dict, block_path: str) -> dict:
    """``stack`` without the entries of ``block_path`` and below."""
    return {key: (path, cls) for key, (path, cls) in stack.items()
            if not (normalize_module_path(path) + ".").startswith(block_path + ".")}

"""Give a block list's hidden input standard strides before its first block, so every block compiles alike.

FastVideo's Wan DiT makes its tokens with ``patch_embedding(x).flatten(2).transpose(1, 2)`` and never
copies them: the head blocks compute on (and return) that transposed layout, while the blocks after
a cache unit's ``torch.cond`` get its contiguous outputs. The piecewise executor compiles one piece
per distinct block input layout, so the same block was compiled twice (a few seconds more at every
cold start and new shape). A ``contiguous`` copy of the hidden states in front of block 0 (outside
it) gives every block the same layout: one compiled block. Values are unchanged (a copy); the
kernels now see one layout, as for models whose tokens are contiguous.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from cachepass.analysis.blocks import CacheUnitPlan, block_nodes_by_list_item, example_value
from cachepass.decision.branches import is_standard_contiguous

log = logging.getLogger(__name__)


def contiguous_block_input(gm: fx.GraphModule, plans: list[CacheUnitPlan]) -> fx.GraphModule:
    """A non-contiguous hidden input of each unit's block 0 -> a contiguous copy, read by block 0 only."""
    blocks = block_nodes_by_list_item(gm)
    for plan in plans:
        hidden = plan.chain_input
        value = example_value(hidden)
        if not len(plan.head) or not isinstance(value, torch.Tensor) or is_standard_contiguous(value):
            continue  # no head block: block 0 is in the middle region, whose inputs insert_cache_cond copies
        if not _layout_carries_through_head(plan, value):
            continue  # the blocks change the layout themselves (views of a joined buffer): a copy would not unify
        first = set(blocks[plan.list_path][0])
        readers = [user for user in hidden.users if user in first]
        opening = next(n for n in gm.graph.nodes if n in first)
        with gm.graph.inserting_before(opening):  # before the block: its nodes stay one run
            copy = gm.graph.call_method("contiguous", (hidden,))
        # no example value: block 0's traced values are of the old layout, and the executor reuses a piece's
        # traced values only when its inputs have them (`cachepass.piecewise.execute`); without one it runs it
        copy.meta.update({k: v for k, v in hidden.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for reader in readers:
            reader.replace_input_with(hidden, copy)
        log.info("stepcache: %s.0 takes hidden states of strides %s (shape %s), which the head blocks keep and the "
                 "cond's outputs do not: copied contiguous before it, so the blocks of %s share one input layout",
                 plan.list_path, tuple(value.stride()), list(value.shape), plan.list_path)
    gm.graph.lint()
    gm.recompile()
    return gm


def _layout_carries_through_head(plan: CacheUnitPlan, value: torch.Tensor) -> bool:
    """Whether the head blocks return the hidden states in the layout block 0 took (FastVideo's blocks do): only
    then do the blocks after the cond, fed contiguous, differ from the head by layout alone."""
    head_output = next((example_value(s.middle_input) for s in plan.slots if s.role == "hidden"), None)
    return isinstance(head_output, torch.Tensor) and head_output.stride() == value.stride()

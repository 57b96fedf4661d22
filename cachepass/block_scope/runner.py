"""The module `cachepass.compile` compiles for one block list under ``scope="blocks"``: the list's blocks run in order,
each fed the previous one's outputs as the model's loop feeds them (`cachepass.block_scope.feeding`)."""

from __future__ import annotations

import torch
from torch import nn

from cachepass import block_regions
from cachepass.block_scope.feeding import Feeding, structure


class _ReadWeightsOnly:
    """``named_parameters`` / ``named_buffers`` as `nn.Module`'s, but not its own functions: where they are, Dynamo's wrap
    of the module walks every weight under it (marking each a static input, recording its name), while the trace reads
    a few. A list's program reads the first block's (the others are one `block_regions.chain`, their weights the
    backend's: `cachepass.leaf_weights`); the walk took 1 707 weights of a 30-block Wan at every trace, its new shapes
    included, against 87. Dynamo still marks every weight the trace reads as it reads it."""

    def named_parameters(self, *args, **kwargs):
        return super().named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return super().named_buffers(*args, **kwargs)


class _ListView(_ReadWeightsOnly, nn.ModuleList):
    """The model's block list as the runner registers it: the same blocks (one ``_modules`` dict: a block the model's
    list is given later is this one's too), its weights not walked by Dynamo's wrap."""

    def __init__(self, blocks: nn.ModuleList):
        super().__init__()
        self._modules = blocks._modules


class ListRunner(_ReadWeightsOnly, nn.Module):
    """Runs ``blocks`` (the model's own list, registered under ``name``: discovery names the cache unit after it).

    ``forward`` takes the first block's arguments and the inputs the clock reads (`cachepass.analysis.timestep`
    finds them by these names), and returns the last block's output with views of those inputs: Dynamo keeps
    an input in the graph only where an op of the graph reads it (an input returned as it is stays out).

    Where the first block is traced inline and the others would be leaves (`cachepass.block_regions`), blocks 1..
    are one `block_regions.chain` call: Dynamo then wraps, calls and guards the first block only. ``chained`` (set
    before each call by the list's scope) is how many blocks after the first the chain takes: up to a block traced
    inline (configured apart, `block_regions.leaf_count`), the others then called one by one; and 0 while any block
    but the first has hooks (a leaf's module call traces the block's hooks around it, a chain's blocks have none).
    """

    def __init__(self, name: str, blocks: nn.ModuleList, feedings: dict[tuple, Feeding]):
        super().__init__()
        self.add_module(name, _ListView(blocks))
        self.list_name = name
        self.block_class = block_regions.block_class_name(type(blocks[0]))
        self.feedings = feedings  # structure of the calls -> Feeding (Dynamo guards it: a new one recompiles)
        self.chained = len(blocks) - 1  # blocks 1 to this one run as one `block_regions.chain` (0: none); Dynamo guards it

    def forward(self, block_args: tuple, block_kwargs: dict, timestep: torch.Tensor | None = None,
                latents: torch.Tensor | None = None):
        feeding = self.feedings[structure(block_args, block_kwargs)]
        args, kwargs = list(block_args), dict(block_kwargs)
        blocks = getattr(self, self.list_name)
        first = 0
        out = None
        if self.chained and block_regions.traced_inline(blocks[0]):  # blocks 1.. are leaves: one `chain` of them
            out = blocks[0](*args, **kwargs)
            feeding.next_arguments(args, kwargs, out if isinstance(out, tuple) else (out,))
            first = self.chained + 1
            out = block_regions.chain(self.block_class, self.list_name, first, feeding.fed, tuple(args), kwargs)[-1]
            feeding.next_arguments(args, kwargs, out if isinstance(out, tuple) else (out,))
        for index in range(first, len(blocks)):
            out = blocks[index](*args, **kwargs)  # Dynamo traces the block's own call (`ListScope.block_called` steps aside)
            feeding.next_arguments(args, kwargs, out if isinstance(out, tuple) else (out,))
        return out, _kept(timestep), _kept(latents)


def _kept(value):
    """A view of ``value`` (a graph op reading it: its placeholder stays for the clock), or ``value`` if not a tensor."""
    return value.view(value.shape) if isinstance(value, torch.Tensor) else value

"""The module `cachepass.compile` compiles for one block list under ``scope="blocks"``: the list's blocks run in order,
each fed the previous one's outputs as the model's loop feeds them (`cachepass.block_scope.feeding`)."""

from __future__ import annotations

import torch
from torch import nn

from cachepass.block_scope.feeding import Feeding, structure


class ListRunner(nn.Module):
    """Runs ``blocks`` (the model's own list, registered under ``name``: discovery names the cache unit after it).

    ``forward`` takes the first block's arguments and the inputs the clock reads (`cachepass.analysis.timestep`
    finds them by these names), and returns the last block's output with views of those inputs: Dynamo keeps
    an input in the graph only where an op of the graph reads it (an input returned as it is stays out).
    """

    def __init__(self, name: str, blocks: nn.ModuleList, feedings: dict[tuple, Feeding]):
        super().__init__()
        self.add_module(name, blocks)
        self.list_name = name
        self.feedings = feedings  # structure of the calls -> Feeding (Dynamo guards it: a new one recompiles)

    def forward(self, block_args: tuple, block_kwargs: dict, timestep: torch.Tensor | None = None,
                latents: torch.Tensor | None = None):
        feeding = self.feedings[structure(block_args, block_kwargs)]
        args, kwargs = list(block_args), dict(block_kwargs)
        out = None
        for block in getattr(self, self.list_name):
            out = block(*args, **kwargs)  # Dynamo traces the block's own call (`ListScope.block_called` steps aside)
            feeding.next_arguments(args, kwargs, out if isinstance(out, tuple) else (out,))
        return out, _kept(timestep), _kept(latents)


def _kept(value):
    """A view of ``value`` (a graph op reading it: its placeholder stays for the clock), or ``value`` if not a tensor."""
    return value.view(value.shape) if isinstance(value, torch.Tensor) else value

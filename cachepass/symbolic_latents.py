"""``cachepass.compile(model, cfg, dynamic="latents")``: the latents' sizes are symbolic from the first call.

With ``dynamic=None`` (torch's automatic dynamic) the first resolution compiles with static sizes and the second
compiles the whole program again with the sizes that changed symbolic: Dynamo's trace of the model, the rewrite and
the split, piece by piece, about 2x what regional compile pays for its one block at that moment (bench/NOTES.md).
Here every call marks each dimension of the model's latents argument (``hidden_states``, ``latents``, ...:
`cachepass.analysis.timestep.LATENT_NAMES`) with ``torch._dynamo.maybe_mark_dynamic`` before Dynamo sees it, so
the first compile already traces the frames, height, width and token counts as symbols: a later resolution runs that
program after a guard check, with a cache state of its own (`cachepass.state.sizes`) and, on CUDA, its own graphs.
A dimension the model fixes (the channels a patch embedding reads, a batch of 1) is specialised by Dynamo as it
traces, without an error. A dimension of another tensor argument as long as one of the latents' at the first call is
marked too, at every call (FLUX's position ids have a row per token); the other inputs keep the default: a text length
that changes compiles once more, as does a size passed as a Python int (LTX-Video's ``num_frames``, ``height`` and
``width``).

Under ``scope="blocks"`` a list's program takes the blocks' arguments (tokens, text, rotary tables), whose sizes
no name ties to the latents: every dimension of every tensor it takes (and of the tensor a view was taken from,
which Dynamo guards too) is marked (`mark_every_size`), the text length's included.

The cost is the symbolic program's kernels at the first resolution too (the default runs static kernels until a
second resolution comes), and a symbolic first compile; measured in bench/NOTES.md. The one-graph form does not take
it: it compiles each shape statically.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from cachepass import block_regions
from cachepass.analysis.timestep import LATENT_NAMES
from cachepass.errors import CachepassError

OPTION = "latents"  # cachepass.compile(..., dynamic=OPTION)


class SymbolicLatents:
    """Marks the latents argument of each call of ``model`` (found once, by name, in its forward's signature)."""

    def __init__(self, model: nn.Module):
        parameters = [p for p in inspect.signature(model.forward).parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        names = [p.name for p in parameters]
        self.name = next((n for n in LATENT_NAMES if n in names), None)
        if self.name is None:
            raise CachepassError(f"cachepass.compile dynamic='latents' marks the model's latents argument, one of "
                                 f"{', '.join(LATENT_NAMES)}; {type(model).__name__}.forward takes {names}. Use "
                                 "dynamic=True (every input's sizes symbolic) or None")
        position = names.index(self.name)
        positional = parameters[position].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.position = position if positional else None
        self.followers: list[tuple[int | str, int]] | None = None  # (argument, dimension), from the first call

    def mark(self, args: tuple, kwargs: dict) -> None:
        """Mark every dimension of this call's latents (a tensor passed by name or at its position) as maybe dynamic,
        and the dimensions of other tensor arguments that were as long as one of the latents' at the first call (FLUX's
        position ids, a row per token): the same ones at every call, since Dynamo recompiles for a tensor marked now
        that was not when it compiled."""
        latents = kwargs.get(self.name)
        if latents is None and self.position is not None and self.position < len(args):
            latents = args[self.position]
        if not isinstance(latents, torch.Tensor):
            return
        if self.followers is None:
            sizes = set(latents.shape) - {1}
            self.followers = [(key, dim) for key, value in (*enumerate(args), *kwargs.items())
                              if isinstance(value, torch.Tensor) and value is not latents
                              for dim, size in enumerate(value.shape) if size in sizes]
        for dim in range(latents.dim()):
            torch._dynamo.maybe_mark_dynamic(latents, dim)
        for key, dim in self.followers:
            value = args[key] if isinstance(key, int) and key < len(args) else kwargs.get(key)
            if isinstance(value, torch.Tensor) and dim < value.dim():
                torch._dynamo.maybe_mark_dynamic(value, dim)


def mark_every_size(values) -> None:
    """Mark every dimension of each tensor in ``values`` (through tuples, lists and dicts), and of the tensor each view
    among them was taken from, as maybe dynamic: the same marks at every call, whatever the sizes."""
    for value in block_regions.flat_arguments(values, {}):
        if isinstance(value, torch.Tensor):
            for tensor in (value,) if value._base is None else (value, value._base):
                for dim in range(tensor.dim()):
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)

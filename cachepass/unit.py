"""A cache unit after outlining: its description (`UnitSpec`) and the module holding its middle blocks.

`outline_middle_blocks` replaces each middle region with ``call_module(unit_i, (h_in, *region_inputs))``
on an `OutlinedUnit`. Run as is, the outlined graph computes exactly what the original did; the
reference swaps the module for its eager DBCache logic, and `insert_cache_cond` rewrites the call
into the compiled decision + ``torch.cond``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import fx, nn


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """A carried value leaving the middle region."""

    slot: int
    role: str  # "hidden" or "encoder"
    input_position: int  # index of the middle-region input (head output) among the region inputs
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    input_name: str
    output_name: str

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """Everything about one cache unit that outlives the graph it was found in."""

    index: int
    name: str  # module path of the block list, e.g. "transformer_blocks"
    block_class: str
    block_paths: tuple[str, ...]
    head: range
    middle: range
    tail: range
    slots: tuple[SlotSpec, ...]

    @property
    def hidden(self) -> SlotSpec:
        return next(s for s in self.slots if s.role == "hidden")

    @property
    def module_name(self) -> str:
        return f"stepcache_unit_{self.index}"

    def describe(self) -> str:
        def span(r: range) -> str:
            return f"blocks {r.start}..{r.stop - 1}" if len(r) else "none"

        lines = [
            f"cache unit {self.index}: {self.name} ({len(self.block_paths)} x {self.block_class})",
            f"  head   {span(self.head)}   always run, decide on the hidden residual",
            f"  middle {span(self.middle)}   skipped on cached steps",
            f"  tail   {span(self.tail)}",
        ]
        for s in self.slots:
            dtype = str(s.dtype).removeprefix("torch.")
            lines.append(
                f"  carried {s.role:<7} {s.input_name} -> {s.output_name}  {dtype}{list(s.shape)}"
            )
        return "\n".join(lines)


class OutlinedUnit(nn.Module):
    """The middle blocks of one unit as a submodule; ``forward`` runs them (no caching)."""

    def __init__(self, spec: UnitSpec, compute: fx.GraphModule):
        super().__init__()
        self.spec = spec
        self.compute = compute

    def forward(self, hidden_in: torch.Tensor, *region_inputs):
        del hidden_in  # used by the caching variants of this call, not by the plain blocks
        return self.compute(*region_inputs)

"""Graph inputs that live in host memory and that the model only moves to the device: moved once, kept there.

FastVideo's Wan DiT takes its rotary tables from a process-wide cache of CPU tensors and calls
``.to(device)`` on them in ``forward``: Dynamo makes each table a graph input on the CPU. Run as
traced, every call copies it from pageable memory (a host sync), and a captured CUDA graph cannot
take it at all (it would keep the value at capture). Such an input (a CPU tensor whose every use in
the graph is a move to the program's device) is given to the program on the device instead: the
backend compiles with the moved example value (the moves become no-ops) and each call moves the
caller's tensor, reusing the device copy while the caller passes the same tensor object unchanged
(its version counter, which every in-place op bumps). Writes that bypass the counter (``.data``,
a NumPy view) are not seen: the INFO log says which inputs this covers.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Sequence

import torch
from torch import fx

from cachepass.piecewise.static_inputs import has_static_address

log = logging.getLogger(__name__)

_MOVES = {"to", "cuda"}


class HostInputs:
    """The host inputs of one compiled graph and the device copies its calls reuse."""

    def __init__(self, indices: list[int], device: torch.device):
        self.indices, self.device = indices, device
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # index -> (source, its version, copy)
        self.moved = 0  # copies made (a first call, or a new or changed tensor)

    @classmethod
    def find(cls, gm: fx.GraphModule, example_inputs: Sequence[Any], device: torch.device) -> "HostInputs":
        """The placeholders holding a CPU tensor that every user moves to ``device`` (none on a CPU program).

        Weights and buffers are not among them: where they live is their owner's business (an offload
        hook, cachepass's own offload), and ``.data`` swaps on them would go unseen.
        """
        indices = []
        if device.type != "cpu":
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
                if (isinstance(value, torch.Tensor) and value.device.type == "cpu" and not has_static_address(value)
                        and node.users and all(_moves_to(user, node, device) for user in node.users)):
                    indices.append(i)
        found = cls(indices, device)
        if indices:
            log.info("stepcache: %s", found.describe(example_inputs))
        return found

    def describe(self, inputs: Sequence[Any]) -> str:
        shapes = ", ".join(f"{i} {list(inputs[i].shape)}" for i in self.indices)
        return (f"graph input(s) {shapes} are CPU tensors the model moves to {self.device}: each is moved once and "
                "reused while the same tensor is passed unchanged (in-place writes are seen; writes through .data "
                "or NumPy are not)")

    def retarget(self, gm: fx.GraphModule, inputs: Sequence[Any]) -> list:
        """Make the host inputs device inputs of ``gm`` (their placeholders' fake values move too, so every
        pass and piece sees one graph); returns ``inputs`` so moved: what the program is compiled with."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = list(inputs)
        for i in self.indices:
            inputs[i] = inputs[i].to(self.device)
            traced = placeholders[i].meta.get("example_value")
            if isinstance(traced, torch.Tensor):
                with traced.fake_mode:
                    placeholders[i].meta["example_value"] = torch.empty_strided(
                        traced.shape, traced.stride(), dtype=traced.dtype, device=self.device)
        return inputs

    def move(self, args: Sequence[Any]) -> Sequence[Any]:
        """The call's graph inputs with each host input replaced by its device copy (made again if it changed)."""
        if not self.indices:
            return args
        args = list(args)
        for i in self.indices:
            args[i] = self._copy_of(i, args[i])
        return args

    def _copy_of(self, i: int, value: torch.Tensor) -> torch.Tensor:
        cached = self._copies.get(i)
        if cached is not None and cached[0]() is value and cached[1] == value._version:
            return cached[2]
        copy = value.to(self.device, copy=True)  # a new tensor: an output that aliased the old copy keeps its values
        self.moved += 1
        self._copies[i] = (weakref.ref(value), value._version, copy)
        return copy


def _moves_to(user: fx.Node, source: fx.Node, device: torch.device) -> bool:
    """Whether ``user`` is ``source.to(device, ...)`` / ``source.cuda()`` onto ``device``'s type."""
    method = user.target if user.op == "call_method" else (
        "to" if user.op == "call_function" and user.target is torch.Tensor.to else None)
    if method not in _MOVES or not user.args or user.args[0] is not source or source in user.args[1:]:
        return False
    if method == "cuda":
        return device.type == "cuda"
    targets = [a for a in (*user.args[1:], user.kwargs.get("device")) if a is not None]
    return any(_device_type(a) == device.type for a in targets)


def _device_type(value: Any) -> str | None:
    if isinstance(value, torch.device):
        return value.type
    if isinstance(value, str):
        try:
            return torch.device(value).type
        except RuntimeError:
            return None
    if isinstance(value, fx.Node):  # .to(other_tensor)
        example = value.meta.get("example_value")
        return example.device.type if isinstance(example, torch.Tensor) else None
    return None

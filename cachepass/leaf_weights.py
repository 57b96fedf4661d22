"""The block leaves' weights: graph inputs that the backend appends to each call, read from the called model.

Dynamo's trace of a block leaf (`cachepass.block_regions`) does not touch the block's parameters and buffers:
wrapping them into graph inputs (a fake tensor, a guard and a placeholder each, about 800 on a 30-block Wan)
was most of what the leaves still cost Dynamo. The pass that makes a leaf a call of the first block's body
(`cachepass.passes.call_block_bodies`) gives each weight the body reads a placeholder of its own,
after Dynamo's inputs, marked with the weight's module path (``blocks.7.attn1.to_q._parameters.weight``).
The backend finds them (`LeafWeights.of`) and appends them to every call, read by attribute path from the
model of the call in progress, so a replaced weight is seen as with any graph input. Dynamo guards the
first block's weights; these are checked here instead: while the same tensors come back (one identity
comparison per call) nothing else runs, and a changed tensor must keep the shape, strides, dtype and
device the graph was compiled for, or the call fails naming it (a block whose weights changed layout
needs a new compile: the pieces were compiled for the old one).
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

import torch
from torch import fx

from cachepass import block_regions
from cachepass.analysis.blocks import normalize_module_path
from cachepass.errors import CachepassError

WEIGHT_PATH = "cachepass_leaf_weight"  # placeholder meta: the weight's module path in the model


def weight_path(node: fx.Node) -> str | None:
    """The module path of the tensor a placeholder takes (``blocks.4.attn1.to_q._parameters.weight``): a leaf
    weight's mark, or Dynamo's source; None for an input with neither."""
    if WEIGHT_PATH in node.meta:
        return node.meta[WEIGHT_PATH]
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    name = source.name  # a method before torch 2.12, a property since
    return normalize_module_path(name() if callable(name) else name)


class LeafWeights:
    """The leaf-weight inputs of one rewritten graph: their paths, in placeholder order, and how to read them."""

    def __init__(self, paths: Sequence[str]):
        self.paths = tuple(paths)
        self._read = _reader(self.paths)
        self._ids: dict[int, list[int]] = {}  # id of a model -> the ids of its weights at its last call
        self._layouts: list[tuple] = []

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "LeafWeights":
        return cls([n.meta[WEIGHT_PATH] for n in gm.graph.nodes if n.op == "placeholder" and WEIGHT_PATH in n.meta])

    def compiled_with(self, example_inputs: Sequence, fake: bool = True) -> list[torch.Tensor]:
        """The example inputs for the weights of the model being compiled, whose layouts every later call must keep:
        where Dynamo's ``example_inputs`` have a fake mode (the backend's own, not the trace's) and ``fake``, static
        fake tensors of it laid out as these weights (`fake_like`); else the weights (the piecewise form's bound
        weights: its `cachepass.bound_weights.WeightTable` makes the few fakes its compiles read)."""
        if not self.paths:
            return []
        model = block_regions.current_model()
        tensors = self._tensors(model)
        self._ids, self._layouts = {id(model): list(map(id, tensors))}, [_layout(t) for t in tensors]
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        if fake_mode is None or not fake:
            return list(tensors)
        made: dict[int, torch.Tensor] = {}  # one fake per weight tensor: weights shared between blocks stay shared
        for tensor in tensors:
            if id(tensor) not in made:
                made[id(tensor)] = fake_like(fake_mode, tensor)
        return [made[id(t)] for t in tensors]

    def __call__(self) -> tuple:
        """The weights of the model of the call in progress (none when the graph has no leaves)."""
        if not self.paths:
            return ()
        model = block_regions.current_model()
        tensors = self._tensors(model)
        ids = list(map(id, tensors))
        if ids != self._ids.get(id(model)):  # two models sharing the graph (Wan 2.2's experts) keep their own
            self._check(tensors)
            self._ids[id(model)] = ids
        return tensors

    def _tensors(self, model: torch.nn.Module) -> tuple:
        try:
            return self._read(model)
        except (KeyError, AttributeError) as error:
            raise CachepassError(f"a block weight the compiled graph reads is gone from the model ({error!r}); compile "
                                 "the changed model again") from None

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        for path, tensor, layout in zip(self.paths, tensors, self._layouts):
            if not isinstance(tensor, torch.Tensor) or _layout(tensor) != layout:
                now = _describe(_layout(tensor)) if isinstance(tensor, torch.Tensor) else repr(tensor)
                raise CachepassError(
                    f"the weight {path.replace('._parameters.', '.').replace('._buffers.', '.')} is now {now}; the "
                    f"compiled graph takes {_describe(layout)}. A block's weights may be replaced by tensors of the "
                    "same shape, strides, dtype and device; for another layout, compile the model again "
                    "(cachepass.compile on the changed model)")


def fake_like(fake_mode, tensor: torch.Tensor) -> torch.Tensor:
    """A static fake tensor of ``fake_mode`` laid out as ``tensor`` (real or fake), made from a meta tensor: a fake
    dispatch (``empty_strided`` under the mode) or ``from_tensor`` costs about 4-5x, per weight of 783 per compile of
    a 30-block Wan. The backend's leaf weights need it: Dynamo hands the backend a fake mode of its own."""
    meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, meta, tensor.device)


@functools.lru_cache(maxsize=64)
def _reader(paths: tuple[str, ...]) -> Callable:
    """A function of the model returning the tensors at ``paths`` by attribute reads (shared prefixes read once).
    Kept per paths: each new shape of a model compiles for the same weights (its code takes about 12 ms to make at
    783 weights)."""
    lines, names = [], {"": "m"}
    for path in paths:
        parts = path.split(".")
        kind, name, modules = parts[-2], parts[-1], parts[:-2]
        for depth in range(1, len(modules) + 1):
            prefix = ".".join(modules[:depth])
            if prefix not in names:
                names[prefix] = f"m{len(names)}"
                lines.append(f"    {names[prefix]} = {names['.'.join(modules[:depth - 1])]}._modules[{modules[depth - 1]!r}]")
        if kind not in ("_parameters", "_buffers") or not re.fullmatch(r"\w+", name):
            raise ValueError(f"not a parameter or buffer path: {path!r}")
        lines.append(f"    t{len(lines)} = {names['.'.join(modules)]}.{kind}[{name!r}]")
    returned = [line.split("=")[0].strip() for line in lines if line.lstrip().startswith("t")]
    namespace: dict = {}
    source = "def read(m):\n" + "\n".join(lines) + f"\n    return ({', '.join(returned)}{',' if returned else ''})\n"
    exec(source, namespace)  # noqa: S102 (code built from module paths)
    return namespace["read"]


def _layout(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _describe(layout: tuple) -> str:
    shape, stride, dtype, device = layout
    return f"{list(shape)} (strides {list(stride)}) {str(dtype).removeprefix('torch.')} on {device}"

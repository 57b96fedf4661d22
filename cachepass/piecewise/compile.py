"""Compile each distinct piece once: structurally identical pieces (the blocks of a list) share one artifact.

A piece's key is its graph (ops, targets, constants, the wiring between nodes) plus the shape,
dtype, stride and device of each input; ``get_attr`` constants key by identity, so two pieces
only share a compiled callable when it computes the same function of its inputs. The weights
are inputs, so one compiled block serves every block of its list.

The last block of a list can lose an output nobody reads after it (FLUX's last single block
drops its text tokens, Dynamo removes the dead slice): such a piece reuses its list's artifact and
keeps the outputs it has (`PieceCompiler._reuse_with_fewer_outputs`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import operator
import time
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from cachepass.bound_weights import WeightRef


@dataclasses.dataclass
class CompileCount:
    """How many pieces asked for a compile, how many compiles ran, and their seconds, per kind of piece."""

    pieces: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    compiled: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    each: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (kind, seconds) per compile, in order

    def __str__(self) -> str:
        return ", ".join(f"{kind}: {self.compiled[kind]} compiled for {n} pieces" for kind, n in sorted(self.pieces.items()))

    def timings(self) -> str:
        """Seconds per kind, and each compile's: ``glue 10.7 s (6.1 + 1.9 + 1.6 + 1.1)``."""
        parts = []
        for kind in sorted(self.compiled):
            each = " + ".join(f"{s:.1f}" for k, s in self.each if k == kind)
            parts.append(f"{kind} {self.seconds[kind]:.1f} s ({each})")
        return ", ".join(parts)


class PieceCompiler:
    """Compiles pieces with ``compile_fn``, reusing the artifact of a structurally identical piece.

    ``needs_examples(kind)``: whether ``compile_fn`` reads a piece's example inputs (a piece run as traced does not;
    the executor then computes only the values other compiles need, and such a piece may get None for the rest).
    """

    def __init__(self, compile_fn: Callable[[fx.GraphModule, list, str], Callable],
                 needs_examples: Callable[[str], bool] = lambda kind: True):
        self.compile_fn = compile_fn
        self.needs_examples = needs_examples
        self.artifacts: dict[str, Callable] = {}
        self.numbers: dict[int, int] = {}  # id(artifact) -> its number, in compile order
        self.compiled: list[tuple[fx.GraphModule, list, Callable]] = []  # (piece, example inputs, artifact)
        self.graph_keys: dict[int, tuple[fx.GraphModule, tuple]] = {}  # id(piece) -> (piece, graph_key(piece))
        self.count = CompileCount()

    def __call__(self, piece: fx.GraphModule, example_inputs: list, kind: str) -> Callable:
        if id(piece) not in self.graph_keys:  # the split shares one module among alike blocks: its graph keyed once
            self.graph_keys[id(piece)] = (piece, graph_key(piece))
        key = repr((self.graph_keys[id(piece)][1], inputs_key(example_inputs)))
        self.count.pieces[kind] += 1
        if key not in self.artifacts:
            self.artifacts[key] = self._reuse_with_fewer_outputs(key, piece) or self._compile(piece, example_inputs, kind)
        return self.artifacts[key]

    def number(self, artifact: Callable) -> int:
        return self.numbers[id(artifact)]

    def _compile(self, piece: fx.GraphModule, example_inputs: list, kind: str) -> Callable:
        start = time.perf_counter()
        if self.needs_examples(kind):
            give_example_values(piece, example_inputs)
        artifact = self.compile_fn(piece, example_inputs, kind)
        seconds = time.perf_counter() - start
        self.count.seconds[kind] += seconds
        self.count.each.append((kind, seconds))
        self.count.compiled[kind] += 1
        self.numbers[id(artifact)] = len(self.numbers)
        self.compiled.append((piece, example_inputs, artifact))
        return artifact

    def _reuse_with_fewer_outputs(self, key: str, piece: fx.GraphModule) -> Callable | None:
        """A compiled piece that computes ``piece``'s outputs and more, wrapped to return just those."""
        wanted = len(_outputs(piece))
        for compiled, example_inputs, artifact in self.compiled:
            outputs = _outputs(compiled)
            if len(outputs) <= wanted or len(outputs) - wanted > 3:
                continue
            for kept in itertools.combinations(range(len(outputs)), wanted):
                if structural_key(_keep_outputs(compiled, kept), example_inputs) == key:
                    return self._selecting(artifact, kept)
        return None

    def _selecting(self, artifact: Callable, kept: tuple[int, ...]) -> Callable:
        def selected(*args):
            out = artifact(*args)
            return tuple(out[i] for i in kept)

        self.numbers[id(selected)] = self.number(artifact)
        return selected


def give_example_values(piece: fx.GraphModule, example_inputs: list) -> Any:
    """Give the nodes the passes created the ``example_value`` Dynamo's own nodes carry; returns the piece's fake
    outputs (None where ``example_inputs`` have no fake mode, or every node has one already: nothing ran).

    AOTAutograd's cache refuses a graph with a method call on a node without one ("Unsupported
    call_method target"), and a second process then traces every such piece again. The executor's
    fake propagation calls this for the pieces it runs, so a piece runs on fake tensors once.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    for node in piece.graph.nodes:  # Dynamo leaves a tensor ``__setitem__`` (rotary embeddings) without a value;
        if node.op == "call_function" and node.target is operator.setitem:  # it is None, nothing to run for
            node.meta.setdefault("example_value", None)
    if fake_mode is None or all("example_value" in n.meta for n in piece.graph.nodes if n.op != "output"):
        return None
    with torch.no_grad():
        outputs = FakeTensorProp(piece, mode=fake_mode).propagate_dont_convert_inputs(
            *in_fake_mode(fake_mode, example_inputs))
    for node in piece.graph.nodes:
        if "example_value" not in node.meta and "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    return outputs


def in_fake_mode(fake_mode, values: Sequence) -> list:
    """``values`` with the tensors not yet fake in ``fake_mode`` converted (``FakeTensorProp.propagate`` converts every
    tensor, fake ones again: about 0.2 ms each, 800 weights per propagation of a 30-block model)."""
    return [fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) and getattr(v, "fake_mode", None) is not fake_mode
            else v for v in values]


def _outputs(piece: fx.GraphModule) -> tuple:
    return piece.graph.output_node().args[0]


def _keep_outputs(piece: fx.GraphModule, kept: tuple[int, ...]) -> fx.GraphModule:
    """A copy of ``piece`` returning only the outputs at ``kept``, its dead code removed."""
    trimmed = copy.deepcopy(piece)
    output = trimmed.graph.output_node()
    output.args = (tuple(output.args[0][i] for i in kept),)
    trimmed.graph.eliminate_dead_code()
    return trimmed


def structural_key(gm: fx.GraphModule, example_inputs: list) -> str:
    return repr((graph_key(gm), inputs_key(example_inputs)))


def inputs_key(example_inputs: list) -> list:
    return [_value_key(v) for v in example_inputs]


def graph_key(gm: fx.GraphModule) -> tuple:
    """``gm``'s ops, targets, constants and wiring (by position), comparable across graphs."""
    index: dict[fx.Node, int] = {}
    parts = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "get_attr":
            target: Any = ("attr", id(_attribute(gm, node.target)))
        elif node.op == "placeholder":
            target = None
        else:
            target = node.target if isinstance(node.target, str) else _qualified_name(node.target)
        parts.append((node.op, target, arg_key(node.args, index), arg_key(node.kwargs, index)))
    return tuple(parts)


def _value_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(map(size_key, value.shape)), value.dtype, significant_strides(value), str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_key(v) for v in value))
    return repr(value)


def size_key(size: Any) -> Any:
    """An int as it is; a symbolic size as its expression, compared by structure. Comparing a ``SymInt`` asks its shape
    environment (a guard evaluation, tens of microseconds at a new shape's symbolic sizes); two expressions alike are
    the same size, and two that are not may still be equal under the environment's facts."""
    return size.node.expr if isinstance(size, torch.SymInt) else size


def significant_strides(value: torch.Tensor, size: Callable[[Any], Any] = size_key) -> tuple:
    """Strides with those of size-1 dimensions left out: no index ever moves along them.

    FLUX's single blocks return views of their joint text+image buffer, shaped [1, tokens, dim]
    with the batch stride of the whole buffer; the blocks after a glue piece or a cond get
    contiguous tensors of the same shape. Inductor's input checks (``assert_size_stride``) skip
    size-1 dimensions too, so one compiled block serves both. ``size``: how a size is read (`size_key` by default; a
    function returning the ``SymInt`` itself compares as the shape environment decides).
    """
    return tuple(size(s) if size(n) != 1 else None for n, s in zip(value.shape, value.stride()))


def arg_key(arg: Any, index: dict[fx.Node, int]) -> Any:
    """``arg`` (a node's args or kwargs) with each node replaced by its position in ``index``: the wiring, comparable
    across graphs."""
    if isinstance(arg, (fx.Node, WeightRef)):  # a weight a piece's nodes name: its position among the piece's weights
        return ("node", index[arg])
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(arg_key(a, index) for a in arg))
    if isinstance(arg, dict):
        return tuple(sorted((k, arg_key(v, index)) for k, v in arg.items()))
    return repr(arg)


def _qualified_name(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value

"""Compile each distinct piece once: structurally identical pieces (the blocks of a list) share one artifact.

A piece's key is its graph (ops, targets, constants, the wiring between nodes) plus the shape,
dtype, stride and device of each input; ``get_attr`` constants key by identity, so two pieces
only share a compiled callable when it computes the same function of its inputs. The weights
are inputs, so one compiled block serves every block of its list.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import torch
from torch import fx


@dataclasses.dataclass
class CompileCount:
    """How many pieces asked for a compile, and how many compiles ran, per kind of piece."""

    pieces: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    compiled: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __str__(self) -> str:
        return ", ".join(f"{kind}: {self.compiled[kind]} compiled for {n} pieces" for kind, n in sorted(self.pieces.items()))


class PieceCompiler:
    """Compiles pieces with ``compile_fn``, reusing the artifact of a structurally identical piece."""

    def __init__(self, compile_fn: Callable[[fx.GraphModule, list], Callable]):
        self.compile_fn = compile_fn
        self.artifacts: dict[str, Callable] = {}
        self.numbers: dict[int, int] = {}  # id(artifact) -> its number, in compile order
        self.count = CompileCount()

    def __call__(self, piece: fx.GraphModule, example_inputs: list, kind: str) -> Callable:
        key = structural_key(piece, example_inputs)
        self.count.pieces[kind] += 1
        if key not in self.artifacts:
            self.artifacts[key] = self.compile_fn(piece, example_inputs)
            self.numbers[id(self.artifacts[key])] = len(self.numbers)
            self.count.compiled[kind] += 1
        return self.artifacts[key]

    def number(self, artifact: Callable) -> int:
        return self.numbers[id(artifact)]


def structural_key(gm: fx.GraphModule, example_inputs: list) -> str:
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
        parts.append((node.op, target, _arg_key(node.args, index), _arg_key(node.kwargs, index)))
    return repr((parts, [_value_key(v) for v in example_inputs]))


def _value_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, tuple(value.stride()), str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_key(v) for v in value))
    return repr(value)


def _arg_key(arg: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(arg, fx.Node):
        return ("node", index[arg])
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_arg_key(a, index) for a in arg))
    if isinstance(arg, dict):
        return tuple(sorted((k, _arg_key(v, index)) for k, v in arg.items()))
    return repr(arg)


def _qualified_name(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value

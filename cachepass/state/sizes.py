"""Symbolic sizes: one compiled program for every shape, its state laid out per concrete shape at run time.

Dynamo traces a model's second shape with symbolic sizes (automatic dynamic shapes, what
``torch.compile`` does by default and regional compile relies on): the sizes that changed become
symbols (``s22``), and the state shapes the rewrite lays out are expressions in them
(``[2, 1, 64*s22, 128]``). `SizeSymbols` reads each symbol's value from a call's arguments (an
integer input or a tensor input's dimension, where Dynamo's graph takes it), so the state set can
pick, per call, the concrete layout and its state: a third resolution runs the same program, with
a state of its own, and no compile. `symbol_nodes` and `size_inputs` hand the pieces and the cond
branches the size symbols their inputs' sizes need: a compiler binds each symbol from its inputs.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import sympy
import torch
from torch import fx

from cachepass.analysis.blocks import example_value
from cachepass.errors import UnsupportedGraphError


def is_symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt)


def bare_symbol(size: Any) -> sympy.Symbol | None:
    """The symbol a size is by itself (``s18``; not ``2*s18``), else None: what a compiler binds from it."""
    return size.node.expr if is_symbolic(size) and isinstance(size.node.expr, sympy.Symbol) else None


def free_symbols(sizes: Iterable[Any]) -> frozenset:
    """The sympy symbols the sizes ``sizes`` (ints or SymInts) depend on."""
    found: set = set()
    for size in sizes:
        if is_symbolic(size):
            found |= size.node.expr.free_symbols
    return frozenset(found)


def hashable(sizes: Iterable[Any]) -> tuple:
    """``sizes`` with each symbolic size as its expression's text (SymInts do not hash)."""
    return tuple(str(s) if is_symbolic(s) else s for s in sizes)


class SizeSymbols:
    """Where each size symbol of a graph is read from its arguments, and the concrete sizes of a call."""

    def __init__(self, example_inputs: Sequence[Any], needed: Iterable[sympy.Symbol] = ()):
        where: dict[sympy.Symbol, tuple[int, int | None]] = {}
        for i, value in enumerate(example_inputs):
            if (symbol := bare_symbol(value)) is not None:
                where.setdefault(symbol, (i, None))
            elif isinstance(value, torch.Tensor):
                for dim, size in enumerate(value.shape):
                    if (symbol := bare_symbol(size)) is not None:
                        where.setdefault(symbol, (i, dim))
        # every integer input is a size: one symbol may come in twice (FLUX's token count), or as an expression
        integers = [i for i, value in enumerate(example_inputs) if is_symbolic(value)]
        needed = set(needed) | free_symbols(example_inputs[i] for i in integers)
        missing = sorted(str(s) for s in needed if s not in where)
        if missing:
            raise UnsupportedGraphError(
                f"the state's sizes depend on the symbolic size(s) {', '.join(missing)}, which no graph input carries "
                "as an integer or a tensor dimension; compile with cachepass.compile(..., dynamic=False)")
        self.symbols = tuple(sorted(where, key=str))
        self.reads = tuple(where[s] for s in self.symbols)
        self.integer_inputs = frozenset(integers)  # each a function of the symbols, so the symbols' values key them

    @classmethod
    def of(cls, example_inputs: Sequence[Any], needed: Iterable[sympy.Symbol] = ()) -> "SizeSymbols | None":
        """The size symbols of a graph's inputs; None for a graph traced with static sizes."""
        found = cls(example_inputs, needed)
        return found if found.symbols else None

    def values(self, args: Sequence[Any]) -> tuple[int, ...]:
        """The symbols' values in a call with graph inputs ``args``."""
        return tuple(int(args[i]) if dim is None else args[i].shape[dim] for i, dim in self.reads)

    def hints(self, example_inputs: Sequence[Any]) -> tuple[int, ...]:
        """The symbols' values in the call Dynamo traced (its example inputs' hints)."""
        return tuple(hint(example_inputs[i] if dim is None else example_inputs[i].shape[dim]) for i, dim in self.reads)

    def concrete(self, sizes: Iterable[Any], values: tuple[int, ...]) -> tuple[int, ...]:
        """``sizes`` (ints or SymInts) at the symbols' ``values``."""
        binding = {s: sympy.Integer(v) for s, v in zip(self.symbols, values)}
        return tuple(int(s.node.expr.xreplace(binding)) if is_symbolic(s) else s for s in sizes)


def symbol_nodes(graph: fx.Graph) -> dict:
    """Size symbol -> a node a compiler binds it from: the first whose value is that symbol alone (Dynamo's SymInt
    inputs, ``sym_size`` calls), else an input tensor with a dimension of that symbol alone. A cond's branch may have
    only the latter: HunyuanVideo's middle region takes ``-s1`` and the text states of ``s1`` tokens, and a block
    piece of it a view whose strides hold ``s1``. Inputs only: they are there before any piece runs."""
    found, tensors = {}, {}
    for node in graph.nodes:
        value = example_value(node)
        if (symbol := bare_symbol(value)) is not None:
            found.setdefault(symbol, node)
        elif node.op == "placeholder" and isinstance(value, torch.Tensor):
            for size in value.shape:
                if (symbol := bare_symbol(size)) is not None:
                    tensors.setdefault(symbol, node)
    return {**tensors, **found}


def size_inputs(inputs: list[fx.Node], size_nodes: dict) -> list[fx.Node]:
    """The nodes of the size symbols ``inputs``' sizes depend on but none of them carries alone: a compiler binds
    each symbol of a graph from its inputs (``s18`` from a tensor of ``32*(s18//2)`` rows alone it cannot), so a
    piece or a cond branch taking ``inputs`` takes these too. ``size_nodes``: `symbol_nodes` of their graph."""
    bound, needed = set(), set()
    for node in inputs:
        value = example_value(node)
        sizes = [value] if is_symbolic(value) else [*value.shape, *value.stride()] if isinstance(value, torch.Tensor) else []
        bound |= {bare_symbol(s) for s in sizes} - {None}
        needed |= free_symbols(sizes)
    missing = sorted(needed - bound, key=str)
    unknown = [str(s) for s in missing if s not in size_nodes]
    if unknown:
        raise UnsupportedGraphError(f"no node of the graph carries the size symbol(s) {', '.join(unknown)} "
                                    "that values passed between pieces depend on")
    return list(dict.fromkeys(size_nodes[s] for s in missing))  # a tensor may carry two of them


def size_input_name(size: Any) -> str:
    """A placeholder name for a value `size_inputs` gave: ``size_s18``, or ``size_tensor`` for a tensor carrying it."""
    return f"size_{size}" if is_symbolic(size) else "size_tensor"


def hint(size: Any) -> int:
    """A size's value in the traced call (a symbolic size's hint): for choices that must not guard on it."""
    return int(size.node.hint) if is_symbolic(size) else int(size)

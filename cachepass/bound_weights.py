"""Block weights named by reference instead of passed as graph values (the piecewise form).

A 30-block Wan's block calls read about 800 weights (26 per block). As graph values they are operands
of the cache unit's ``torch.cond``, placeholders of both branches, inputs of every split piece and
arguments in each program's generated code, with a fake value or a layout check at each level: about
8 ms of our backend per block at a new shape (bench/NOTES.md, the fourteenth session). Bound, a block's
body call names its weights with `WeightRef` constants (`cachepass.passes.bind_block_weights`) and
takes only its activations as graph values. The split gives a piece one placeholder per weight it names
(after its other inputs), and the executor's `Piece` appends the weights at each run, read from the
program's own inputs: the weights stay graph inputs of the top program (offload substitutes its slots
there, CUDA graphs check their addresses there), and only that program and the block pieces see them.

At run time the top program's first node (`bind`) records the call's weight inputs for the thread,
every piece of that call reads them by slot (`WeightTable.reader`), and its last node (`release`) lets
them go (a call that raises keeps them until the thread's next call).
"""

from __future__ import annotations

import operator
import threading
from typing import Callable, Sequence

import torch
from torch import fx

from cachepass.leaf_weights import fake_like


class WeightRef:
    """A body call's argument standing for the graph input ``name`` (a block's parameter or buffer).

    Its repr is the weight's layout only: two blocks of a list whose weights are laid out alike read
    alike to block discovery's structural comparison, as placeholders of the same rank did.
    """

    __slots__ = ("name", "example_value")

    def __init__(self, name: str, example_value: torch.Tensor):
        self.name, self.example_value = name, example_value

    @property
    def layout(self) -> tuple:
        value = self.example_value
        return tuple(value.shape), value.stride(), value.dtype, value.device

    def __repr__(self) -> str:
        shape, _, dtype, _ = self.layout
        return f"<weight {list(shape)} {str(dtype).removeprefix('torch.')}>"


def refs_in(arg) -> list[WeightRef]:
    """The `WeightRef`s in a node's ``args`` or ``kwargs``, in order."""
    found: list[WeightRef] = []
    fx.node.map_aggregate(arg, lambda a: found.append(a) if isinstance(a, WeightRef) else None)
    return found


def replace_refs(arg, env: dict[WeightRef, fx.Node]):
    """``arg`` with each `WeightRef` replaced by its node in ``env``."""
    return fx.node.map_aggregate(arg, lambda a: env[a] if isinstance(a, WeightRef) else a)


_CURRENT = threading.local()  # .weights: the weight inputs of the program call in progress on this thread


def bind(*weights: torch.Tensor) -> None:
    """The top program's first node: the call's weight inputs, for its pieces to read."""
    _CURRENT.weights = weights


def release() -> None:
    """The top program's last node before its output: no reference to the weights outlives the call."""
    _CURRENT.weights = ()


class WeightTable:
    """The weight inputs the pieces of one program read (compile time), in the order `bind` records them."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._inputs = {node.name: value for node, value in zip(placeholders, example_inputs)}  # by placeholder name
        self._fake_mode = torch._guards.detect_fake_mode(example_inputs)
        self._made: dict[tuple, torch.Tensor] = {}  # (position in a piece's weights, layout) -> a fake tensor
        self._slots: dict[str, int] = {}

    def examples(self, names: Sequence[str]) -> list:
        """The example values of the inputs ``names`` (a piece's weights), for its compile: fake tensors of the
        example inputs' fake mode where they have one. An input that is not one of that mode (a parameter Dynamo hands
        as the real tensor, a leaf weight, `cachepass.leaf_weights`) gets a static fake of its layout (`fake_like`),
        one per position and layout: the blocks of a list, alike, share their weights' fakes (29 x 26 weights of a
        30-block Wan take 26), and the weights of one piece stay apart."""
        return [self._example(position, self._inputs[name]) for position, name in enumerate(names)]

    def _example(self, position: int, value):
        if self._fake_mode is None or getattr(value, "fake_mode", None) is self._fake_mode:
            return value
        key = (position, tuple(value.shape), value.stride(), value.dtype, value.device)
        if key not in self._made:
            self._made[key] = fake_like(self._fake_mode, value)
        return self._made[key]

    def reader(self, names: Sequence[str]) -> Callable[[], tuple]:
        """A function returning the current call's values of the inputs ``names``, in order."""
        slots = [self._slots.setdefault(name, len(self._slots)) for name in names]
        if len(slots) == 1:
            slot = slots[0]
            return lambda: (_CURRENT.weights[slot],)
        pick = operator.itemgetter(*slots)
        return lambda: pick(_CURRENT.weights)

    def add_bind(self, program: fx.GraphModule) -> None:
        """``bind(<the inputs read, by slot>)`` as ``program``'s first node (after its placeholders), ``release()`` as
        its last before the output."""
        if not self._slots:
            return
        by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        graph = program.graph
        with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
            graph.call_function(bind, tuple(by_name[name] for name in self._slots))
        with graph.inserting_before(graph.output_node()):
            graph.call_function(release, ())


def with_weights(run: Callable, read: Callable[[], tuple]) -> Callable:
    """``run`` called with the current call's weights (``read``) after its own arguments."""

    def run_with_weights(*args):
        return run(*args, *read())

    return run_with_weights

"""The piecewise executor: a program that calls the compiled pieces in order, and its per-call plan.

The program is the split graph with each piece call rewritten into a call of its compiled artifact
(a plain function call per piece). A cond piece becomes a `CondStep`: it reads the unit's predicate
on the host (the one sync per unit and call) and runs the compiled program of one branch; the
compute branch is itself split, so the middle blocks are block pieces too. The `Plan` is the data
that says what runs: pieces in order, which block each belongs to, which artifact it shares, and
the two branch plans of every cond. Each call of the program is a `Piece`; block pieces and conds
report to the program's `ProgramHooks` (offload), and CUDA graphs capture stretches of pieces.
A piece that takes weights its graph names (`cachepass.bound_weights`) is run with them appended, read
from the inputs of the top program's call in progress.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.multiprocessing.reductions import StorageWeakRef

from cachepass.bound_weights import WeightTable, with_weights
from cachepass.piecewise.compile import PieceCompiler, give_example_values, in_fake_mode, significant_strides, size_key
from cachepass.piecewise.hooks import NO_HOOKS, ProgramHooks
from cachepass.piecewise.split import PieceInfo, PieceKind, is_cond, split_pieces


@dataclasses.dataclass(frozen=True)
class Step:
    """One piece of a call: what it is, which block it runs, which compiled artifact it uses."""

    piece: str
    kind: PieceKind
    owner: str | None  # block path for block pieces, the cache unit (block list) for conds
    artifact: int | None  # pieces with the same number share one compiled artifact (None: a cond)
    branches: tuple["Plan", "Plan"] | None = None  # cond: (cached, compute)


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    def describe(self, indent: str = "") -> str:
        lines = []
        for step in self.steps:
            what = step.owner or step.kind.value
            artifact = "" if step.artifact is None else f"artifact {step.artifact}"
            lines.append(f"{indent}{step.piece:<10} {step.kind.value:<5} {what:<28} {artifact}".rstrip())
            if step.branches:
                for label, branch in zip(("cached", "compute"), step.branches):
                    lines.append(f"{indent}  if {label}:")
                    lines.append(branch.describe(indent + "    "))
        return "\n".join(lines)

    @property
    def blocks(self) -> list[str]:
        """Block pieces in run order, the compute branch of every cond included."""
        found = []
        for step in self.steps:
            if step.kind is PieceKind.BLOCK:
                found.append(step.owner)
            for branch in step.branches or ():
                found.extend(branch.blocks)
        return found


class CondStep:
    """A cache unit's ``torch.cond``, run by the host: read the predicate, call one branch's program."""

    def __init__(self, unit: str, pred_index: int, operand_indices: list[int], cached: Callable, compute: Callable,
                 hooks: ProgramHooks):
        self.unit, self.pred_index, self.operand_indices = unit, pred_index, operand_indices
        self.cached, self.compute, self.hooks = cached, compute, hooks

    def __call__(self, *args):
        operands = [args[i] for i in self.operand_indices]
        cached = bool(args[self.pred_index])
        self.hooks.decided(self.unit, cached)
        return (self.cached if cached else self.compute)(*operands)

    def run_both(self, *args):
        """``self(*args)``, after running the other branch on the same operands with its outputs dropped.

        Branches are pure (state updates happen after the cond), so this only warms the branch the
        call did not take: CUDA-graph capture needs every kernel launched once beforehand.
        """
        taken = bool(args[self.pred_index])
        operands = [args[i] for i in self.operand_indices]
        (self.compute if taken else self.cached)(*operands)
        return (self.cached if taken else self.compute)(*operands)


class Piece:
    """One call of the program: a compiled piece (or a `CondStep`), what it is, and the block or unit it runs.

    A block piece tells the program's hooks before and after it runs. The program's nodes call these
    objects; CUDA-graph capture finds the pieces and conds among them by type.
    """

    def __init__(self, name: str, kind: PieceKind, owner: str | None, run: Callable, hooks: ProgramHooks):
        self.__name__ = self.__qualname__ = name  # how the generated program's code names the call
        self.kind, self.owner, self.run, self.hooks = kind, owner, run, hooks

    @property
    def cond(self) -> CondStep | None:
        return self.run if isinstance(self.run, CondStep) else None

    def __call__(self, *args):
        if self.kind is not PieceKind.BLOCK:
            return self.run(*args)
        self.hooks.before_block(self.owner)
        out = self.run(*args)
        self.hooks.after_block(self.owner)
        return out


def build_program(gm: fx.GraphModule, example_inputs: list, compiler: PieceCompiler, block_lists: set[str],
                  hooks: ProgramHooks = NO_HOOKS, weights: WeightTable | None = None) -> tuple[fx.GraphModule, Plan]:
    """Split ``gm``, compile its pieces, and return the runnable program (reporting to ``hooks``) with its plan.

    ``weights``: where the pieces of a cond's branch find the weights their graphs name (the top program's inputs).
    """
    top = weights is None
    if top:
        weights = WeightTable(gm, example_inputs)
    program, infos = split_pieces(gm, block_lists)
    given = {node: weights.examples(infos[node.target].weights) for node in program.graph.nodes
             if node.op == "call_module" and infos[node.target].weights}
    _propagate(program, example_inputs, _needed(program, infos, compiler), given)
    steps = []
    for node in list(program.graph.nodes):
        if node.op != "call_module":
            continue
        info, piece = infos[node.target], program.get_submodule(node.target)
        inputs = [arg.meta.get("val") for arg in node.args]  # None: a value no compile reads (`_needed`)
        if info.kind is PieceKind.COND:
            fn, branches = _cond_step(piece, inputs, compiler, block_lists, info.owner, hooks, weights)
            artifact = None
        else:
            fn, branches = compiler(piece, inputs + given.get(node, []), info.kind.value), None
            artifact = compiler.number(fn)
            if info.weights:
                fn = with_weights(fn, weights.reader(info.weights))
        steps.append(Step(node.target, info.kind, info.owner, artifact, branches))
        node.op, node.target = "call_function", Piece(f"{info.kind.value}_{node.target}", info.kind, info.owner, fn, hooks)
    for name in infos:
        delattr(program, name)
    if top:
        weights.add_bind(program)
    program.recompile()
    return program, Plan(tuple(steps))


def _cond_step(piece: fx.GraphModule, inputs: list, compiler: PieceCompiler, block_lists: set[str], unit: str,
               hooks: ProgramHooks, weights: WeightTable) -> tuple[CondStep, tuple[Plan, Plan]]:
    cond = next(n for n in piece.graph.nodes if is_cond(n))
    position = {n: i for i, n in enumerate(n for n in piece.graph.nodes if n.op == "placeholder")}
    operand_indices = [position[a] for a in cond.args[3]]
    operands = [inputs[i] for i in operand_indices]
    programs, plans = [], []
    for branch in cond.args[1:3]:
        program, plan = build_program(piece.get_submodule(branch.target), operands, compiler, block_lists, hooks, weights)
        programs.append(_OperandsRead.of(program))
        plans.append(plan)
    return CondStep(unit, position[cond.args[0]], operand_indices, *programs, hooks), tuple(plans)


class _OperandsRead:
    """A branch's program that takes only the operands it reads, called with all of its cond's.

    Both branches of a ``torch.cond`` take the same operands; the cached one reads a few of them. Its generated code
    spelled out all of them, at its first call at every shape (before the weights were bound, `cachepass.bound_weights`,
    the operands held every middle block's weight, about 800 at 30 blocks: 21-26 ms of code generation at a new shape
    on the CPU).
    """

    def __init__(self, program: fx.GraphModule, read: list[int]):
        self.program, self.read = program, read

    @classmethod
    def of(cls, program: fx.GraphModule) -> Callable:
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        read = [i for i, p in enumerate(placeholders) if p.users]
        if len(read) == len(placeholders):
            return program
        for placeholder in placeholders:
            if not placeholder.users:
                program.graph.erase_node(placeholder)
        program.recompile()
        return cls(program, read)

    def __call__(self, *operands):
        return self.program(*[operands[i] for i in self.read])


def _needed(program: fx.GraphModule, infos: dict[str, PieceInfo], compiler: PieceCompiler) -> dict[fx.Node, set | None]:
    """Per piece call of the split graph but the conds (their cached branch runs), the nodes of the piece to run on
    fake tensors (None: the whole piece).

    A piece compiled from example inputs needs all its inputs, and a cond its operands (its branches are
    built from them). A piece run as traced needs no inputs of its own: it runs only the nodes that compute
    what those inputs are made of, directly or through other such pieces (none when nothing is: the
    clock, the decision and the state updates: 290 of the 391 glue nodes of a 30-block Wan are not run).
    """
    # a value of the split graph a compile reads -> None (all of it); a piece call -> the positions of its outputs read
    wanted: dict[fx.Node, set | None] = {}
    runs: dict[fx.Node, set | None] = {}
    for node in reversed(program.graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and node in wanted:
            call = node.args[0]
            if call not in wanted or wanted[call] is not None:
                wanted.setdefault(call, set()).add(node.args[1])
        if node.op != "call_module":
            continue
        info, piece = infos[node.target], program.get_submodule(node.target)
        if info.kind is PieceKind.COND:
            cond = next(n for n in piece.graph.nodes if is_cond(n))
            read = set(cond.args[3])  # the operands: the branches' example inputs, and the cached branch's outputs'
        elif compiler.needs_examples(info.kind.value):
            read, runs[node] = set(piece.graph.nodes), None
        else:
            outputs = piece.graph.output_node().args[0]
            positions = wanted.get(node, set())
            chosen = range(len(outputs)) if positions is None else sorted(positions)
            read = runs[node] = _upstream([outputs[i] for i in chosen])
        placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
        for placeholder, arg in zip(placeholders, node.args):
            if placeholder in read and isinstance(arg, fx.Node):
                wanted[arg] = None
    return runs


def _upstream(nodes: list) -> set[fx.Node]:
    """``nodes`` and every node they are computed from."""
    found: set[fx.Node] = set()
    todo = [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        node = todo.pop()
        if node not in found:
            found.add(node)
            todo.extend(node.all_input_nodes)
    return found


def _propagate(program: fx.GraphModule, example_inputs: list, runs: dict[fx.Node, set | None],
               weights: dict[fx.Node, list]) -> None:
    """Fake values for the nodes of the split graph that pieces' compiles read (`_needed`; the others get None).
    ``weights``: per piece call, the example values of the weights its piece takes after its arguments."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        fake_mode = torch._subclasses.FakeTensorMode()
    # an input no node reads (a block's weight, bound: `cachepass.bound_weights`) is not converted
    read = [bool(n.users) for n in program.graph.nodes if n.op == "placeholder"]
    inputs = in_fake_mode(fake_mode, [v if r else None for v, r in zip(example_inputs, read)])
    with torch.no_grad():
        _PieceValues(program, runs, weights, mode=fake_mode).propagate_dont_convert_inputs(*inputs)


class _Partly(FakeTensorProp):
    """Fake propagation over ``nodes`` of a graph only: every other node's value is None."""

    def __init__(self, module: fx.GraphModule, nodes: set[fx.Node], **kwargs):
        super().__init__(module, **kwargs)
        self.nodes = nodes

    def run_node(self, n):
        if n.op in ("placeholder", "output") or n in self.nodes:
            return super().run_node(n)
        return None


class _PieceValues(FakeTensorProp):
    """Fake propagation over the split graph that runs only what compiles read (``runs``, from `_needed`) and Dynamo's
    fake values don't cover.

    A cond piece returns its cached branch's outputs (the compute branch's blocks get their values
    when that branch is split in turn). A piece that gets exactly the inputs Dynamo traced it with
    (same shapes, strides, offsets) and whose outputs are nodes Dynamo traced (blocks, most glue)
    returns their ``example_value``, remade in the backend's fake mode (Dynamo hands backends a
    fresh one) with the same storage sharing: views of an input stay views of it, outputs of one
    buffer share one. Anything else runs, so a layout that differs from eager's (a cond's output,
    a ``contiguous`` the passes added) reaches every piece downstream.
    """

    def __init__(self, program: fx.GraphModule, runs: dict[fx.Node, set | None], weights: dict[fx.Node, list],
                 **kwargs):
        super().__init__(program, **kwargs)
        self.runs, self.weights = runs, weights
        self.calling: fx.Node | None = None

    def run_node(self, n):
        if n.op != "placeholder":
            self.calling = n
            return super().run_node(n)
        # an input as it is: FakeTensorProp stores a detached copy of each (a fake dispatch per input, about 0.1 ms;
        # the top program takes every block weight, about 800 of a 30-block model, read by no node of it)
        value = self.placeholder(n.target, (), {})
        n.meta["val"] = value
        return value

    def call_module(self, target, args, kwargs):
        piece = self.fetch_attr(target)
        if any(is_cond(n) for n in piece.graph.nodes):
            return _CachedBranchOnly(piece).run(*args)
        weights = in_fake_mode(self._mode, self.weights.get(self.calling, ()))  # the piece's last inputs
        nodes = self.runs[self.calling]
        if nodes is not None and not nodes >= {n for n in piece.graph.nodes if n.op not in ("placeholder", "output")}:
            if not nodes:  # nothing of it is read
                return tuple(None for _ in piece.graph.output_node().args[0])
            return _Partly(piece, nodes, mode=self._mode).propagate_dont_convert_inputs(*args, *weights)
        outputs = piece.graph.output_node().args[0]
        placeholders = [n for n in piece.graph.nodes if n.op == "placeholder"]
        # weights are laid out as traced: the split shares a block's module only where they are (`split._signature`)
        if (isinstance(outputs, tuple) and all(_traced_value(n) is not None for n in outputs)
                and all(_same_as_traced(p, a) for p, a in zip(placeholders, args))):
            remade = _remade([_traced_value(n) for n in outputs], placeholders, args)
            if remade is not None:
                return remade
        args = (*args, *weights)
        outputs = give_example_values(piece, list(args))  # run once: the compiler finds its example values given
        return super().call_module(target, args, kwargs) if outputs is None else outputs


def _traced_value(node: Any) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _same_as_traced(placeholder: fx.Node, value: Any) -> bool:
    """``value`` laid out as the placeholder's traced value: compared by structure first (`size_key`), as the shape
    environment decides where the expressions differ."""
    if not isinstance(value, torch.Tensor):
        return True
    traced = _traced_value(placeholder)
    if traced is None:
        return False
    return any(_layout(traced, size) == _layout(value, size) for size in (size_key, _as_is))


def _layout(value: torch.Tensor, size: Callable[[Any], Any]) -> tuple:
    return tuple(map(size, value.shape)), significant_strides(value, size), size(value.storage_offset()), value.dtype


def _as_is(size: Any) -> Any:
    return size


def _remade(traced: list[torch.Tensor], placeholders: list[fx.Node], args: tuple) -> tuple | None:
    """``traced`` (Dynamo's fake outputs) as tensors of the current fake mode, storage sharing kept.

    None where a storage is shared by tensors of different dtypes (a dtype view): the piece then runs.
    """
    bases: dict[StorageWeakRef, torch.Tensor] = {}
    for placeholder, arg in zip(placeholders, args):
        if isinstance(arg, torch.Tensor):
            bases.setdefault(StorageWeakRef(_traced_value(placeholder).untyped_storage()), arg)
    keys = [StorageWeakRef(v.untyped_storage()) for v in traced]
    alone = [key not in bases and keys.count(key) == 1 and v.storage_offset() == 0 for key, v in zip(keys, traced)]
    for key, value, own in zip(keys, traced, alone):
        if key not in bases and not own:
            extent = max(_extent(v) for k, v in zip(keys, traced) if k == key)
            bases[key] = torch.empty(extent, dtype=value.dtype, device=value.device)
    if any(not own and bases[key].dtype != v.dtype for key, v, own in zip(keys, traced, alone)):
        return None
    # an output with a storage of its own: one fake op (empty, then as_strided, cost two at symbolic sizes)
    return tuple(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device) if own else
                 bases[key].as_strided(v.shape, v.stride(), v.storage_offset()) for key, v, own in zip(keys, traced, alone))


def _extent(value: torch.Tensor) -> int:
    """Elements of storage ``value`` reaches."""
    if value.numel() == 0:
        return value.storage_offset()
    return value.storage_offset() + sum((n - 1) * s for n, s in zip(value.shape, value.stride())) + 1


class _CachedBranchOnly(fx.Interpreter):
    """Runs a cond piece with the cond replaced by its cached (true) branch: the cond's output values."""

    def call_function(self, target, args, kwargs):
        if target is torch.ops.higher_order.cond:  # interpreted: its generated code would spell out every operand
            return fx.Interpreter(args[1]).run(*args[3])
        return super().call_function(target, args, kwargs)

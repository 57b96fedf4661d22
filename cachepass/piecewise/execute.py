"""The piecewise executor: a program that calls the compiled pieces in order, and its per-call plan.

The program is the split graph with each piece call rewritten into a call of its compiled artifact
(a plain function call per piece). A cond piece becomes a `CondStep`: it reads the unit's predicate
on the host (the one sync per unit and call) and runs the compiled program of one branch; the
compute branch is itself split, so the middle blocks are block pieces too. The `Plan` is the data
that says what runs: pieces in order, which block each belongs to, which artifact it shares, and
the two branch plans of every cond. CUDA graphs, offload and context parallel attach to it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from cachepass.piecewise.compile import PieceCompiler
from cachepass.piecewise.split import PieceKind, is_cond, split_pieces


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

    def __init__(self, pred_index: int, operand_indices: list[int], cached: Callable, compute: Callable):
        self.pred_index, self.operand_indices = pred_index, operand_indices
        self.cached, self.compute = cached, compute

    def __call__(self, *args):
        operands = [args[i] for i in self.operand_indices]
        branch = self.cached if bool(args[self.pred_index]) else self.compute
        return branch(*operands)


def build_program(gm: fx.GraphModule, example_inputs: list, compiler: PieceCompiler,
                  block_lists: set[str]) -> tuple[fx.GraphModule, Plan]:
    """Split ``gm``, compile its pieces, and return the runnable program with its plan."""
    program, infos = split_pieces(gm, block_lists)
    _propagate(program, example_inputs)
    steps = []
    for node in list(program.graph.nodes):
        if node.op != "call_module":
            continue
        info, piece = infos[node.target], program.get_submodule(node.target)
        inputs = [arg.meta["val"] for arg in node.args]
        if info.kind is PieceKind.COND:
            fn, branches = _cond_step(piece, inputs, compiler, block_lists)
            artifact = None
        else:
            fn, branches = compiler(piece, inputs, info.kind.value), None
            artifact = compiler.number(fn)
        steps.append(Step(node.target, info.kind, info.owner, artifact, branches))
        node.op, node.target = "call_function", _named(fn, f"{info.kind.value}_{node.target}")
    for name in infos:
        delattr(program, name)
    program.recompile()
    return program, Plan(tuple(steps))


def _named(fn: Callable, name: str) -> Callable:
    """A plain function calling ``fn``, named for the generated program's code."""
    def piece(*args):
        return fn(*args)

    piece.__name__ = piece.__qualname__ = name
    return piece


def _cond_step(piece: fx.GraphModule, inputs: list, compiler: PieceCompiler,
               block_lists: set[str]) -> tuple[CondStep, tuple[Plan, Plan]]:
    cond = next(n for n in piece.graph.nodes if is_cond(n))
    position = {n: i for i, n in enumerate(n for n in piece.graph.nodes if n.op == "placeholder")}
    operand_indices = [position[a] for a in cond.args[3]]
    operands = [inputs[i] for i in operand_indices]
    programs, plans = [], []
    for branch in cond.args[1:3]:
        program, plan = build_program(piece.get_submodule(branch.target), operands, compiler, block_lists)
        programs.append(program)
        plans.append(plan)
    return CondStep(position[cond.args[0]], operand_indices, *programs), tuple(plans)


def _propagate(program: fx.GraphModule, example_inputs: list) -> None:
    """Fake values for every node of the split graph (each piece's example inputs)."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    with torch.no_grad():
        FakeTensorProp(program, mode=fake_mode).propagate(*example_inputs)

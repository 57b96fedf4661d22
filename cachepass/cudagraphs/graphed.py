"""CUDA graphs over the piecewise program: one graph per stretch between cache decisions, one pool.

Per model state (the state tensors are graph inputs, read and written in place) and, for a program
traced with symbolic sizes, per concrete sizes, the program is captured as, per cache unit,

    before the cond | cached branch | compute branch | after the cond

The graphs read the weights and the state where they live, and the call's other inputs (latents,
timestep, text) from static buffers the call copies them into. Values passed between graphs stay in
the pool at the addresses of the capture; both branches write their outputs to the same buffers, so
what follows the cond reads one place. A call is then: copy the inputs in, replay, read the unit's
predicate (the one host sync per unit) and replay one branch, replay the rest, and clone the outputs
(a CFG loop keeps the first call's output while the second call runs). With ``conditional`` the
graphs are joined by IF/ELSE nodes into one graph (`conditional_nodes`): one launch, no host sync.

The first call for a state runs the program as it is, on the capture stream, with both branches of
every cond (the not-taken one's outputs dropped: branches are pure), which warms every kernel; then
it captures, which runs nothing. An input that first call changed in place is written by the model:
replays copy its static buffer back into the caller's tensor. Capture needs the weights and state at fixed addresses: a call
whose weights or state moved (the model was offloaded and brought back, its weights replaced)
captures again, and says so.
"""

from __future__ import annotations

import enum
import logging
import time
import weakref
from typing import Any, Callable

import torch
from torch import fx
from torch.utils import _pytree as pytree

from cachepass.cudagraphs import memory
from cachepass.cudagraphs.conditional_nodes import ConditionalGraph
from cachepass.errors import CachepassError
from cachepass.piecewise.execute import CondStep, Piece
from cachepass.piecewise.hooks import NO_HOOKS, ProgramHooks
from cachepass.piecewise.static_inputs import has_static_address, pointers_equal
from cachepass.state.sizes import SizeSymbols

log = logging.getLogger(__name__)


class CudaGraphs(str, enum.Enum):
    """How the piecewise program runs on a CUDA device."""

    OFF = "off"
    PIECEWISE = "piecewise"  # one graph per stretch between decisions; the host reads each predicate
    CONDITIONAL = "conditional"  # those graphs joined by IF/ELSE nodes: one launch, no host sync


class GraphedProgram:
    """The piecewise program run through CUDA graphs; one set of graphs per model state.

    Called like the program: graph inputs, then the ``state_count`` state tensors of the state the
    call belongs to (its first tensor keys the state's graphs; with ``sizes``, a program traced with
    symbolic sizes, the call's concrete sizes key them too: a graph replays the sizes it captured).
    """

    def __init__(self, program: fx.GraphModule, device: torch.device, mode: CudaGraphs, state_count: int,
                 hooks: ProgramHooks = NO_HOOKS, chosen_by_default: bool = False, sizes: SizeSymbols | None = None):
        if mode is CudaGraphs.OFF:
            raise ValueError("GraphedProgram needs cudagraphs='piecewise' or 'conditional'")
        self.program, self.device, self.mode, self.state_count = program, device, mode, state_count
        self.hooks = hooks  # told as each graph's capture begins (offload joins its copy stream there)
        self.sizes = sizes  # a program traced with symbolic sizes: graphs per state and per concrete sizes
        # not asked for: a program the graphs cannot take runs without them (logged) instead of failing
        self.chosen_by_default = chosen_by_default
        self.without_graphs: str | None = None  # why it runs without them, once it does
        # (id of the state's first tensor, the call's sizes) -> (a weak reference to it, the graphs). Not a
        # WeakKeyDictionary: its lookups compare keys with ==, which on tensors is an elementwise op and a host sync
        self._runners: dict[memory.SetKey, tuple[weakref.ref, _Runner]] = {}
        self.captures = 0  # graph sets captured (one per state, more when weights or state moved or sets were dropped)
        self.moves = 0  # captures dropped because weights or state moved

    def __call__(self, *args):
        key = args[len(args) - self.state_count]
        set_key = (id(key), self.sizes.values(args) if self.sizes is not None else ())
        entry = self._runners.get(set_key)
        runner = entry[1] if entry is not None and entry[0]() is key else None
        if runner is not None:
            moved = runner.moved(args)
            if moved is None:
                memory.replayed(self, set_key, self.device)
                return runner.replay(args)
            self.drop(set_key)
            self.moves += 1
            if self.chosen_by_default and self.moves > 1:
                self.without_graphs = f"{moved} moved again since the last capture"
                log.warning("stepcache: %s moved again since the CUDA graphs were captured (weights that move between "
                            "calls: an offload hook, or weights replaced again); this program runs without CUDA graphs "
                            "from now on (they were the default, not asked for)", moved)
            else:
                log.warning("stepcache: %s moved since the CUDA graphs were captured (the model was offloaded, or its "
                            "weights replaced); capturing them again (capture %d)", moved, self.captures + 1)
        if self.without_graphs is not None:
            return self.program(*args)
        return self._capture(key, set_key, args)

    def _give_up(self, error: CachepassError) -> None:
        """Graphs cannot take this program: an error if they were asked for, else no graphs from now on (logged)."""
        if not self.chosen_by_default:
            raise error
        self.without_graphs = str(error)
        log.warning("stepcache: %s; this program runs without CUDA graphs (they were the default, not asked for)", error)

    def drop(self, key: memory.SetKey) -> None:
        """Forget the graph set ``key`` (state, sizes): its next call captures again (`memory.HoldsGraphSets`)."""
        if self._runners.pop(key, None) is not None:
            memory.forgotten(self, key, self.device)

    def _drop_state(self, state_id: int) -> None:
        for key in [k for k in self._runners if k[0] == state_id]:
            self.drop(key)

    def _capture(self, key: torch.Tensor, set_key: memory.SetKey, args: tuple) -> Any:
        """The first call of a state: run it (warming every kernel), then capture its graphs."""
        start = time.perf_counter()
        try:
            static, copied = _split_inputs(args, self.state_count, self.sizes)
        except CachepassError as error:
            self._give_up(error)
            return self.program(*args)
        before = [args[i].clone() for i in copied]
        out = self._warm(args)
        warmed = time.perf_counter()
        mutated = [i for i, value in zip(copied, before) if not torch.equal(value, args[i])]
        if mutated:
            log.info("stepcache: the model writes graph input(s) %s in place; CUDA graphs copy them back after "
                     "each replay", mutated)
        try:
            runner = _Runner(self.program, args, static, copied, mutated, self.device, self.mode, self.hooks)
        except RuntimeError as error:  # CUDA refused to capture (an op that syncs, ...); the call itself has run
            failure = CachepassError(f"CUDA graphs could not capture this program: {error}")
            failure.__cause__ = error
            self._give_up(failure)
            return out
        state_id = id(key)
        self._runners[set_key] = (weakref.ref(key, lambda _: self._drop_state(state_id)), runner)  # freed with the state
        memory.added(self, set_key, self.device)
        self.captures += 1
        log.info("stepcache: captured CUDA graphs (%s) in %.2f s after a %.2f s warm-up call: %s", self.mode.value,
                 time.perf_counter() - warmed, warmed - start, runner.describe())
        return out

    def _warm(self, args) -> Any:
        """The call itself, run as the program is on the capture stream, with both branches of every cond."""
        _, stream = memory.pool_and_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            out = _BothBranches(self.program).run(*args)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return out


class _BothBranches(fx.Interpreter):
    """Runs the program, each cond running both its branches (see `CondStep.run_both`)."""

    def call_function(self, target, args, kwargs):
        if isinstance(target, Piece) and target.cond is not None:
            return target.cond.run_both(*args)
        return super().call_function(target, args, kwargs)


class _Runner:
    """The captured graphs of one model state, with the static buffers they read their inputs from."""

    def __init__(self, program: fx.GraphModule, args: tuple, static: list[int], copied: list[int],
                 mutated: list[int], device: torch.device, mode: CudaGraphs, hooks: ProgramHooks):
        self.static, self.copied = static, copied
        self.pointers: list[int | None] = [None] * len(args)
        for i in self.static:
            self.pointers[i] = args[i].data_ptr()
        self.buffers = [torch.empty_strided(args[i].shape, args[i].stride(), dtype=args[i].dtype, device=device)
                        for i in self.copied]
        inputs = list(args)
        for i, buffer in zip(self.copied, self.buffers):
            inputs[i] = buffer
        self.written_back = [(i, inputs[i]) for i in mutated]  # inputs the model writes: their buffers
        recorder = _Recorder(program, device, mode is CudaGraphs.CONDITIONAL, hooks)
        self.outputs = recorder.record(inputs)
        self.parts, self._live = recorder.parts, recorder.live  # _live: the pool memory between graphs stays theirs
        self.joined = ConditionalGraph(self.parts, device) if mode is CudaGraphs.CONDITIONAL else None

    def moved(self, args) -> str | None:
        """Which weight or state input is not where the graphs read it (None: all in place)."""
        if pointers_equal(args, self.pointers, self.static):
            return None
        index = next(i for i in self.static if args[i].data_ptr() != self.pointers[i])
        return f"graph input {index} (a weight or state tensor of shape {list(args[index].shape)})"

    def replay(self, args) -> Any:
        if self.copied:
            torch._foreach_copy_(self.buffers, [args[i] for i in self.copied])
        if self.joined is not None:
            self.joined.launch()
        else:
            for part in self.parts:
                if isinstance(part, tuple):
                    pred, cached, compute = part
                    (cached if bool(pred) else compute).replay()  # the host sync of this cache unit
                else:
                    part.replay()
        if self.written_back:
            torch._foreach_copy_([args[i] for i, _ in self.written_back], [b for _, b in self.written_back])
        return pytree.tree_map_only(torch.Tensor, torch.clone, self.outputs)

    def describe(self) -> str:
        decisions = sum(isinstance(p, tuple) for p in self.parts)
        graphs = sum(2 if isinstance(p, tuple) else 1 for p in self.parts)  # a decision: its two branches
        if self.joined is not None:
            return f"one graph per call ({graphs} captured graphs joined by {decisions} IF/ELSE node(s)); " \
                   f"{len(self.copied)} input(s) copied in"
        return f"{graphs} graphs, {decisions} decision(s) read on the host per call; {len(self.copied)} input(s) copied in"


def _split_inputs(args: tuple, state_count: int, sizes: SizeSymbols | None) -> tuple[list[int], list[int]]:
    """Graph inputs the graphs read in place (weights, buffers, state), and those copied in per call.

    Integer sizes of a program traced with symbolic sizes are neither: they key the graph set.
    """
    first_state = len(args) - state_count
    static = [i for i, a in enumerate(args) if i >= first_state or has_static_address(a)]
    sized = sizes.integer_inputs if sizes is not None else frozenset()
    copied = [i for i in range(len(args)) if i not in set(static) and i not in sized]
    for i in copied:
        if not isinstance(args[i], torch.Tensor):
            raise CachepassError(f"CUDA graphs: graph input {i} is a {type(args[i]).__name__}, not a tensor; "
                                 "a captured graph cannot take it. Compile with cudagraphs='off'")
        if args[i].device.type != "cuda":
            raise CachepassError(f"CUDA graphs: graph input {i} is on {args[i].device.type} (shape "
                                 f"{list(args[i].shape)}); a captured graph would keep its value at capture. "
                                 "Pass it on the GPU, or compile with cudagraphs='off'")
    return static, copied


class _Recorder(fx.Interpreter):
    """Runs the program once under capture, cutting a graph at every cond.

    ``parts`` is, in call order, a ``torch.cuda.CUDAGraph`` per stretch of pieces and a
    ``(pred, cached graph, compute graph)`` triple per cond. ``live`` holds every value a later
    graph reads, so the pool memory behind it stays theirs.
    """

    def __init__(self, program: fx.GraphModule, device: torch.device, keep_graphs: bool, hooks: ProgramHooks):
        super().__init__(program)
        self.pool, self.stream = memory.pool_and_stream(device)
        self.keep_graphs, self.hooks = keep_graphs, hooks
        self.parts: list = []
        self.live: list = []
        self._open: tuple | None = None  # (graph, its capture context) while a stretch is being captured

    def record(self, inputs: list) -> Any:
        try:
            return self.run(*inputs)
        finally:
            if self._open is not None:  # an error mid-capture: end the capture before raising
                self._open[1].__exit__(None, None, None)

    def run_node(self, n: fx.Node) -> Any:
        piece = n.target if n.op == "call_function" and isinstance(n.target, Piece) else None
        if piece is not None and piece.cond is not None:
            self._close()
            return self._record_cond(piece.cond, *self.fetch_args_kwargs_from_env(n)[0])
        if piece is not None and self._open is None:
            graph = torch.cuda.CUDAGraph(keep_graph=self.keep_graphs)
            context = torch.cuda.graph(graph, pool=self.pool, stream=self.stream)
            context.__enter__()
            self._open = (graph, context)
            self.hooks.begin_capture(False)
        if n.op == "output":
            self._close()
        return super().run_node(n)

    def _close(self) -> None:
        if self._open is None:
            return
        graph, context = self._open
        self._open = None
        context.__exit__(None, None, None)
        self.parts.append(graph)
        self.live.extend(self.env.values())

    def _capture(self, fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        graph = torch.cuda.CUDAGraph(keep_graph=self.keep_graphs)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            self.hooks.begin_capture(self.keep_graphs)  # a branch: an IF/ELSE body when the graphs are joined
            out = fn()
        return graph, out

    def _record_cond(self, step: CondStep, *args) -> Any:
        pred = args[step.pred_index]
        operands = [args[i] for i in step.operand_indices]
        cached_graph, outputs = self._capture(lambda: step.cached(*operands))
        _require_fresh(outputs, operands)

        def compute_into_outputs():
            for out, value in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(step.compute(*operands))):
                out.copy_(value)

        compute_graph, _ = self._capture(compute_into_outputs)
        self.parts.append((pred, cached_graph, compute_graph))
        self.live.extend([*self.env.values(), outputs])
        return outputs


def _require_fresh(outputs: Any, operands: list) -> None:
    """The compute branch overwrites the cached branch's outputs: none may share memory with an operand."""
    taken = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(operands) if isinstance(t, torch.Tensor)}
    for out in pytree.tree_leaves(outputs):
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() in taken:
            raise CachepassError("CUDA graphs: a cache branch returned memory of its inputs; the branches must "
                                 "return fresh tensors (torch.cond requires it too). Compile with cudagraphs='off'")

"""Layerwise offload at run time: pinned host weights, device slots, one copy stream, events.

`ProgramOffload` attaches to a piecewise program: every block piece tells the model's
`SlotScheduler` (`offload_plan`) before and after it runs, every cond tells it the decision, and
each call tells it where the call starts and ends. On the first call of a model instance,
`ModelOffload` moves the streamed blocks' weights to pinned host memory (registered at their exact
size: the caching host allocator would round each block up to a power of two) and makes their
parameters views of the slot they stream through (each with a storage of its own, `_own_storage`). Parameters keep their shape, dtype, stride and
device, so Dynamo's guards hold and nothing recompiles; a slot's views keep their addresses, so
CUDA graphs capture them as static inputs.

Copies run on one copy stream. A slot has a *ready* event (recorded on the copy stream after a
copy into it) that the compute stream waits on before the block runs, and a *free* event
(recorded on the compute stream after the block ran) that the copy stream waits on before
overwriting it: no host syncs, no ``record_stream``, no allocations during a generation. Under
CUDA-graph capture the copy stream joins each capture through an event recorded at its start,
and each captured stretch loads the blocks it runs (`SlotScheduler` with ``across_decisions=False``).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import fx

from cachepass.blocks import normalize_module_path
from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError
from cachepass.piecewise.cudagraphs import has_static_address
from cachepass.piecewise.execute import CondStep
from cachepass.piecewise.offload_plan import (Counters, OffloadConfig, Residency, SlotScheduler, Timeline,
                                              choose_residency, format_bytes)
from cachepass.piecewise.split import PieceKind
from cachepass.unit import UnitSpec

log = logging.getLogger("cachepass")

ALIGNMENT = 256  # bytes: each parameter of a packed block starts at a multiple of this


# ---------------------------------------------------------------------------- packing
def packed_offsets(params: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offset of each parameter in a block's packed buffer, and the buffer's size."""
    offsets, size = [], 0
    for p in params:
        offsets.append(size)
        size += -(-p.numel() * p.element_size() // ALIGNMENT) * ALIGNMENT
    return offsets, size


def block_lists_paths(model: torch.nn.Module, block_lists: Sequence[str]) -> list[str]:
    """``["blocks"]`` -> ``["blocks.0", "blocks.1", ...]``: the block paths of the named lists."""
    return [f"{name}.{i}" for name in block_lists for i in range(len(model.get_submodule(name)))]


def model_bytes(model: torch.nn.Module, block_paths: Sequence[str]) -> tuple[dict[str, int], int]:
    """Packed bytes per block (by path), and the bytes of every other parameter and buffer."""
    blocks = {path: list(model.get_submodule(path).parameters()) for path in block_paths}
    in_blocks = {id(p) for params in blocks.values() for p in params}
    other = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in in_blocks]
    return ({path: packed_offsets(params)[1] for path, params in blocks.items()},
            sum(t.numel() * t.element_size() for t in other))


def block_inputs(gm: fx.GraphModule, units: Sequence[UnitSpec]) -> dict[str, list[int]]:
    """Per block path, the graph inputs that are its parameters (positions among the placeholders)."""
    paths = {p for u in units for p in u.block_paths}
    found: dict[str, list[int]] = {p: [] for p in paths}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is None or "_parameters" not in source.name:
            continue  # not a weight (buffers stay resident)
        path = normalize_module_path(source.name)  # blocks.4.attn1.to_q._parameters.weight
        owner = next((p for p in paths if path.startswith(p + ".")), None)
        if owner is not None:
            found[owner].append(i)
    return found


# ---------------------------------------------------------------------------- memory
def pinned_host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of page-locked host memory, exactly (cudaHostRegister on a plain allocation)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if device.type != "cuda":
        return buffer
    cudart = torch.cuda.cudart()
    code = cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)
    if int(code) != 0:
        raise CachepassError(f"offload: cudaHostRegister of {format_bytes(nbytes)} failed ({code}); the host may be "
                             "out of lockable memory (ulimit -l)")
    weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
    return buffer


def _own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view``'s memory as a tensor with a storage of its own (through DLPack; it keeps ``view`` alive).

    Parameters that were views of one slot would share its storage: Dynamo would see the weights of
    the blocks that take turns in a slot as aliases of each other when it traces a new shape, and
    the cache pass clones aliased cond operands, which would copy the weights the slot holds then.
    """
    return torch.from_dlpack(view)


class StreamTransport:
    """The `Transport` of a CUDA device: a copy stream, and a ready and a free event per slot."""

    def __init__(self, device: torch.device, host: dict[str, torch.Tensor], slots: list[torch.Tensor]):
        self.device, self.host, self.slots = device, host, slots
        self.copy_stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event() for _ in slots]
        self.free = [torch.cuda.Event() for _ in slots]
        self._fork: torch.cuda.Event | None = None  # recorded where the capture in progress began
        self._joined = False
        self._freed_in_capture = [False] * len(slots)

    def join(self) -> None:
        """The copy stream waits for all compute so far: replayed graphs recorded no event the host knows of."""
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def begin_capture(self) -> None:
        self._fork = torch.cuda.Event()
        self._fork.record(torch.cuda.current_stream(self.device))
        self._joined = False
        self._freed_in_capture = [False] * len(self.slots)

    def copy(self, block: str, slot: int) -> None:
        if torch.cuda.is_current_stream_capturing():
            # only events of this capture may be waited on; earlier graphs finished before this one starts
            if not self._joined:
                self.copy_stream.wait_event(self._fork)
                self._joined = True
            if self._freed_in_capture[slot]:
                self.copy_stream.wait_event(self.free[slot])
        else:
            self.copy_stream.wait_event(self.free[slot])
        source = self.host[block]
        with torch.cuda.stream(self.copy_stream):
            self.slots[slot][: source.numel()].copy_(source, non_blocking=True)
        self.ready[slot].record(self.copy_stream)

    def wait_ready(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def release(self, slot: int) -> None:
        self.free[slot].record(torch.cuda.current_stream(self.device))
        if torch.cuda.is_current_stream_capturing():
            self._freed_in_capture[slot] = True


class CopyTransport:
    """The `Transport` of a CPU model (``allow_cpu``): copies happen at once, nothing to wait for."""

    def __init__(self, host: dict[str, torch.Tensor], slots: list[torch.Tensor]):
        self.host, self.slots = host, slots

    def begin_capture(self) -> None:
        pass

    def join(self) -> None:
        pass

    def copy(self, block: str, slot: int) -> None:
        source = self.host[block]
        self.slots[slot][: source.numel()].copy_(source)

    def wait_ready(self, slot: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass


# ---------------------------------------------------------------------------- one model instance
class ModelOffload:
    """The offloaded weights of one model instance, and the scheduler that streams them."""

    def __init__(self, blocks: dict[str, list[torch.nn.Parameter]], nonblock_bytes: int, units: Sequence[UnitSpec],
                 config: StepCacheConfig, offload: OffloadConfig, device: torch.device, graphed: bool):
        self.device, self.graphed = device, graphed
        self.parameter_ids = {path: [id(p) for p in params] for path, params in blocks.items()}  # no strong refs
        layouts = {path: packed_offsets(params) for path, params in blocks.items()}
        self.residency = choose_residency(units, {p: size for p, (_, size) in layouts.items()}, nonblock_bytes, offload)
        self.host: dict[str, torch.Tensor] = {}
        self.slots = [torch.empty(self.residency.slot_bytes, dtype=torch.uint8, device=device)
                      for _ in range(self.residency.slots)]
        for path, slot in self.residency.slot_of.items():
            offsets, size = layouts[path]
            host = self.host[path] = pinned_host_buffer(size, device)
            for param, offset in zip(blocks[path], offsets):
                if not param.is_contiguous():  # its slot view would have other strides: a guard failure
                    raise CachepassError(f"offload: a weight of {path} ({list(param.shape)}, strides "
                                         f"{param.stride()}) is not contiguous; call .contiguous() on it first")
                nbytes = param.numel() * param.element_size()
                host[offset: offset + nbytes].copy_(param.data.reshape(-1).view(torch.uint8))
                param.data = _own_storage(self.slots[slot][offset: offset + nbytes].view(param.dtype).view(param.shape))
        transport = StreamTransport(device, self.host, self.slots) if device.type == "cuda" else \
            CopyTransport(self.host, self.slots)
        self.transport = transport
        self.scheduler = SlotScheduler(self.residency, Timeline.of(units), config, transport,
                                       across_decisions=not graphed)
        self.scheduler.start_generation()
        log.info("stepcache: offload: %s", self.describe())

    def describe(self) -> str:
        r = self.residency
        return (f"{format_bytes(r.device_bytes)} of weights on {self.device} (non-block {format_bytes(r.nonblock_bytes)}, "
                f"{len(r.resident)} resident blocks, {r.slots} slot(s) of {format_bytes(r.slot_bytes)}), "
                f"{len(r.slot_of)} blocks ({format_bytes(sum(t.numel() for t in self.host.values()))}) in pinned host "
                f"memory{', copies captured per CUDA graph' if self.graphed else ''}")

    def check(self, blocks: dict[str, list[torch.nn.Parameter]], graphed: bool) -> None:
        """Another compiled graph of the same model (a new shape) must stream the same parameters, the same way."""
        if graphed != self.graphed:
            raise CachepassError("offload: this model runs compiled graphs with and without CUDA graphs; one model's "
                                 "offload streams its weights one way. Compile every shape with the same cudagraphs")
        for path, params in blocks.items():
            if [id(p) for p in params] != self.parameter_ids[path]:
                raise CachepassError(f"offload: {path}'s parameters differ between two compiled graphs of one model")


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """What offload did for one model so far (host-issued copies; with CUDA graphs the captured ones count at capture)."""

    residency: Residency
    counters: Counters
    graphed: bool


_MODELS: dict[int, tuple[weakref.ref, ModelOffload]] = {}  # id of a streamed parameter -> its model's offload


class ProgramOffload:
    """Attaches offload to one compiled piecewise program: hooks in its pieces, per-call bookkeeping.

    One program serves every instance of a model class (Dynamo reuses the graph); the offload of
    the instance a call belongs to is found from the call's block parameters.
    """

    def __init__(self, gm: fx.GraphModule, units: Sequence[UnitSpec], config: StepCacheConfig,
                 offload: OffloadConfig, device: torch.device, graphed: bool):
        self.units, self.config, self.offload, self.device, self.graphed = list(units), config, offload, device, graphed
        self.inputs = block_inputs(gm, units)
        missing = [path for path, indices in self.inputs.items() if not indices]
        if missing:
            raise CachepassError(f"offload: no graph input is a weight of {missing[0]} (blocks without parameters, "
                                 "or weights Dynamo did not lift as inputs): nothing to stream")
        self.first_input = self.inputs[self.units[0].block_paths[0]][0]  # finds the model's offload per call
        self.current: ModelOffload | None = None
        self._checked: weakref.WeakSet[ModelOffload] = weakref.WeakSet()  # models this program has called

    def attach(self, program: fx.GraphModule) -> None:
        """Make ``program``'s block pieces and conds report to this object (recursively into cond branches)."""
        unit_index = {u.name: u.index for u in self.units}
        for node in program.graph.nodes:
            step = getattr(node.target, "step", None) if node.op == "call_function" else None
            if isinstance(step, CondStep):
                step.on_decision = self._decided
                step.unit = unit_index[node.target.owner]
                self.attach(step.cached)
                self.attach(step.compute)
            elif step is not None and node.target.kind is PieceKind.BLOCK:
                node.target = _hooked(node.target, self)
        program.recompile()

    def begin(self, args: Sequence[Any], state) -> None:
        """Before a call: the model's offload (made on its first call) becomes the current one."""
        first = args[self.first_input]
        entry = _MODELS.get(id(first))
        model = entry[1] if entry is not None and entry[0]() is first else None
        if model is None:
            model = self._offload(self._blocks(args), args)
        elif model not in self._checked:
            model.check(self._blocks(args), self.graphed)
        self._checked.add(model)
        state.offload = model
        self.current = model
        if self.graphed:  # before any eager copy of this call (a warm-up), the last replay's reads come first
            model.transport.join()

    def end(self) -> None:
        self.current.scheduler.end_call()

    def _blocks(self, args: Sequence[Any]) -> dict[str, list]:
        return {path: [args[i] for i in indices] for path, indices in self.inputs.items()}

    def _offload(self, blocks: dict[str, list], args: Sequence[Any]) -> ModelOffload:
        for path, params in blocks.items():
            bad = next((p for p in params if not isinstance(p, torch.nn.Parameter)), None)
            if bad is not None:
                raise CachepassError(f"offload: an input of {path} is a {type(bad).__name__}, not a parameter; "
                                     "only weights stream")
            wrong = next((p for p in params if p.device != self.device), None)
            if wrong is not None:
                raise CachepassError(f"offload: a weight of {path} is on {wrong.device}, the model runs on {self.device}: "
                                     "is the model offloaded by diffusers or accelerate hooks? Remove them "
                                     "(cachepass streams the blocks itself) and move the model to the device")
        in_blocks = {id(p) for params in blocks.values() for p in params}
        seen, nonblock = set(), 0
        for a in args:  # every other weight and buffer stays on the device
            if has_static_address(a) and id(a) not in in_blocks and id(a) not in seen:
                seen.add(id(a))
                nonblock += a.numel() * a.element_size()
        model = ModelOffload(blocks, nonblock, self.units, self.config, self.offload, self.device, self.graphed)
        for params in blocks.values():
            for p in params:  # the entry goes with the parameter (the model's offload lives as long as it)
                _MODELS[id(p)] = (weakref.ref(p, lambda _, key=id(p): _MODELS.pop(key, None)), model)
        return model

    # hooks called from the pieces
    def before_block(self, block: str) -> None:
        self.current.scheduler.before_block(block)

    def after_block(self, block: str) -> None:
        self.current.scheduler.after_block(block)

    def begin_capture(self) -> None:
        self.current.scheduler.boundary()
        self.current.transport.begin_capture()

    def _decided(self, unit: int, cached: bool) -> None:
        self.current.scheduler.decided(unit, cached)


def _hooked(piece: Callable, offload: ProgramOffload) -> Callable:
    owner = piece.owner

    def block(*args):
        offload.before_block(owner)
        out = piece(*args)
        offload.after_block(owner)
        return out

    block.__name__ = block.__qualname__ = piece.__name__
    block.step, block.owner, block.kind = piece.step, owner, piece.kind
    return block


def offload_stats(model: Any) -> OffloadStats | None:
    """The offload of ``model`` (compiled or original module), None before its first call or without offload."""
    from cachepass.runtime import states_of

    for state in reversed(states_of(model)):
        offload = getattr(state, "offload", None)
        if offload is not None:
            return OffloadStats(offload.residency, dataclasses.replace(offload.scheduler.counters), offload.graphed)
    return None


def check_not_offloaded_by_hooks(model: torch.nn.Module) -> None:
    """diffusers group / layerwise offloading and accelerate's CPU offload move weights behind the graph's back."""
    for path, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        names = list(getattr(registry, "hooks", {}) or {})
        offloading = [n for n in names if "offload" in n]
        if offloading or getattr(module, "_hf_hook", None) is not None:
            what = f"diffusers hook {offloading[0]!r}" if offloading else "an accelerate hook"
            raise CachepassError(
                f"offload: {path or 'the model'} is already offloaded by {what}; cachepass streams the blocks itself. "
                "Remove those hooks (e.g. diffusers' model.disable_group_offload() / reload the model) and move the "
                "model to the GPU")

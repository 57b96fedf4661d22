"""Layerwise offload at run time: pinned host weights, device slots, one copy stream, events.

`ProgramOffload` is the `ProgramHooks` of a piecewise program: every block piece tells the model's
`SlotScheduler` (`cachepass.offload.plan`) before and after it runs, every cond tells it the
decision, and each call tells it where the call starts and ends.

The host copy is authoritative. On the first call of a model instance, `ModelOffload` packs each
streamed block's weights into one pinned host buffer (registered at its exact size: the caching
host allocator would round each block up to a power of two) and makes every streamed parameter a
view of its place there, on the model's device (on CUDA the pinned memory is mapped into the
device's address space, so the parameter keeps its device, dtype, shape and strides: Dynamo's
guards hold and nothing recompiles). What the user writes into a parameter between calls (an
in-place LoRA fuse, ``load_state_dict``, ``p.data.mul_``) lands in the host copy, and the next call
streams it. A parameter whose memory was replaced (``p.data = ...``, a new ``Parameter``,
``model.to(dtype)``) is found by a pointer check per call, copied into the host copy (or, for a new
dtype or shape, the blocks are packed again) and logged.

The compiled pieces never read the parameters themselves: each call passes them a view of the
slot the block streams through instead (each view with a storage of its own, `_own_storage`). A
slot's views keep their addresses, so CUDA graphs capture them as static inputs.

Copies run on one copy stream. A slot has a *ready* event (recorded on the copy stream after a
copy into it) that the compute stream waits on before the block runs, and a *free* event
(recorded on the compute stream after the block ran) that the copy stream waits on before
overwriting it: no host syncs, no ``record_stream``, no allocations during a generation. Each call's
copies wait for the work queued before the call (the user's writes to the weights). Under
CUDA-graph capture the copy stream joins each capture through an event recorded at its start,
and each captured stretch loads the blocks it runs (`SlotScheduler` with ``across_decisions=False``).
A copy captured into an IF/ELSE body is a few-SM kernel (`cachepass.offload.sm_copy`): a memcpy node
there runs as a kernel on the whole device and overlaps nothing (`bench.copy_check`).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Sequence

import torch
from torch import fx

from cachepass.config import StepCacheConfig
from cachepass.cudagraphs.conditional_nodes import unavailable_reason as conditional_nodes_unavailable
from cachepass.errors import CachepassError
from cachepass.leaf_weights import weight_path
from cachepass.offload import sm_copy
from cachepass.offload.host_start import materialize, packed_buffer
from cachepass.offload.memory import host_view, own_storage, packed_offsets, pinned_host_buffer
from cachepass.offload.plan import (
    Counters,
    OffloadConfig,
    Residency,
    SlotScheduler,
    Timeline,
    choose_residency,
    format_bytes,
)
from cachepass.piecewise.static_inputs import has_static_address, pointers_equal
from cachepass.unit import UnitSpec

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- packing
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
        path = weight_path(node)  # blocks.4.attn1.to_q._parameters.weight
        if path is None or "._parameters." not in path:
            continue  # not a weight (buffers stay resident)
        owner = next((p for p in paths if path.startswith(p + ".")), None)
        if owner is not None:
            found[owner].append(i)
    return found


class StreamTransport:
    """The `Transport` of a CUDA device: a copy stream, and a ready and a free event per slot."""

    def __init__(self, device: torch.device, host: dict[str, torch.Tensor], slots: list[torch.Tensor], graphed: bool):
        self.device, self.host, self.slots = device, host, slots
        if graphed and conditional_nodes_unavailable(device) is None:
            sm_copy.prepare(device)  # IF/ELSE bodies may copy with it
        self.copy_stream = torch.cuda.Stream(device, priority=-1)  # its copy kernels go before waiting compute
        self.ready = [torch.cuda.Event() for _ in slots]
        self.free = [torch.cuda.Event() for _ in slots]
        self._fork: torch.cuda.Event | None = None  # recorded where the capture in progress began
        self._joined = False
        self._freed_in_capture = [False] * len(slots)
        self._sm_copies = False  # the capture in progress is an IF/ELSE body: copy with `sm_copy`

    def join(self) -> None:
        """The copy stream waits for all compute so far: replayed graphs recorded no event the host knows of."""
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def begin_capture(self, conditional_body: bool) -> None:
        self._sm_copies = conditional_body
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
            if self._sm_copies and torch.cuda.is_current_stream_capturing():
                sm_copy.sm_copy(self.slots[slot], source)
            else:
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

    def begin_capture(self, conditional_body: bool) -> None:
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
@dataclasses.dataclass
class _Streamed:
    """One streamed parameter: where its authoritative copy and its slot view live."""

    param: weakref.ref  # the Parameter (no strong reference: the model owns it)
    host: torch.Tensor  # its memory from now on: a view of the block's pinned host buffer, on the model's device
    slot: torch.nn.Parameter  # what the compiled pieces read: a view of the block's slot

    def holds(self, param: Any) -> bool:
        """``param`` is this record's parameter and lives in its host view."""
        return self.param() is param and param.data_ptr() == self.host.data_ptr()

    def fits(self, param: torch.Tensor) -> bool:
        return param.shape == self.host.shape and param.dtype == self.host.dtype and param.is_contiguous()


class ModelOffload:
    """The offloaded weights of one model instance, and the scheduler that streams them."""

    def __init__(self, blocks: dict[str, list[torch.nn.Parameter]], nonblock_bytes: int, units: Sequence[UnitSpec],
                 config: StepCacheConfig, offload: OffloadConfig, device: torch.device, graphed: bool):
        self.device, self.graphed = device, graphed
        layouts = {path: packed_offsets(params) for path, params in blocks.items()}
        self.residency = choose_residency(units, {p: size for p, (_, size) in layouts.items()}, nonblock_bytes, offload)
        self.host: dict[str, torch.Tensor] = {}
        self.records: dict[int, _Streamed] = {}  # id of a streamed parameter -> its record
        self.slots = [torch.empty(self.residency.slot_bytes, dtype=torch.uint8, device=device)
                      for _ in range(self.residency.slots)]
        for path in self.residency.resident:  # placed in host memory before tracing (`host_start`): now on the device
            for param in blocks[path]:
                materialize(param, device)
        for path, slot in self.residency.slot_of.items():
            offsets, size = layouts[path]
            packed = packed_buffer(blocks[path])  # the block was packed before tracing: it streams from there
            if packed is not None:
                host, offsets = packed
            else:
                host = pinned_host_buffer(size, device)
            self.host[path] = host
            for param, offset in zip(blocks[path], offsets):
                if not param.is_contiguous():  # its slot view would have other strides: a guard failure
                    raise CachepassError(f"offload: a weight of {path} ({list(param.shape)}, strides "
                                         f"{param.stride()}) is not contiguous; call .contiguous() on it first")
                nbytes = param.numel() * param.element_size()
                slot_view = self.slots[slot][offset: offset + nbytes].view(param.dtype).view(param.shape)
                memory = param.data if packed is not None else host_view(host, offset, param, device)
                record = _Streamed(weakref.ref(param), memory, torch.nn.Parameter(own_storage(slot_view), requires_grad=False))
                if packed is None:
                    record.host.copy_(param.detach())
                    param.data = record.host
                self.records[id(param)] = record
        transport = StreamTransport(device, self.host, self.slots, graphed) if device.type == "cuda" else \
            CopyTransport(self.host, self.slots)
        self.transport = transport
        self.scheduler = SlotScheduler(self.residency, Timeline.of(units), config, transport,
                                       across_decisions=not graphed)
        log.info("stepcache: offload: %s", self.describe())

    def describe(self) -> str:
        r = self.residency
        return (f"{format_bytes(r.device_bytes)} of weights on {self.device} (non-block "
                f"{format_bytes(r.nonblock_bytes)}, "
                f"{len(r.resident)} resident blocks, {r.slots} slot(s) of {format_bytes(r.slot_bytes)}), "
                f"{len(r.slot_of)} blocks ({format_bytes(sum(t.numel() for t in self.host.values()))}) in pinned host "
                f"memory{', copies captured per CUDA graph' if self.graphed else ''}")

    def record_of(self, param: Any) -> _Streamed | None:
        record = self.records.get(id(param))
        return record if record is not None and record.param() is param else None

    def adopt(self, records: Sequence[_Streamed], params: Sequence[torch.Tensor]) -> None:
        """``params`` replaced the weights of ``records`` (``p.data = ...``, a new ``Parameter``): copy their
        values into the host copy, and make them views of it."""
        for record, param in zip(records, params):
            record.host.copy_(param.detach())
            param.data = record.host
            if record.param() is not param:
                self.records = {k: r for k, r in self.records.items() if r is not record}
                record.param = weakref.ref(param)
                self.records[id(param)] = record


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """What offload did for one model so far (host-issued copies; with CUDA graphs the captured ones count at capture)."""

    residency: Residency
    counters: Counters
    graphed: bool
    host_bytes: int  # page-locked host memory holding the streamed blocks


_MODELS: dict[int, tuple[weakref.ref, ModelOffload]] = {}  # id of a streamed parameter -> its model's offload


def _register(model: ModelOffload, params: Sequence[torch.nn.Parameter]) -> None:
    for p in params:  # the entry goes with the parameter (the model's offload lives as long as it)
        _MODELS[id(p)] = (weakref.ref(p, lambda _, key=id(p): _MODELS.pop(key, None)), model)


def _registered(param: Any) -> ModelOffload | None:
    entry = _MODELS.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


class _CallInputs:
    """Per program and model: the positions of the streamed weights among the graph inputs, their
    records, what the pieces get there instead (slot views) and where the weights must live (host views)."""

    def __init__(self, indices: list[int], records: list[_Streamed], count: int):
        self.indices, self.records = indices, records
        self.views = [r.slot for r in records]
        self.pointers: list[int | None] = [None] * count
        for i, record in zip(indices, records):
            self.pointers[i] = record.host.data_ptr()

    def in_place(self, args: Sequence[Any]) -> bool:
        return len(args) == len(self.pointers) and pointers_equal(args, self.pointers, self.indices)

    def substituted(self, args: Sequence[Any]) -> list:
        args = list(args)
        for i, view in zip(self.indices, self.views):
            args[i] = view
        return args


class ProgramOffload:
    """The `ProgramHooks` of one compiled piecewise program with offload: per-call bookkeeping, and the
    model's scheduler driven from its pieces.

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
        self.block_indices = [i for indices in self.inputs.values() for i in indices]
        self.unit_index = {u.name: u.index for u in self.units}
        self.current: ModelOffload | None = None
        self._calls: weakref.WeakKeyDictionary[ModelOffload, _CallInputs] = weakref.WeakKeyDictionary()
        self._models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # RuntimeState -> its model's offload

    def begin_call(self, args: Sequence[Any], state) -> list:
        """Before a call: the model's offload (made on its first call) becomes the current one; returns
        the call's graph inputs with the streamed weights replaced by the views of their slots."""
        model = next((m for m in (_registered(args[i]) for i in self.block_indices) if m is not None), None)
        if model is None:
            model = self._offload(args)
        if model.graphed != self.graphed:
            raise CachepassError("offload: this model runs compiled graphs with and without CUDA graphs; one model's "
                                 "offload streams its weights one way. Compile every shape with the same cudagraphs")
        inputs = self._calls.get(model)
        if inputs is None or not inputs.in_place(args):
            model, inputs = self._bring_in_changes(model, args, inputs)
            self._calls[model] = inputs
        self._models[state] = model
        self.current = model
        model.transport.join()  # the copies read the host copy after whatever the caller queued before
        model.scheduler.start_call()
        return inputs.substituted(args)

    def end_call(self) -> None:
        self.current.scheduler.end_call()

    def reset(self, state) -> None:
        model = self._models.get(state)
        if model is not None:
            model.scheduler.start_generation()

    def _bring_in_changes(self, model: ModelOffload, args: Sequence[Any],
                          last: _CallInputs | None) -> tuple[ModelOffload, _CallInputs]:
        """Streamed weights not in their host views: copy them in (logged), or pack the blocks again.

        ``last``: this program's inputs for ``model`` at its last call, which say whose place a new
        ``Parameter`` object takes; without it (a new shape's first call) weights are known by identity.
        """
        paths, indices = self._streamed(model)
        records = last.records if last is not None else [model.record_of(args[i]) for i in indices]
        changed = [k for k, (i, r) in enumerate(zip(indices, records)) if r is None or not r.holds(args[i])]
        blocks = ", ".join(dict.fromkeys(paths[k] for k in changed))
        if any(records[k] is None or not records[k].fits(args[indices[k]]) for k in changed):
            log.warning("stepcache: offload: weights of %s changed dtype or shape since the last call (model.to(dtype)?) "
                        "or are not the model's; packing the streamed blocks into host memory again", blocks)
            model = self._offload(args)
            return model, self._call_inputs(model, args)
        if changed:
            params = [args[indices[k]] for k in changed]
            model.adopt([records[k] for k in changed], params)
            _register(model, params)
            log.info("stepcache: offload: %d weight(s) of %s were replaced since the last call (p.data = ..., a new "
                     "Parameter); copied them into the pinned host copy they stream from", len(changed), blocks)
        return model, _CallInputs(indices, records, len(args))

    def _call_inputs(self, model: ModelOffload, args: Sequence[Any]) -> _CallInputs:
        indices = self._streamed(model)[1]
        return _CallInputs(indices, [model.record_of(args[i]) for i in indices], len(args))

    def _streamed(self, model: ModelOffload) -> tuple[list[str], list[int]]:
        """The block path and graph-input position of each streamed weight, in streaming order."""
        pairs = [(path, i) for path in model.residency.slot_of for i in self.inputs[path]]
        return [path for path, _ in pairs], [i for _, i in pairs]

    def _offload(self, args: Sequence[Any]) -> ModelOffload:
        blocks = {path: [args[i] for i in indices] for path, indices in self.inputs.items()}
        for path, params in blocks.items():
            bad = next((p for p in params if not isinstance(p, torch.nn.Parameter)), None)
            if bad is not None:
                raise CachepassError(f"offload: an input of {path} is a {type(bad).__name__}, not a parameter; "
                                     "only weights stream")
            wrong = next((p for p in params if p.device != self.device), None)
            if wrong is not None:
                raise CachepassError(f"offload: a weight of {path} is on {wrong.device}, the model runs on "
                                     f"{self.device}: "
                                     "is the model offloaded by diffusers or accelerate hooks? Remove them "
                                     "(cachepass streams the blocks itself) and move the model to the device")
        in_blocks = {id(p) for params in blocks.values() for p in params}
        for a in args:  # packed before tracing but not a block of a cache unit: a non-block weight, on the device
            if id(a) not in in_blocks and isinstance(a, torch.nn.Parameter):
                materialize(a, self.device)
        seen, nonblock = set(), 0
        for a in args:  # every other weight and buffer stays on the device
            if has_static_address(a) and id(a) not in in_blocks and id(a) not in seen:
                seen.add(id(a))
                nonblock += a.numel() * a.element_size()
        model = ModelOffload(blocks, nonblock, self.units, self.config, self.offload, self.device, self.graphed)
        _register(model, [p for params in blocks.values() for p in params])
        return model

    # hooks called from the pieces
    def before_block(self, block: str) -> None:
        self.current.scheduler.before_block(block)

    def after_block(self, block: str) -> None:
        self.current.scheduler.after_block(block)

    def begin_capture(self, conditional_body: bool) -> None:
        self.current.scheduler.boundary()
        self.current.transport.begin_capture(conditional_body)

    def decided(self, unit: str, cached: bool) -> None:
        self.current.scheduler.decided(self.unit_index[unit], cached)


def model_offload(model: Any) -> ModelOffload | None:
    """The offload of ``model`` (compiled or original module), None before its first call or without offload."""
    module = getattr(model, "_orig_mod", model)
    return next((m for m in map(_registered, module.parameters()) if m is not None), None)


def offload_stats(model: Any) -> OffloadStats | None:
    """What offload did for ``model`` (compiled or original module); None before its first call or without offload."""
    offload = model_offload(model)
    if offload is None:
        return None
    return OffloadStats(offload.residency, dataclasses.replace(offload.scheduler.counters), offload.graphed,
                        sum(t.numel() for t in offload.host.values()))


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


FASTVIDEO_FIX = ("turn FastVideo's DiT offload off (dit_layerwise_offload=False, dit_cpu_offload=False; on the command line "
                 "--dit-layerwise-offload false --dit-cpu-offload false) and pass offload={'budget': ...} to "
                 "cachepass.compile, which streams the blocks from the cache schedule")


def check_not_offloaded_by_fastvideo(model: torch.nn.Module) -> None:
    """FastVideo's DiT offload: its layerwise hooks (``_hook_manager``, on by default) swap weights for empty
    placeholders around each block behind ``torch.compiler.disable``, and ``dit_cpu_offload`` shards the model
    with FSDP's CPU offload; neither can run inside one compiled graph, with or without cachepass's offload."""
    for path, module in model.named_modules():
        hooks = getattr(getattr(module, "_hook_manager", None), "forward_hooks", None) or {}
        offloading = [name for name in hooks if "offload" in name.lower()]
        if offloading:
            raise CachepassError(f"{path or 'the model'} is offloaded by FastVideo's {offloading[0]} "
                                 f"(dit_layerwise_offload): {FASTVIDEO_FIX}")
        if type(module).__name__.startswith("FSDP"):
            raise CachepassError(f"{path or 'the model'} is managed by FSDP ({type(module).__name__}; FastVideo's "
                                 f"dit_cpu_offload): {FASTVIDEO_FIX}")

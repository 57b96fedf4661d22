"""Start from host memory: place a model whose weights are on the CPU for offload before it is traced.

``cachepass.compile(model, cfg, offload={"budget": ...}, device="cuda")`` on a CPU model (as
``from_pretrained`` leaves it): every weight and buffer outside the model's block lists moves to the
device; each block's weights are packed, one block at a time, into a page-locked host buffer that
becomes their memory (the CPU tensors they had are freed as each block is packed), seen from the device
through its mapping. So tracing, compiling and the first call see CUDA tensors and the device holds
only the non-block weights until the first call places the resident blocks and the slots
(`cachepass.offload.runtime.ModelOffload`), which never exceed the budget together.

Block lists are found on the module tree here (lists of modules of one class, two or more), before
the graph's discovery; what discovery does not make a cache unit moves to the device at the first call.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from cachepass.errors import CachepassError
from cachepass.offload.memory import host_view, packed_offsets, pinned_host_buffer
from cachepass.offload.plan import OffloadConfig, format_bytes

log = logging.getLogger(__name__)

_PACKED: dict[int, tuple[weakref.ref, torch.Tensor, int]] = {}  # id of a packed parameter -> (it, its buffer, offset)


def candidate_blocks(model: nn.Module) -> list[nn.Module]:
    """Items of the model's lists of same-class modules (two or more): the blocks a cache unit may hold."""
    return [item for module in model.modules()
            if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1
            for item in module]


def check_budget_fits(model: nn.Module, offload: OffloadConfig) -> None:
    """Refuse, before tracing, a budget below what any choice of cache units needs.

    What is in no list of same-class modules is a non-block weight. The blocks the graph's discovery
    picks are some of those lists (the others' weights are non-block), so the non-block weights plus
    one slot for the largest block are at least this.
    """
    blocks = candidate_blocks(model)
    in_lists = {id(p) for block in blocks for p in block.parameters()}
    largest = max((packed_offsets(list(block.parameters()))[1] for block in blocks), default=0)
    nonblock = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if id(t) not in in_lists)
    if largest and offload.budget < nonblock + largest:
        raise CachepassError(
            f"stepcache option offload.budget={format_bytes(offload.budget)} is too small: the non-block weights "
            f"(at least {format_bytes(nonblock)}) plus one slot for the largest block ({format_bytes(largest)}) need "
            f"{format_bytes(nonblock + largest)}")


def place_for_offload(model: nn.Module, device: torch.device) -> int:
    """Move the non-block weights and every buffer to ``device``; pack each block's weights into a pinned host
    buffer that becomes their memory. Returns the bytes pinned."""
    blocks = candidate_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in in_blocks and param.device != device:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    pinned = 0
    for block in blocks:
        params = [p for p in block.parameters() if not _is_packed(p)]
        if not params:
            continue
        offsets, size = packed_offsets(params)
        buffer = pinned_host_buffer(size, device)
        for param, offset in zip(params, offsets):
            if not param.is_contiguous():
                param.data = param.data.contiguous()
            view = host_view(buffer, offset, param, device)
            view.copy_(param.detach())
            param.data = view  # the CPU tensor it had is freed here (unless the caller holds it)
            _PACKED[id(param)] = (weakref.ref(param, lambda _, key=id(param): _PACKED.pop(key, None)), buffer, offset)
        pinned += size
    log.info("stepcache: offload: %s of block weights placed in pinned host memory before tracing; the other weights "
             "on %s", format_bytes(pinned), device)
    return pinned


def _is_packed(param: torch.Tensor) -> bool:
    entry = _PACKED.get(id(param))
    return entry is not None and entry[0]() is param


def packed_buffer(params: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """The host buffer `place_for_offload` packed all of ``params`` into, with each one's offset; or None."""
    entries = [_PACKED.get(id(p)) for p in params]
    if not entries or any(e is None or e[0]() is not p for e, p in zip(entries, params)):
        return None
    buffer = entries[0][1]
    if any(e[1] is not buffer for e in entries):
        return None
    return buffer, [e[2] for e in entries]


def materialize(param: torch.Tensor, device: torch.device) -> None:
    """A packed parameter gets device memory of its own (a resident block, or a list that is no cache unit)."""
    if not _is_packed(param):
        return
    param.data = torch.empty_like(param.data, device=device).copy_(param.data)
    _PACKED.pop(id(param), None)

"""Host and device memory of streamed blocks: the packed layout of a block's weights, page-locked host
buffers registered at their exact size and mapped into the device's address space, and views of them
that are tensors of their own (so views of one buffer never look like aliases of each other)."""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

from cachepass.errors import CachepassError
from cachepass.offload.plan import format_bytes

ALIGNMENT = 256  # bytes: each parameter of a packed block starts at a multiple of this


def packed_offsets(params: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offset of each parameter in a block's packed buffer, and the buffer's size."""
    offsets, size = [], 0
    for p in params:
        offsets.append(size)
        size += -(-p.numel() * p.element_size() // ALIGNMENT) * ALIGNMENT
    return offsets, size


_HOST_REGISTER_PORTABLE_MAPPED = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped


def pinned_host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of page-locked host memory, exactly, mapped into the device's address space.

    (cudaHostRegister on a plain allocation; on a CPU "device" a plain allocation.)
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if device.type != "cuda" or nbytes == 0:
        return buffer
    cudart = torch.cuda.cudart()
    code = cudart.cudaHostRegister(buffer.data_ptr(), nbytes, _HOST_REGISTER_PORTABLE_MAPPED)
    if int(code) != 0:
        raise CachepassError(f"offload: cudaHostRegister of {format_bytes(nbytes)} failed ({code}); the host may be "
                             "out of lockable memory (ulimit -l)")
    weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
    return buffer


class _MappedHostMemory:
    """A byte range of a pinned host buffer, seen from the device (``__cuda_array_interface__``).

    With unified addressing the device address of registered host memory is its host address
    (cudaDevAttrCanUseHostPointerForRegisteredMem, which Linux on x86-64 and Grace have).
    """

    def __init__(self, buffer: torch.Tensor, offset: int, nbytes: int):
        self.buffer = buffer  # keeps the pinned memory alive as long as the view
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "version": 3, "strides": None,
                                         "data": (buffer.data_ptr() + offset, False), "stream": None}


def host_view(buffer: torch.Tensor, offset: int, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``like``'s place in a packed host buffer, as a tensor on ``device`` with a storage of its own.

    On CUDA it reads and writes the pinned host memory itself (mapped); on a CPU "device", the buffer.
    """
    nbytes = like.numel() * like.element_size()
    if nbytes == 0:
        return torch.empty(like.shape, dtype=like.dtype, device=device)
    if device.type == "cuda":
        raw = torch.as_tensor(_MappedHostMemory(buffer, offset, nbytes), device=device)
    else:
        raw = own_storage(buffer[offset: offset + nbytes])
    return raw.view(like.dtype).view(like.shape)


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view``'s memory as a tensor with a storage of its own (through DLPack; it keeps ``view`` alive).

    Views of one slot would share its storage: compiled code would see the weights of the blocks
    that take turns in a slot as aliases of each other.
    """
    return torch.from_dlpack(view)

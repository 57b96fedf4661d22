"""A host-to-device copy run by a few SMs, for the copies captured inside IF/ELSE bodies.

A memcpy node inside a CUDA-graph conditional body does not run on a copy engine: the driver runs
it as a kernel on the whole device, which then leaves no SMs to the blocks it should overlap
(measured with `bench.copy_check`). This kernel reads the pinned host memory through its device
mapping (zero-copy) with a fixed, small grid: enough loads in flight to fill the host link,
most SMs left to compute. Launched through the driver API on the current stream, so stream capture
records it as a kernel node like any other.
"""

from __future__ import annotations

import ctypes

import torch

from cachepass.cudagraphs.nvrtc import check, kernel
from cachepass.errors import CachepassError

_SOURCE = r"""
extern "C" __global__ void cachepass_sm_copy(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                             unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {  // four loads in flight per thread
        uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        dst[i] = a; dst[i + stride] = b; dst[i + 2 * stride] = c; dst[i + 3 * stride] = d;
    }
    for (; i < n; i += stride) dst[i] = src[i];
}
"""

THREADS = 1024
# thread blocks: 4 and 8 copy at 49 GB/s beside a matmul chain with full overlap, 16 and more take SMs from it
# (`bench/results/copy_check-nvidia-h200-2026-12-04.md`)
DEFAULT_BLOCKS = 8


def prepare(device: torch.device) -> None:
    """Compile the kernel for ``device`` now: NVRTC cannot run while a stream is capturing."""
    kernel(_SOURCE, "cachepass_sm_copy", torch.cuda.current_device() if device.index is None else device.index)


def sm_copy(dst: torch.Tensor, src: torch.Tensor, blocks: int = DEFAULT_BLOCKS) -> None:
    """``dst.copy_(src)`` for a uint8 CUDA ``dst`` and a uint8 pinned, mapped host ``src`` of 16-byte multiples,
    on the current stream (`prepare` the device before a capture)."""
    from cuda.bindings import driver

    nbytes = src.numel()
    if dst.numel() < nbytes or nbytes % 16 or src.data_ptr() % 16 or dst.data_ptr() % 16:
        raise CachepassError(f"sm_copy: {nbytes} bytes into {dst.numel()}: sizes and addresses must be multiples of 16")
    function = kernel(_SOURCE, "cachepass_sm_copy", dst.device.index)
    values = (ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(dst.data_ptr()), ctypes.c_ulonglong(nbytes // 16))
    pointers = (ctypes.c_void_p * 3)(*(ctypes.addressof(v) for v in values))
    stream = torch.cuda.current_stream(dst.device).cuda_stream
    check(driver.cuLaunchKernel(function, blocks, 1, 1, THREADS, 1, 1, 0, stream, ctypes.addressof(pointers), 0))

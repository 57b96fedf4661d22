"""Small CUDA kernels of our own, compiled once per process and device with NVRTC, run through the driver API
(``cuda-bindings``): the set-condition kernel of IF/ELSE nodes, the few-SM copy of offload's conditional bodies."""

from __future__ import annotations

import functools

import torch

from cachepass.errors import CachepassError


def check(result):
    """cuda-bindings returns (status, *values): raise on a bad status, return the value(s)."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise CachepassError(f"CUDA driver call failed: {status!r}")
    return values[0] if len(values) == 1 else tuple(values)


@functools.cache
def kernel(source: str, name: str, device_index: int):
    """The ``extern "C"`` kernel ``name`` of ``source``, compiled for device ``device_index`` (a ``CUfunction``)."""
    from cuda.bindings import driver, nvrtc

    with torch.cuda.device(device_index):
        torch.cuda.synchronize()  # makes the device's primary context current on this thread (driver calls need it)
        major, minor = torch.cuda.get_device_capability(device_index)
        program = check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []))
        options = [f"--gpu-architecture=compute_{major}{minor}".encode()]
        status, = nvrtc.nvrtcCompileProgram(program, len(options), options)
        if int(status) != 0:
            size = check(nvrtc.nvrtcGetProgramLogSize(program))
            log = bytearray(size)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise CachepassError(f"NVRTC failed on {name}: {log.decode(errors='replace')}")
        ptx = bytearray(check(nvrtc.nvrtcGetPTXSize(program)))
        check(nvrtc.nvrtcGetPTX(program, ptx))
        module = check(driver.cuModuleLoadData(bytes(ptx)))
        return check(driver.cuModuleGetFunction(module, name.encode()))

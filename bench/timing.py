"""Shared timing helpers: synchronised wall-clock, fresh compile caches, CUDA sync counting, peak memory."""

from __future__ import annotations

import collections
import contextlib
import statistics
import time
import warnings
from typing import Callable, Iterator

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """(result, seconds) of ``fn()``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def fresh_compile_caches() -> Iterator[None]:
    """Empty Inductor and Triton cache dirs and in-memory caches: the next compile is a cold start."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    torch._dynamo.reset()
    with fresh():
        yield
    torch._dynamo.reset()


def count_syncs(fn: Callable, device: torch.device, sites: collections.Counter | None = None) -> int | None:
    """Host-device synchronisations ``fn()`` triggers (CUDA's sync debug mode); None off CUDA. ``sites``: counts
    them per Python line (``file:line``) that made them."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)  # outside debug mode: results before 2026-11-28 evening counted this one too
    # the message of a sync; not the "Synchronization debug mode is a prototype" notice that setting the mode
    # gives once per process (counted as a sync of the process's first variant until 2026-12-05)
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    if sites is not None:
        sites.update(f"{w.filename}:{w.lineno}" for w in syncs)
    return len(syncs)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def pinned_htod_bytes(fn: Callable, trace_path: str) -> tuple[object, int]:
    """(``fn()``, bytes copied host-to-device from pinned memory while it ran), as the profiler records them."""
    import json

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    return result, sum(
        int(e.get("args", {}).get("bytes", 0))
        for e in events
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "") and "Pinned" in e.get("name", "")
    )


def sm_copy_kernels(trace_path: str) -> int:
    """Launches of `cachepass.offload.sm_copy`'s kernel in a profiler trace written by `pinned_htod_bytes`: the
    host-to-device copies captured into IF/ELSE bodies, which the profiler shows as kernels, not memcpys."""
    import json

    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    return sum(e.get("cat") == "kernel" and e.get("name") == "cachepass_sm_copy" for e in events)

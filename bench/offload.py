"""Offload measurements of a bench row: bytes the profiler saw copied host-to-device in one generation,
the plan's figure for the decisions made, and the lower bound max(compute, bytes / bandwidth)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import torch
from torch import nn

import cachepass
from bench.timing import pinned_htod_bytes
from cachepass.offload.plan import decisions_of, plan_generation
from cachepass.offload.runtime import block_lists_paths, model_bytes
from cachepass.state.runtime import states_of


def nonblock_bytes(model: nn.Module, block_lists: tuple[str, ...]) -> int:
    """Bytes of every parameter and buffer outside the block lists (what stays on the device in any case)."""
    return model_bytes(model, block_lists_paths(model, block_lists))[1]


def h2d_gbps(device: torch.device, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Host-to-device bandwidth from pinned memory, GB/s (10^9)."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return repeats * nbytes / (time.perf_counter() - start) / 1e9


def measure(name: str, model: nn.Module, generate_once: Callable[[], object], shared: dict) -> dict:
    """One more generation under the profiler, and what the plan says it should have moved."""
    with tempfile.TemporaryDirectory() as tmp:
        _, copied = pinned_htod_bytes(generate_once, os.path.join(tmp, "trace.json"))
    row = {"htod_bytes_per_generation": copied, "h2d_gbps": shared["h2d_gbps"]}
    if name.startswith("stepcache"):
        offload = cachepass.offload_stats(model)
        layout = states_of(model)[-1].layout
        plan = plan_generation(offload.residency, layout.units, layout.config,
                               decisions_of(cachepass.stats(model), layout.config), graphed=offload.graphed)
        r = offload.residency
        row.update(planned_bytes_per_generation=plan.bytes_per_generation, wasted_bytes=plan.counters.wasted_bytes,
                   planned_weight_gb=r.device_bytes / 2**30, resident_blocks=len(r.resident),
                   streamed_blocks=len(r.slot_of), slots=r.slots)
    compute = shared.get("stepcache_median_s")
    if compute is not None:
        row["lower_bound_s"] = max(compute, copied / (shared["h2d_gbps"] * 1e9))
    return row

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
from bench.timing import pinned_htod_bytes, sm_copy_kernels
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
    """One more generation under the profiler, and what the plan says it should have moved.

    The profiler shows copy-engine copies as pinned HtoD memcpys with their bytes, and the copies captured into
    IF/ELSE bodies (conditional CUDA graphs: the middle blocks' copies) as ``cachepass_sm_copy`` kernels without
    bytes. ``measured_bytes_per_generation`` is the memcpys' bytes, plus the plan's bytes of the middle blocks'
    copies where one kernel was seen per such copy; None where the profiler's counts do not match the plan."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        _, copied = pinned_htod_bytes(generate_once, trace)
        kernels = sm_copy_kernels(trace)
    row = {"htod_bytes_per_generation": copied, "sm_copy_kernels_per_generation": kernels,
           "h2d_gbps": shared["h2d_gbps"]}
    moved = copied
    if name.startswith("stepcache"):
        offload = cachepass.offload_stats(model)
        layout = states_of(model)[-1].layout
        plan = plan_generation(offload.residency, layout.units, layout.config,
                               decisions_of(cachepass.stats(model), layout.config), graphed=offload.graphed)
        r = offload.residency
        middle = middle_blocks(layout.units)
        in_bodies = [a.block for c in plan.calls for a in c.actions if a.kind == "copy" and a.block in middle]
        body_bytes = sum(r.block_bytes[b] for b in in_bodies)
        if kernels == 0 and copied == plan.bytes_per_generation:  # every copy a memcpy (no graphs, piecewise)
            moved = copied
        elif kernels == len(in_bodies) and copied == plan.bytes_per_generation - body_bytes:  # conditional graphs
            moved = copied + body_bytes
        else:  # what the profiler saw is not the plan: no measured figure, the two counts stay in the row
            moved = None
        row.update(planned_bytes_per_generation=plan.bytes_per_generation, wasted_bytes=plan.counters.wasted_bytes,
                   planned_middle_copies=len(in_bodies), measured_bytes_per_generation=moved,
                   planned_weight_gb=r.device_bytes / 2**30, resident_blocks=len(r.resident),
                   streamed_blocks=len(r.slot_of), slots=r.slots)
    compute = shared.get("stepcache_median_s")
    if compute is not None and moved is not None:
        row["lower_bound_s"] = max(compute, moved / (shared["h2d_gbps"] * 1e9))
    return row


def middle_blocks(units) -> set[str]:
    """The paths of the blocks that run only on a compute decision: under conditional CUDA graphs their copies are
    captured into the IF/ELSE bodies."""
    return {u.block_paths[i] for u in units for i in u.middle}

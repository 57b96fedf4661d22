"""The measurement steps every bench runs per variant: one generation, the cold one, the timed repeats,
memory, host syncs, recompiles and decisions. `bench.compare` and `bench.context_parallel` add their
own columns around them."""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

from bench.timing import count_syncs, median, peak_memory_gb, reset_peak_memory, timed
from bench.variants import Context, Prepared
from cachepass.demo.sampling import sample


def generation(ctx: Context, prepared: Prepared, inputs, progress=None) -> torch.Tensor:
    """One denoising loop of the workload through the variant's transformer call."""
    latents, cond, uncond = inputs
    prepared.before_generation()

    def velocity(x, sigma, kwargs):
        if progress is not None:
            progress.update(1)
        return ctx.workload.call(prepared.fn, x, sigma, kwargs)

    w = ctx.workload
    return sample(velocity, latents, cond, uncond, w.num_steps, guidance=w.guidance, shift=w.shift)


@contextlib.contextmanager
def new_graphs(row: dict[str, Any]):
    """Count Dynamo graphs made inside the block into ``row["recompiles"]``."""
    before = counters["stats"]["unique_graphs"]
    try:
        yield
    finally:
        row["recompiles"] = row.get("recompiles", 0) + counters["stats"]["unique_graphs"] - before


def _no_progress(label: str):
    return contextlib.nullcontext(None)


def timed_generations(name: str, ctx: Context, prepare: Callable[[], Prepared], inputs, repeats: int,
                      device: torch.device, progress=_no_progress,
                      before_each: Callable[[], None] = lambda: None) -> tuple[Prepared, torch.Tensor, dict[str, Any]]:
    """Prepare the variant and time its cold generation (run it under ``fresh_compile_caches``), then
    ``repeats`` timed ones; ``before_each`` runs before every generation (a barrier across ranks)."""
    counters.clear()
    prepared = prepare()
    row: dict[str, Any] = {}
    before_each()
    with progress(f"{name} (cold)") as bar:
        out, row["cold_start_s"] = timed(lambda: generation(ctx, prepared, inputs, bar), device)
    row["graph_count"] = counters["stats"]["unique_graphs"]
    row["graph_breaks"] = sum(counters["graph_break"].values())
    reset_peak_memory(device)
    times = []
    for i in range(repeats):
        before_each()
        with progress(f"{name} ({i + 1}/{repeats})") as bar:
            out, seconds = timed(lambda: generation(ctx, prepared, inputs, bar), device)
        times.append(seconds)
    row.update(median_s=median(times), times_s=times, peak_mem_gb=peak_memory_gb(device))
    return prepared, out, row


def counted(ctx: Context, prepared: Prepared, inputs, device: torch.device, row: dict[str, Any]) -> None:
    """Add host syncs per call (one more generation), recompiles since the cold one, and the decisions.

    Recompiles: Dynamo's graphs made since the cold generation, or, when ``row["recompiles"]`` is already
    counted (generations of several variants interleaved, `new_graphs`), those plus this generation's."""
    before = counters["stats"]["unique_graphs"]
    sites = collections.Counter()
    syncs = count_syncs(lambda: generation(ctx, prepared, inputs), device, sites)
    row["syncs_per_call"] = None if syncs is None else syncs / ctx.workload.calls_per_generation
    row["sync_sites"] = None if syncs is None else dict(sites.most_common(5))  # the Python lines that synced
    if "recompiles" in row:
        row["recompiles"] += counters["stats"]["unique_graphs"] - before
    else:
        row["recompiles"] = counters["stats"]["unique_graphs"] - row["graph_count"]
    decisions = prepared.decisions()
    row["decisions"] = decisions
    row["cached_steps"] = None if decisions is None else sum(len(a) + len(b) for a, b in decisions)

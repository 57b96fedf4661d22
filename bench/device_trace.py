"""What the device did over one profiled run, from torch.profiler's trace: kernel time, copy time, and how
much of the copy time ran beside kernels (the overlap offload depends on), per copy kind and stream."""

from __future__ import annotations

import collections
import json
import os
import tempfile
from typing import Iterable


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two sorted disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(events: list[dict]) -> dict:
    """Seconds of kernels, of host-to-device copies, of their overlap; copies by kind; streams seen."""
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "dur" in e]
    htod = [e for e in copies if "HtoD" in e.get("name", "")]
    kernel_time = _union((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    copy_time = _union((e["ts"], e["ts"] + e["dur"]) for e in htod)
    kinds: dict[str, dict] = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "s": 0.0})
    for e in copies:
        kind = kinds[e["name"]]
        kind["count"] += 1
        kind["bytes"] += int(e.get("args", {}).get("bytes", 0))
        kind["s"] += e["dur"] / 1e6
    overlap = _intersection(kernel_time, copy_time)
    return {
        "kernel_s": _length(kernel_time) / 1e6,
        "htod_s": _length(copy_time) / 1e6,
        "htod_overlapped_s": overlap / 1e6,
        "htod_exposed_s": (_length(copy_time) - overlap) / 1e6,
        "htod_gbps": sum(int(e.get("args", {}).get("bytes", 0)) for e in htod) / max(_length(copy_time), 1e-9) / 1e3,
        "copy_kinds": dict(kinds),
        "kernel_streams": sorted({e.get("tid") for e in kernels}, key=str),
        "copy_streams": sorted({e.get("tid") for e in htod}, key=str),
        "kernels": len(kernels),
    }


def of(prof) -> dict:
    """`summarize` of the device events a finished ``torch.profiler.profile`` recorded."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return summarize(json.load(f)["traceEvents"])

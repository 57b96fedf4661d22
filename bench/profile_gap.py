"""Where a generation's time goes: device-busy vs idle time of stepcache and the ideal, side by side.

    python -m bench.profile_gap --workload wan-1.3b-1f [--kernels 30] [--schedule dynamic --threshold 0.3]

Each variant is compiled and warmed up with one generation, then one generation runs under
torch.profiler. Busy = the summed time of device kernels and copies (one stream, so they do not
overlap); idle = profiled wall - busy: time the device waits for the host (launches, syncs,
Python), inflated by the profiler's own overhead, so compare idle between variants, not with
``wall_s`` (one unprofiled generation; use bench.compare for timings). A variant slower than the
ideal with the same busy time loses on the host side. ``--host`` adds where the host's time goes:
one more generation under cProfile, its top functions by own time (``host_top``).

On CUDA the same trace also gives (`bench.device_trace`) the seconds of kernels, of host-to-device
copies and of the copies that ran beside no kernel (``HtoD exposed``): the overlap offload lives on.
``--kernels N`` keeps each variant's N kernels of most device time and, for Inductor's Triton kernels, the
launch config their autotuning kept (of how many) and a hash of their source.

    python -m bench.profile_gap --workload wan-1.3b-9f --offload-blocks 1.2GB \
        --variants stepcache-offload,stepcache-offload-piecewise,stepcache-offload-conditional
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import hashlib
import io
import json
import os
import pstats
import sys

import torch
from torch._inductor.codecache import PyCodeCache
from torch.autograd import DeviceType

from bench import device_trace
from bench.compare import device_name, step_config
from bench.measure import generation
from bench.timing import count_syncs, timed
from bench.variants import VARIANTS, Context, remember_decisions, shared_program_conflict
from bench.workloads import WORKLOADS
from cachepass.offload.plan import parse_bytes


def profile(ctx: Context, name: str, inputs, device: torch.device, host: bool = False, kernels: int = 0) -> dict:
    loaded_before = {id(m) for m in PyCodeCache.modules}
    prepared = VARIANTS[name](ctx)
    generation(ctx, prepared, inputs)  # compile and warm up
    _, wall = timed(lambda: generation(ctx, prepared, inputs), device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        _, profiled_wall = timed(lambda: generation(ctx, prepared, inputs), device)
    device_events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.self_device_time_total for e in device_events)
    top = sorted(device_events, key=lambda e: -e.self_device_time_total)[:kernels]
    trace = device_trace.of(prof) if device.type == "cuda" else None
    if name.startswith("stepcache"):
        remember_decisions(ctx, prepared.decisions())
    calls = ctx.workload.calls_per_generation
    syncs = count_syncs(lambda: generation(ctx, prepared, inputs), device)
    host_top = _host_profile(lambda: generation(ctx, prepared, inputs), device) if host else None
    picked = _autotuned(loaded_before)
    prepared.cleanup()
    return {
        "host_top": host_top, "device_trace": trace,
        "kernels": [{"name": e.key, "count": e.count, "s": e.self_device_time_total / 1e6, "configs": picked.get(e.key)}
                    for e in top],
        "variant": name, "wall_s": wall, "profiled_wall_s": profiled_wall, "device_busy_s": busy_us / 1e6,
        "device_idle_s": profiled_wall - busy_us / 1e6, "calls": calls,
        "syncs_per_call": None if syncs is None else syncs / calls,
    }


def _autotuned(loaded_before: set[int]) -> dict[str, list[dict]]:
    """Per Triton kernel of the Inductor modules loaded since (this variant's compiles), one entry per module that
    defines a kernel of that name: the launch config its autotuning kept, of how many candidates, and a hash of
    its source. A kernel of one name that runs slower in one variant than in another shows here whether its code
    or only the pick differed (bench/NOTES.md, nineteenth session). A module an earlier variant of the process
    loaded (a cache hit: one module, one pick for both) is not this variant's: its kernels have no entry."""
    picked: dict[str, list[dict]] = {}
    for module in PyCodeCache.modules:
        if id(module) in loaded_before:
            continue
        for name, value in vars(module).items():
            if name.startswith("triton_") and getattr(value, "launchers", None):
                source = getattr(getattr(value, "fn", None), "src", None)
                picked.setdefault(name, []).extend(
                    {"config": str(launcher.config), "candidates": len(getattr(value, "configs", None) or ()),
                     "source": hashlib.sha1(source.encode()).hexdigest()[:12] if isinstance(source, str) else None}
                    for launcher in value.launchers)
    return picked


def _host_profile(fn, device: torch.device, top: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--variants", default="stepcache,ideal", help="comma-separated; a stepcache variant first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--host", action="store_true", help="also profile one generation's host time with cProfile")
    parser.add_argument("--kernels", type=int, default=0,
                        help="keep each variant's N device kernels of most time (name, count, seconds) and print them")
    parser.add_argument("--schedule", choices=["static", "dynamic"], default="static",
                        help="as bench.compare's: the static mask, or the residual threshold")
    parser.add_argument("--threshold", type=float, default=0.08, help="residual diff threshold (dynamic schedule)")
    parser.add_argument("--offload-blocks", default="8GB",
                        help="device bytes for block weights in the stepcache-offload variants (resident + slots)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="backend of the non-stepcache torch.compile variants (the ideal's two models)")
    args = parser.parse_args(argv)
    if conflict := shared_program_conflict(args.variants.split(",")):
        parser.error(conflict)
    device, workload = torch.device(args.device), WORKLOADS[args.workload]
    model, inputs = workload.setup(device)
    ctx = Context(workload, model, step_config(workload, args.schedule, args.threshold), args.compile_backend)
    ctx.shared.update(device=device, offload_block_bytes=parse_bytes(args.offload_blocks))
    with torch.no_grad():
        rows = [profile(ctx, name, inputs, device, args.host, args.kernels) for name in args.variants.split(",")]
    meta = {"workload": workload.name, "schedule": args.schedule, "threshold": args.threshold,
            "device": device_name(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "python -m bench.profile_gap " + " ".join(argv or sys.argv[1:])}
    print("| variant | wall s | device busy s | device idle s | idle ms/call | syncs/call | kernel s | HtoD s | "
          "HtoD exposed s | HtoD GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["device_trace"] or {}
        copies = " | ".join(f"{t[k]:.3f}" if k in t else "" for k in ("kernel_s", "htod_s", "htod_exposed_s", "htod_gbps"))
        print(f"| {r['variant']} | {r['wall_s']:.3f} | {r['device_busy_s']:.3f} | {r['device_idle_s']:.3f} | "
              f"{1e3 * r['device_idle_s'] / r['calls']:.2f} | {r['syncs_per_call']} | {copies} |")
    for r in rows if args.kernels else ():
        print(f"device kernels of most time, {r['variant']}, one generation:")
        for k in r["kernels"]:
            print(f"  {k['s']:8.4f} s {k['count']:6d}x {k['name'][:110]}")
            for pick in k["configs"] or ():
                print(f"{'':28s}source {pick['source']}, kept of {pick['candidates']}: {pick['config']}")
    for r in rows if args.host else ():
        print(f"host time of {r['variant']}, one generation:\n{r['host_top']}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

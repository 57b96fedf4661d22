"""Compile vs eager, cache-dit vs stepcache: every variant on one workload, in one process, on one device.

    python -m bench.compare --workload wan-1.3b-33f --schedule static
    python -m bench.compare --workload wan-1.3b-1f --schedule dynamic --threshold 0.3
    python -m bench.compare --workload wan-1.3b-33f --inductor-config cache-dit   # all under cache-dit's settings
    python -m bench.compare --workload tiny --device cpu --repeats 1        # smoke test

Each variant: a cold first generation (fresh Inductor / Triton caches, compile included), then
``--repeats`` timed generations (median reported), one more under CUDA's sync debug mode to count
host syncs, and quality of the final latents against the uncached eager run. On CUDA one more generation
runs under torch.profiler for the GPU's busy seconds (``gpu_busy_s``: kernel time, the floor a variant's
median would reach if the host never made the GPU wait). Rows are merged into
``bench/results/<device>-<date>.json`` (+ ``.md`` table, ``.png`` plot); a failed variant is a row
with status "failed" and its error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import logging
import os
import sys
import traceback
from typing import Any

# cachepass makes each block list its own cache unit; cache-dit does the same in this mode
# (its default merges FLUX.1's two lists into one). Set before cache_dit is imported.
os.environ.setdefault("CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", "0")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import cachepass  # noqa: E402
from bench import device_trace, offload, report  # noqa: E402
from bench.measure import counted, generation, new_graphs  # noqa: E402
from bench.timing import fresh_compile_caches, median, peak_memory_gb, reset_peak_memory, synchronize, timed  # noqa: E402
from bench.variants import (  # noqa: E402
    VARIANTS,
    Context,
    cache_dit_compile_settings,
    remember_decisions,
    shared_program_conflict,
)
from bench.workloads import STATIC_MASK, WORKLOADS  # noqa: E402
from cachepass.demo.quality import compare  # noqa: E402
from cachepass.offload.plan import parse_bytes  # noqa: E402

log = logging.getLogger("bench")


def step_config(workload, schedule: str, threshold: float) -> cachepass.StepCacheConfig:
    common = dict(num_head_blocks=workload.head, num_tail_blocks=workload.tail, separate_cfg=workload.separate_cfg,
                  num_inference_steps=workload.num_steps)
    if schedule == "static":
        return cachepass.StepCacheConfig(**common, threshold=threshold, warmup_steps=4,
                                         steps_computation_mask=STATIC_MASK, steps_computation_policy="static")
    return cachepass.StepCacheConfig(**common, threshold=threshold, warmup_steps=4)


def run_variant(name: str, ctx: Context, inputs, reference, args, device, progress_factory) -> dict:
    """One variant from its cold generation to its last repeat, alone (the default order)."""
    held = torch.cuda.memory_allocated(device) - _device_bytes(ctx.model, device) if device.type == "cuda" else 0
    prepared = None
    # all of it under the fresh caches: leaving them resets Dynamo, which would compile the variant again
    with fresh_compile_caches():
        row, prepared, out = prepare_variant(name, ctx, inputs, device, progress_factory, contextlib.nullcontext, held)
        try:
            if prepared is not None:
                times = []
                for i in range(args.repeats):
                    with progress_factory(f"{name} ({i + 1}/{args.repeats})") as bar, new_graphs(row):
                        out, seconds = timed(lambda: generation(ctx, prepared, inputs, bar), device)
                    times.append(seconds)
                finish_variant(row, ctx, prepared, inputs, out, times, reference, device)
        except Exception as e:
            _failed(row, name, e)
        finally:
            _release(prepared, device)
    return row


def prepare_variant(name: str, ctx: Context, inputs, device, progress_factory, caches,
                    allocated_before: int) -> tuple[dict, Any, Any]:
    """Build the variant under ``caches()`` (fresh compile caches) and time its cold generation:
    (row, prepared or None if it failed, output). ``allocated_before``: device bytes allocated before the
    variant's model came to the device; what it holds after the cold generation is its resident memory."""
    row = {"variant": name}
    try:
        counters.clear()
        with caches():
            prepared = VARIANTS[name](ctx)
            with progress_factory(f"{name} (cold)") as bar:
                out, row["cold_start_s"] = timed(lambda: generation(ctx, prepared, inputs, bar), device)
        row["graph_count"] = counters["stats"]["unique_graphs"]
        row["graph_breaks"] = sum(counters["graph_break"].values())
        if device.type == "cuda":  # weights, cache state, CUDA-graph pools, compiled constants
            row["_resident_bytes"] = torch.cuda.memory_allocated(device) - allocated_before
        return row, prepared, out
    except Exception as e:  # a failing variant is a row, never dropped
        _failed(row, name, e)
        return row, None, None


def finish_variant(row: dict, ctx: Context, prepared, inputs, out, times: list[float], reference, device) -> None:
    """The columns after the timed repeats: memory, offload bytes, syncs, decisions, quality."""
    name = row["variant"]
    try:
        row.update(median_s=median(times), times_s=times)
        reset_peak_memory(device)
        synchronize(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with new_graphs(row):
            generation(ctx, prepared, inputs)
        if device.type == "cuda":  # what the variant holds plus what its generation adds on top of everything resident
            row["peak_mem_gb"] = (row.pop("_resident_bytes") + peak_memory_gb(device) * 2**30 - before) / 2**30
        if device.type == "cuda":  # the GPU's busy time: what no host-side saving can go below
            row["gpu_busy_s"] = gpu_busy_seconds(lambda: generation(ctx, prepared, inputs))
        if "offload" in name and device.type == "cuda":
            row.update(offload.measure(name, ctx.model, lambda: generation(ctx, prepared, inputs), ctx.shared))
        counted(ctx, prepared, inputs, device, row)
        if name == "stepcache":
            ctx.shared["stepcache_median_s"], ctx.shared["stepcache_output"] = row["median_s"], out
        elif name.startswith("stepcache") and "stepcache_output" in ctx.shared:
            row["max_abs_diff_vs_stepcache"] = (out - ctx.shared["stepcache_output"]).abs().max().item()
        if name.startswith("stepcache"):
            row["residual_diffs"] = [(u.residual_diffs, u.cfg_residual_diffs) for u in cachepass.stats(ctx.model)]
        if reference is not None and name not in ("ideal", "eager"):  # ideal drops the middle blocks: a timing bound only
            q = compare(ctx.workload.images(out), ctx.workload.images(reference))
            row.update(psnr=q.psnr, ssim=q.ssim, rel_l2=q.rel_l2)
        row["status"] = "ok"
        row["_output"] = out
    except Exception as e:
        _failed(row, name, e)


def gpu_busy_seconds(run) -> float:
    """Seconds the GPU ran kernels during ``run()`` (the union of kernel intervals in a torch.profiler trace, so
    overlapping streams count once; kernels inside CUDA-graph replays included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return device_trace.of(prof)["kernel_s"]


def _device_bytes(model, device: torch.device) -> int:
    """Bytes of ``model``'s parameters and buffers on ``device`` (``cuda`` and ``cuda:0`` are the same device here:
    ``torch.device`` equality is not, and the bench runs on one device)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
               if t.device.type == device.type)


def _failed(row: dict, name: str, error: Exception) -> None:
    log.error("variant %s failed:\n%s", name, traceback.format_exc())
    row.update(status="failed", error=f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")


def _release(prepared, device: torch.device) -> None:
    if prepared is not None:
        prepared.cleanup()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_compiler(device: torch.device) -> float:
    """Pay the process's compiler start-up (Inductor, its compile workers, Triton) once, before any variant, so
    that no variant's cold start carries it; returns its seconds (a column of every row)."""
    x = torch.randn(64, 64, device=device)
    with fresh_compile_caches():
        _, seconds = timed(lambda: torch.compile(lambda a: torch.relu(a @ a) + 1, fullgraph=True)(x), device)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--schedule", choices=["static", "dynamic"], default="static")
    parser.add_argument("--threshold", type=float, default=0.08, help="residual diff threshold (dynamic schedule)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset, in run order")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-backend", default="inductor", help="backend of the non-stepcache torch.compile variants")
    parser.add_argument("--inductor-config", choices=["default", "cache-dit"], default="default",
                        help="Inductor settings of every compiled variant: PyTorch's defaults (cache-dit's compiled "
                             "variants still apply their own), or cache_dit.set_compile_configs() for all")
    parser.add_argument("--offload-blocks", default="8GB",
                        help="device bytes for block weights (resident blocks and slots) in the offload variants")
    parser.add_argument("--interleave", action="store_true",
                        help="every variant prepared first on its own copy of the model, then the timed repeats "
                             "round-robin across variants (drift hits all alike); an offload variant's copy comes to "
                             "the device whole and streams its blocks from host memory once prepared")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if conflict := shared_program_conflict(names):
        parser.error(conflict)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    device = torch.device(args.device)
    workload = WORKLOADS[args.workload]
    model, inputs = workload.setup(device)
    ctx = Context(workload, model, step_config(workload, args.schedule, args.threshold), args.compile_backend)
    ctx.shared.update(device=device, offload_block_bytes=parse_bytes(args.offload_blocks))
    if device.type == "cuda" and any("offload" in n for n in names):
        ctx.shared["h2d_gbps"] = offload.h2d_gbps(device)
    progress_factory = _progress(workload.calls_per_generation)

    meta = {
        "workload": workload.name, "schedule": args.schedule, "device": device_name(device),
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "note": workload.note,
        "config": repr(ctx.config), "repeats": args.repeats, "inductor_config": args.inductor_config,
        "threshold": args.threshold, "offload_blocks": args.offload_blocks,
        "command": "python -m bench.compare " + " ".join(sys.argv[1:] if argv is None else argv),
        "order": "interleaved" if args.interleave else "one variant after another",
    }
    restore_settings = cache_dit_compile_settings() if args.inductor_config == "cache-dit" else lambda: None
    try:
        meta["compiler_warmup_s"] = warm_compiler(device)
        if args.interleave:
            finished = _run_interleaved(names, ctx, inputs, args, device, progress_factory, meta)
        else:
            finished = _run_all(names, ctx, inputs, args, device, progress_factory, meta)
    finally:
        restore_settings()
    print(report.table(finished))
    print("wrote", ", ".join(report.write(finished, args.out)))
    return 0


def _run_all(names, ctx, inputs, args, device, progress_factory, meta) -> list[dict]:
    """Every variant in order; the files are rewritten after each so a cut-off run keeps its rows."""
    rows, reference, finished = [], None, []
    with torch.no_grad():
        for name in names:
            row = run_variant(name, ctx, inputs, reference, args, device, progress_factory)
            if name == "eager" and row["status"] == "ok":
                reference = row["_output"]
                row.update(psnr=None, ssim=None, rel_l2=None)
            if row.get("decisions") is not None and name.startswith(("stepcache", "cache-dit")):
                remember_decisions(ctx, row["decisions"])
            row.pop("_output", None)
            rows.append(row)
            log.info("%s: %s", name, {k: v for k, v in row.items() if k not in ("decisions", "times_s")})
            finished = [report.finish_row(r, rows, meta) for r in rows]
            report.write(finished, args.out)
    return finished


def _run_interleaved(names, ctx, inputs, args, device, progress_factory, meta) -> list[dict]:
    """Every variant built and run cold on its own model copy, then repeat ``r`` of every variant before repeat
    ``r + 1`` of any. The Dynamo cache is not reset between variants (they are all live); each compiles under
    its own fresh Inductor cache."""
    from torch._inductor import utils

    fresh_inductor = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    template = ctx.model.to("cpu")  # each variant gets a copy of it on the device
    ctx.shared["own_model_copies"] = True  # an offload variant's weights move off its own copy: nothing to rebuild
    live = []  # (row, ctx, prepared, last output)
    rows = []
    with torch.no_grad():
        for name in names:
            own = dataclasses.replace(ctx, model=copy.deepcopy(template).to(device), shared=ctx.shared)
            # measured with the copy on the device, less its bytes: a failed variant's copy, dropped while the next
            # variant prepared, counted against it (FLUX's cache-dit row on 2026-12-05 read 0.45 GB)
            held = torch.cuda.memory_allocated(device) - _device_bytes(own.model, device) if device.type == "cuda" else 0
            row, prepared, out = prepare_variant(name, own, inputs, device, progress_factory, fresh_inductor, held)
            rows.append(row)
            if prepared is None:  # its copy leaves the device now, not while the next variant prepares
                own = None
                _release(None, device)
            if prepared is not None:
                live.append([row, own, prepared, out])
                decisions = prepared.decisions() if name.startswith(("stepcache", "cache-dit")) else None
                if decisions is not None:  # the ideal, prepared later, replays them
                    remember_decisions(ctx, decisions)
        times = {id(entry[0]): [] for entry in live}
        for r in range(args.repeats):
            for entry in list(live):
                row, own, prepared, _ = entry
                try:
                    with progress_factory(f"{row['variant']} ({r + 1}/{args.repeats})") as bar, new_graphs(row):
                        entry[3], seconds = timed(lambda: generation(own, prepared, inputs, bar), device)
                except Exception as e:
                    _failed(row, row["variant"], e)
                    live.remove(entry)
                    _release(prepared, device)
                    continue
                times[id(row)].append(seconds)
        eager = next((entry for entry in live if entry[0]["variant"] == "eager"), None)
        reference = eager[3] if eager is not None else None
        for row, own, prepared, out in live:
            finish_variant(row, own, prepared, inputs, out, times[id(row)], reference, device)
        for row, _, prepared, _ in live:
            _release(prepared, device)
            row.pop("_output", None)
    finished = [report.finish_row(r, rows, meta) for r in rows]
    report.write(finished, args.out)
    return finished


def _progress(total_calls: int):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    class Bar:
        def __init__(self, label):
            self.bar = tqdm(total=total_calls, desc=label, unit="call", leave=False) if tqdm else None

        def __enter__(self):
            return self

        def update(self, n):
            if self.bar is not None:
                self.bar.update(n)

        def __exit__(self, *exc):
            if self.bar is not None:
                self.bar.close()

    return Bar


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())

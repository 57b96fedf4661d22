"""Compile vs eager, cache-dit vs stepcache: every variant on one workload, in one process, on one device.

    python -m bench.compare --workload wan-1.3b-33f --schedule static
    python -m bench.compare --workload wan-1.3b-1f --schedule dynamic --threshold 0.3
    python -m bench.compare --workload wan-1.3b-33f --inductor-config cache-dit   # all under cache-dit's settings
    python -m bench.compare --workload tiny --device cpu --repeats 1        # smoke test

Each variant: a cold first generation (fresh Inductor / Triton caches, compile included), then
``--repeats`` timed generations (median reported), one more under CUDA's sync debug mode to count
host syncs, and quality of the final latents against the uncached eager run. Rows are merged into
``bench/results/<device>-<date>.json`` (+ ``.md`` table, ``.png`` plot); a failed variant is a row
with status "failed" and its error.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import sys
import traceback

# cachepass makes each block list its own cache unit; cache-dit does the same in this mode
# (its default merges FLUX.1's two lists into one). Set before cache_dit is imported.
os.environ.setdefault("CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", "0")

import torch  # noqa: E402

import cachepass  # noqa: E402
from bench import offload, report  # noqa: E402
from bench.measure import counted, generation, timed_generations  # noqa: E402
from bench.timing import fresh_compile_caches  # noqa: E402
from bench.variants import VARIANTS, Context, cache_dit_compile_settings, remember_decisions  # noqa: E402
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
    row = {"variant": name}
    prepared = None
    try:
        with fresh_compile_caches():
            prepared, out, timing = timed_generations(name, ctx, lambda: VARIANTS[name](ctx), inputs, args.repeats, device,
                                                      progress_factory)
            row.update(timing)
            if "offload" in name and device.type == "cuda":
                row.update(offload.measure(name, ctx.model, lambda: generation(ctx, prepared, inputs), ctx.shared))
            counted(ctx, prepared, inputs, device, row)
            if name == "stepcache":
                ctx.shared["stepcache_median_s"], ctx.shared["stepcache_output"] = row["median_s"], out
            elif name.startswith("stepcache") and "stepcache_output" in ctx.shared:
                row["max_abs_diff_vs_stepcache"] = (out - ctx.shared["stepcache_output"]).abs().max().item()
            if name.startswith("stepcache"):
                row["residual_diffs"] = [(u.residual_diffs, u.cfg_residual_diffs) for u in cachepass.stats(ctx.model)]
            if reference is not None and name != "ideal":  # ideal drops the middle blocks: a timing bound only
                q = compare(ctx.workload.images(out), ctx.workload.images(reference))
                row.update(psnr=q.psnr, ssim=q.ssim, rel_l2=q.rel_l2)
            row["status"] = "ok"
            row["_output"] = out
    except Exception as e:  # a failing variant is a row, never dropped
        log.error("variant %s failed:\n%s", name, traceback.format_exc())
        row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        if prepared is not None:
            prepared.cleanup()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


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
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
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
    }
    restore_settings = cache_dit_compile_settings() if args.inductor_config == "cache-dit" else lambda: None
    try:
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

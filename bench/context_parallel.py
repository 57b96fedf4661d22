"""Context parallel: single-GPU stepcache against diffusers CP variants, in one torchrun job on one host.

    torchrun --nproc-per-node 2 -m bench.context_parallel --workload wan-1.3b-33f --schedule static
    torchrun --nproc-per-node 2 -m bench.context_parallel --workload wan-1.3b-1f --schedule dynamic --threshold 0.3
    torchrun --nproc-per-node 2 -m bench.context_parallel --workload tiny --device cpu --repeats 1   # smoke (gloo)

Variants, in run order, each on every rank at once (``cp`` in a name: the model sharded with
diffusers' ``enable_parallelism(ContextParallelConfig(ulysses_degree=world))``, Ulysses):

    stepcache                       single GPU: every rank runs the whole model alone (the baseline)
    compile-cp                      torch.compile (fullgraph), no cache
    cache-dit-cp                    cache-dit (eager), its AVG all-reduce of two means per decision
    cache-dit+compiled-blocks-cp    cache-dit + compile_repeated_blocks (the regional-compile peer)
    stepcache-cp                    cachepass.compile: one all-reduce per unit per call, in the graph
    stepcache-cp-{cudagraphs,conditional}   the same under CUDA graphs (not run unless named)

Per variant: a cold first generation (fresh Inductor caches, compile included), ``--repeats`` timed ones
(median), decisions and stats
gathered from every rank (equal?), decisions against single-GPU stepcache with the steps whose
residual diff lies within bf16 rounding of the threshold flagged, PSNR of the latents against
single-GPU stepcache. Also the cost of one all-reduce of the decision vector. Rows go to
``<out>/<device>-<date>-cp.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import sys

os.environ.setdefault("CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import cachepass  # noqa: E402
from bench.compare import device_name, step_config  # noqa: E402
from bench.measure import counted, timed_generations  # noqa: E402
from bench.report import _fmt, _spread  # noqa: E402
from bench.timing import fresh_compile_caches, timed  # noqa: E402
from bench.variants import Context, Prepared, cache_dit_decisions  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402
from cachepass.compat import trace_functional_all_gather  # noqa: E402
from cachepass.demo.quality import compare  # noqa: E402

log = logging.getLogger("bench")
BF16_ROUNDING = 2.0 ** -7  # relative: a diff this close to the threshold may fall either side in bf16


def _allow_diffusers_cp_logging() -> None:
    """diffusers 0.42's CP hook logs with ``logger.warning_once`` when a 1-D timestep is not split (Wan 2.1):
    transformers (and cache-dit, again, on import) add that method to ``logging.Logger``, and Dynamo must be
    told to skip the current one (else a graph break)."""
    import logging as std_logging

    import transformers.utils.logging  # noqa: F401  (defines logging.Logger.warning_once)

    torch._dynamo.config.ignore_logging_functions.add(std_logging.Logger.warning_once)


def _sharded(ctx: Context) -> torch.nn.Module:
    """A fresh copy of the model (same seed) under diffusers' context parallel, hooks warmed by one eager call."""
    from diffusers import ContextParallelConfig

    _allow_diffusers_cp_logging()
    trace_functional_all_gather()  # torch 2.11: every compiled variant needs it (cachepass.compile applies it too)
    model, inputs = ctx.workload.setup(ctx.shared["device"])
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size(), mesh=ctx.shared["mesh"]))
    latents, cond, _ = inputs
    with torch.no_grad():
        ctx.workload.call(model, latents, torch.tensor(1.0), cond)
    return model


def _stepcache_decisions(model):
    return lambda: [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(model)]


def single_gpu_stepcache(ctx: Context) -> Prepared:
    return Prepared(cachepass.compile(ctx.model, ctx.config), decisions=_stepcache_decisions(ctx.model))


def compile_cp(ctx: Context) -> Prepared:
    return Prepared(torch.compile(_sharded(ctx), fullgraph=True, dynamic=False))


def cache_dit_cp(ctx: Context, compiled_blocks: bool = False) -> Prepared:
    import cache_dit

    model = _sharded(ctx)
    db, taylor = ctx.config.to_cache_dit()
    cache_dit.enable_cache(model, cache_config=db, calibrator_config=taylor)
    if compiled_blocks:
        model.compile_repeated_blocks()
    return Prepared(model, lambda: cache_dit.refresh_context(model), lambda: cache_dit_decisions(model))


def stepcache_cp(ctx: Context, cudagraphs: str | None = None) -> Prepared:
    model = _sharded(ctx)
    return Prepared(cachepass.compile(model, ctx.config, cudagraphs=cudagraphs), decisions=_stepcache_decisions(model))


VARIANTS = {
    "stepcache": single_gpu_stepcache,
    "compile-cp": compile_cp,
    "cache-dit-cp": cache_dit_cp,
    "cache-dit+compiled-blocks-cp": lambda ctx: cache_dit_cp(ctx, compiled_blocks=True),
    "stepcache-cp": stepcache_cp,
    "stepcache-cp-cudagraphs": lambda ctx: stepcache_cp(ctx, "piecewise"),
    "stepcache-cp-conditional": lambda ctx: stepcache_cp(ctx, "conditional"),
}


def _gathered(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _near_threshold_steps(decisions, reference, diffs, threshold: float) -> tuple[list, list]:
    """Steps decided differently from the reference, and those among them whose diff is within bf16 rounding."""
    differing, near = [], []
    for unit, (mine, ref) in enumerate(zip(decisions, reference)):
        for stream in (0, 1):
            for step in sorted(set(mine[stream]) ^ set(ref[stream])):
                differing.append((unit, stream, step))
                diff = (diffs[unit][stream] if diffs else {}).get(str(step))
                if diff is not None and abs(diff - threshold) <= BF16_ROUNDING * threshold:
                    near.append((unit, stream, step, diff))
    return differing, near


def run_variant(name: str, ctx: Context, inputs, args, device) -> dict:
    row = {"variant": name.replace("-cp", f"-cp{dist.get_world_size()}")}
    try:
        # every generation inside: leaving the context resets Dynamo; the first compiles with empty Inductor caches
        with fresh_compile_caches():
            prepared, out, timing = timed_generations(name, ctx, lambda: VARIANTS[name](ctx), inputs, args.repeats, device,
                                                      before_each=dist.barrier)
            row.update(timing)
            counted(ctx, prepared, inputs, device, row)
            decisions = row["decisions"]
            if name.startswith("stepcache"):
                stats = [(u.residual_diffs, u.cfg_residual_diffs) for u in cachepass.stats(prepared.fn)]
                row["residual_diffs"] = stats
                if "cp" in name:  # the single-GPU baseline runs independently on each rank
                    row["stats_equal_on_ranks"] = all(g == stats for g in _gathered(stats))
            if decisions is not None:
                row["decisions_equal_on_ranks"] = all(g == decisions for g in _gathered(decisions))
            if name == "stepcache":
                ctx.shared.update(single_out=out, single_decisions=decisions, single_diffs=row.get("residual_diffs"),
                                  single_median_s=row["median_s"])
            elif "single_out" in ctx.shared:
                q = compare(ctx.workload.images(out), ctx.workload.images(ctx.shared["single_out"]))
                row.update(psnr_vs_single=q.psnr if q.psnr != float("inf") else None, ssim_vs_single=q.ssim,
                           speedup_vs_single=ctx.shared["single_median_s"] / row["median_s"])
                if decisions is not None:
                    differing, near = _near_threshold_steps(decisions, ctx.shared["single_decisions"],
                                                            ctx.shared["single_diffs"], ctx.config.threshold)
                    row.update(decisions_equal_single=not differing, differing_steps=differing,
                               differing_within_bf16_rounding=near)
            row["status"] = "ok"
    except Exception as e:  # a failing variant is a row; the ranks fail together (the same code on each)
        log.exception("variant %s failed", name)
        row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        prepared = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def allreduce_us(device: torch.device, iters: int = 200) -> float:
    """Microseconds per all-reduce of the 9-entry float64 decision vector, each waited for, host-timed."""
    import torch.distributed._functional_collectives as funcol

    x = torch.zeros(9, dtype=torch.float64, device=device)
    for _ in range(20):
        funcol.all_reduce(x, "sum", dist.group.WORLD).wait()
    dist.barrier()

    def reduce_all():
        for _ in range(iters):
            funcol.all_reduce(x, "sum", dist.group.WORLD).wait()

    return timed(reduce_all, device)[1] / iters * 1e6


def table(rows: list[dict]) -> str:
    header = ("variant", "status", "median s", "min-max s", "vs 1-GPU stepcache", "cold s", "cached", "graphs/breaks",
              "recomp", "syncs/call", "peak GB", "ranks agree", "decisions = 1 GPU", "PSNR vs 1 GPU")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"failed: {r.get('error', '')[:120]}"
        agree = r.get("decisions_equal_on_ranks")
        same = r.get("decisions_equal_single")
        if same is False:
            near = len(r.get("differing_within_bf16_rounding") or [])
            same = f"no: {len(r['differing_steps'])} steps ({near} within bf16 rounding)"
        cells = (r["variant"], status, _fmt(r.get("median_s")), _spread(r.get("times_s")),
                 _fmt(r.get("speedup_vs_single")), _fmt(r.get("cold_start_s"), 1), _fmt(r.get("cached_steps")),
                 f"{_fmt(r.get('graph_count'))}/{_fmt(r.get('graph_breaks'))}", _fmt(r.get("recompiles")),
                 _fmt(r.get("syncs_per_call")), _fmt(r.get("peak_mem_gb"), 1), _fmt(agree), _fmt(same),
                 _fmt(r.get("psnr_vs_single"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: list[dict], meta: dict, out_dir: str) -> list[str]:
    """Merge this run's rows (keyed by workload, schedule, threshold) into <device>-<date>-cp.json, redraw the .md."""
    os.makedirs(out_dir, exist_ok=True)
    device = "".join(c if c.isalnum() else "-" for c in meta["device"].lower()).strip("-")
    stem = os.path.join(out_dir, f"{device}-{meta['date']}-cp")
    key = (meta["workload"], meta["schedule"], meta["threshold"])
    existing = json.load(open(stem + ".json")) if os.path.exists(stem + ".json") else []
    merged = [r for r in existing if (r["workload"], r["schedule"], r["threshold"]) != key] + [{**meta, **r} for r in rows]
    with open(stem + ".json", "w") as f:
        json.dump(merged, f, indent=1, default=str)
    parts = []
    for k in dict.fromkeys((r["workload"], r["schedule"], r["threshold"]) for r in merged):
        group = [r for r in merged if (r["workload"], r["schedule"], r["threshold"]) == k]
        first = group[0]
        parts.append(f"### {k[0]}, {k[1]} schedule (threshold {k[2]}), {first['world']} ranks\n")
        parts.append(f"{first['note']}. Device: {first['device']} x{first['world']}, torch {first['torch']}, "
                     f"{first['date']}, {first['repeats']} timed repeats (median). All-reduce of the decision "
                     f"vector: {first['allreduce_us']:.1f} us. Config: `{first['config']}`.\n")
        parts.append(f"Command: `{first['command']}`\n")
        parts.append(table(group) + "\n")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(parts))
    return [stem + ".json", stem + ".md"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--schedule", choices=["static", "dynamic"], default="static")
    parser.add_argument("--threshold", type=float, default=0.08)
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if "cudagraphs" not in v and "conditional" not in v))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{os.environ.get('RANK', 0)} %(name)s: "
                                                   f"%(message)s")
    names = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in names if v not in VARIANTS]:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    rank = int(os.environ["RANK"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.accelerator.device_count = lambda: 1  # diffusers maps ranks to devices by rank % device_count
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    workload = WORKLOADS[args.workload]
    model, inputs = workload.setup(device)
    ctx = Context(workload, model, step_config(workload, args.schedule, args.threshold), "inductor")
    ctx.shared.update(device=device, mesh=init_device_mesh(device.type, (1, world), mesh_dim_names=("ring", "ulysses")))
    meta = {
        "workload": workload.name,
        "schedule": args.schedule,
        "threshold": args.threshold,
        "world": world,
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "note": workload.note,
        "config": repr(ctx.config),
        "repeats": args.repeats,
        "command": f"torchrun --nproc-per-node {world} -m bench.context_parallel "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    rows = []
    with torch.no_grad():
        meta["allreduce_us"] = allreduce_us(device)
        for name in names:
            rows.append(run_variant(name, ctx, inputs, args, device))
            if rank == 0:
                shown = {k: v for k, v in rows[-1].items() if k not in ("decisions", "times_s", "residual_diffs")}
                log.info("%s: %s", name, shown)
    if rank == 0:
        print(table(rows))
        print("wrote", ", ".join(write(rows, meta, args.out)))
    dist.barrier()
    # no destroy_process_group(): after the CUDA-graph variant (NCCL kernels captured) it hung once on torch 2.11
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

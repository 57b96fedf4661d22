"""A model that does not fit the GPU: built on the CPU, compiled with offload and ``device="cuda"``, run under
a device memory cap, against the same model resident on the GPU (uncapped, same process, run first).

    python -m bench.offload_from_host --workload wan-1.3b-33f --offload-blocks 1.2GB --caps-gb 2.5 --out bench/results

Both models are built on the CPU from the same seed, so their weights are equal. Per row: cold first
generation (compile included, in this process: not a fresh-process cold start), ``--repeats`` timed
generations (median, min-max), host syncs per call (one more generation), peak device memory
of the caching allocator (the cap applies to it; the CUDA context is outside it), host bytes pinned,
and the largest difference of the latents from the resident run's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import sys

import torch

import cachepass
from bench import offload
from bench.compare import device_name, step_config
from bench.report import _fmt
from bench.timing import count_syncs, median, timed
from bench.workloads import WORKLOADS
from cachepass.demo.sampling import sample
from cachepass.offload.plan import format_bytes, parse_bytes
from cachepass.offload.runtime import block_lists_paths, model_bytes

log = logging.getLogger("bench")


def _on(device: torch.device, inputs):
    latents, cond, uncond = inputs
    move = lambda kw: None if kw is None else {k: v.to(device) for k, v in kw.items()}  # noqa: E731
    return latents.to(device), move(cond), move(uncond)


def _generate(workload, fn, inputs) -> torch.Tensor:
    latents, cond, uncond = inputs
    return sample(lambda x, sigma, kw: workload.call(fn, x, sigma, kw), latents, cond, uncond, workload.num_steps,
                  guidance=workload.guidance, shift=workload.shift)


def _run(name: str, workload, compiled, inputs, repeats: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    torch.cuda.reset_peak_memory_stats(device)
    out, cold = timed(lambda: _generate(workload, compiled, inputs), device)
    times = []
    for _ in range(repeats):
        out, seconds = timed(lambda: _generate(workload, compiled, inputs), device)
        times.append(seconds)
    syncs = count_syncs(lambda: _generate(workload, compiled, inputs), device)
    row = {"variant": name, "cold_start_s": cold, "median_s": median(times), "times_s": times,
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
           "syncs_per_call": None if syncs is None else syncs / workload.calls_per_generation}
    log.info("%s: %s", name, row)
    return out, row


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0, device)


def _write(stem: str, meta: dict, rows: list[dict], workload, weights: int, args) -> list[str]:
    """The JSON and the table so far: a run cut short by its time limit keeps the rows it measured."""
    with open(stem + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    lines = [f"### {workload.name}: built on the CPU, offloaded from host memory", "",
             f"{workload.note}. {meta['device']}, torch {meta['torch']}, {meta['date']}, weights "
             f"{format_bytes(weights)}, cudagraphs={args.cudagraphs}, {args.repeats} timed repeats (median).", "",
             f"Command: `{meta['command']}`", "",
             "| variant | cap GiB | blocks GB | median s | min-max s | vs resident | lower bound s | cold s | peak GiB "
             "| host pinned GiB | GB moved (measured / plan) | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        blocks = f"{r['block_budget_gb']:.1f}" if "block_budget_gb" in r else "all"
        lines.append(f"| {r['variant']} | {r.get('device_memory_cap_gb') or '-'} | {blocks} | {r['median_s']:.3f} | "
                     f"{min(r['times_s']):.3f}-{max(r['times_s']):.3f} | {r.get('vs_resident', 1.0):.3f} | "
                     f"{_fmt(r.get('lower_bound_s'), 3)} | {r['cold_start_s']:.1f} | {r['peak_mem_gb']:.2f} | "
                     f"{r.get('host_pinned_gb', 0):.2f} | {_fmt(_gb(r.get('measured_bytes_per_generation')), 1)} / "
                     f"{_fmt(_gb(r.get('planned_bytes_per_generation')), 1)} | "
                     f"{r.get('max_abs_diff_vs_resident', 0.0):.3g} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def _gb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--offload-blocks", default="1.2GB",
                        help="device bytes for block weights (resident + slots); comma-separated: one row per budget "
                             "and cap, to find the smallest budget within a ratio of resident in one process")
    parser.add_argument("--caps-gb", default="", help="comma-separated device memory caps, GiB (empty: no cap)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cudagraphs", default="off", choices=["off", "piecewise", "conditional"])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device, workload = torch.device("cuda", torch.cuda.current_device()), WORKLOADS[args.workload]
    cfg = step_config(workload, "static", 0.08)
    total = torch.cuda.get_device_properties(device).total_memory

    model, inputs = workload.setup(torch.device("cpu"))
    inputs = _on(device, inputs)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    nonblock = model_bytes(model, block_lists_paths(model, workload.block_lists))[1]
    budgets = [nonblock + parse_bytes(b) for b in args.offload_blocks.split(",")]
    resident_out, resident = _run("stepcache-resident", workload, cachepass.compile(model.to(device), cfg,
                                                                                    cudagraphs=args.cudagraphs),
                                  inputs, args.repeats, device)
    del model
    _free(device)
    rows = [resident]
    meta = {"workload": workload.name, "note": workload.note, "device": device_name(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "weights_gb": weights / 2**30, "cudagraphs": args.cudagraphs,
            "config": repr(cfg), "command": "python -m bench.offload_from_host " + " ".join(sys.argv[1:] if argv is None
                                                                                        else argv)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"offload-from-host-{meta['device'].lower().replace(' ', '-')}-{meta['date']}-"
                                  f"{workload.name}" + ("" if args.cudagraphs == "off" else f"-{args.cudagraphs}")
                        + ("-budgets" if len(budgets) > 1 else ""))
    caps = [float(c) for c in args.caps_gb.split(",") if c] or [None]
    shared = {"h2d_gbps": offload.h2d_gbps(device), "stepcache_median_s": resident["median_s"]}
    for budget, cap in [(b, c) for b in budgets for c in caps]:
        if cap is not None:
            torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total, device)
        model = workload.setup(torch.device("cpu"))[0]
        compiled = cachepass.compile(model, cfg, cudagraphs=args.cudagraphs, offload={"budget": budget}, device=device)
        name = f"stepcache-offload-from-host{'' if cap is None else f'-cap{cap:g}gb'}"
        if len(budgets) > 1:
            name += f"-blocks{format_bytes(budget - nonblock).replace(' ', '')}"
        out, row = _run(name, workload, compiled, inputs, args.repeats, device)
        row.update(offload.measure(name, model, lambda fn=compiled: _generate(workload, fn, inputs), shared))
        stats = cachepass.offload_stats(model)
        row.update(device_memory_cap_gb=cap, budget_gb=budget / 2**30, block_budget_gb=(budget - nonblock) / 1e9,
                   host_pinned_gb=stats.host_bytes / 2**30,
                   resident_blocks=len(stats.residency.resident), streamed_blocks=len(stats.residency.slot_of),
                   vs_resident=row["median_s"] / resident["median_s"],
                   max_abs_diff_vs_resident=(out.float() - resident_out.float()).abs().max().item())
        rows.append(row)
        _write(stem, meta, rows, workload, weights, args)
        del model, compiled
        _free(device)
    print("\n".join(_write(stem, meta, rows, workload, weights, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ops a generation runs, on the CPU: a stand-in for the kernels the glue launches on a GPU.

    python -m bench.op_count [--case wan] [--schedule static|dynamic] [--steps 10] [--out FILE]

The glue runs as traced (no compiler fuses it), so every op the passes add is a kernel per call on a GPU. This
counts the top-level aten ops the profiler records over one generation of a tiny model (blocks by ``aot_eager``,
separate CFG), leaving out views and allocations (no kernel). The blocks' ops are in the count too: compare
revisions of the same case and schedule, not cases.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import cachepass
from bench.tiny_models import CASES, generate

NO_KERNEL = {"aten::view", "aten::reshape", "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze",
             "aten::expand", "aten::as_strided", "aten::detach", "aten::_unsafe_view", "aten::t", "aten::permute",
             "aten::empty", "aten::empty_strided", "aten::alias", "aten::lift_fresh", "aten::result_type"}


def top_level_ops(fn) -> collections.Counter:
    """The aten ops ``fn()`` runs that no other aten op called, by name, views and allocations left out."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def outermost(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return collections.Counter(e.name for e in prof.events()
                               if e.name.startswith("aten::") and e.name not in NO_KERNEL and outermost(e))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="wan")
    parser.add_argument("--schedule", choices=["static", "dynamic"], default="static",
                        help="static: a steps_computation_mask with the static policy; dynamic: the threshold alone")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", help="write the counts as JSON here")
    args = parser.parse_args(argv)
    case = CASES[args.case]
    mask = tuple(1 if step < 2 or step % 3 == 0 or step == args.steps - 1 else 0 for step in range(args.steps))
    schedule = dict(steps_computation_mask=mask, steps_computation_policy="static") if args.schedule == "static" else {}
    config = cachepass.StepCacheConfig(num_head_blocks=1, threshold=case.threshold, warmup_steps=1, separate_cfg=True,
                                       num_inference_steps=args.steps, **schedule)
    compiled = cachepass.compile(case.model(), config, inner="aot_eager")
    generate(case, compiled, args.steps)  # compile
    ops = top_level_ops(lambda: generate(case, compiled, args.steps, seed=2))
    calls = 2 * args.steps
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {"case": args.case, "schedule": args.schedule, "steps": args.steps, "calls": calls,
           "ops_per_generation": sum(ops.values()), "ops_per_call": sum(ops.values()) / calls,
           "most_run": dict(ops.most_common(12)), "revision": revision, "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "command": "python -m bench.op_count " + " ".join(argv or sys.argv[1:])}
    print(f"{args.case}, {args.schedule}, {calls} calls at {revision}: {row['ops_per_generation']} ops per generation, "
          f"{row['ops_per_call']:.1f} per call")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

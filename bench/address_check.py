"""Host cost of the CUDA-graph runner's address check, per call, at a real model's input count.

    python -m bench.address_check --workload wan-1.3b-1f --out bench/results

Every replay first checks that the weights, buffers and cache state are where the captured graphs
read them (`cachepass.piecewise.static_inputs.pointers_equal`, the C++ check Inductor's cudagraph
trees use). This times that check over as many tensors as the workload's model has parameters and
buffers (built on the meta device; the timed tensors are small CUDA tensors: only addresses matter).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

from bench.timing import count_syncs
from bench.workloads import WORKLOADS
from cachepass.piecewise.static_inputs import pointers_equal


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="wan-1.3b-1f", choices=sorted(WORKLOADS))
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    with torch.device("meta"):
        model = WORKLOADS[args.workload].build()
    count = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    tensors = [torch.empty(4, device="cuda") for _ in range(count)]
    pointers = [t.data_ptr() for t in tensors]
    indices = list(range(count))
    rounds = []
    for _ in range(21):
        start = time.perf_counter()
        for _ in range(1000):
            pointers_equal(tensors, pointers, indices)
        rounds.append((time.perf_counter() - start) / 1000)
    device = torch.device("cuda")
    row = {
        "workload": args.workload,
        "variant": f"address-check-{count}-inputs",
        "median_s": statistics.median(rounds),
        "times_s": rounds,
        "cold_start_s": None,
        "syncs_per_call": count_syncs(lambda: pointers_equal(tensors, pointers, indices), device),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": f"python -m bench.address_check --workload {args.workload}",
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"address_check-{row['device'].lower().replace(' ', '-')}-{row['date']}.json")
    with open(path, "w") as f:
        json.dump([row], f, indent=1)
    print(f"{row['variant']}: {row['median_s'] * 1e6:.1f} us per call, {row['syncs_per_call']} syncs; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

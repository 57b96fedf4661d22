"""Where a host-to-device copy inside a CUDA graph runs, and whether it overlaps compute: top level vs IF body.

    python -m bench.copy_check --out bench/results

One captured graph per case; each case replayed as a plain graph and as the body of an IF node
(`cachepass.cudagraphs.conditional_nodes`). ``compute`` is a chain of bf16 matmuls on the capture
stream; ``copy`` moves ``--gib`` from registered, mapped pinned host memory into a device buffer on a
forked stream, by ``copy_`` (a memcpy node) or by `cachepass.offload.sm_copy` with a given number of
thread blocks. ``both`` runs the two side by side: perfect overlap takes max(compute, copy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

from cachepass.cudagraphs.conditional_nodes import ConditionalGraph
from cachepass.offload.memory import pinned_host_buffer
from cachepass.offload.sm_copy import sm_copy


def _capture(fn) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    fn()  # warm (cuBLAS workspace, NVRTC) outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _ms(launch, repeats: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--matmuls", type=int, default=12, help="8192x8192 bf16 matmuls in the compute chain")
    parser.add_argument("--blocks", default="4,8,16,32,132", help="thread-block counts of the SM copy")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    nbytes = int(args.gib * 2**30) // 256 * 256
    host = pinned_host_buffer(nbytes, device)
    host.copy_(torch.randint(0, 255, (nbytes,), dtype=torch.uint8))
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    side = torch.cuda.Stream(device)

    def compute():
        for _ in range(args.matmuls):
            torch.mm(a, a, out=c)

    copies = {"memcpy": lambda: dst.copy_(host, non_blocking=True)}
    copies.update({f"sm{k}": (lambda k=k: sm_copy(dst, host, blocks=k)) for k in map(int, args.blocks.split(","))})

    def forked(copy, with_compute: bool):
        def run():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                copy()
            if with_compute:
                compute()
            torch.cuda.current_stream().wait_stream(side)
        return run

    cases = {"compute": compute}
    for name, copy in copies.items():
        cases[f"copy {name}"] = forked(copy, False)
        cases[f"both {name}"] = forked(copy, True)
    pred = torch.ones((), dtype=torch.bool, device=device)
    rows = []
    for name, fn in cases.items():
        dst.zero_()
        graph = _capture(fn)
        joined = ConditionalGraph([(pred, graph, graph)], device)
        for where, launch in (("top level", graph.replay), ("IF body", joined.launch)):
            median, low, high = _ms(launch, args.repeats)
            rows.append({"case": name, "where": where, "median_ms": median, "min_ms": low, "max_ms": high})
        if name.startswith("copy"):
            assert torch.equal(dst.cpu(), host), f"{name} copied wrong bytes"
    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "gib": args.gib,
            "command": "python -m bench.copy_check " + " ".join(argv or sys.argv[1:])}
    print(f"| case | where | ms (min-max) | GB/s of the copy |  ({meta['device']}, torch {meta['torch']})")
    print("|---|---|---|---|")
    for r in rows:
        rate = f"{nbytes / r['median_ms'] / 1e6:.1f}" if r["case"].startswith("copy") else ""
        print(f"| {r['case']} | {r['where']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | {rate} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"copy_check-{meta['date']}.json")
        with open(path, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

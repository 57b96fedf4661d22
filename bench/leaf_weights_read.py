"""Host cost per call of reading the block leaves' weights (`cachepass/leaf_weights.py`), microseconds.

    python -m bench.leaf_weights_read --blocks 30 --out bench/results

A diffusers Wan transformer (small width, random weights, on the CPU: the read touches only Python
objects): the weights of blocks 1..N-1, the inputs the backend appends to every call, read by path
from the model as a compiled call does, median and min-max of 7 rounds of 2000 reads.
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

from bench.cold_start import WIDTHS
from cachepass import block_regions
from cachepass.leaf_weights import LeafWeights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, num_layers=args.blocks,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
                                  **WIDTHS["small"])
    lists = block_regions.block_lists(model)
    paths = [f"{module}.{kind}.{name}" for module, m in model.named_modules()
             if module.startswith("blocks.") and module.split(".")[1] != "0"
             for kind in ("_parameters", "_buffers") for name, t in getattr(m, kind).items() if t is not None]
    weights = LeafWeights(paths)
    rounds = []
    with block_regions.marked(model, lists):
        weights.compiled_with([])
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(2000):
                weights()
            rounds.append((time.perf_counter() - start) / 2000 * 1e6)
    row = {"weights": len(paths), "median_us": statistics.median(rounds), "min_us": min(rounds), "max_us": max(rounds)}
    result = {"question": __doc__.splitlines()[0], "device": "cpu", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "command": "python -m bench.leaf_weights_read " + " ".join(
                  sys.argv[1:] if argv is None else argv), "model": f"diffusers WanTransformer3DModel, {args.blocks} "
              "blocks, small width", "rows": [row]}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"leaf_weights_read-cpu-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(paths)} weights: {row['median_us']:.1f} us per call ({row['min_us']:.1f}-{row['max_us']:.1f})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

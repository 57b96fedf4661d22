"""The generation clock on a GPU: host syncs per call, the wrapper's host bookkeeping, and an interrupted run.

    python -m bench.clock_check --out bench/results

On the toy DiT of ``bench/tiny_models.py`` (host-bound, so host costs show): for each inner compiler,
(1) a generation aborted after 17 calls, then two full generations, compared bit for bit with a
fresh state's generation; (2) host syncs per call in a warm generation (CUDA sync-debug mode); (3)
host time of the wrapper's per-call bookkeeping (state lookup, mismatch report), microseconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings

import torch

import cachepass
from bench.tiny_models import CASES, toy_config
from cachepass.demo.sampling import sample
from cachepass.state.runtime import current_state

STEPS = 12


def generation(fn, inputs, abort_after: int | None = None, count_syncs: bool = False):
    latents, cond, uncond = inputs
    calls = 0

    def velocity(x, sigma, kw):
        nonlocal calls
        if abort_after is not None and calls == abort_after:
            raise KeyboardInterrupt
        calls += 1
        return CASES["toy"].call(fn, x, sigma, kw)

    torch.cuda.set_sync_debug_mode("warn" if count_syncs else 0)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sample(velocity, latents, cond, uncond, STEPS, guidance=3.0)
        syncs = sum("synchroniz" in str(w.message) for w in caught) / calls
        return out, syncs
    except KeyboardInterrupt:
        return None, None
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check(inner: str) -> dict:
    case = CASES["toy"]
    latents, cond, uncond = case.inputs(torch.Generator().manual_seed(1))
    inputs = (latents.cuda(), {k: v.cuda() for k, v in cond.items()}, {k: v.cuda() for k, v in uncond.items()})
    fresh, _ = generation(cachepass.compile(case.model().cuda(), toy_config(), inner=inner), inputs)
    model = case.model().cuda()
    fn = cachepass.compile(model, toy_config(), inner=inner)
    generation(fn, inputs, abort_after=17)
    after, syncs = generation(fn, inputs, count_syncs=True)
    again, _ = generation(fn, inputs)
    state = current_state(model)
    rounds = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(1000):
            state.before_call()
            state.after_call()
        rounds.append((time.perf_counter() - start) * 1e3)  # us per call
    torch.cuda.synchronize()
    unit = cachepass.stats(fn)[0]
    equal = bool(torch.equal(after, fresh) and torch.equal(again, fresh))
    return {"variant": f"stepcache-{inner}", "equal_to_fresh_after_interrupt": equal,
            "syncs_per_call": syncs, "bookkeeping_us_per_call": statistics.median(rounds),
            "cached_steps": [unit.cached_steps, unit.cfg_cached_steps], "warnings": unit.warnings}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    rows = [check(inner) for inner in ("aot_eager", "inductor")]
    result = {"question": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "command": "python -m bench.clock_check", "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"clock_check-{result['device'].lower().replace(' ', '-')}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for row in rows:
        print(f"{row['variant']:<20} equal after interrupt: {row['equal_to_fresh_after_interrupt']}  syncs/call "
              f"{row['syncs_per_call']:.2f}  bookkeeping {row['bookkeeping_us_per_call']:.2f} us/call")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cold and warm start: stepcache (piecewise, one-graph) vs diffusers' compile_repeated_blocks, fresh Inductor caches.

    python -m bench.cold_start --blocks 12 --device cpu --out bench/results
    python -m bench.cold_start --blocks 30 --variants stepcache-piecewise,regional-compile --warm-repeats 3 --interleave

Every variant runs in its own process twice over one new cache folder (TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR): the first process starts cold, the second warm. One uncompiled process of the same model runs
before all of them (the machine's warm-up: imports, the device's start), so the first cold process does not pay it.
A third process starts as another machine would with the first one's compile results shipped: an empty cache folder
filled by
``torch.compiler.load_cache_artifacts`` with what the cold process saved (``save_cache_artifacts``; the
load's seconds are reported beside, not in, its first call). ``--interleave`` alternates the variants' processes
(warm round r of each before round r + 1 of any) and pairs each warm round with regional compile's. Each process
times its first call (trace + compile + run), a second call, a call at a new shape (twice the tokens) and one at a
third shape (three times: both have traced the second shape with symbolic sizes, which takes the third without a
compile); the model is a diffusers Wan transformer with
``--blocks`` blocks and random weights. Two reference rows bound what a whole-model capture costs:
``compile`` (plain ``torch.compile``, fullgraph) and ``dynamo-trace`` (Dynamo's trace of the whole
model with ``backend="eager"``: no compiler at all); ``dynamo-trace-regions`` traces the block class once as torch's
``nested_compile_region``, ``dynamo-trace-leaves`` the first block once and the others as leaves (as cachepass does:
`cachepass/block_regions.py`), ``stepcache-block-scope`` cachepass with ``scope="blocks"`` (each block list compiled alone,
the model-level code run as it is, as under regional compile: `cachepass.block_scope`), ``stepcache-dynamic-latents``
cachepass with ``dynamic="latents"`` (the latents' sizes symbolic from the first call: `cachepass.symbolic_latents`),
``stepcache-block-scope-dynamic-latents`` both,
``stepcache`` is the default call (``cachepass.compile(model, cfg)``: the block scope where it fits),
``stepcache-piecewise`` the whole model's program (``scope="model"``),
``dynamo-trace-opaque-blocks`` with each block a pass-through (Dynamo's floor if it never traced into a block; its
output is not the model's). stepcache rows also give the backend's own seconds (passes, split and piece compiles),
read from its log. The new shape's call is split into Dynamo's phases (bytecode tracing, the compiler, guards, the
first run) in the cold process (``new_shape_phases``) and in each warm one, with Inductor's Triton work: kernels
compiled, those compiled in this process because the compile pool was not ready, the waits on the pool, and the
kernels autotuned at their first launch (`TRITON_TIMERS`); the cold process's first call is split the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import json
import logging
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time

VARIANTS = ("stepcache", "stepcache-piecewise", "stepcache-piecewise-inline-trace", "stepcache-block-scope",
            "stepcache-dynamic-latents",
            "stepcache-block-scope-dynamic-latents",
            "stepcache-piecewise-glue-inductor", "stepcache-piecewise-glue-aot_eager", "stepcache-piecewise-glue-eager",
            "stepcache-one-graph", "regional-compile", "compile",
            "dynamo-trace", "dynamo-trace-regions", "dynamo-trace-leaves", "dynamo-trace-opaque-blocks")


WIDTHS = {  # WanTransformer3DModel sizes: the small default, and Wan2.1-1.3B's (random weights, bf16)
    "small": dict(num_attention_heads=4, attention_head_dim=32, text_dim=64, freq_dim=64, ffn_dim=512),
    "wan-1.3b": dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256, ffn_dim=8960),
}


def child(variant: str, blocks: int, device: str, width: str, save_artifacts: str | None = None,
          load_artifacts: str | None = None, profile_to: str | None = None) -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    import cachepass

    loaded_s = None
    if load_artifacts:  # another machine's compile results, into this process's (empty) cache folder
        start = time.perf_counter()
        with open(load_artifacts, "rb") as f:
            data = f.read()
        if data:
            torch.compiler.load_cache_artifacts(data)
        loaded_s = time.perf_counter() - start
    torch.manual_seed(0)
    dtype = torch.bfloat16 if width != "small" else torch.float32
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16, num_layers=blocks, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64, **WIDTHS[width],
    ).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 4, 16, 16, generator=g).to(device, dtype)
    text = torch.randn(1, 16, WIDTHS[width]["text_dim"], generator=g).to(device, dtype)
    backend_log = _BackendLog()
    logging.getLogger("cachepass").addHandler(backend_log)
    logging.getLogger("cachepass").setLevel(logging.INFO)
    if variant == "eager":  # the machine's warm-up process (`main`): no compile
        fn = model
    elif variant == "regional-compile":
        model.compile_repeated_blocks(fullgraph=True)
        fn = model
    elif variant in ("compile", "dynamo-trace", "dynamo-trace-regions", "dynamo-trace-leaves", "dynamo-trace-opaque-blocks"):
        block_class = type(model.blocks[0])
        if variant == "dynamo-trace-regions":
            block_class.forward = torch.compiler.nested_compile_region(block_class.forward)
        elif variant == "dynamo-trace-opaque-blocks":
            block_class.forward = lambda self, hidden_states, *args, **kwargs: hidden_states
        fn = torch.compile(model, fullgraph=True, backend="inductor" if variant == "compile" else "eager")
        if variant == "dynamo-trace-leaves":  # the leaves run as they are (`block_regions.leaf` with real tensors)
            fn = _with_block_leaves(fn, model)
    else:
        cfg = cachepass.StepCacheConfig(num_head_blocks=1, threshold=0.1, warmup_steps=1, num_inference_steps=8)
        variant_glue = re.search(r"-glue-(\w+)$", variant)  # the glue pieces' compiler, as the option sets it
        glue = variant_glue.group(1) if variant_glue else None
        if variant.endswith("-inline-trace"):  # Dynamo inlines every block (cachepass/block_regions.py off)
            os.environ["CACHEPASS_BLOCK_REGIONS"] = "0"
        scope = "blocks" if variant.startswith("stepcache-block-scope") else "model"
        dynamic = "latents" if variant.endswith("-dynamic-latents") else None
        form = "piecewise" if scope == "blocks" or dynamic else \
            re.sub(r"-glue-\w+$", "", variant).removeprefix("stepcache-").removesuffix("-inline-trace")
        fn = cachepass.compile(model, cfg) if variant == "stepcache" else \
            cachepass.compile(model, cfg, form=form, glue=glue, scope=scope, dynamic=dynamic)
    times = []
    wider = torch.cat([latents, latents], dim=-1)  # a new resolution mid-session: twice the tokens
    widest = torch.cat([latents] * 3, dim=-1)  # a third one: the second's symbolic program runs it
    with torch.no_grad():
        for t, x in ((999, latents), (874, latents), (999, wider), (999, widest)):
            profiler = cProfile.Profile() if profile_to and len(times) in PROFILED else None
            before = _call_phases(0.0)  # Dynamo's timers' totals so far
            start = time.perf_counter()
            with profiler or contextlib.nullcontext():
                fn(hidden_states=x, timestep=torch.tensor([t], device=device), encoder_hidden_states=text,
                   return_dict=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if len(times) == 1:
                phases = _first_call_phases(times[0])
            elif len(times) == 3:
                new_shape_phases = _call_phases(times[2], since=before)
            if profiler is not None:
                _write_profile(profiler, profile_to.removesuffix(".txt") + PROFILED[len(times) - 1] + ".txt")
    saved = {}
    if save_artifacts:
        saved_artifacts = torch.compiler.save_cache_artifacts()  # None where nothing went through the caches
        data = saved_artifacts[0] if saved_artifacts else b""
        with open(save_artifacts, "wb") as f:
            f.write(data)
        saved = {"artifacts_mb": len(data) / 1e6}
    return {"variant": variant, "first_call_s": times[0], "second_call_s": times[1], "new_shape_s": times[2],
            "third_shape_s": times[3],
            "artifacts_load_s": loaded_s, **saved, **phases, **backend_log.found,
            **{f"new_shape_{k}": v for k, v in new_shape_phases.items()}}


def _with_block_leaves(fn, model):
    from cachepass import block_regions

    lists = block_regions.block_lists(model)

    def call(*args, **kwargs):
        with block_regions.marked(model, lists):
            return fn(*args, **kwargs)
    return call


PROFILED = {0: "", 2: "-new-shape"}  # the calls of a child that ``--profile-to`` profiles (the first, the new shape's)


def _write_profile(profiler: cProfile.Profile, path: str) -> None:
    """A call's profile: the 60 functions with the most cumulative time, then the 40 with the most own time;
    the whole profile beside it (``.prof``, for `pstats`)."""
    profiler.dump_stats(path.removesuffix(".txt") + ".prof")
    with open(path, "w") as f:
        for key, count in (("cumulative", 60), ("tottime", 40)):
            pstats.Stats(profiler, stream=f).strip_dirs().sort_stats(key).print_stats(count)


TRITON_TIMERS = (  # Inductor's own timers of its Triton work (`dynamo_timed` keys), as seconds and counts
    ("triton_in_process", "async_compile.precompile"),  # kernels compiled in this process (the compile pool not ready)
    ("triton_pool_wait", "async_compile.wait"),  # waits on the compile pool's workers (once per compiled graph)
    ("autotune", "CachingAutotuner.benchmark_all_configs"),  # kernels whose launch configs were timed at a first launch
)
PHASES = ("dynamo_compile_s", "bytecode_tracing_s", "user_compiler_s", "build_guards_s", "first_run_s",
          "triton_compiled_n", *(f"{name}_{unit}" for name, _ in TRITON_TIMERS for unit in ("s", "n")))
LOGGED = ("capture_s", "warmup_call_s")


def _first_call_phases(first_call_s: float) -> dict:
    """Where the first call went, from Dynamo's own timers: the whole compile (trace, backend, guards), its
    bytecode tracing and backend call, and what is left of the call (the first run: warm-up runs, CUDA graph
    capture, kernel loads)."""
    return {**_call_phases(first_call_s), "first_call_caches": _cache_counts()}


def _call_phases(call_s: float, since: dict | None = None) -> dict:
    """`PHASES` of a call of ``call_s`` seconds: Dynamo's and Inductor's timers now, less their totals in ``since``
    (this function's result before the call). ``first_run_s`` is what the compile leaves of the call; the Triton
    entries are how many kernels Inductor compiled (a cache miss of its in-process kernel cache), how many of them in
    this process, what it waited on its compile pool, and how many kernels had their configs timed (`TRITON_TIMERS`)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    def total(key: str, unit: str = "s") -> float:
        timed = compilation_time_metrics.get(key, ())
        return sum(timed) if unit == "s" else len(timed)

    now = {"dynamo_compile_s": total("_compile.compile_inner"), "bytecode_tracing_s": total("bytecode_tracing"),
           "user_compiler_s": total("OutputGraph.call_user_compiler"), "build_guards_s": total("build_guards"),
           "triton_compiled_n": counters["inductor"]["async_compile_cache_miss"],
           **{f"{name}_{unit}": total(key, unit) for name, key in TRITON_TIMERS for unit in ("s", "n")}}
    phases = {k: v - (since or {}).get(k, 0) for k, v in now.items()}
    return {**phases, "first_run_s": call_s - phases["dynamo_compile_s"]}


def _cache_counts() -> dict:
    """The compile caches' hits and misses so far in this process (Inductor's FX graph cache, AOTAutograd's):
    a warm process whose first call misses recompiles what it should have loaded."""
    from torch._dynamo.utils import counters

    return {f"{group}.{name}": count for group, names in (("inductor", ("fxgraph_cache_hit", "fxgraph_cache_miss",
                                                                       "fxgraph_cache_bypass")),
                                                           ("aot_autograd", ("autograd_cache_hit", "autograd_cache_miss",
                                                                             "autograd_cache_bypass")))
            for name in names if (count := counters[group][name])}


class _BackendLog(logging.Handler):
    """Keeps the first call's stepcache timing lines: the backend's (``backend 12.3 s (passes ...)``) and the
    CUDA graph capture's (``captured CUDA graphs (...) in 1.20 s after a 0.80 s warm-up call``)."""

    def __init__(self):
        super().__init__()
        self.found: dict = {}

    def emit(self, record):
        text = record.getMessage()
        seconds = re.search(r"backend ([0-9.]+) s", text)
        if seconds and "backend_s" not in self.found:  # the first call's compile
            self.found.update(backend_s=float(seconds.group(1)), backend_log=text)
        elif seconds and "new_shape_backend_s" not in self.found:  # the new shape's
            self.found.update(new_shape_backend_s=float(seconds.group(1)), new_shape_backend_log=text)
        captured = re.search(r"captured CUDA graphs .* in ([0-9.]+) s after a ([0-9.]+) s warm-up call", text)
        if captured and "capture_s" not in self.found:
            self.found.update(capture_s=float(captured.group(1)), warmup_call_s=float(captured.group(2)))


def run(variant: str, blocks: int, device: str, width: str, cache: str, *artifacts: str) -> dict:
    """One child process over the cache folder ``cache``; ``artifacts``: ``--save-artifacts PATH`` or
    ``--load-artifacts PATH``."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    command = [sys.executable, "-m", "bench.cold_start", "--child", variant, "--blocks", str(blocks), "--device", device,
               "--width", width, *artifacts]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # the child's own error, not only its exit status
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _reported(start: str, out: dict) -> dict:
    """``out`` after printing it: a run cut short (a device call's time limit) still leaves each process's result."""
    print(f"  {out['variant']} {start}: {json.dumps({k: v for k, v in out.items() if k != 'backend_log'})}", flush=True)
    return out


def _profile(variant: str, args, warm_cache: str) -> None:
    """One more cold process (a fresh cache folder) and one more warm one (``warm_cache``), their first calls and
    new-shape calls under cProfile: ``cold_start-profile-<variant>-{cold,warm}[-new-shape].txt`` in ``args.out``."""
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as fresh:
        for start, cache in (("cold", fresh), ("warm", warm_cache)):
            path = os.path.abspath(os.path.join(args.out, f"cold_start-profile-{variant}-{start}.txt"))
            run(variant, args.blocks, args.device, args.width, cache, "--profile-to", path)
            print(f"wrote {path} and its -new-shape.txt", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", choices=sorted(WIDTHS), default="small")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--warm-repeats", type=int, default=1,
                   help="warm processes per variant (the warm column is their median; each is kept in the row)")
    p.add_argument("--interleave", action="store_true",
                   help="the variants' processes alternate (all cold ones, then each round of warm ones, then the "
                        "from-artifacts ones) instead of one variant after another; the rows then also give each "
                        "round's warm ratio to regional compile")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--profile", default="",
                   help="comma-separated variants whose first and new-shape calls are also profiled (cProfile), in one "
                        "more cold and one more warm process, untimed; the reports go to --out")
    p.add_argument("--profile-to", help=argparse.SUPPRESS)
    p.add_argument("--save-artifacts", help=argparse.SUPPRESS)
    p.add_argument("--load-artifacts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.blocks, args.device, args.width, args.save_artifacts,
                               args.load_artifacts, args.profile_to)))
        return 0

    rows = []
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as unused:
        # one uncompiled process first: the machine's own warm-up (imports read from disk, the device's start, eager
        # kernels) is then not paid by whichever variant's cold process comes first (a default cold start of 1.70x on
        # an H100 when it ran first, against 0.99-1.16x in earlier runs: bench/NOTES.md, fourteenth session)
        warmup_s = run("eager", args.blocks, args.device, args.width, unused)["first_call_s"]
    with contextlib.ExitStack() as folders:
        caches = {v: folders.enter_context(tempfile.TemporaryDirectory()) for v in variants}
        other_machines = {v: folders.enter_context(tempfile.TemporaryDirectory()) for v in variants}
        for group in ([variants] if args.interleave else [[v] for v in variants]):
            for variant, (cold, warms, portable) in _measure(group, args, caches, other_machines).items():
                rows.append(_row(variant, cold, warms, portable))
            _write(rows, args, warmup_s)  # after each group: a run cut short keeps the rows it finished
    return 0


def _measure(group: list[str], args, caches: dict, other_machines: dict) -> dict[str, tuple]:
    """The cold, warm and from-artifacts processes of each variant of ``group``: all cold processes, then warm
    process ``r`` of every variant before warm process ``r + 1`` of any (a host that speeds up or slows down over
    the run shifts all variants alike), then the from-artifacts processes."""
    artifacts = {v: os.path.join(other_machines[v], "artifacts.bin") for v in group}
    colds = {v: _reported("cold", run(v, args.blocks, args.device, args.width, caches[v], "--save-artifacts",
                                      artifacts[v])) for v in group}
    warms: dict[str, list] = {v: [] for v in group}
    for _ in range(args.warm_repeats):
        for v in group:
            warms[v].append(_reported("warm", run(v, args.blocks, args.device, args.width, caches[v])))
    measured = {}
    for v in group:
        portable = _reported("from artifacts", run(v, args.blocks, args.device, args.width,
                                                   os.path.join(other_machines[v], "cache"), "--load-artifacts",
                                                   artifacts[v]))
        if v in args.profile.split(","):
            _profile(v, args, caches[v])
        measured[v] = (colds[v], warms[v], portable)
    return measured


def _row(variant: str, cold: dict, warms: list[dict], portable: dict) -> dict:
    warm = sorted(warms, key=lambda w: w["first_call_s"])[len(warms) // 2]  # the median process
    row = {"variant": variant, "cold_start_s": cold["first_call_s"], "warm_start_s": warm["first_call_s"],
           "portable_start_s": portable["first_call_s"], "artifacts_load_s": portable["artifacts_load_s"],
           "artifacts_mb": cold["artifacts_mb"],
           "warm_start_each_s": [w["first_call_s"] for w in warms],
           "warm_new_shape_each_s": [w["new_shape_s"] for w in warms],
           "warm_third_shape_each_s": [w["third_shape_s"] for w in warms],
           "warm_new_shape_phases_each": [_phases_of(w, "new_shape_") for w in warms],
           "second_call_s": cold["second_call_s"], "new_shape_s": cold["new_shape_s"],
           "new_shape_phases": _phases_of(cold, "new_shape_"), "new_shape_backend_log": cold.get("new_shape_backend_log"),
           "third_shape_s": cold["third_shape_s"],
           "cold_backend_s": cold.get("backend_s"),
           "warm_backend_s": warm.get("backend_s"), "cold_backend_log": cold.get("backend_log"),
           "warm_backend_log": warm.get("backend_log"),
           **{f"{start}_{k}": v for start, out in (("cold", cold), ("warm", warm))
              for k, v in out.items() if k in PHASES + LOGGED}}
    backend = "" if cold.get("backend_s") is None else \
        f"   backend cold {cold['backend_s']:.1f} s warm {warm['backend_s']:.1f} s"
    print(f"{variant:<22} cold {row['cold_start_s']:7.1f} s   warm {row['warm_start_s']:7.1f} s   "
          f"from artifacts {row['portable_start_s']:7.1f} s (+{row['artifacts_load_s']:.1f} s load)   "
          f"second call {row['second_call_s'] * 1e3:7.1f} ms   new shape {row['new_shape_s']:6.1f} s   "
          f"third shape {row['third_shape_s']:6.1f} s{backend}",
          flush=True)
    calls = (("first call in the cold process", "", cold["first_call_s"], cold),
             ("new shape in the cold process", "new_shape_", cold["new_shape_s"], cold),
             *(("warm new shape", "new_shape_", w["new_shape_s"], w) for w in warms))
    for name, prefix, seconds, process in calls:
        if process.get(f"{prefix}bytecode_tracing_s") is not None:
            print(f"{'':<22} {name} {seconds:.2f} s: {_phases_text(process, prefix)}", flush=True)
    return row


def _phases_of(process: dict, prefix: str) -> dict:
    """Where a process's call went (``prefix`` "" for the first call, "new_shape_" for the new shape's): `PHASES` and
    our backend's seconds (None for regional compile)."""
    return {k: process.get(f"{prefix}{k}") for k in (*PHASES, "backend_s")}


def _phases_text(process: dict, prefix: str) -> str:
    """A call's `_phases_of` as one line."""
    phase = _phases_of(process, prefix)
    text = (f"bytecode tracing {phase['bytecode_tracing_s']:.2f}   compiler {phase['user_compiler_s']:.2f}"
            + (f" (ours {phase['backend_s']:.2f})" if phase["backend_s"] is not None else "")
            + f"   guards {phase['build_guards_s']:.2f}   run {phase['first_run_s']:.2f}")
    if phase["triton_compiled_n"]:
        text += (f"   Triton: {phase['triton_compiled_n']} kernels compiled, {phase['triton_in_process_n']} in this "
                 f"process ({phase['triton_in_process_s']:.2f} s), pool waits {phase['triton_pool_wait_s']:.2f} s, "
                 f"{phase['autotune_n']} autotuned ({phase['autotune_s']:.2f} s)")
    return text


def _write(rows: list[dict], args, warmup_s: float) -> None:
    """The rows so far, with their ratios to regional compile's where it has run, as one JSON file in ``args.out``."""
    import torch

    base = next((r for r in rows if r["variant"] == "regional-compile"), None)
    for row in rows:
        for column, ratio in (("cold_start_s", "cold_vs_regional"), ("warm_start_s", "warm_vs_regional"),
                              ("new_shape_s", "new_shape_vs_regional"), ("third_shape_s", "third_shape_vs_regional"),
                              ("portable_start_s", "portable_vs_regional")):
            row[ratio] = row[column] / base[column] if base else None
        if args.interleave and base:  # warm process r of this variant ran beside warm process r of regional compile
            row["warm_vs_regional_each"] = [a / b for a, b in zip(row["warm_start_each_s"], base["warm_start_each_s"])]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    result = {
        "question": "cold start (first call, fresh Inductor caches), warm start (second process, same caches) and "
                    "start from artifacts (third process, an empty cache folder filled by "
                    "torch.compiler.load_cache_artifacts with what the cold process saved: another machine)",
        "device": device_name,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": f"python -m bench.cold_start --blocks {args.blocks} --device {args.device} --width {args.width} "
                   f"--variants {args.variants} --warm-repeats {args.warm_repeats}"
                   + (f" --profile {args.profile}" if args.profile else "") + (" --interleave" if args.interleave else ""),
        "model": f"diffusers WanTransformer3DModel, {args.blocks} blocks, {args.width} width "
                 f"({WIDTHS[args.width]['num_attention_heads'] * WIDTHS[args.width]['attention_head_dim']}), 256 tokens "
                 "(512 for the new shape, 768 for the third), random weights",
        "machine_warmup": "every process below ran after one uncompiled process of the same model (imports, device "
                          f"start, eager kernels; its first call {warmup_s:.2f} s), so no variant's cold "
                          "process pays the machine's own warm-up",
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    slug = "cpu" if args.device == "cpu" else device_name.lower().replace(" ", "-")
    path = os.path.join(args.out, f"cold_start-{slug}-{result['date']}-{args.width}-{args.blocks}blocks.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path} ({len(rows)} of {len(args.variants.split(','))} variants)", flush=True)


if __name__ == "__main__":
    sys.exit(main())

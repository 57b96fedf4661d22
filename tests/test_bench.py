"""Smoke test of bench/compare.py on the tiny workload (CPU): rows, files, failed rows, decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.report import REQUIRED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_writes_json_table_and_plot(tmp_path):
    variants = "eager,cache-dit,stepcache-aot_eager,compile-reduce-overhead,ideal"
    command = [sys.executable, "-m", "bench.compare", "--workload", "tiny", "--device", "cpu", "--repeats", "1",
               "--compile-backend", "aot_eager", "--variants", variants, "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = tmp_path.glob("cpu-*.json")
    rows = {r["variant"]: r for r in json.loads(json_path.read_text())}
    assert list(rows) == variants.split(",")
    for row in rows.values():
        assert set(REQUIRED) <= set(row), set(REQUIRED) - set(row)
        assert row["workload"] == "tiny" and row["device"] == "cpu"
    # a variant that cannot run is a failed row with its error, not a missing one
    assert rows["compile-reduce-overhead"]["status"] == "failed"
    assert "needs the inductor backend" in rows["compile-reduce-overhead"]["error"]
    ok = [r for name, r in rows.items() if name != "compile-reduce-overhead"]
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in ok)
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    assert rows["ideal"]["ratio_to_ideal"] == 1.0
    # static mask: 8 of 16 steps cached in each CFG stream, identical in cache-dit and stepcache
    assert rows["cache-dit"]["cached_steps"] == rows["stepcache-aot_eager"]["cached_steps"] == 16
    assert rows["stepcache-aot_eager"]["matches_cache_dit"] is True
    assert rows["stepcache-aot_eager"]["graph_breaks"] == 0 and rows["stepcache-aot_eager"]["recompiles"] == 0
    assert 20 < rows["stepcache-aot_eager"]["psnr"] and rows["stepcache-aot_eager"]["rel_l2"] < 0.1
    table = json_path.with_suffix(".md").read_text()
    assert "| stepcache-aot_eager | ok |" in table and "failed: RuntimeError" in table
    assert json_path.with_suffix(".png").stat().st_size > 10_000


def test_compare_runs_the_default_with_symbolic_latents_on_one_program(tmp_path):
    """``stepcache-dynamic-latents``: the default call with ``dynamic="latents"`` caches what the default caches (the
    static mask: 8 of 16 steps per CFG stream), in one graph, with no recompile (its first compile is symbolic)."""
    command = [sys.executable, "-m", "bench.compare", "--workload", "tiny", "--device", "cpu", "--repeats", "1",
               "--variants", "stepcache-dynamic-latents", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    assert row["status"] == "ok", row.get("error")
    assert (row["cached_steps"], row["graph_count"], row["graph_breaks"], row["recompiles"]) == (16, 1, 0, 0)


def test_a_default_compile_after_a_dynamic_latents_one_of_its_class_runs_the_symbolic_program():
    """What the refusal below guards against: Dynamo shares one class's compiled programs, and a program with symbolic
    sizes passes every shape's guards, so a model compiled by default after a ``dynamic="latents"`` copy compiles
    nothing at its first call. Each keeps its own cache state: their first calls (every block computed) agree."""
    import copy

    from torch._dynamo.utils import counters

    import cachepass
    from bench.workloads import WORKLOADS, _wan_call

    cfg = cachepass.StepCacheConfig(num_head_blocks=2, threshold=0.1, warmup_steps=1, num_inference_steps=8)
    symbolic_model, (latents, cond, _) = WORKLOADS["tiny"].setup(torch.device("cpu"))
    default_model = copy.deepcopy(symbolic_model)
    symbolic = cachepass.compile(symbolic_model, cfg, inner="aot_eager", dynamic="latents")
    default = cachepass.compile(default_model, cfg, inner="aot_eager")
    with torch.no_grad():
        before = counters["stats"]["unique_graphs"]
        first = _wan_call(symbolic, latents, torch.tensor(0.9), cond)
        assert counters["stats"]["unique_graphs"] == before + 1
        second = _wan_call(default, latents, torch.tensor(0.9), cond)
        assert counters["stats"]["unique_graphs"] == before + 1  # no compile of its own
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["compare", "profile_gap"])
@pytest.mark.parametrize("variants", ["stepcache,stepcache-dynamic-latents", "stepcache-dynamic-latents,stepcache-model",
                                      "stepcache-symbolic,stepcache-dynamic-latents"])
def test_compare_refuses_a_symbolic_variant_beside_another_stepcache_variant(entry, variants, capsys):
    """A program with symbolic sizes passes every shape's guards and is shared by the models of one class: in one
    process the other stepcache variants' calls would run it (seen on the CPU: a static model compiled after a
    ``dynamic="latents"`` one compiled nothing and ran the symbolic program). Refused before any model is built, by
    both scripts that run several variants in one process."""
    import importlib

    script = importlib.import_module(f"bench.{entry}")
    with pytest.raises(SystemExit) as exit_:
        script.main(["--workload", "tiny", "--device", "cpu", "--variants", variants])
    assert exit_.value.code == 2
    assert "in a process of its own" in capsys.readouterr().err


def test_the_table_gives_medians_spreads_and_gpu_time_to_four_places():
    """A 0.2% difference between two 2.9 s medians must be readable in the table, not only in the JSON."""
    from bench.report import table

    row = {"variant": "stepcache", "status": "ok", "median_s": 2.946057, "times_s": [2.913641, 2.946057, 2.955912],
           "gpu_busy_s": 2.936815}
    assert "| stepcache | ok | 2.9461 | 2.9136-2.9559 | 2.9368 |" in table([row])


def test_compare_interleaves_repeats_across_variants(tmp_path):
    """--interleave: every variant on its own model copy, repeats round-robin; the same decisions and columns. An
    offload variant interleaves on its own copy too (on the CPU the slot logic runs with CPU copies)."""
    variants = "cache-dit,stepcache-aot_eager,stepcache-offload-aot_eager"
    command = [sys.executable, "-m", "bench.compare", "--workload", "tiny", "--device", "cpu", "--repeats", "2",
               "--compile-backend", "aot_eager", "--variants", variants, "--interleave", "--offload-blocks", "70KB",
               "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(next(tmp_path.glob("cpu-*.json")).read_text())}
    assert list(rows) == variants.split(",") and all(r["status"] == "ok" for r in rows.values())
    assert all(r["order"] == "interleaved" and r["compiler_warmup_s"] > 0 and len(r["times_s"]) == 2
               for r in rows.values())
    for name in ("stepcache-aot_eager", "stepcache-offload-aot_eager"):
        assert rows[name]["matches_cache_dit"] is True and rows[name]["recompiles"] == 0, rows[name]
        assert rows[name]["cached_steps"] == rows["cache-dit"]["cached_steps"] == 16
    assert "2 resident blocks, 2 slot(s)" in result.stderr and "3 blocks" in result.stderr  # the offload one streams
    assert "repeats round-robin across variants" in next(tmp_path.glob("cpu-*.md")).read_text()


@pytest.mark.slow  # multi-minute on 2 cores; CI runs it
def test_profile_gap_reports_busy_and_idle_time_per_variant(tmp_path):
    out = tmp_path / "gap.json"
    command = [sys.executable, "-m", "bench.profile_gap", "--workload", "tiny", "--device", "cpu",
               "--variants", "stepcache-aot_eager,ideal", "--compile-backend", "aot_eager", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["workload"] == "tiny" and report["device"] == "cpu"
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["stepcache-aot_eager", "ideal"]  # the ideal replays stepcache's decisions
    for row in rows.values():
        assert row["calls"] == 32 and row["wall_s"] > 0
        assert row["device_busy_s"] == 0  # no device kernels on CPU: all of the wall is host time
        assert row["device_idle_s"] == row["profiled_wall_s"] > 0
    assert "| stepcache-aot_eager |" in result.stdout


def test_profile_gap_names_the_autotuned_config_of_each_triton_kernel_a_variant_loaded(monkeypatch):
    import hashlib
    import types

    from torch._inductor.codecache import PyCodeCache

    from bench.profile_gap import _autotuned

    def module(**kernels):
        loaded = types.ModuleType("output_code")
        for name, (source, kept, *configs) in kernels.items():  # configs: the autotuner's list, None once it kept one
            setattr(loaded, name, types.SimpleNamespace(fn=types.SimpleNamespace(src=source),
                                                        configs=configs[0] if configs else [1, 2, 3],
                                                        launchers=[types.SimpleNamespace(config=c) for c in kept]))
        return loaded

    earlier = module(triton_red_fused_1=("def k(): pass", ["XBLOCK: 1, R0_BLOCK: 2048"]))
    monkeypatch.setattr(PyCodeCache, "modules", [earlier])
    before = {id(m) for m in PyCodeCache.modules}
    PyCodeCache.modules.append(module(triton_red_fused_1=("def k(): pass", ["XBLOCK: 8, R0_BLOCK: 512"]),
                                      call=("", ["not a kernel"])))
    PyCodeCache.modules.append(module(triton_red_fused_1=("def k(): return", ["XBLOCK: 1, R0_BLOCK: 2048"]),
                                      triton_poi_fused_2=("", []),
                                      triton_per_fused_3=("def k(): pass", ["XBLOCK: 2, R0_BLOCK: 512"], None)))
    sha = {src: hashlib.sha1(src.encode()).hexdigest()[:12] for src in ("def k(): pass", "def k(): return")}
    assert _autotuned(before) == {"triton_red_fused_1": [
        {"config": "XBLOCK: 8, R0_BLOCK: 512", "candidates": 3, "source": sha["def k(): pass"]},
        {"config": "XBLOCK: 1, R0_BLOCK: 2048", "candidates": 3, "source": sha["def k(): return"]}],
        "triton_per_fused_3": [{"config": "XBLOCK: 2, R0_BLOCK: 512", "candidates": 0, "source": sha["def k(): pass"]}]}


def test_device_trace_counts_only_the_copy_time_no_kernel_ran_beside_as_exposed():
    from bench.device_trace import summarize

    events = [
        {"cat": "kernel", "name": "k", "ts": 0, "dur": 100, "tid": 7},
        {"cat": "kernel", "name": "k", "ts": 50, "dur": 100, "tid": 7},  # overlaps the first: 150 us of kernels
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 120, "dur": 60, "tid": 9,
         "args": {"bytes": 6000}},  # 30 us beside the kernels, 30 after them
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 0, "dur": 10, "tid": 7},
        {"cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1000},
    ]
    t = summarize(events)
    assert t["kernel_s"] == pytest.approx(150e-6)
    assert t["htod_s"] == pytest.approx(60e-6)
    assert t["htod_overlapped_s"] == pytest.approx(30e-6)
    assert t["htod_exposed_s"] == pytest.approx(30e-6)
    assert t["htod_gbps"] == pytest.approx(0.1)  # 6000 B in 60 us
    assert t["copy_kinds"]["Memcpy DtoD (Device -> Device)"]["count"] == 1
    assert t["copy_streams"] == [9] and t["kernel_streams"] == [7]


def test_a_variants_held_bytes_count_the_model_on_an_indexed_device():
    """``torch.device("cuda") != torch.device("cuda:0")``: the bytes of a model whose tensors carry no index
    (here ``cpu``) must still count as on ``cpu:0``, or the one-after-another order's peak memory goes negative."""
    import torch

    from bench.compare import _device_bytes

    model = torch.nn.Linear(2, 3)  # 6 weights + 3 biases, float32
    assert _device_bytes(model, torch.device("cpu", 0)) == 9 * 4
    assert _device_bytes(model, torch.device("meta")) == 0


def test_cold_start_interleaves_the_variants_processes_and_pairs_each_warm_round(tmp_path, monkeypatch, capsys):
    """``--interleave``: one uncompiled process (the machine's warm-up), every cold process, then warm round r of every
    variant before round r + 1 of any, then the from-artifacts processes; each row gives each round's warm ratio to
    regional compile, and where the new shape's call went in the cold process and in each warm one."""
    from bench import cold_start

    calls = []

    def fake_run(variant, blocks, device, width, cache, *extra):
        start = "cold" if "--save-artifacts" in extra else "from artifacts" if "--load-artifacts" in extra else "warm"
        calls.append((start, variant))
        timed = sum(c[0] == "warm" and c[1] != "eager" for c in calls)
        seconds = {"stepcache-piecewise": 6.0, "regional-compile": 4.0, "eager": 0.5}[variant] + timed
        compiler = 5.0 if start == "cold" else 0.3  # the new shape's: kernels compiled, or loaded from the caches
        phases = {"new_shape_dynamo_compile_s": compiler + 1.0, "new_shape_bytecode_tracing_s": 0.8,
                  "new_shape_user_compiler_s": compiler, "new_shape_build_guards_s": 0.1, "new_shape_first_run_s": 0.2}
        ours = {"new_shape_backend_s": compiler - 0.1} if variant.startswith("stepcache") else {}
        if start == "cold":  # Inductor's Triton work at the new shape (none in the warm processes: their caches hit)
            phases.update(new_shape_triton_compiled_n=8, new_shape_triton_in_process_n=0, new_shape_triton_in_process_s=0.0,
                          new_shape_triton_pool_wait_n=1, new_shape_triton_pool_wait_s=compiler - 2.0,
                          new_shape_autotune_n=6, new_shape_autotune_s=1.5)
        return {"variant": variant, "first_call_s": seconds, "second_call_s": 0.1, "new_shape_s": compiler + 1.2,
                "third_shape_s": {"stepcache-piecewise": 3.0, "regional-compile": 0.2}.get(variant, 0.1),
                "artifacts_load_s": 0.1 if start == "from artifacts" else None, "artifacts_mb": 1.0, **phases, **ours}

    monkeypatch.setattr(cold_start, "run", fake_run)
    cold_start.main(["--variants", "stepcache-piecewise,regional-compile", "--warm-repeats", "2", "--interleave",
                     "--out", str(tmp_path)])
    assert calls == [("warm", "eager"), ("cold", "stepcache-piecewise"), ("cold", "regional-compile"),
                     ("warm", "stepcache-piecewise"), ("warm", "regional-compile"),
                     ("warm", "stepcache-piecewise"), ("warm", "regional-compile"),
                     ("from artifacts", "stepcache-piecewise"), ("from artifacts", "regional-compile")]
    (path,) = tmp_path.glob("cold_start-cpu-*.json")
    result = json.loads(path.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["stepcache-piecewise"]["warm_start_each_s"] == [7.0, 9.0]
    assert rows["regional-compile"]["warm_start_each_s"] == [6.0, 8.0]
    assert rows["stepcache-piecewise"]["warm_vs_regional_each"] == [7.0 / 6.0, 9.0 / 8.0]
    assert rows["stepcache-piecewise"]["warm_third_shape_each_s"] == [3.0, 3.0]
    assert rows["stepcache-piecewise"]["third_shape_vs_regional"] == 3.0 / 0.2
    assert rows["stepcache-piecewise"]["new_shape_phases"]["user_compiler_s"] == 5.0
    assert rows["stepcache-piecewise"]["new_shape_phases"]["backend_s"] == 4.9
    assert rows["regional-compile"]["new_shape_phases"]["backend_s"] is None
    assert [p["user_compiler_s"] for p in rows["regional-compile"]["warm_new_shape_phases_each"]] == [0.3, 0.3]
    printed = capsys.readouterr().out
    assert ("new shape in the cold process 6.20 s: bytecode tracing 0.80   compiler 5.00 (ours 4.90)   guards 0.10   "
            "run 0.20   Triton: 8 kernels compiled, 0 in this process (0.00 s), pool waits 3.00 s, 6 autotuned (1.50 s)"
            in printed)
    assert rows["regional-compile"]["new_shape_phases"]["triton_pool_wait_s"] == 3.0
    assert printed.count("warm new shape 1.50 s: bytecode tracing 0.80   compiler 0.30   guards") == 2  # regional's
    assert result["command"].endswith("--interleave")
    assert "its first call 0.50 s" in result["machine_warmup"]


def test_cold_start_rows_name_the_profiled_variants_in_their_command(tmp_path, monkeypatch):
    """``--profile``'s extra processes are part of the run a row comes from: its command says so."""
    from bench import cold_start

    profiled = []

    def fake_run(variant, blocks, device, width, cache, *extra):
        if "--profile-to" in extra:
            profiled.append(variant)
        return {"variant": variant, "first_call_s": 1.0, "second_call_s": 0.1, "new_shape_s": 0.5, "third_shape_s": 0.1,
                "artifacts_load_s": 0.1 if "--load-artifacts" in extra else None, "artifacts_mb": 1.0}

    monkeypatch.setattr(cold_start, "run", fake_run)
    cold_start.main(["--variants", "stepcache,regional-compile", "--profile", "stepcache", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("cold_start-cpu-*.json")
    assert json.loads(path.read_text())["command"].endswith("--warm-repeats 1 --profile stepcache")
    assert profiled == ["stepcache", "stepcache"]  # a cold and a warm process


def test_cold_start_phases_of_a_call_are_the_timers_growth_over_it(monkeypatch):
    """A call's phases: Dynamo's and Inductor's timers (seconds and counts) and Inductor's compiled-kernel counter,
    less what they held before the call; the first run is what the compile leaves of the call."""
    import collections

    from torch._dynamo import utils

    from bench import cold_start

    timers = {"_compile.compile_inner": [2.0], "async_compile.precompile": [0.5, 0.25], "async_compile.wait": [1.0]}
    monkeypatch.setattr(utils, "compilation_time_metrics", timers)
    monkeypatch.setitem(utils.counters, "inductor", collections.Counter(async_compile_cache_miss=2))
    before = cold_start._call_phases(0.0)
    timers["_compile.compile_inner"].append(3.0)
    timers["async_compile.wait"].append(2.5)
    timers["CachingAutotuner.benchmark_all_configs"] = [0.4, 0.1, 0.2]
    utils.counters["inductor"]["async_compile_cache_miss"] += 5
    phases = cold_start._call_phases(4.0, since=before)
    assert phases == {"dynamo_compile_s": 3.0, "bytecode_tracing_s": 0, "user_compiler_s": 0, "build_guards_s": 0,
                      "first_run_s": 1.0, "triton_compiled_n": 5, "triton_in_process_s": 0, "triton_in_process_n": 0,
                      "triton_pool_wait_s": 2.5, "triton_pool_wait_n": 1, "autotune_s": pytest.approx(0.7),
                      "autotune_n": 3}
    assert set(phases) == set(cold_start.PHASES)


def test_op_count_counts_the_outermost_ops_that_launch_work_and_leaves_out_views(tmp_path):
    from bench import op_count

    x = torch.ones(4, 4)
    ops = op_count.top_level_ops(lambda: (x.view(-1) + 1).sum())
    assert ops == {"aten::add": 1, "aten::sum": 1}  # the view is none; add's own inner calls are not counted again
    out = tmp_path / "ops.json"
    assert op_count.main(["--case", "toy", "--schedule", "static", "--steps", "6", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert (row["case"], row["schedule"], row["calls"]) == ("toy", "static", 12) and row["ops_per_generation"] > 0
    assert row["ops_per_call"] == row["ops_per_generation"] / 12

"""Export: the step-cached model as a torch.export program and as ONNX (run by onnxruntime), held to
the compiled stepcache and to cache-dit over two separate-CFG generations; TensorRT's structural needs."""

from __future__ import annotations

import math

import cache_dit
import cache_dit_helpers
import onnx
import pytest
import torch

import cachepass
from bench.tiny_models import CASES, generate, toy_config
from cachepass.exported.onnx import Session, replace_bool_where
from cachepass.exported.program import StepCachedModule, trace
from cachepass.exported.tensorrt import problems

STEPS = 8


def config(case, **overrides):
    return toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=case.threshold * 3, num_inference_steps=STEPS,
                      **overrides)


def example_call(case) -> dict:
    """The keyword arguments of one transformer call of ``case`` (what export traces with)."""
    latents, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    seen = {}
    case.call(lambda **kwargs: seen.update(kwargs) or (latents,), latents, torch.tensor(1.0), cond)
    return seen


def decisions(stats) -> list[tuple[list[int], list[int]]]:
    return [(u.cached_steps, u.cfg_cached_steps) for u in stats]


def onnx_call(case, session: Session):
    """``session`` called like the model: its outputs come back as a list (the toy returns one tensor)."""

    def call(**kwargs):
        outputs = session(**{k: kwargs[k] for k in session.input_names})
        return outputs[0] if case.name == "toy" else outputs

    return call


@pytest.fixture(scope="module")
def expected():
    """Per case: two generations of the compiled stepcache, its decisions, and cache-dit's."""
    found = {}
    for name in ("toy", "wan", "flux"):
        case = CASES[name]
        model = case.model()
        compiled = cachepass.compile(model, config(case), inner="aot_eager")
        outs = [generate(case, compiled, STEPS, seed=seed) for seed in (1, 2)]
        ours = decisions(cachepass.stats(model))  # of the second generation
        reference = case.model()
        cache_dit_helpers.enable(name, reference, config(case))
        for seed in (1, 2):
            cache_dit.refresh_context(reference)  # cache-dit needs it between generations; stepcache does not
            generate(case, reference, STEPS, seed=seed)
        theirs = [(c, u) for c, u, _, _ in cache_dit_helpers.unit_stats(reference)]
        assert ours == theirs and any(s for unit in ours for s in unit), name
        found[name] = (outs, ours)
    torch._dynamo.reset()
    return found


def cached_steps(state: torch.nn.Module) -> list[tuple[list[int], list[int]]]:
    """Per cache unit, per CFG stream: the cached steps recorded in an exported module's state buffers."""
    found = []
    for unit in range(sum(1 for name, _ in state.named_buffers() if name.endswith("_cached_flags"))):
        flags = getattr(state, f"u{unit}_cached_flags")[:, :-1]  # the last column is scratch
        found.append(tuple([t for t in range(flags.shape[1]) if flags[s, t]] for s in range(flags.shape[0])))
    return found


@pytest.mark.parametrize("name", ["toy", "wan", "flux"])
def test_exported_program_saved_and_loaded_matches_the_compiled_model(name, expected, tmp_path):
    case = CASES[name]
    program = cachepass.export(case.model(), config(case), **example_call(case))
    conds = [n for n in program.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == len(expected[name][1])  # one cond per cache unit (FLUX: two)
    torch.export.save(program, tmp_path / "model.pt2")
    module = cachepass.load_exported(tmp_path / "model.pt2").module()
    outs = [generate(case, module, STEPS, seed=seed) for seed in (1, 2)]
    for ours, theirs in zip(outs, expected[name][0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    mutated = program.run_decompositions().graph_signature.buffers_to_mutate
    assert any(buffer.startswith("stepcache_state.") for buffer in mutated.values())
    assert cached_steps(module.stepcache_state) == [tuple(u) for u in expected[name][1]]


@pytest.mark.parametrize("name", ["toy", "wan", "flux"])
def test_onnx_under_onnxruntime_matches_the_compiled_model(name, expected, tmp_path):
    case = CASES[name]
    path = cachepass.export_onnx(case.model(), config(case), tmp_path / "model.onnx", **example_call(case))
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("If") == len(expected[name][1])
    state_inputs = {i.name for i in proto.graph.input if i.name.startswith("state.")}
    assert "state.u0.prev_residual" in state_inputs and "state.clock.calls" in state_inputs
    assert not any(init.name.startswith("state") for init in proto.graph.initializer)
    session = Session(path)
    run = onnx_call(case, session)
    for seed, theirs in zip((1, 2), expected[name][0]):
        torch.testing.assert_close(generate(case, run, STEPS, seed=seed), theirs, atol=1e-5, rtol=1e-5)
    assert [tuple(streams) for streams in session.cached_steps()] == [tuple(u) for u in expected[name][1]]
    found = problems(proto)  # TensorRT: only DOUBLE, which it takes by casting down (trt_compatible avoids it)
    assert found and all("is DOUBLE" in p for p in found), [p for p in found if "is DOUBLE" not in p][:5]


def test_trt_compatible_onnx_is_in_tensorrts_operator_matrix_and_runs(tmp_path):
    """Wan: no node outside the matrix. (FLUX's own rotary embedding computes in float64 in diffusers,
    which TensorRT takes only by casting down; stepcache's nodes there are clean too.)"""
    case = CASES["wan"]
    path = cachepass.export_onnx(case.model(), config(case), tmp_path / "model.onnx", trt_compatible=True,
                                 **example_call(case))
    assert problems(path) == []
    proto = onnx.load(path)
    for node in proto.graph.node:
        if node.op_type == "If":
            branches = {a.name: a.g for a in node.attribute}
            assert len(branches["then_branch"].output) == len(branches["else_branch"].output)
    session = Session(path)
    generate(case, onnx_call(case, session), STEPS)
    assert any(s for unit in session.cached_steps() for s in unit)


def test_narrow_decisions_flip_only_at_the_threshold():
    """float32/int32 decisions against float64 across a threshold sweep: every flip is a diff within
    float32 rounding of the threshold (the flips found are reported in the failure message)."""
    case = CASES["wan"]
    flips = []
    for scale in (0.5, 1, 2, 3, 4):
        cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=case.threshold * scale,
                         num_inference_steps=STEPS)
        runs = {}
        for narrow in (False, True):
            traced = trace(case.model(), cfg, (), example_call(case), narrow=narrow)
            module = StepCachedModule(case.model(), traced)
            with torch.no_grad():
                generate(case, module, STEPS)
            runs[narrow] = module
        for unit in runs[False].layout.units:
            wide, narrow = (getattr(runs[n].stepcache_state, f"u{unit.index}_cached_flags") for n in (False, True))
            diffs = getattr(runs[False].stepcache_state, f"u{unit.index}_diffs")
            for s, t in (wide != narrow).nonzero().tolist():
                flips.append((cfg.threshold, s, t, float(diffs[s, t])))
    near = [f for f in flips if math.isclose(f[3], f[0], rel_tol=1e-5)]
    assert near == flips, f"decisions that flipped away from the threshold: {sorted(set(flips) - set(near))}"


def test_state_kept_in_buffers_fails_the_generation_check(expected, tmp_path):
    """The guard: exporting the buffer form to ONNX makes the state constant initializers, so the model
    never caches; the generation check must catch it. No ONNX path may keep state in buffers."""
    case = CASES["toy"]
    kwargs = example_call(case)
    module = StepCachedModule(case.model(), trace(case.model(), config(case), (), kwargs)).eval()
    with torch.no_grad():
        program = torch.onnx.export(module, (), kwargs=kwargs, dynamo=True)
    proto = program.model_proto  # a new proto at every access
    replace_bool_where(proto)  # as export_onnx does: onnxruntime has no bool Where
    onnx.save_model(proto, str(tmp_path / "buffers.onnx"))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "buffers.onnx"))
    names = [i.name for i in session.get_inputs()]
    run = lambda **kw: torch.from_numpy(session.run(None, {n: kw[n].numpy() for n in names})[0])  # noqa: E731
    out = generate(case, run, STEPS, seed=1)
    assert not torch.allclose(out, expected["toy"][0][0], atol=1e-5, rtol=1e-5)
    uncached = generate(case, case.model(), STEPS, seed=1)
    torch.testing.assert_close(out, uncached, atol=1e-5, rtol=1e-5)  # it never cached a step


GLOBAL_SHIFT = torch.ones(4)


class ReadsAGlobal(type(CASES["toy"].model())):
    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return super().forward(hidden_states + GLOBAL_SHIFT, timestep, encoder_hidden_states)


def test_an_input_export_cannot_reproduce_is_named():
    case = CASES["toy"]
    torch.manual_seed(0)
    message = r"graph input \S+ comes from G\[.*\]\.GLOBAL_SHIFT; export takes tensors"
    with pytest.raises(cachepass.UnsupportedGraphError, match=message):
        cachepass.export(ReadsAGlobal().eval(), config(case), **example_call(case))


def test_each_module_of_an_exported_program_has_its_own_state(tmp_path):
    """Two ``program.module()`` interleaved step by step equal their solo runs; a module made after a
    cancelled generation starts fresh; ``cachepass.stats`` / ``reset`` read and reset an exported module
    (saved and loaded too), and stats equal the compiled model's."""
    from cachepass.demo.sampling import flow_sigmas

    case = CASES["toy"]
    program = cachepass.export(case.model(), config(case), **example_call(case))
    solo = [generate(case, program.module(), STEPS, seed=seed) for seed in (1, 2)]

    modules = [program.module(), program.module()]
    runs = [list(case.inputs(torch.Generator().manual_seed(seed))) for seed in (1, 2)]
    sigmas = flow_sigmas(STEPS)
    with torch.no_grad():
        for i in range(STEPS):  # one step of each generation in turn
            for module, run in zip(modules, runs):
                latents, cond, uncond = run
                v_cond, v_uncond = (case.call(module, latents, sigmas[i], kw) for kw in (cond, uncond))
                run[0] = latents + (sigmas[i + 1] - sigmas[i]) * (v_uncond + 3.0 * (v_cond - v_uncond))
    for run, expected in zip(runs, solo):
        torch.testing.assert_close(run[0], expected, atol=0, rtol=0)

    compiled_model = case.model()
    compiled = cachepass.compile(compiled_model, config(case), inner="aot_eager")
    generate(case, compiled, STEPS, seed=1)
    assert decisions(cachepass.stats(modules[0])) == decisions(cachepass.stats(compiled_model))
    assert any(s for unit in decisions(cachepass.stats(modules[0])) for s in unit)

    torch.export.save(program, tmp_path / "model.pt2")
    loaded = cachepass.load_exported(tmp_path / "model.pt2")
    first = loaded.module()
    assert decisions(cachepass.stats(first)) == [([], [])]  # before any call
    cachepass.reset(first)  # before any call: nothing to reset
    with pytest.raises(KeyboardInterrupt):  # cancelled after 6 calls
        generate(case, lambda *a, **k: first(*a, **k) if first.stepcache_state.clock_calls < 6 else _cancel(), STEPS)
    assert int(loaded.module().stepcache_state.clock_calls) == 0  # a new module starts fresh
    cachepass.reset(first)
    torch.testing.assert_close(generate(case, first, STEPS, seed=1), solo[0], atol=0, rtol=0)
    assert decisions(cachepass.stats(first)) == decisions(cachepass.stats(compiled_model))


def _cancel():
    raise KeyboardInterrupt


def test_onnx_session_reset_numbers_and_bad_inputs(tmp_path):
    """``Session.reset`` works before and after calls; a Python number feeds a one-element input; a
    bfloat16 tensor or a wrong shape is a clear error naming the input and what it takes."""
    case = CASES["toy"]
    kwargs = example_call(case)
    path = cachepass.export_onnx(case.model(), config(case), tmp_path / "toy.onnx", **kwargs)
    session = Session(path)
    session.reset()  # before the first call
    run = onnx_call(case, session)
    first = generate(case, run, STEPS, seed=1)
    session.reset()
    torch.testing.assert_close(generate(case, run, STEPS, seed=1), first, atol=0, rtol=0)
    by_number = session(**{**kwargs, "timestep": float(kwargs["timestep"])})
    session.reset()
    torch.testing.assert_close(torch.as_tensor(by_number[0]), session(**kwargs)[0], atol=0, rtol=0)
    with pytest.raises(cachepass.CachepassError, match=r"'hidden_states' is a bfloat16 tensor.*pass "
                                                       r"\.to\(torch\.float32\)"):
        session(**{**kwargs, "hidden_states": kwargs["hidden_states"].bfloat16()})
    with pytest.raises(TypeError, match=r"'hidden_states' takes float32\[1, 16, 4\].*got float32\[1, 8, 4\]"):
        session(**{**kwargs, "hidden_states": kwargs["hidden_states"][:, :8]})


def test_onnx_export_checks_the_path_first_and_leaves_no_invalid_file(tmp_path):
    case = CASES["wan"]
    with pytest.raises(cachepass.CachepassError, match=r"the folder .*missing' does not exist"):
        cachepass.export_onnx(case.model(), config(case), tmp_path / "missing" / "wan.onnx", **example_call(case))
    bf16 = case.model().to(torch.bfloat16)
    with pytest.raises(cachepass.CachepassError, match=r"patch_embedding is a bfloat16 convolution.*float16"):
        cachepass.export_onnx(bf16, config(case), tmp_path / "wan.onnx", **example_call(case))
    assert list(tmp_path.iterdir()) == []


def test_an_exported_module_is_called_as_the_model_was(tmp_path):
    """Non-tensor arguments as the model takes them: return_dict=False turns the output into a tuple, a
    default given explicitly is taken, a value the program was not exported with is a clear error."""
    case = CASES["wan"]
    kwargs = example_call(case)  # return_dict=False
    tensors = {k: v for k, v in kwargs.items() if k != "return_dict"}
    program = cachepass.export(case.model(), config(case), **tensors)  # exported with the default return_dict=True
    torch.export.save(program, tmp_path / "wan.pt2")
    module = cachepass.load_exported(tmp_path / "wan.pt2").module()
    with torch.no_grad():
        as_object = module(**tensors)
        cachepass.reset(module)
        as_tuple = module(**kwargs, attention_kwargs=None)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_object.sample)
        with pytest.raises(cachepass.CachepassError, match=r"exported without dummy"):
            module(**tensors, dummy=3)
    tuple_program = cachepass.export(case.model(), config(case), **kwargs).module()
    with pytest.raises(cachepass.CachepassError, match=r"exported with return_dict=False and returns a tuple"):
        tuple_program(**tensors)
    assert int(tuple_program.stepcache_state.clock_calls) == 0  # refused before it ran

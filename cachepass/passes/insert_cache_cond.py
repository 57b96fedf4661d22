"""Rewrite each outlined cache unit into the DBCache decision, a ``torch.cond`` and the state update.

Input: a graph from `outline_middle_blocks` (one ``call_module(stepcache_unit_i)`` per unit).
Output: the same graph with

* one placeholder per state tensor of `cachepass.state.runtime.StateLayout`, appended after the
  original placeholders (the backend's wrapper passes them on every call);
* a clock at the top: generation start, denoising step and CFG stream, told apart by the
  timestep input (a timestep that does not decrease starts a generation), the per-step schedule
  lookups, and `Mismatch` flags for calls that do not fit the config;
* per unit: the head residual ``R = H_F - H_in``, the decision as tensor ops (warmup, mask,
  budgets, ``mean|R_prev - R| / mean|R_prev| < threshold``), then
  ``torch.ops.higher_order.cond(hit, cached, compute, operands)`` where *compute* runs the middle
  blocks and *cached* returns ``H_F + TaylorSeer(R_M)`` per carried slot, then the state update
  (``where``-selected new values written back with ``copy_``);
* the clock's state update, last before the output.

No ``.item()`` and no host-side branch is emitted: Dynamo never sees a changing Python value.
The semantics are cache-dit 1.5's DBCache + TaylorSeer; `cachepass.reference` is their eager
statement and the tests hold both to cache-dit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import zlib

import torch
from torch import fx
from torch._prims_common import make_contiguous_strides_for
from torch.fx.proxy import GraphAppendingTracer, Proxy
from torch.multiprocessing.reductions import StorageWeakRef

from cachepass.analysis.blocks import example_value
from cachepass.analysis.sequence_parallel import SequenceParallel
from cachepass.analysis.timestep import TimestepInput, follows, latents_sample
from cachepass.errors import UnsupportedGraphError
from cachepass.state.layout import Mismatch, StateLayout
from cachepass.unit import OutlinedUnit, UnitSpec

log = logging.getLogger(__name__)


def insert_cache_cond(gm: fx.GraphModule, layout: StateLayout, timestep: TimestepInput | None,
                      parallel: SequenceParallel | None = None) -> fx.GraphModule:
    """``call_module(stepcache_unit_i)`` -> decision + ``torch.cond`` + in-place state update.

    ``timestep`` names the placeholder the clock reads to tell steps and generations apart
    (None: the clock counts calls). ``parallel``: the ranks sharding the tokens, over which each
    unit's decision inputs are all-reduced before its cond (`_agree_across_ranks`).
    """
    graph = gm.graph
    units = [n for n in graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), OutlinedUnit)]
    if not units:
        raise UnsupportedGraphError("insert_cache_cond found no outlined cache unit in the graph")
    state = _add_state_placeholders(graph, layout)
    tracer = GraphAppendingTracer(graph)
    first_compute = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    placeholders = {n.target: Proxy(n, tracer) for n in graph.nodes if n.op == "placeholder"}
    with graph.inserting_before(first_compute):
        proxies = {k: Proxy(v, tracer) for k, v in state.items()}
        clock = _emit_clock(layout, proxies, placeholders[timestep.placeholder] if timestep else None,
                            placeholders[timestep.latents] if timestep and timestep.latents else None)
    for call in units:
        unit = gm.get_submodule(call.target)
        _rewrite_unit(gm, call, unit, layout, clock, state, tracer, parallel)
        gm.delete_submodule(call.target)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        for name, value in {**clock.updates, "clock.report": torch.stack([clock.flags, clock.ended])}.items():
            Proxy(state[name], tracer).copy_(value)
    graph.lint()
    gm.recompile()
    conds = [n for n in graph.nodes if n.target is torch.ops.higher_order.cond]
    if len(conds) != len(units):
        raise UnsupportedGraphError(f"expected {len(units)} torch.cond nodes after the rewrite, found {len(conds)}")
    log.debug("insert_cache_cond: %d units -> %d conds, %d state inputs", len(units), len(conds), len(state))
    return gm


def _at(x: Proxy, index: Proxy) -> Proxy:
    """``x[index]`` for a 0-dim index tensor, as a gather (plain indexing would call ``.item()``)."""
    return torch.index_select(x, 0, index.reshape(1)).squeeze(0)


def _pick_stream(x: Proxy, stream: Proxy, num_streams: int) -> Proxy:
    """``x[stream]`` over the (at most two) CFG streams by ``where`` on static slices.

    No indirect indexing into the large buffers: elementwise kernels read them directly (and
    Inductor 2.11's CPU codegen mishandles a gather inside a transposed tile).
    """
    picked = x[0]
    for s in range(1, num_streams):
        picked = torch.where(stream == s, x[s], picked)
    return picked


def _write_stream(state: Proxy, clock: "Clock", value: Proxy, when: Proxy) -> None:
    """``state[stream] = value`` where ``when`` holds, as one masked full-buffer ``copy_``."""
    mask = clock.stream_mask.reshape(-1, *([1] * (len(state.node.meta["stepcache_shape"]) - 1))) & when
    state.copy_(torch.where(mask, value.unsqueeze(0), state))


# ---------------------------------------------------------------------------- placeholders
def _add_state_placeholders(graph: fx.Graph, layout: StateLayout) -> dict[str, fx.Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    nodes = {}
    with graph.inserting_after(last):
        for spec in reversed(layout.specs):  # inserting_after a fixed node: reverse keeps order
            nodes[spec.name] = graph.placeholder("stepcache_" + spec.name.replace(".", "_"))
            nodes[spec.name].meta["stepcache_shape"] = spec.shape
    return {spec.name: nodes[spec.name] for spec in layout.specs}


# ---------------------------------------------------------------------------- clock
@dataclasses.dataclass
class Clock:
    calls: Proxy  # calls since the state was made or reset, before this one
    first: Proxy  # bool: first call of a generation -> per-stream state resets
    stream: Proxy  # 0 = conditional, 1 = unconditional (CFG) stream
    step: Proxy  # denoising step
    step_slot: Proxy  # step clamped to the stats capacity
    stream_mask: Proxy  # [S] bool, the current stream
    step_mask: Proxy  # [C+1] bool, the current step's stats column
    forced: Proxy  # bool: warmup or mask forces a compute step
    static_hit: Proxy  # bool: the static mask policy caches this step
    flags: Proxy  # `Mismatch` bits, written back after the units (which may add to them)
    ended: Proxy  # steps of the last generation that ended early
    updates: dict[str, Proxy]  # the other clock state written back after the units


def _progress(layout: StateLayout, calls: Proxy, timestep: Proxy | None) -> Proxy:
    """A scalar (the layout's float dtype) that decreases from one denoising step to the next within a generation.

    The timestep input itself (its largest entry) when the graph has one; else one derived from the
    call count, which restarts after ``num_inference_steps`` steps per stream.
    """
    if timestep is not None:
        # a full reduction; max() also exports to ONNX (onnxscript needs amax dims)
        return timestep.detach().to(layout.float_dtype).max()
    cfg = layout.config
    position = calls % (cfg.num_inference_steps * cfg.num_streams) if cfg.num_inference_steps else calls
    return -(position // cfg.num_streams).to(layout.float_dtype)


def _set_flag(flags: Proxy, flag: Mismatch, when: Proxy) -> Proxy:
    """``flags | flag`` where ``when`` holds, in plain arithmetic on the non-negative flags.

    ONNX-TensorRT has no BitwiseOr, and exporters expand an integer ``//`` or ``%`` into sign tests on
    bools that it does not take either: bit ``flag`` is ``trunc(flags / flag) - 2 * trunc(flags / (2 * flag))``.
    """
    bit = torch.div(flags, int(flag), rounding_mode="trunc") - 2 * torch.div(flags, 2 * int(flag), rounding_mode="trunc")
    return torch.where(when & (bit == 0), flags + int(flag), flags)


def _emit_clock(layout: StateLayout, st: dict[str, Proxy], timestep: Proxy | None, latents: Proxy | None) -> Clock:
    """Which generation, step and CFG stream this call is, decided on the device from the timestep.

    A call whose timestep is below the last one, with latents that continue the last call's (a
    sample's cosine, `cachepass.analysis.timestep.follows`), is the next step; with separate CFG, a call at
    the same timestep and with the same latents (sum and sum of squares) right after a step's first
    call is that step's second (CFG partner) call; any other call (new noise, an img2img start below
    a cancelled generation's last timestep) starts a new generation at step 0. Calls that do not
    fit the config set `Mismatch` bits.
    """
    cfg = layout.config
    steps = cfg.num_inference_steps
    calls, last_step, pending, last_t = st["clock.calls"], st["clock.step"], st["clock.pending"], st["clock.last_t"]
    t = _progress(layout, calls, timestep)
    fresh = calls == 0
    same_t = ~fresh & (t == last_t)
    fingerprint, sample = st["clock.last_latents"], st["clock.last_sample"]
    continues = ~fresh
    if latents is not None:
        x = latents.detach().to(layout.float_dtype)
        fingerprint = torch.stack([x.sum(), (x * x).sum()])
        sample = latents_sample(x, example_value(latents.node).numel(), layout.sample_size)
        continues = continues & follows(sample, st["clock.last_sample"])
    same_call = same_t & (fingerprint == st["clock.last_latents"]).all()
    partner = pending & same_call if cfg.separate_cfg else torch.zeros_like(same_t)
    first = fresh | (t > last_t) | (same_t & ~partner) | ((t < last_t) & ~continues)
    step = torch.where(first, 0, torch.where(partner, last_step, last_step + 1))
    stream = partner.to(layout.int_dtype)
    if cfg.cfg_compute_first:
        stream = 1 - stream

    flags = st["clock.report"][0]
    ended = st["clock.report"][1]
    if cfg.separate_cfg:
        flags = _set_flag(flags, Mismatch.MISSING_CFG_PARTNER, pending & ~first & ~partner)
        flags = _set_flag(flags, Mismatch.EXTRA_CALLS, same_call & ~pending)  # a third call of one step
    else:
        flags = _set_flag(flags, Mismatch.SHARED_TIMESTEP, same_t)
    if steps:
        ended_early = first & ~fresh & (last_step + 1 < steps)
        flags = _set_flag(flags, Mismatch.MORE_STEPS, step >= steps)
        flags = _set_flag(flags, Mismatch.FEWER_STEPS, ended_early)
        ended = torch.where(ended_early, last_step + 1, ended)

    # Where, not Clip: ONNX-TensorRT clips floats only
    step_slot = torch.where(step > layout.capacity, layout.capacity, step)
    forced = _at(st["schedule.warmup"], step_slot) | _at(st["schedule.mask_compute"], step_slot)
    return Clock(
        calls=calls,
        first=first,
        stream=stream,
        step=step,
        step_slot=step_slot,
        stream_mask=st["schedule.stream_ids"] == stream,
        step_mask=st["schedule.step_ids"] == step_slot,
        forced=forced,
        static_hit=_at(st["schedule.mask_static"], step_slot) & ~forced,
        flags=flags,
        ended=ended,
        updates={
            "clock.calls": calls + 1,
            "clock.step": step,
            "clock.pending": ~partner if cfg.separate_cfg else partner,
            "clock.last_t": t,
            "clock.last_latents": fingerprint,
            "clock.last_sample": sample,
        },
    )


# ---------------------------------------------------------------------------- one unit
class _UnitState:
    """Reset-adjusted views of one unit's state and the pending in-place writes."""

    def __init__(self, layout: StateLayout, unit: UnitSpec, state: dict[str, fx.Node], tracer, clock: Clock):
        self.layout, self.prefix, self.clock = layout, f"u{unit.index}.", clock
        self.state, self.tracer = state, tracer
        self.writes: list[tuple[str, Proxy]] = []
        self.effective: dict[str, Proxy] = {}

    def raw(self, name: str) -> Proxy:
        return Proxy(self.state[self.prefix + name], self.tracer)

    def vector(self, name: str) -> Proxy:
        """The whole [S, ...] tensor; per-generation state reads as its fill value on the first call."""
        if name not in self.effective:
            spec = self.layout.specs[self.layout.index[self.prefix + name]]
            raw = self.raw(name)
            self.effective[name] = torch.where(self.clock.first, spec.fill, raw) if spec.reset_each_generation else raw
        return self.effective[name]

    def current(self, name: str) -> Proxy:
        return _pick_stream(self.vector(name), self.clock.stream, self.layout.config.num_streams)

    def set_current(self, name: str, value) -> None:
        """Write ``value`` into the current stream's entry (row for [S, K] tensors)."""
        vec = self.vector(name)
        mask = self.clock.stream_mask
        if len(self.layout.specs[self.layout.index[self.prefix + name]].shape) == 2:
            mask = mask.unsqueeze(1)
            value = value.unsqueeze(0) if isinstance(value, Proxy) else value
        self.writes.append((name, torch.where(mask, value, vec)))

    def record(self, name: str, value, when: Proxy | None = None) -> None:
        """Write ``value`` into (current stream, current step) of a [S, C+1] table (where ``when`` holds)."""
        vec = self.vector(name)
        cell = self.clock.stream_mask.unsqueeze(1) & self.clock.step_mask.unsqueeze(0)
        if when is not None:
            cell = cell & when
        self.writes.append((name, torch.where(cell, value, vec)))

    def flush(self) -> None:
        for name, value in self.writes:
            self.raw(name).copy_(value)


def _rewrite_unit(gm, call: fx.Node, unit: OutlinedUnit, layout: StateLayout, clock: Clock, state, tracer,
                  parallel: SequenceParallel | None) -> None:
    spec, cfg, graph = unit.spec, layout.config, gm.graph
    hidden = spec.hidden
    with graph.inserting_before(call):
        region_inputs = _contiguous(graph, _without_aliases(graph, list(call.args[1:])))
        us = _UnitState(layout, spec, state, tracer, clock)
        h_in = Proxy(call.args[0], tracer)
        h_f = Proxy(region_inputs[hidden.input_position], tracer)
        residual = h_f - h_in
        prev = _pick_stream(us.raw("prev_residual"), clock.stream, cfg.num_streams)
        hit, diff, considered = _decide(cfg, us, residual, prev, parallel)

        elapsed = clock.step - us.current("last_compute_step")
        taylor_operands = []
        for slot in spec.slots:
            taylor_operands += [us.raw(f"slot{slot.slot}.terms").node, us.vector(f"slot{slot.slot}.valid").node]
        operands = (*region_inputs, *taylor_operands, clock.stream.node, elapsed.node)
        cached_gm = _cached_branch(spec, layout, [example_value(n) for n in region_inputs])
        compute_gm = _compute_branch(unit.compute, len(operands) - len(region_inputs))
        gm.add_submodule(f"{spec.module_name}_cached", cached_gm)
        gm.add_submodule(f"{spec.module_name}_compute", compute_gm)
        cond = graph.call_function(
            torch.ops.higher_order.cond,
            (
                hit.node,
                graph.get_attr(f"{spec.module_name}_cached"),
                graph.get_attr(f"{spec.module_name}_compute"),
                operands,
            ),
        )
        cond.meta["stepcache_unit"] = spec  # as on the outlined call: the piecewise splitter names cond pieces by it
        outs = [Proxy(graph.call_function(operator.getitem, (cond, i)), tracer) for i in range(len(spec.slots))]

        computed = ~hit
        _update_counters(us, clock, hit, diff, considered)
        us.set_current("has_prev", us.current("has_prev") | computed)
        us.set_current("last_compute_step", torch.where(computed, clock.step, us.current("last_compute_step")))
        _write_stream(us.raw("prev_residual"), clock, residual, computed)
        for slot, out in zip(spec.slots, outs):
            head_out = Proxy(region_inputs[slot.input_position], tracer)
            _update_taylor(us, slot.slot, layout.taylor_order(slot.role), out - head_out, computed, clock)
        us.flush()

    for user in list(call.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(outs[user.args[1]].node)
            graph.erase_node(user)
    if call.users:
        raise UnsupportedGraphError(f"{call.name} has users other than getitem: {list(call.users)}")
    graph.erase_node(call)


def _decide(cfg, us: _UnitState, residual: Proxy, prev: Proxy,
            parallel: SequenceParallel | None) -> tuple[Proxy, Proxy | None, Proxy | None]:
    """cache-dit ``CachedContextManager.can_cache``: returns (hit, diff, diff_was_recorded)."""
    clock = us.clock
    if parallel is not None:
        ok = _may_cache(cfg, us) if cfg.threshold > 0 else torch.zeros_like(clock.static_hit)
        return _agree_across_ranks(cfg, us, residual, prev, ok, parallel)
    if cfg.threshold <= 0:  # never reaches the similarity test
        return clock.static_hit, None, None
    ok = _may_cache(cfg, us)
    if cfg.threshold >= 1:
        diff = torch.full_like(ok, -1.0, dtype=us.layout.float_dtype)  # cache-dit records -1.0 and always caches
        return clock.static_hit | ok, diff, ok
    diff = _shared_cfg_diff(cfg, us, ((prev - residual).abs().mean() / prev.abs().mean()).to(us.layout.float_dtype))
    return clock.static_hit | (ok & (diff < cfg.threshold)), diff, ok


def _may_cache(cfg, us: _UnitState) -> Proxy:
    """Everything but the similarity test: not forced, not statically cached, a previous residual, budgets left."""
    clock = us.clock
    ok = ~clock.forced & ~clock.static_hit & us.current("has_prev")
    if cfg.max_cached_steps is not None:
        ok = ok & (us.current("cached_count") < cfg.max_cached_steps)
    if cfg.max_continuous_cached_steps is not None:
        ok = ok & (_streak(us) < cfg.max_continuous_cached_steps)
    if cfg.max_accumulated_residual_diff is not None:
        ok = ok & (us.current("accumulated_diff") < cfg.max_accumulated_residual_diff)
    return ok


def _shared_cfg_diff(cfg, us: _UnitState, diff: Proxy) -> Proxy:
    """With separate CFG, the unconditional stream reuses the conditional stream's diff of this step, if any."""
    if not (cfg.separate_cfg and not cfg.cfg_diff_compute_separate):
        return diff
    cond_diff = _at(us.vector("diffs")[0], us.clock.step_slot).to(us.layout.float_dtype)
    return torch.where((us.clock.stream == 1) & ~torch.isnan(cond_diff), cond_diff, diff)


_FINGERPRINT_MODULUS = 1 << 16  # in-step checks sum x and x^2 over ranks in float64: exact for x < 2^16


def _agree_across_ranks(cfg, us: _UnitState, residual: Proxy, prev: Proxy, ok: Proxy,
                        parallel: SequenceParallel) -> tuple[Proxy, Proxy | None, Proxy | None]:
    """The decision of the whole sequence, identical on every rank of ``parallel``.

    One float64 SUM all-reduce of ``[sum|R_prev - R|, sum|R_prev|, ok, static_hit, 1, call, call^2,
    fingerprint, fingerprint^2]`` over the local shards; the predicate reads only the reduced vector
    (the diff is exact for unequal shards). The ranks are in step when every rank reports the same
    call count and the same fingerprint (config, step, CFG stream): ``W * sum(x^2) == sum(x)^2``.
    Out of step (a rank reset alone, another config), every rank computes and the sticky
    `Mismatch.RANKS_DIVERGED` bit is set.
    """
    clock, f64 = us.clock, torch.float64
    if 0 < cfg.threshold < 1:
        local = [(prev - residual).abs().sum(dtype=f64), prev.abs().sum(dtype=f64)]
    else:
        local = [torch.zeros_like(clock.static_hit, dtype=f64)] * 2
    call = (clock.calls % _FINGERPRINT_MODULUS).to(f64)
    fingerprint = ((config_fingerprint(cfg) + 31 * clock.step + 977 * clock.stream) % _FINGERPRINT_MODULUS).to(f64)
    vector = torch.stack([*local, ok.to(f64), clock.static_hit.to(f64), torch.ones_like(call),
                          call, call * call, fingerprint, fingerprint * fingerprint])
    total = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(vector, "sum", parallel.group_name))
    size = parallel.size
    in_step = ((total[4] == size) & (size * total[6] == total[5] * total[5])
               & (size * total[8] == total[7] * total[7]))
    clock.flags = _set_flag(clock.flags, Mismatch.RANKS_DIVERGED, ~in_step)
    all_ok, all_static = in_step & (total[2] == size), in_step & (total[3] == size)
    if cfg.threshold <= 0:
        return all_static, None, None
    if cfg.threshold >= 1:
        return all_static | all_ok, torch.full_like(total[0], -1.0, dtype=us.layout.float_dtype), all_ok
    diff = _shared_cfg_diff(cfg, us, (total[0] / total[1]).to(us.layout.float_dtype))
    return all_static | (all_ok & (diff < cfg.threshold)), diff, all_ok


def config_fingerprint(cfg) -> int:
    """A number for the config, the same in every process (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(cfg).encode()) % _FINGERPRINT_MODULUS


def _streak(us: _UnitState) -> Proxy:
    """Cached steps in a row up to the previous step (a computed step breaks the streak)."""
    continues = us.current("last_cached_step") == us.clock.step - 1
    return torch.where(continues, us.current("streak"), 0)


def _update_counters(us: _UnitState, clock: Clock, hit: Proxy, diff, considered) -> None:
    streak = _streak(us)
    us.set_current("cached_count", us.current("cached_count") + hit.to(us.layout.int_dtype))
    us.set_current("streak", torch.where(hit, streak + 1, streak))
    us.set_current("last_cached_step", torch.where(hit, clock.step, us.current("last_cached_step")))
    us.record("cached_flags", hit)
    if diff is not None:
        us.record("diffs", diff.to(torch.float32), considered)
        gain = torch.where(considered & (diff > 0), diff, 0.0)
        us.set_current("accumulated_diff", us.current("accumulated_diff") + gain)


def _update_taylor(us: _UnitState, slot: int, order: int, y: Proxy, computed: Proxy, clock: Clock) -> None:
    """TaylorSeer ``update`` on a computed step: dY0 = Y, dY(i+1) = (dY(i) - dY_prev(i)) / window.

    cache-dit creates its Taylor state lazily at step 0, so its step counter runs one behind and
    derivatives start at step 3 (its ``current_step > 1``); matched here.
    """
    terms_state = us.raw(f"slot{slot}.terms")
    old = _pick_stream(terms_state, clock.stream, us.layout.config.num_streams)
    old_valid = us.current(f"slot{slot}.valid")
    window = clock.step - us.current("last_compute_step")
    window = torch.where(window < 1, 1, window)  # clamp(min=1); ONNX-TensorRT's Clip takes floats only
    terms, valid = [y], [torch.ones_like(computed)]
    for i in range(order):
        terms.append((terms[i] - old[i]) / window)
        valid.append(valid[i] & old_valid[i] & (clock.step > 2))
    new = torch.stack(terms)
    _write_stream(terms_state, clock, new, computed)
    us.set_current(f"slot{slot}.valid", torch.where(computed, torch.stack(valid), old_valid))


# ---------------------------------------------------------------------------- cond branches
def _without_aliases(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
    """cond operands may not alias each other: clone all but the largest of tensors sharing storage.

    FLUX's and HunyuanVideo's single blocks split hidden and encoder states out of one tensor, so
    the head hands the middle region two views of one buffer; the (small) encoder view is copied.
    """
    groups: dict[StorageWeakRef, list[int]] = {}
    for i, node in enumerate(inputs):
        value = example_value(node)
        if isinstance(value, torch.Tensor):
            groups.setdefault(StorageWeakRef(value.untyped_storage()), []).append(i)
    result = list(inputs)
    for members in groups.values():
        members = sorted(members, key=lambda i: example_value(inputs[i]).numel(), reverse=True)
        for i in members[1:]:
            clone = graph.call_method("clone", (inputs[i],))
            clone.meta["example_value"] = example_value(inputs[i])
            result[i] = clone
    return result


def _contiguous(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
    """Give non-contiguous cond operands standard strides (FastVideo's ``flatten(2).transpose(1, 2)`` tokens).

    Inductor stores such a head output contiguously but compiles the branches for the strides in
    the example value, and the cond then fails its stride assertion (torch 2.11-2.13); a copy
    whose example value is contiguous keeps both sides in agreement.
    """
    result = []
    for node in inputs:
        value = example_value(node)
        if isinstance(value, torch.Tensor) and not _is_standard_contiguous(value):
            copy = graph.call_method("contiguous", (node,))
            copy.meta["example_value"] = value.contiguous()
            node = copy
        result.append(node)
    return result


def _is_standard_contiguous(value: torch.Tensor) -> bool:
    return tuple(value.stride()) == tuple(make_contiguous_strides_for(value.shape))


def _compute_branch(compute: fx.GraphModule, num_extra: int) -> fx.GraphModule:
    """The middle blocks, taking (and ignoring) the cached branch's extra operands.

    Outputs must have standard contiguous strides (as the cached branch's) and alias neither an
    input nor each other: such outputs are cloned, the rest returned as computed.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in compute.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        env[node] = graph.placeholder(node.name)
        env[node].meta.update(node.meta)
    for i in range(num_extra):
        graph.placeholder(f"unused_{i}")
    output = None
    for node in compute.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = node
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    taken = {StorageWeakRef(example_value(p).untyped_storage())
             for p in placeholders if isinstance(example_value(p), torch.Tensor)}
    results = []
    for out in output.args[0]:
        value = example_value(out)
        storage = StorageWeakRef(value.untyped_storage())
        if _is_standard_contiguous(value) and storage not in taken:
            results.append(env[out])
        else:
            results.append(graph.call_method("clone", (env[out],), {"memory_format": torch.contiguous_format}))
        taken.add(storage)
    graph.output(tuple(results))
    return fx.GraphModule(compute, graph, class_name=f"{type(compute).__name__}Compute")


def _cached_branch(spec: UnitSpec, layout: StateLayout, region_values: list) -> fx.GraphModule:
    """``H_F + sum_i dY(i) * elapsed^i / i!`` per carried slot (order 0: ``H_F + R_M``)."""
    graph = fx.Graph()
    tracer = GraphAppendingTracer(graph)
    inputs = [Proxy(graph.placeholder(f"region_{i}"), tracer) for i in range(len(region_values))]
    taylor = []
    for slot in spec.slots:
        terms = Proxy(graph.placeholder(f"slot{slot.slot}_terms"), tracer)
        valid = Proxy(graph.placeholder(f"slot{slot.slot}_valid"), tracer)
        taylor.append((terms, valid))
    stream = Proxy(graph.placeholder("stream"), tracer)
    elapsed = Proxy(graph.placeholder("elapsed"), tracer)
    results = []
    for slot, (terms, valid) in zip(spec.slots, taylor):
        order = layout.taylor_order(slot.role)
        streams = layout.config.num_streams
        terms, valid = _pick_stream(terms, stream, streams), _pick_stream(valid, stream, streams)
        approx = terms[0]
        for i in range(1, order + 1):
            # float Pow: TensorRT has no int Pow
            term = terms[i] * (1 / math.factorial(i)) * elapsed.to(terms[i].dtype) ** i
            approx = approx + torch.where(valid[i], term, 0.0)
        out = approx + inputs[slot.input_position]
        if not _is_standard_contiguous(region_values[slot.input_position]):
            out = out.clone(memory_format=torch.contiguous_format)
        results.append(out.node)
    graph.output(tuple(results))
    return fx.GraphModule(torch.nn.Module(), graph, class_name=f"StepcacheCached{spec.index}")

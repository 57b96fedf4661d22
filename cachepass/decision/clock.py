"""The clock: which generation, denoising step and CFG stream a call is, decided on the device from the
timestep and latents inputs, with the per-step schedule lookups and the `Mismatch` flags."""

from __future__ import annotations

import dataclasses

import torch
from torch.fx.proxy import Proxy

from cachepass.analysis.blocks import example_value
from cachepass.analysis.timestep import follows, latents_sample
from cachepass.decision.ops import at, set_flag, stream_selectors
from cachepass.state.layout import Mismatch, StateLayout
from cachepass.state.sizes import is_symbolic


@dataclasses.dataclass
class Clock:
    calls: Proxy  # calls since the state was made or reset, before this one
    first: Proxy  # bool: first call of a generation -> per-stream state resets
    stream: Proxy  # 0 = conditional, 1 = unconditional (CFG) stream
    stream_selectors: tuple[Proxy, ...]  # stream == 1, ...: what `pick_stream` selects by
    stream_row: Proxy  # [stream] as int64: the index `write_row` writes a per-stream buffer's row at (ONNX: ScatterND)
    step: Proxy  # denoising step
    step_slot: Proxy  # step clamped to the stats capacity
    stream_mask: Proxy  # [S] bool, the current stream
    step_mask: Proxy  # [C+1] bool, the current step's stats column
    not_forced: Proxy  # bool: neither warmup nor the mask forces a compute step
    static_hit: Proxy  # bool: the static mask policy caches this step
    flags: Proxy  # `Mismatch` bits, written back after the units (which may add to them)
    ended: Proxy  # steps of the last generation that ended early
    updates: dict[str, Proxy]  # the other clock state written back after the units


def progress(layout: StateLayout, calls: Proxy, num_steps: Proxy, timestep: Proxy | None) -> Proxy:
    """A scalar (the layout's float dtype) that decreases from one denoising step to the next within a generation.

    The timestep input itself (its largest entry) when the graph has one; else one derived from the
    call count, which restarts after ``num_steps`` steps per stream (when known).
    """
    if timestep is not None:
        # a full reduction; max() also exports to ONNX (onnxscript needs amax dims)
        return timestep.detach().to(layout.float_dtype).max()
    streams = layout.config.num_streams
    per_generation = num_steps * streams
    position = torch.where(num_steps > 0, calls % torch.where(num_steps > 0, per_generation, 1), calls)
    return -(position // streams).to(layout.float_dtype)


def emit_clock(layout: StateLayout, st: dict[str, Proxy], timestep: Proxy | None, latents: Proxy | None) -> Clock:
    """Which generation, step and CFG stream this call is, decided on the device from the timestep.

    A call whose timestep is below the last one, with latents that continue the last call's (a
    sample's cosine, `cachepass.analysis.timestep.follows`), is the next step; with separate CFG, a call at
    the same timestep and with the same latents (sum and sum of squares) right after a step's first
    call is that step's second (CFG partner) call; any other call (new noise, an img2img start below
    a cancelled generation's last timestep) starts a new generation at step 0. Calls that do not
    fit the config set `Mismatch` bits.
    """
    cfg = layout.config
    steps = st["schedule.num_steps"]  # the config's count, or the pipeline call's (`RuntimeState.set_steps`)
    calls, last_step, pending, last_t = st["clock.calls"], st["clock.step"], st["clock.pending"], st["clock.last_t"]
    t = progress(layout, calls, steps, timestep)
    fresh = calls == 0
    not_fresh = ~fresh  # each value the clock reads twice is computed once: glue runs as traced, a kernel per op
    same_t = not_fresh & (t == last_t)
    fingerprint, sample = st["clock.last_latents"], st["clock.last_sample"]
    continues = not_fresh
    nonfinite = None
    if latents is not None:
        x = latents.detach().to(layout.float_dtype)
        fingerprint = torch.stack([x.sum(), (x * x).sum()])
        numel = example_value(latents.node).numel()
        if is_symbolic(numel):  # sizes traced symbolically: the graph computes them from the latents'
            numel = x.numel()
        sample = latents_sample(x, numel, st["clock.sample_ids"])
        continues = continues & follows(sample, st["clock.last_sample"])
        # every entry's: a NaN or Inf makes a sum NaN or Inf; finite squares cannot overflow float64. A
        # reduction of isfinite over the sample fused into a kernel Triton 3.6 failed to compile.
        nonfinite = ~torch.isfinite(fingerprint).all()
    same_call = same_t & (fingerprint == st["clock.last_latents"]).all()
    partner = pending & same_call if cfg.separate_cfg else torch.zeros_like(same_t)
    not_partner, next_step = ~partner, last_step + 1
    first = fresh | (t > last_t) | (same_t & not_partner) | ((t < last_t) & ~continues)
    step = torch.where(first, 0, torch.where(partner, last_step, next_step))
    stream = partner.to(layout.int_dtype)
    if cfg.cfg_compute_first:
        stream = 1 - stream

    flags = st["clock.report"][0]
    ended = st["clock.report"][1]
    if nonfinite is not None:
        flags = set_flag(flags, Mismatch.NONFINITE_LATENTS, nonfinite)
    if cfg.separate_cfg:
        flags = set_flag(flags, Mismatch.MISSING_CFG_PARTNER, pending & ~first & not_partner)
        flags = set_flag(flags, Mismatch.EXTRA_CALLS, same_call & ~pending)  # a third call of one step
    else:
        flags = set_flag(flags, Mismatch.SHARED_TIMESTEP, same_t)
    known = steps > 0
    ended_early = known & first & not_fresh & (next_step < steps)
    flags = set_flag(flags, Mismatch.MORE_STEPS, known & (step >= steps))
    flags = set_flag(flags, Mismatch.FEWER_STEPS, ended_early)
    ended = torch.where(ended_early, next_step, ended)

    # Where, not Clip: ONNX-TensorRT clips floats only
    step_slot = torch.where(step > layout.capacity, layout.capacity, step)
    forced = at(st["schedule.warmup"], step_slot) | at(st["schedule.mask_compute"], step_slot)
    not_forced = ~forced
    return Clock(
        calls=calls,
        first=first,
        stream=stream,
        stream_selectors=stream_selectors(stream, cfg.num_streams),
        stream_row=stream.reshape(1).long(),
        step=step,
        step_slot=step_slot,
        stream_mask=st["schedule.stream_ids"] == stream,
        step_mask=st["schedule.step_ids"] == step_slot,
        not_forced=not_forced,
        static_hit=at(st["schedule.mask_static"], step_slot) & not_forced,
        flags=flags,
        ended=ended,
        updates={
            "clock.calls": calls + 1,
            "clock.step": step,
            "clock.pending": not_partner if cfg.separate_cfg else partner,
            "clock.last_t": t,
            "clock.last_latents": fingerprint,
            "clock.last_sample": sample,
        },
    )

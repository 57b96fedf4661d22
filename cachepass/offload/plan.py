"""Layerwise offload planned from the cache schedule: which blocks stay resident, which stream through slots, when.

Block weights that do not fit the device budget live in host memory; a few device *slots* hold the
streamed blocks while they run (block ``j`` of the streamed order always uses slot ``j % slots``,
so its pieces read fixed views of one slot: static addresses, no recompiles). What runs is known
per call from the cache schedule: head and tail blocks always, the middle blocks only on a compute
decision. A static mask fixes every decision in advance; a dynamic one is known on the host once
per unit (the predicate read), and before that the first streamed block of *both* outcomes is
prefetched.

`SlotScheduler` is the host-side logic: driven by the executor (a call starts, a block is about to
run, a block ran, a decision is known, a call ended), it decides which copies to issue into which slot and when
the compute stream must wait. It drives a `Transport` (real streams and events in
`cachepass.offload.runtime`); `plan_generation` drives it over a whole generation with a
`RecordingTransport`, which is the `OffloadPlan` that ``cachepass.explain`` prints: the runtime and
the plan are the same code.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Iterator, Protocol, Sequence

from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError
from cachepass.unit import UnitSpec

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """``options={"offload": {...}}``.

    Args:
        budget: bytes of weights the device may hold: the non-block weights, the resident blocks
            and the slots. An int, or a string such as ``"8GB"`` / ``"7.5GiB"``.
        slots: device buffers the streamed blocks take turns in (>= 1; 2 overlaps one block's copy
            with the previous block's compute).
        allow_cpu: run on a CPU model (copies between two CPU buffers). Nothing is saved there;
            it exists so that the slot logic can be tested without a GPU.
    """

    budget: int
    slots: int = 2
    allow_cpu: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_bytes(self.budget))
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
            raise ValueError(f"stepcache option offload.slots={self.slots!r} is invalid; allowed: an integer >= 1")
        if not isinstance(self.allow_cpu, bool):
            raise ValueError(f"stepcache option offload.allow_cpu={self.allow_cpu!r} is invalid; allowed: True or False")

    @classmethod
    def parse(cls, value) -> "OffloadConfig | None":
        """None (no offload), an `OffloadConfig`, or a dict of its fields."""
        if value is None or isinstance(value, OffloadConfig):
            return value
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown or "budget" not in value:
                raise ValueError(f"stepcache option offload={value!r} is invalid: it needs 'budget' and allows "
                                 f"{sorted(known)}" + (f" (unknown: {unknown})" if unknown else ""))
            return cls(**value)
        raise ValueError(f"stepcache option offload={value!r} is invalid; allowed: None, a dict with 'budget' "
                         "(bytes or a string like '8GB') and optionally 'slots', or cachepass.OffloadConfig")


def parse_bytes(value) -> int:
    """``8_000_000_000``, ``"8GB"`` (10^9) or ``"8GiB"`` (2^30) -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and float(value).is_integer():
        return int(value)  # 1.5e6 is a number of bytes too
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"stepcache option offload.budget={value!r} is invalid; allowed: a positive number of "
                         "bytes, or a string like '8GB' or '7.5GiB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def format_bytes(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:.0f} B"


# ---------------------------------------------------------------------------- residency
@dataclasses.dataclass(frozen=True)
class Residency:
    """Where each block's weights live: resident on the device, or streamed through a slot."""

    slot_of: dict[str, int]  # streamed block path -> its slot
    resident: tuple[str, ...]  # resident block paths, in priority order
    slot_bytes: int  # bytes of one slot (the largest streamed block)
    slots: int
    nonblock_bytes: int
    block_bytes: dict[str, int]

    @property
    def device_bytes(self) -> int:
        """Weight bytes on the device: non-block weights, resident blocks, slots (constant during a generation)."""
        return self.nonblock_bytes + sum(self.block_bytes[b] for b in self.resident) + self.slots * self.slot_bytes


def residency_priority(units: Sequence[UnitSpec]) -> list[str]:
    """Blocks most worth keeping first: heads and tails, then each unit's first middle block, then the
    middle blocks spread evenly (each prefix of the order is spread over the middle as evenly as it can be)."""
    order = [u.block_paths[i] for u in units for i in (*u.head, *u.tail)]
    order += [u.block_paths[u.middle[0]] for u in units if len(u.middle)]
    rest = [[u.block_paths[i] for i in u.middle[1:]] for u in units]
    for fraction in _spread():
        if not any(rest):
            break
        for paths in rest:
            if paths:
                order.append(paths.pop(min(int(fraction * len(paths)), len(paths) - 1)))
    return order


def _spread() -> Iterator[float]:
    """1/2, 1/4, 3/4, 1/8, 3/8, ... (van der Corput): positions that keep every prefix evenly spread."""
    k = 1
    while True:
        bits, value, scale = k, 0.0, 0.5
        while bits:
            value += (bits & 1) * scale
            bits >>= 1
            scale /= 2
        yield value
        k += 1


def choose_residency(units: Sequence[UnitSpec], block_bytes: dict[str, int], nonblock_bytes: int,
                     config: OffloadConfig) -> Residency:
    """Keep the most-used blocks resident within ``config.budget``; stream the rest through ``config.slots`` slots."""
    order = residency_priority(units)
    total = nonblock_bytes + sum(block_bytes.values())
    if total <= config.budget:
        return Residency({}, tuple(order), 0, 0, nonblock_bytes, dict(block_bytes))
    largest = max(block_bytes.values())
    if config.budget < nonblock_bytes + largest:
        raise CachepassError(
            f"stepcache option offload.budget={format_bytes(config.budget)} is too small: the non-block weights "
            f"({format_bytes(nonblock_bytes)}) plus one slot for the largest block ({format_bytes(largest)}) need "
            f"{format_bytes(nonblock_bytes + largest)}; the whole model is {format_bytes(total)}")
    slots = min(config.slots, (config.budget - nonblock_bytes) // largest)
    if slots < config.slots:
        log.info("stepcache: offload.slots=%d cut to %d: the budget (%s less %s of non-block weights) holds %d slot(s) "
                 "of the largest block (%s)", config.slots, slots, format_bytes(config.budget),
                 format_bytes(nonblock_bytes), slots, format_bytes(largest))
    room = config.budget - nonblock_bytes - slots * largest
    resident = []
    for block in order:
        if block_bytes[block] <= room:
            resident.append(block)
            room -= block_bytes[block]
        else:
            break  # keep the priority order: no smaller block jumps the queue
    streamed = [b for u in units for b in u.block_paths if b not in resident]
    slot_of = {block: j % slots for j, block in enumerate(streamed)}
    return Residency(slot_of, tuple(resident), max(block_bytes[b] for b in streamed), slots, nonblock_bytes,
                     dict(block_bytes))


# ---------------------------------------------------------------------------- the schedule
@dataclasses.dataclass(frozen=True)
class Timeline:
    """What one call runs, in order: per cache unit its head blocks, its decision, its tail blocks."""

    units: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...]  # (head, middle, tail) paths
    place: dict[str, tuple[int, int, int]]  # block -> (unit, phase: 0 head 1 middle 2 tail, index in the phase)

    @classmethod
    def of(cls, units: Sequence[UnitSpec]) -> "Timeline":
        def paths(u, r):
            return tuple(u.block_paths[i] for i in r)

        phases = tuple((paths(u, u.head), paths(u, u.middle), paths(u, u.tail)) for u in units)
        place = {block: (u, phase, i) for u, unit in enumerate(phases) for phase, blocks in enumerate(unit)
                 for i, block in enumerate(blocks)}
        return cls(phases, place)


def predicted_decision(config: StepCacheConfig, call: int) -> bool | None:
    """Whether call ``call`` of a generation (streams interleaved) is cached, if the config alone says so
    (every unit of a call follows the same schedule).

    True: cached (static mask); False: computed (warmup, mask, the first step, no threshold caching);
    None: the threshold decides (known once the unit's predicate is read).
    """
    step = call // config.num_streams
    steps = config.num_inference_steps
    if steps is not None and step >= steps:
        return None
    mask = config.steps_computation_mask
    forced = step in config.warmup_step_indices or (mask is not None and mask[step] == 1)
    if forced or step == 0:
        return False
    if config.static_schedule:
        return True
    return None if config.decides_by_threshold else False


class Transport(Protocol):
    """What the scheduler asks of the hardware."""

    def copy(self, block: str, slot: int) -> None:
        """Copy ``block`` into ``slot`` on the copy stream, after the slot's last reader is done."""

    def wait_ready(self, slot: int) -> None:
        """The compute stream waits until the last copy into ``slot`` landed."""

    def release(self, slot: int) -> None:
        """The compute stream marks ``slot``'s current block as read (its free point)."""


@dataclasses.dataclass
class Counters:
    bytes_moved: int = 0
    copies: int = 0
    wasted_bytes: int = 0  # copied, then overwritten before it ran
    late_copies: int = 0  # issued only when the block was about to run (nothing overlapped it)
    mispredicted: int = 0  # decisions that differed from what the static schedule said


class SlotScheduler:
    """Host-side slot logic: what each slot holds, what to copy when (see the module docstring).

    ``across_decisions``: prefetch past a cache decision (predicted from the schedule, or both
    outcomes' first streamed block). Off for CUDA graphs: a captured graph replays fixed copies, so
    each captured stretch loads only what it runs. Nothing is kept or prefetched from one call to
    the next: the host copy is the weights' own memory, which the user may write between calls
    (a LoRA fuse, ``load_state_dict``), so every call loads what it runs from it.
    """

    def __init__(self, residency: Residency, timeline: Timeline, config: StepCacheConfig, transport: Transport,
                 across_decisions: bool = True):
        self.residency, self.timeline, self.config = residency, timeline, config
        self.transport, self.across_decisions = transport, across_decisions
        self.holds: list[str | None] = [None] * residency.slots
        self.unused: set[str] = set()  # loaded (or loading) and not run since
        self.counters = Counters()
        self.call = 0  # call index within the generation, as the host counts it
        self._position = (0, 0, 0)  # (unit, phase: 0 head 1 middle 2 tail, index within the phase) of the next block
        self._decided: dict[int, bool] = {}  # this call's decisions read so far: unit -> cached
        self._phase_rest: tuple[str, ...] = ()  # the blocks after the last one run in its head, middle or tail

    # ------------------------------------------------------------------ driven by the executor
    def start_generation(self) -> None:
        self.call = 0

    def start_call(self) -> None:
        """A call begins: the slots hold nothing it may use; load its first streamed blocks."""
        self._position = (0, 0, 0)
        self._decided = {}
        self.boundary()
        self.prefetch()

    def before_block(self, block: str) -> None:
        slot = self.residency.slot_of.get(block)
        if slot is None:
            return
        if self.holds[slot] != block:
            self.counters.late_copies += 1
            self._load(block, slot)
        self.transport.wait_ready(slot)

    def after_block(self, block: str) -> None:
        slot = self.residency.slot_of.get(block)
        if slot is not None:
            self.transport.release(slot)
            self.unused.discard(block)
        self._advance_past(block)
        self.prefetch()

    def decided(self, unit: int, cached: bool) -> None:
        predicted = predicted_decision(self.config, self.call)
        if predicted is not None and predicted != cached:
            self.counters.mispredicted += 1
        self._decided[unit] = cached
        if cached:
            self._position = (unit, 2, 0)
        self.prefetch()

    def end_call(self) -> None:
        self.call += 1
        if self.config.num_inference_steps is not None and \
                self.call >= self.config.num_inference_steps * self.config.num_streams:
            self.call = 0

    def boundary(self) -> None:
        """A call or a captured graph ends here: what follows assumes nothing about what the slots hold
        (what was loaded and did not run was wasted)."""
        self.counters.wasted_bytes += sum(self.residency.block_bytes[b] for b in self.unused)
        self.holds = [None] * self.residency.slots
        self.unused.clear()
        self._phase_rest = ()

    # ------------------------------------------------------------------ prefetch
    def prefetch(self) -> None:
        """Load the next streamed blocks, up to one per slot, in the order they will run."""
        upcoming = self.upcoming(self.residency.slots)
        for i, block in enumerate(upcoming):
            slot = self.residency.slot_of[block]
            holder = self.holds[slot]
            if holder == block:
                continue
            if holder in self.unused and holder in upcoming[:i]:
                break  # the slot still waits for an earlier block to run: keep the run order
            self._load(block, slot)

    def upcoming(self, limit: int) -> list[str]:
        """The next ``limit`` streamed blocks the host expects to run, nearest first."""
        found: list[str] = []
        for block in self._walk():
            if block in self.residency.slot_of and block not in found:
                found.append(block)
                if len(found) == limit:
                    break
        return found

    def _walk(self) -> Iterator[str]:
        """Blocks from the current position to the end of this call, as far as the host can tell."""
        unit, phase, index = self._position
        if not self.across_decisions:  # only the rest of the block run being captured
            yield from self._phase_rest
            return
        for u in range(unit, len(self.timeline.units)):
            start = (phase, index) if u == unit else (0, 0)
            if not (yield from self._rest_of_unit(u, *start, self._decided.get(u), self.call)):
                return

    def _rest_of_unit(self, u: int, phase: int, index: int, cached: bool | None, call: int):
        """Yield unit ``u``'s blocks from (phase, index); returns False where the outcome is unknown."""
        head, middle, tail = self.timeline.units[u]
        if phase == 0:
            yield from head[index:]
        if phase <= 1:
            if cached is None:
                cached = predicted_decision(self.config, call)
            if cached is None:  # both outcomes: the first streamed block of each, then stop
                first = [b for b in middle if b in self.residency.slot_of][:1]
                yield from first
                yield from (b for b in tail if b in self.residency.slot_of)
                return False
            if not cached:
                yield from middle[index if phase == 1 else 0:]
        yield from tail[index if phase == 2 else 0:]
        return True

    # ------------------------------------------------------------------ bookkeeping
    def _load(self, block: str, slot: int) -> None:
        evicted = self.holds[slot]
        if evicted is not None and evicted in self.unused:
            self.counters.wasted_bytes += self.residency.block_bytes[evicted]
            self.unused.discard(evicted)
        self.transport.copy(block, slot)
        self.holds[slot] = block
        self.unused.add(block)
        self.counters.bytes_moved += self.residency.block_bytes[block]
        self.counters.copies += 1

    def _advance_past(self, block: str) -> None:
        """The next block is the one after ``block`` (a finished phase moves on; past a tail, the next unit)."""
        u, phase, index = self.timeline.place[block]
        phases = self.timeline.units[u]
        index += 1
        self._phase_rest = phases[phase][index:]
        if index < len(phases[phase]):
            self._position = (u, phase, index)
        elif phase < 2 and any(phases[phase + 1:]):
            self._position = (u, phase + 1, 0)
        else:
            self._position = (u + 1, 0, 0)


# ---------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "copy", "wait", "free"
    block: str
    slot: int
    after: str  # the point of the call it is issued at: "start", "blocks.3" (after it ran), "decision u0"


@dataclasses.dataclass(frozen=True)
class CallPlan:
    call: int
    step: int
    stream: int
    cached: tuple[bool, ...]  # per unit
    blocks: tuple[str, ...]  # blocks run, in order
    actions: tuple[Action, ...]
    bytes_moved: int


@dataclasses.dataclass(frozen=True)
class OffloadPlan:
    """The offload schedule of one generation: per call what runs, where, and which copies go when."""

    residency: Residency
    calls: tuple[CallPlan, ...]
    counters: Counters
    dynamic: bool  # some decisions come from the threshold: the plan assumes the outcomes listed per call
    graphed: bool  # CUDA graphs: each captured stretch loads what it runs

    @property
    def bytes_per_generation(self) -> int:
        return sum(c.bytes_moved for c in self.calls)

    def describe(self, indent: str = "") -> str:
        r = self.residency
        lines = [
            f"{indent}offload: {format_bytes(r.device_bytes)} of weights on the device "
            f"(non-block {format_bytes(r.nonblock_bytes)}, {len(r.resident)} resident blocks, "
            f"{r.slots} slot(s) x {format_bytes(r.slot_bytes)}); {len(r.slot_of)} blocks streamed from pinned host memory"
        ]
        if not r.slot_of:
            return lines[0] + " (everything fits: nothing moves)"
        lines.append(f"{indent}  resident: {', '.join(r.resident) or 'none'}")
        lines.append(f"{indent}  streamed: " + ", ".join(f"{b}->s{s}" for b, s in r.slot_of.items()))
        lines.append(f"{indent}  a streamed block waits for its slot's copy before it runs and frees the slot after "
                     "it ran; a copy waits for that free. Per call: what runs, then each copy and the point it is "
                     "issued at")
        assumed = " (threshold decisions assumed as listed)" if self.dynamic else ""
        lines.append(f"{indent}  per generation: {format_bytes(self.bytes_per_generation)} moved in "
                     f"{self.counters.copies} copies, {format_bytes(self.counters.wasted_bytes)} wasted, "
                     f"{self.counters.late_copies} late{assumed}")
        for c in self.calls:
            decision = " ".join("cached" if x else "compute" for x in c.cached)
            copies = [a for a in c.actions if a.kind == "copy"]
            issued = "; ".join(f"{a.block}->s{a.slot} after {a.after}" for a in copies) or "no copies"
            streamed = sum(b in r.slot_of for b in c.blocks)
            runs = f"runs {len(c.blocks)} blocks ({streamed} from slots)"
            lines.append(f"{indent}  step {c.step:>2} stream {c.stream} {decision:<8} {runs}, "
                         f"{format_bytes(c.bytes_moved)} copied: {issued}")
        return "\n".join(lines)


class RecordingTransport:
    """A `Transport` that writes down what it was asked, at the point of the call it was asked."""

    def __init__(self):
        self.actions: list[Action] = []
        self.point = "start"

    def copy(self, block: str, slot: int) -> None:
        self.actions.append(Action("copy", block, slot, self.point))

    def wait_ready(self, slot: int) -> None:
        self.actions.append(Action("wait", "", slot, self.point))

    def release(self, slot: int) -> None:
        self.actions.append(Action("free", "", slot, self.point))


def plan_generation(residency: Residency, units: Sequence[UnitSpec], config: StepCacheConfig,
                    outcomes: Sequence[Sequence[bool]] | None = None, graphed: bool = False) -> OffloadPlan:
    """Run the scheduler over a generation, as every generation after the first runs (one is run
    before, unrecorded: the first also loads what the slots start without).

    ``outcomes[call][unit]``: cached or not, for the calls the threshold decides (default: computed,
    the most bytes); the config decides the rest.
    """
    steps = config.num_inference_steps
    if steps is None:
        raise CachepassError("an offload plan for a whole generation needs num_inference_steps in the config")
    transport = RecordingTransport()
    scheduler = SlotScheduler(residency, Timeline.of(units), config, transport, across_decisions=not graphed)
    _generation(scheduler, transport, config, outcomes, graphed)
    scheduler.counters = Counters()
    transport.actions.clear()
    calls, dynamic = _generation(scheduler, transport, config, outcomes, graphed)
    return OffloadPlan(residency, tuple(calls), scheduler.counters, dynamic, graphed)


def decisions_of(stats: Sequence, config: StepCacheConfig) -> list[list[bool]]:
    """``outcomes`` for `plan_generation` from ``cachepass.stats``: per call of a generation, per unit, cached?"""
    streams = config.num_streams
    return [[(call // streams) in (u.cached_steps if call % streams == 0 else u.cfg_cached_steps) for u in stats]
            for call in range(config.num_inference_steps * streams)]


def _generation(scheduler: SlotScheduler, transport: RecordingTransport, config: StepCacheConfig,
                outcomes: Sequence[Sequence[bool]] | None, graphed: bool) -> tuple[list[CallPlan], bool]:
    timeline = scheduler.timeline
    scheduler.start_generation()
    calls, dynamic = [], False
    for call in range(config.num_inference_steps * config.num_streams):
        first = len(transport.actions)
        moved = scheduler.counters.bytes_moved
        scheduler.start_call()
        cached_units, ran = [], []
        for u, (head, middle, tail) in enumerate(timeline.units):
            cached = predicted_decision(config, call)
            if cached is None:
                dynamic = True
                cached = bool(outcomes[call][u]) if outcomes is not None else False
            for block in head:
                _run(scheduler, transport, block, ran)
            if graphed:
                scheduler.boundary()
            transport.point = f"decision u{u}"
            scheduler.decided(u, cached)
            for block in () if cached else middle:
                _run(scheduler, transport, block, ran)
            if graphed:
                scheduler.boundary()
            for block in tail:
                _run(scheduler, transport, block, ran)
            cached_units.append(cached)
        transport.point = "end of call"
        scheduler.end_call()
        calls.append(CallPlan(call, call // config.num_streams, call % config.num_streams, tuple(cached_units),
                              tuple(ran), tuple(transport.actions[first:]), scheduler.counters.bytes_moved - moved))
        transport.point = "start"
    return calls, dynamic


def _run(scheduler: SlotScheduler, transport: RecordingTransport, block: str, ran: list[str]) -> None:
    transport.point = f"before {block}"
    scheduler.before_block(block)
    transport.point = block
    scheduler.after_block(block)
    ran.append(block)

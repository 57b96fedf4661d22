"""Device memory held by captured CUDA graphs: one pool per device, a bound on the graph sets kept, release.

Every capture on a device shares one memory pool and one capture stream. A graph set (the graphs of
one model state at one shape, `cachepass.cudagraphs.graphed`) keeps the pool memory of the values its
graphs pass to each other and of its static buffers. Freed pool memory is reused by later captures
on the device, so what the pool holds is bounded by the sets kept, not by the shapes ever run:
beyond `max_graph_sets` per device the set replayed longest ago is dropped (a later call of it
captures again, logged), and `release` drops a model's sets; a device left with none hands its pool
back to the caching allocator and empties it.
"""

from __future__ import annotations

import collections
import logging
import os
import weakref
from typing import Protocol

import torch

log = logging.getLogger(__name__)

MAX_GRAPH_SETS_ENV = "CACHEPASS_MAX_GRAPH_SETS"
DEFAULT_MAX_GRAPH_SETS = 8


def max_graph_sets() -> int:
    """Graph sets kept per device: ``$CACHEPASS_MAX_GRAPH_SETS``, else 8."""
    value = os.environ.get(MAX_GRAPH_SETS_ENV, str(DEFAULT_MAX_GRAPH_SETS))
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{MAX_GRAPH_SETS_ENV}={value!r} is invalid; allowed: an integer >= 1")
    return limit


# a graph set's key: (id of its model state's first tensor, the concrete sizes of a symbolic program, or ())
SetKey = tuple[int, tuple[int, ...]]


class HoldsGraphSets(Protocol):
    def drop(self, key: SetKey) -> None:
        """Forget the graph set ``key`` (its memory returns to the pool)."""


class _Device:
    def __init__(self, index: int):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(index)
        self.sets: collections.OrderedDict[tuple[int, SetKey], weakref.ref] = collections.OrderedDict()


_DEVICES: dict[int, _Device] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def pool_and_stream(device: torch.device) -> tuple[tuple, torch.cuda.Stream]:
    """The memory pool every capture on ``device`` shares, and the stream warm-up and capture run on."""
    index = _index(device)
    if index not in _DEVICES:
        _DEVICES[index] = _Device(index)
    return _DEVICES[index].pool, _DEVICES[index].stream


def added(holder: HoldsGraphSets, key: SetKey, device: torch.device) -> None:
    """A graph set was captured; drop the least recently replayed ones beyond the bound."""
    sets = _DEVICES[_index(device)].sets
    sets[(id(holder), key)] = weakref.ref(holder)
    limit = max_graph_sets()
    while len(sets) > limit:
        (_, old_key), ref = sets.popitem(last=False)
        log.info("stepcache: dropped the CUDA graphs of the model state replayed longest ago (%d graph sets "
                 "kept per device, $%s sets it); a call of that state captures again", limit, MAX_GRAPH_SETS_ENV)
        if ref() is not None:
            ref().drop(old_key)


def replayed(holder: HoldsGraphSets, key: SetKey, device: torch.device) -> None:
    """Mark a set as used now (it is dropped last)."""
    _DEVICES[_index(device)].sets.move_to_end((id(holder), key))


def forgotten(holder: HoldsGraphSets, key: SetKey, device: torch.device) -> None:
    """A set was dropped by its holder (its state died, or it captures again)."""
    entry = _DEVICES.get(_index(device))
    if entry is not None:
        entry.sets.pop((id(holder), key), None)


def release(states: set[int]) -> int:
    """Drop every graph set of the states ``states`` (ids of their first tensor), at every size; devices left with
    none give their pool back. Returns sets dropped."""
    dropped = 0
    for index, entry in list(_DEVICES.items()):
        here = [(set_key, ref) for set_key, ref in entry.sets.items() if set_key[1][0] in states]
        for set_key, ref in here:
            del entry.sets[set_key]
            if ref() is not None:
                ref().drop(set_key[1])
        dropped += len(here)
        if here and not entry.sets:
            del _DEVICES[index]  # the pool handle; the graphs holding it are gone
            torch.cuda.synchronize(index)
            torch.cuda.empty_cache()
    return dropped


def graph_sets(device: torch.device) -> int:
    """Graph sets kept on ``device`` now."""
    entry = _DEVICES.get(_index(device))
    return len(entry.sets) if entry is not None else 0

"""Dynamo traces each block class once: its forward is a nested compile region while a compiled call runs.

Tracing the whole model inlines every block's forward (30-40 per DiT), most of Dynamo's time and
the bulk of what cachepass pays over regional compile at a cold start or a new shape. During each
call of a model compiled by `cachepass.compile`, the forward of each block class (the class of the
items of a list of two or more modules of one class, outermost lists only, torch's own modules
excluded) is replaced on the class by ``torch.compiler.nested_compile_region`` of itself: Dynamo
traces it once and calls the traced body for every block, each call with its own weights.
`cachepass.passes.inline_block_regions` inlines the bodies again before discovery, so the passes
see what an unmarked trace gives.

The mark sits on the class only while a call runs, and each class gets one marked function for the
process (Dynamo guards on it): other code using the class between calls, cache-dit's block-pattern
matching among it, sees the original. It is not put on instances: on torch 2.13 Dynamo then passed
block 0's weights to every block. A trace the marks make fail runs again without them (logged).
On by default on every supported torch: the CPU parity suites (cache-dit, generations, piecewise,
regions) pass with it on torch 2.11 and 2.13, the GPU tests on torch 2.11; ``CACHEPASS_BLOCK_REGIONS=0``
turns it off.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from typing import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

_LOCK = threading.RLock()
_ACTIVE: collections.Counter = collections.Counter()  # class -> calls in progress that marked it
_MARKED: dict[type, Callable] = {}  # class -> its marked forward (one per class and process)
_OWN: dict[type, Callable | None] = {}  # class -> the forward in its own __dict__ before the mark (None: inherited)
_REFUSED: set[type] = set()  # classes whose marked trace failed: never marked again


def enabled() -> bool:
    """On unless ``CACHEPASS_BLOCK_REGIONS=0``."""
    return os.environ.get("CACHEPASS_BLOCK_REGIONS", "1") != "0"


def block_classes(model: nn.Module) -> tuple[type, ...]:
    """Classes of the items of the model's outermost lists of two or more same-class modules (not torch's own)."""
    found: list[type] = []
    inside: set[int] = set()  # modules within an item of a list already taken
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = {type(m) for m in module}
        cls = next(iter(classes))
        if len(classes) != 1 or cls.__module__.startswith("torch.") or next(module[0].parameters(), None) is None:
            continue
        if cls not in found:
            found.append(cls)
        inside.update(id(m) for item in module for m in item.modules())
    return tuple(c for c in found if c not in _REFUSED)


@contextlib.contextmanager
def marked(classes: tuple[type, ...]) -> Iterator[None]:
    """``classes``' forwards are nested compile regions inside the block (reentrant, thread-safe)."""
    with _LOCK:
        for cls in classes:
            if _ACTIVE[cls] == 0:
                _install(cls)
            _ACTIVE[cls] += 1
    try:
        yield
    finally:
        with _LOCK:
            for cls in classes:
                _ACTIVE[cls] -= 1
                if _ACTIVE[cls] == 0:
                    _restore(cls)


def refuse(classes: tuple[type, ...], error: BaseException) -> None:
    """The marked trace failed: the classes are traced inline from now on."""
    _REFUSED.update(classes)
    log.info("stepcache: tracing %s as nested compile regions failed (%s: %s); tracing them inline instead "
                "(slower to compile, same result)", ", ".join(c.__name__ for c in classes), type(error).__name__,
                str(error).splitlines()[0] if str(error) else "")


def _install(cls: type) -> None:
    own = cls.__dict__.get("forward")
    _OWN[cls] = own
    if cls not in _MARKED:
        _MARKED[cls] = torch.compiler.nested_compile_region(own if own is not None else cls.forward)
    cls.forward = _MARKED[cls]


def _restore(cls: type) -> None:
    own = _OWN.pop(cls)
    if own is not None:
        cls.forward = own
    else:
        del cls.forward

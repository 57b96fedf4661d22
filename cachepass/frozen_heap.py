"""Dynamo's compiles of a cachepass model's calls run with the heap that existed before them frozen (``gc.freeze``).

A compile makes hundreds of thousands of short-lived Python objects (Dynamo's variable trackers, FX nodes,
fake tensors). CPython's collector runs every few hundred allocations, and each full (oldest-generation)
collection walks the whole process heap: torch's and diffusers' modules, the model, every object made
since the process started. On the bench's CPU host (30-block Wan, warm caches) each full collection
took 0.2-0.3 s; two fell inside a warm first call's compile (in Dynamo's trace and in the backend's fake
propagation) and one in the new shape's (in the inline pass). SGLang and vLLM freeze the heap around
CUDA-graph capture for the same reason.

While Dynamo compiles a call that a `cachepass.compile`d model made (`calls_of_compiled_model` marks the
thread and puts our callbacks on Dynamo's compile-start and compile-end hooks, which ``torch._dynamo.reset()``
empties), the objects that existed before the compile move to the collector's permanent generation, and
they move back when the compile ends, failed or not. Both moves are constant-time list splices. The
collector still runs during the compile, over what the compile made. Nothing stays frozen: garbage from
before the compile is collected by the first full collection after it. A process that froze objects
itself (``gc.get_freeze_count() > 0``) is left as it is, since unfreezing would also unfreeze its objects.
Compiles of other code are not touched. Results do not change; only when the collector runs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from typing import Iterator

import torch

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_CALLS = threading.local()  # .depth: calls of compiled models in progress on this thread
_FROZE = False  # whether a compile in progress froze the heap (and must unfreeze it)


@contextlib.contextmanager
def calls_of_compiled_model() -> Iterator[None]:
    """Mark a call of a `cachepass.compile`d model on this thread: a compile it starts freezes the older heap."""
    _register()
    depth = getattr(_CALLS, "depth", 0)
    _CALLS.depth = depth + 1
    try:
        yield
    finally:
        _CALLS.depth = depth


def _compile_started(_args) -> None:
    global _FROZE
    if not getattr(_CALLS, "depth", 0):
        return
    with _LOCK:
        if _FROZE:
            return
        if gc.get_freeze_count():
            log.debug("stepcache: the process froze %d objects itself: its heap is compiled as it is",
                      gc.get_freeze_count())
            return
        gc.freeze()
        _FROZE = True
        log.debug("stepcache: compiling with %d older objects frozen", gc.get_freeze_count())


def _compile_ended(_args) -> None:
    global _FROZE
    with _LOCK:
        if _FROZE:
            gc.unfreeze()
            _FROZE = False


def _register() -> None:
    """Put the callbacks on Dynamo's handler, unless they are on it (``torch._dynamo.reset()`` removes them)."""
    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None:  # a torch without compile callbacks: its compiles run with the heap as it is
        return
    if _compile_started in handler.start_callbacks:  # every call of a compiled model asks: no lock when they are on
        return
    with _LOCK:
        if _compile_started not in handler.start_callbacks:
            handler.register_start_callback(_compile_started)
            handler.register_end_callback(_compile_ended)

"""A compile of ours runs with the heap that existed before it frozen (``gc.freeze``).

A compile makes hundreds of thousands of short-lived Python objects (Dynamo's variable trackers, FX nodes,
fake tensors). CPython's collector runs every few hundred allocations, and each full (oldest-generation)
collection walks the whole process heap: torch's and diffusers' modules, the model, every object made
since the process started. On the bench's CPU host (30-block Wan, warm caches) each full collection
took 0.2-0.3 s; two fell inside a warm first call's compile (in Dynamo's trace and in the backend's fake
propagation) and one in the new shape's (in the pass that then inlined the block leaves). SGLang and vLLM freeze the heap around
CUDA-graph capture for the same reason.

``enter()`` moves the objects that exist to the collector's permanent generation and ``leave()`` moves them
back; both are constant-time list splices. The collector still runs during the compile, over what the
compile made. Nothing stays frozen: garbage from before the compile is collected by the first full
collection after it. A process that froze objects itself (``gc.get_freeze_count() > 0``) is left as it is,
since unfreezing would also unfreeze its objects. Results do not change; only when the collector runs.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def enter() -> bool:
    """Freeze the heap as it is; False (nothing to undo) where the process froze objects itself."""
    if gc.get_freeze_count():
        log.debug("stepcache: the process froze %d objects itself: its heap is compiled as it is", gc.get_freeze_count())
        return False
    gc.freeze()
    log.debug("stepcache: compiling with %d older objects frozen", gc.get_freeze_count())
    return True


def leave() -> None:
    gc.unfreeze()

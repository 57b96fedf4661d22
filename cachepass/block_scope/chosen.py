"""The default scope: each block list compiled alone, the whole model compiled where a list does not fit.

``cachepass.compile(model, config)`` with no ``scope`` compiles as ``scope="blocks"`` does where it can (the shorter
trace at a warm start and at a new shape: bench/NOTES.md, seventeenth session) and returns the whole-model compile,
which runs only once the block scope gives way (`ChosenBlocks.call`):

- at the first call, a loop the block scope cannot run (one that adds something between blocks, skips one, stops
  early or keeps a block's output) or a list program that fails to trace or rewrite: nothing of the call's cache
  state was kept, so the call runs again under the whole-model compile, logged. Errors that are the call's (gradients
  enabled, a device, Dynamo's recompile limit) are raised as they are, the block scope kept;
- at a later call, a loop that no longer runs a list as the chain its program was made for (a ControlNet residual
  from the second generation on): the whole-model compile takes over from that call, with a warning, since its
  cache state starts there (the generation in progress computes every block until its warm-up steps have passed).

The lists' programs are dropped then, their CUDA graphs released. Choosing before any call (offload, context
parallel, the one-graph form, a model with no block list) is `cachepass.api`'s.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from cachepass.block_scope import remove, scope_of
from cachepass.cudagraphs import memory as graph_memory
from cachepass.errors import BlockDiscoveryError, BlockScopeUnfitError, PassError, UnsupportedGraphError
from cachepass.state.runtime import drop_states, states_of

log = logging.getLogger(__name__)


class ChosenBlocks:
    """A model compiled with the default scope while its block scope runs it."""

    def __init__(self, model: nn.Module):
        self.model, self.scope = model, scope_of(model)
        self.ran = False  # a call completed under the block scope

    @property
    def active(self) -> bool:
        """The block scope still runs the model (no fallback, and not replaced by another compile of it)."""
        return self.scope is not None and scope_of(self.model) is self.scope

    def call(self, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """``(True, output)`` of the model called under its block scope, or ``(False, None)`` once the scope gave way
        (the caller then runs the whole-model compile)."""
        try:
            with self.scope.entered():
                out = self.model(*args, **kwargs)
        except BlockScopeUnfitError as error:
            self._fall_back(error)
            return False, None
        except (BlockDiscoveryError, UnsupportedGraphError, PassError, torch._dynamo.exc.TorchDynamoException) as error:
            if self.ran:
                raise
            self._fall_back(error)  # the list's program failed where the whole model's may not
            return False, None
        self.ran = True
        return True, out

    def _fall_back(self, error: BaseException) -> None:
        programs = self.scope.programs
        remove(self.model)
        self.scope = None
        dropped = graph_memory.release({id(state.tensors[0]) for program in programs for state in states_of(program)})
        for program in programs:
            drop_states(program)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if self.ran:
            log.warning("stepcache: %s no longer runs its block lists as the chains their programs were made for (%s); "
                        "compiling the whole model from this call on (scope='model'); its cache state starts at this "
                        "call (%d CUDA graph set(s) of the lists released)", type(self.model).__name__, reason, dropped)
        else:
            log.info("stepcache: %s cannot run its block lists as one program each (%s); compiling the whole model "
                     "instead (scope='model')", type(self.model).__name__, reason)

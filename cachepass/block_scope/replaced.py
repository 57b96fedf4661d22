"""Modules set inside a block list after its compile: a block replaced (``model.blocks[2] = other``), a block added,
or a submodule of a block replaced (``model.blocks[2].attn1 = other``).

A list's program was made for the modules the list held: Dynamo traced the first block and guards it, and the
others run as calls of the first block's body on their own weights (`cachepass.block_regions`), with nothing
guarding their modules. A block of another class, or a submodule of another class in a later block, would run the
first block's code: a wrong result with no message. One global module registration hook
(``torch.nn.modules.module.register_module_module_registration_hook``, which every ``setattr`` of a module and every
``ModuleList`` item assignment runs) records the first such change per list, and the list refuses its next call
(`ListScope.begin`, which per call reads that record and the list's length: a block removed runs no hook). A weight
replaced is not a module set; it is read at each call as before (`cachepass.leaf_weights`).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Protocol

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

_WATCHED: dict[int, tuple[weakref.ref, weakref.ref, str]] = {}  # id(module) -> (the module, its watcher, its path)
_HOOK: list = []  # the hook's handle, once one list is watched


class Watcher(Protocol):
    """A watched list's scope: ``changed`` is the path of the first module set in it after `watch`, or None."""

    changed: str | None


def watch(watcher: Watcher, modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Record a module set in any of ``modules`` (path, module) on ``watcher`` from now on."""
    if not _HOOK:
        _HOOK.append(register_module_module_registration_hook(_registered))
    ref = weakref.ref(watcher)
    for path, module in modules:
        _WATCHED[id(module)] = (weakref.ref(module), ref, path)


def unwatch(watcher: Watcher) -> None:
    for key in [k for k, (_, ref, _) in _WATCHED.items() if ref() is watcher or ref() is None]:
        del _WATCHED[key]


def _registered(module: nn.Module, name: str, _submodule: nn.Module) -> Any:
    entry = _WATCHED.get(id(module))
    if entry is not None and entry[0]() is module:  # not a later module at a freed one's address
        watcher = entry[1]()
        if watcher is not None and watcher.changed is None:
            watcher.changed = f"{entry[2]}.{name}"
    return None

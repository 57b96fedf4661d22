"""Dynamo traces one block per block class; every other block is one opaque call (a leaf).

Tracing the whole model inlines every block's forward (30-40 per DiT): most of Dynamo's time, and
the bulk of what cachepass paid over regional compile at a cold start or a new shape. During each
call of a model compiled by `cachepass.compile`, the forward of each block class (the class of the
items of a list of two or more modules of one class, outermost lists only, torch's own modules
excluded) is replaced on the class by a wrapper:

- the first block of the class (in the model's module order; it carries a flag during the call) is
  traced inline, between two marks (`enter` and `leave`, functions Dynamo puts in the graph as
  calls) that record its arguments and its outputs;
- every other block becomes one call of `leaf` (also put in the graph as it is) with the block's path
  and arguments (a list's own program, ``scope="blocks"``, calls blocks 1.. as one `chain` instead: Dynamo
  then does not even wrap or call those modules). Dynamo never touches that block's parameters and buffers: the
  pass gives the body it copies in placeholders of their own, which the backend fills on every call from the
  called model (`cachepass.leaf_weights`), so offload still streams them and a replaced weight is still seen.

Dynamo computes each leaf's output by running the first block on fake tensors (its weights made fake
in Dynamo's mode), once per input signature (later leaves of that signature get new fake outputs of the
same layout); a leaf called as the first block was (every leaf of a Wan) takes the layouts of that block's
traced outputs, which `leave` records, without a fake run. The marks and the leaves never run:
`cachepass.passes.call_block_bodies` moves the first block's traced nodes into a submodule (the body) before
discovery and makes that block and every leaf one call of it, so every pass sees one call per block and the
piecewise split compiles the body once. It first checks (`check_leaf`) that the leaf's
block is configured like the first (per submodule: class, plain attributes, the classes of the others, hooks, tensor layouts);
a block that is not, or a trace the marks make fail, runs again without the marks (logged). Two
models of one class (Wan 2.2's experts) still share one graph: the flag is a value, not an identity.

Measured (CPU, 30-block small Wan, Dynamo alone, first call, `bench.cold_start --variants
dynamo-trace,dynamo-trace-regions,dynamo-trace-leaves`): with the leaves' weights as graph inputs 2.6 s
against 6.7 s inline on torch 2.13, 3.6 against 6.6 s on 2.11; torch's `nested_compile_region`, used
here before, gave 3.7 s on 2.13 and 7.7 s on 2.11. Without the weights in the trace: see bench/NOTES.md.
The wrapper sits on the class only while a call runs, with one wrapper per class for
the process (Dynamo guards on it): other code using the class between calls (cache-dit's
block-pattern matching among it) sees the original. ``CACHEPASS_BLOCK_REGIONS=0`` turns it off.
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
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from cachepass.errors import CachepassError

log = logging.getLogger(__name__)

_LOCK = threading.RLock()
_ACTIVE: collections.Counter = collections.Counter()  # class -> calls in progress that marked it
_MARKED: dict[type, Callable] = {}  # class -> its wrapper (one per class and process)
_OWN: dict[type, Callable | None] = {}  # class -> the forward in its own __dict__ before the mark (None: inherited)
_ORIGINAL: dict[type, Callable] = {}  # class -> the forward the wrapper traces and the leaves run
_REFUSED: set[type] = set()  # classes whose marked trace failed: never marked again
_FIRST: dict[type, nn.Module] = {}  # class -> the block traced inline in the call in progress
_CLASSES: dict[str, type] = {}  # qualified name -> class, for the leaves' fake runs
_CALLING = threading.local()  # .models: this thread's calls in progress, innermost last (whose weights a call reads)
_PATH = "_cachepass_block_path"  # on every block of a marked list: its path in the model (a leaf's operand)
_INLINE = "_cachepass_traced_inline"  # on the first blocks during a call: a value the wrapper reads (equal in two
                                      # models, so that their calls share one graph; an identity would not be)
_OUTPUTS: dict[str, tuple] = {}  # leaf input signature -> its outputs' layout and fake mode (the calls in progress)
_FIRST_CONFIGURATION: dict[type, tuple] = {}  # class -> `_configuration` of its first block (calls in progress)
_ENTERED: dict[tuple, tuple] = {}  # (qualified class name, fake mode) -> its first block's flat arguments and input
                                   # storages, from `enter` to `leave` on Dynamo's fake tensors


def enabled() -> bool:
    """On unless ``CACHEPASS_BLOCK_REGIONS=0``."""
    return os.environ.get("CACHEPASS_BLOCK_REGIONS", "1") != "0"


def block_lists(model: nn.Module, with_refused: bool = False) -> tuple[tuple[type, nn.ModuleList], ...]:
    """The model's outermost lists of two or more modules of one class (not torch's own), with that class: found once
    per compile (walking every module costs about 1 ms, too much for each call). Lists of a class whose marked trace
    failed are left out unless ``with_refused``."""
    found: list[tuple[type, nn.ModuleList]] = []
    inside: set[int] = set()  # modules within an item of a list already taken
    for path, module in model.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = {type(m) for m in module}
        cls = next(iter(classes))
        if len(classes) != 1 or cls.__module__.startswith("torch.") or next(module[0].parameters(), None) is None:
            continue
        inside.update(id(m) for item in module for m in item.modules())
        if with_refused or cls not in _REFUSED:
            _mark_paths(path, module)
            found.append((cls, module))
    return tuple(found)


def _mark_paths(path: str, blocks: nn.ModuleList) -> None:
    """Each block of ``blocks`` gets its path (it becomes a leaf), but a last block configured apart from the first
    (SD3's, built with ``context_pre_only``): it is traced inline, as the first is, so that its class is not refused
    for it (every block inline). Block discovery takes a list whose last block differs; one that differs elsewhere
    keeps its path, and its leaf's check (`check_leaf`) refuses the class."""
    last = blocks[len(blocks) - 1]
    for index, block in enumerate(blocks):
        block.__dict__[_PATH] = f"{path}.{index}"
    if _configuration(last) != _configuration(blocks[0]):
        del last.__dict__[_PATH]
        log.info("stepcache: %s.%d is configured apart from %s.0: traced inline, the blocks before it as leaves",
                 path, len(blocks) - 1, path)


def leaf_count(blocks: nn.ModuleList) -> int:
    """How many of ``blocks`` from the second on are leaves (`block_lists` gave them a path), before the first that
    is traced inline; a list's own program chains that many (`chain`)."""
    count = 0
    for block in list(blocks)[1:]:
        if _PATH not in block.__dict__:
            break
        count += 1
    return count


@contextlib.contextmanager
def marked(model: nn.Module, lists: tuple[tuple[type, nn.ModuleList], ...]) -> Iterator[None]:
    """The forwards of the classes of ``lists`` (`block_lists` of ``model``) are wrapped while the block runs: the
    first block of each list is traced inline, the others are leaves (reentrant, thread-safe)."""
    classes = tuple(dict.fromkeys(cls for cls, _ in lists))
    with _LOCK:
        flagged = [blocks[0] for _, blocks in lists if _INLINE not in blocks[0].__dict__]
        for block in flagged:
            block.__dict__[_INLINE] = True
        for cls, blocks in lists:
            _FIRST.setdefault(cls, blocks[0])
        # no call in progress: forget what the last call's trace recorded (autocast, a backend or the first block may
        # differ now)
        if not any(_ACTIVE.values()):
            _OUTPUTS.clear()
            _ENTERED.clear()
            _FIRST_CONFIGURATION.clear()
        _calling().append(model)
        for cls in classes:
            if _ACTIVE[cls] == 0:
                _install(cls)
            _ACTIVE[cls] += 1
    try:
        yield
    finally:
        with _LOCK:
            for block in flagged:
                del block.__dict__[_INLINE]
            _calling().pop()
            for cls in classes:
                _ACTIVE[cls] -= 1
                if _ACTIVE[cls] == 0:
                    _restore(cls)
                    _FIRST.pop(cls, None)


def current_model() -> nn.Module:
    """The model of this thread's innermost call in progress (a compiled graph with leaves reads its weights)."""
    models = _calling()
    if not models:
        raise CachepassError("a graph compiled with block leaves was called outside its model's compiled call (the "
                             "function cachepass.compile returned); call that instead")
    return models[-1]


def _calling() -> list[nn.Module]:
    if not hasattr(_CALLING, "models"):
        _CALLING.models = []
    return _CALLING.models


def refuse(lists: tuple[tuple[type, nn.ModuleList], ...], error: BaseException) -> None:
    """The marked trace failed: the lists' classes are traced inline from now on."""
    classes = tuple(dict.fromkeys(cls for cls, _ in lists))
    _REFUSED.update(classes)
    error = _leaf_error(error) or error
    log.info("stepcache: tracing %s once, the other blocks as leaves, failed (%s: %s); tracing every block inline "
             "instead (slower to compile, same result)", ", ".join(c.__name__ for c in classes), type(error).__name__,
             str(error).splitlines()[0] if str(error) else "")


class BlockLeafError(RuntimeError):
    """A block cannot be a leaf of the first block's body (another configuration or call): trace it inline."""


def caused_by_a_leaf(error: BaseException) -> bool:
    """Whether ``error`` (Dynamo's, the backend's or a pass's, through their chains) came from a block leaf."""
    return _leaf_error(error) is not None


def _leaf_error(error: BaseException | None) -> BlockLeafError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BlockLeafError):
            return error
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None


def check_leaf(path: str) -> None:
    """Raise `BlockLeafError` unless the block at ``path`` (in the model of the call in progress) is configured
    like the first block of its class, whose trace its leaf takes."""
    if not _calling():
        raise BlockLeafError(f"the block leaf at {path} was traced outside a call that marked it")
    try:
        block = _calling()[-1].get_submodule(path)
    except AttributeError as error:
        raise BlockLeafError(f"the block leaf at {path} is not a submodule of the model called: {error}") from error
    first = _FIRST.get(type(block))
    if first is None:
        raise BlockLeafError(f"the block at {path} has no first block of its class in this call")
    if first is block:
        return
    if type(block) not in _FIRST_CONFIGURATION:
        _FIRST_CONFIGURATION[type(block)] = _configuration(first)
    if _FIRST_CONFIGURATION[type(block)] != _configuration(block):
        raise BlockLeafError(f"{type(block).__name__} blocks differ in configuration ({path} from the first): each "
                             "is traced inline")


def enter(class_name: str, flat: list) -> list:
    """The first block's tensor arguments (``flat``: its arguments flattened), as the graph's record of where each is
    used and of the class whose leaves take its body (never run: the pass removes it). On Dynamo's fake tensors it
    also notes the call's signature, under which `leave` records the outputs for the leaves. Its fake outputs are
    ``empty_like`` the arguments (the layouts a clone has): a fake clone at a new shape's symbolic sizes cost 31-37 ms
    for Wan's five arguments, ``empty_like`` 14 ms (CPU)."""
    tensors = [v for v in flat if isinstance(v, torch.Tensor)]
    if tensors and all(isinstance(t, FakeTensor) for t in tensors):  # keyed by the trace's fake mode: one per trace
        _ENTERED[class_name, tensors[0].fake_mode] = (flat, {_storage(t) for t in tensors})
        return [torch.empty_like(v) for v in tensors]
    return [torch.clone(v) for v in tensors]


def leave(class_name: str, outputs):
    """The first block's outputs, as the graph's record of them (never run: the pass removes it). On Dynamo's fake
    tensors it records their layouts under the call's signature (noted by `enter`): a leaf called alike then takes
    new tensors of those layouts and does not run the block on fake tensors (at a new shape's symbolic sizes that
    run cost about 0.1 s of a 2.5 s recompile: CPU, 30-block small Wan)."""
    flat, spec = pytree.tree_flatten(outputs)
    if flat and all(isinstance(t, FakeTensor) for t in flat):
        mode = flat[0].fake_mode
        entered = _ENTERED.pop((class_name, mode), None)
        if entered is not None:  # its signature now: the trace may have equated sizes the inputs gave apart
            arguments, input_storages = entered
            _remember(_signature(_CLASSES[class_name], arguments), flat, spec, input_storages, mode)
    return pytree.tree_map_only(torch.Tensor, torch.clone, outputs)


def leaf(class_name: str, path: str, args: tuple, kwargs: dict):
    """The block at ``path`` (of the class ``class_name``) called with ``args`` and ``kwargs``. Under cachepass it
    runs only on Dynamo's fake tensors (the pass replaces the call by the first block's body, which `check_leaf`
    makes sure stands for this block), as the first block with fake weights, once per input signature: later fake
    calls of that signature get new outputs of the same layout. Given real tensors (a plain ``backend="eager"``
    trace) it runs the block at ``path`` of the model called."""
    cls = _CLASSES[class_name]
    block = _FIRST.get(cls)
    if block is None:
        raise BlockLeafError(f"a {cls.__name__} leaf ran outside a call that marked its class")
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not inputs or not all(isinstance(t, FakeTensor) for t in inputs):
        return _ORIGINAL[cls](current_model().get_submodule(path), *args, **kwargs)
    signature = _signature(cls, flat_arguments(args, kwargs))
    mode = inputs[0].fake_mode
    known = _OUTPUTS.get(signature)
    # of this trace's fake mode only: a trace Dynamo restarts within one call has a new one, and its symbolic sizes,
    # named as the last one's were, are other objects
    if known is not None and known[2] is mode:
        layouts, spec, _ = known
        return pytree.tree_unflatten([_new(layout) for layout in layouts], spec)
    weights = {name: mode.from_tensor(t, static_shapes=True) for name, t in (*block.named_parameters(), *block.named_buffers())}
    with _reparametrize_module(block, weights):
        outputs = _ORIGINAL[cls](block, *args, **kwargs)
    flat, spec = pytree.tree_flatten(outputs)
    _remember(signature, flat, spec, {_storage(t) for t in inputs}, mode)
    return outputs


def _signature(cls: type, flat: list) -> str:
    """A block call's key in `_OUTPUTS`: its class and its flattened arguments' layouts and constants, as the pass
    matches a leaf's arguments against the first block's (`flat_arguments`). A symbolic size is written as the trace's
    shape environment knows it now: sizes given as separate inputs (a block list's own program gets the tokens of
    the hidden states and of the rotary embedding apart) are one symbol once the first block's trace equated them."""
    return repr((cls, [_layout(v, _known) for v in flat]))


def _known(size):
    """``size`` (an int or a SymInt) with the equalities its shape environment has learned applied."""
    if isinstance(size, torch.SymInt) and size.node.shape_env is not None:
        return size.node.shape_env.replace(size.node.expr)
    return size


def _remember(signature: str, flat: list, spec, input_storages: set, mode) -> None:
    """The layouts of a block call's outputs, for the next calls of ``signature`` in the trace of the fake ``mode``;
    not where an output is no tensor, or aliases another or an input (new tensors of the layout would not)."""
    storages = [_storage(t) for t in flat if isinstance(t, torch.Tensor)]
    if len(storages) == len(flat) and len(set(storages)) == len(flat) and not input_storages & set(storages):
        _OUTPUTS[signature] = ([_layout(t) for t in flat], spec, mode)


def chain(class_name: str, list_path: str, count: int, fed: tuple, args: tuple, kwargs: dict) -> tuple:
    """Blocks 1 to ``count - 1`` of the list at ``list_path`` (of the class ``class_name``) called in turn, block 1
    with ``args`` and ``kwargs`` and each later one with them fed the outputs of the one before (`feed`); returns
    each block's return value, in order. One leaf for a whole list: a list's own program (``scope="blocks"``,
    `cachepass.block_scope.runner`) calls it after its first block, so Dynamo wraps, calls and guards none of the
    other blocks (each of which cost it a module wrap walking the block's weights, a module call and its hook guards).
    Each block runs as `leaf` does; the pass makes each one call of the first block's body."""
    returned = []
    args, kwargs = list(args), dict(kwargs)
    for index in range(1, count):
        out = leaf(class_name, f"{list_path}.{index}", tuple(args), dict(kwargs))
        returned.append(out)
        feed(fed, args, kwargs, out if isinstance(out, tuple) else (out,))
    return tuple(returned)


def feed(fed: tuple, args: list, kwargs: dict, outputs: tuple) -> None:
    """A block's ``args`` / ``kwargs`` -> the next block's, in place: ``fed`` pairs an argument (a position or a keyword)
    with the index of the block's output the next block gets there (`cachepass.block_scope.feeding.Feeding.fed`)."""
    for key, index in fed:
        if isinstance(key, int):
            args[key] = outputs[index]
        else:
            kwargs[key] = outputs[index]


def traced_inline(block: nn.Module) -> bool:
    """Whether ``block`` is the first block of a marked list during a call (`marked`): traced inline, the list's other
    blocks leaves."""
    return getattr(block, _INLINE, False)


def block_class_name(cls: type) -> str:
    """The name `enter`, `leave`, `leaf` and `chain` take a block class by."""
    return f"{cls.__module__}.{cls.__qualname__}"


for _fn in (enter, leave, leaf, chain):
    torch._dynamo.allow_in_graph(_fn)


def _install(cls: type) -> None:
    own = cls.__dict__.get("forward")
    _OWN[cls] = own
    if cls not in _MARKED:
        _ORIGINAL[cls] = original = own if own is not None else cls.forward
        name = block_class_name(cls)
        _CLASSES[name] = cls

        def forward(self, *args, **kwargs):
            if getattr(self, _INLINE, False):
                tensors = iter(enter(name, flat_arguments(args, kwargs)))
                args, kwargs = _with_tensors(args, tensors), _with_tensors(kwargs, tensors)
                return leave(name, original(self, *args, **kwargs))
            path = getattr(self, _PATH, None)  # None: a block of the class outside the marked lists
            return original(self, *args, **kwargs) if path is None else leaf(name, path, args, kwargs)

        forward.__name__ = forward.__qualname__ = f"{cls.__name__}.forward_as_block_region"
        _MARKED[cls] = forward
    cls.forward = _MARKED[cls]


def flat_arguments(args: tuple, kwargs: dict) -> list:
    """A block call's arguments flattened through tuples, lists and dicts (in order; the values ``enter`` records
    and the pass matches a leaf's against). Not torch's pytree: Dynamo would guard the traced call on the size of
    pytree's registry, and a library registering a type after the first call would make every model recompile."""
    def flat(value) -> list:
        if isinstance(value, (tuple, list)):
            return [leaf for item in value for leaf in flat(item)]
        if isinstance(value, dict):
            return [leaf for item in value.values() for leaf in flat(item)]
        return [value]

    return flat((args, kwargs))


def _with_tensors(value, tensors: Iterator):
    """``value`` with its tensors (in `flat_arguments` order) replaced by the next of ``tensors``."""
    if isinstance(value, tuple):
        items = [_with_tensors(item, tensors) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_with_tensors(item, tensors) for item in value]
    if isinstance(value, dict):
        return {key: _with_tensors(item, tensors) for key, item in value.items()}
    return next(tensors) if isinstance(value, torch.Tensor) else value


def _restore(cls: type) -> None:
    own = _OWN.pop(cls)
    if own is not None:
        cls.forward = own
    else:
        del cls.forward


def _configuration(block: nn.Module) -> tuple:
    """What makes two blocks of one class trace alike: per submodule its class, its plain attributes (the classes of
    the others, such as an attention processor), its hooks (the block's own run around its call, traced apart from
    its body) and an instance ``forward``; per tensor its name, shape, dtype and device."""
    plain = (bool, int, float, str, type(None))

    def attributes(m: nn.Module) -> list:
        return sorted((k, v if isinstance(v, plain) else type(v).__qualname__) for k, v in vars(m).items()
                      if not k.startswith("_") or k == "forward")

    def hooks(m: nn.Module) -> tuple:
        return tuple(len(getattr(m, k, None) or ()) for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))

    # the block's own hooks run around its call, which Dynamo traces for a leaf as for the first block
    return tuple((path, type(m), attributes(m), hooks(m) if path else (),
                  [(n, _layout(t)) for n, t in (*m._parameters.items(), *m._buffers.items()) if t is not None])
                 for path, m in block.named_modules())


def _layout(value, size=lambda s: s) -> tuple | object:
    if not isinstance(value, torch.Tensor):
        return value
    return (tuple(map(size, value.shape)), tuple(map(size, value.stride())), value.dtype, value.device,
            size(value.storage_offset()))


def _new(layout: tuple) -> torch.Tensor:
    shape, stride, dtype, device, _ = layout
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _storage(value: torch.Tensor) -> int:
    return value.untyped_storage()._cdata

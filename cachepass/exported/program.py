"""The one-graph form as a module torch.export and the ONNX exporter can take.

`trace` runs the passes on Dynamo's graph of one call, as the backend does, and records where
each graph input comes from: a parameter or buffer of the model (by its name), or a tensor among
the call's arguments (by its path in them). Two modules run that graph:

- `StepCachedModule` is called as the model was (same positional and keyword arguments) and holds
  the cache state as buffers that the graph updates in place: what `cachepass.export` hands to
  ``torch.export`` (the updates become ``BUFFER_MUTATION`` outputs).
- `FunctionalStepCached` takes the call's tensors and the mutable state as explicit inputs and
  returns the outputs followed by the new state: what ONNX gets (`cachepass.exported.onnx`), because an
  exporter turns buffers into constants and an update of a constant is lost.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch._dynamo import source as dynamo_source
from torch.utils import _pytree as pytree

from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError, UnsupportedGraphError
from cachepass.options import coerce_config
from cachepass.pipeline import copy_graph_module, rewrite
from cachepass.state.layout import StateLayout, TensorSpec, mismatch_messages
from cachepass.state.runtime import read_stats


@dataclasses.dataclass(frozen=True)
class InputRef:
    """Where one graph input comes from: ``("model", "blocks.0.attn.weight")`` or ``("call", path)``.

    A call path starts at the call's ``args`` tuple or ``kwargs`` dict, then goes by item keys or
    indices and ``(".", attribute)`` pairs: ``("kwargs", "hidden_states")``, ``("args", 0)``.
    """

    kind: str
    name: str | tuple
    label: str = ""  # the call input's name in an exported file: encoder_hidden_states, added_cond_kwargs.text_embeds


@dataclasses.dataclass
class Traced:
    graph: fx.GraphModule  # the rewritten one-graph form: (*graph inputs, *state) -> outputs
    inputs: list[InputRef]
    layout: StateLayout
    output_spec: Any  # pytree spec of the model's output: the graph returns its tensors, flattened


@dataclasses.dataclass
class Captured:
    graph: fx.GraphModule  # a copy of Dynamo's graph, free to rewrite
    inputs: list[InputRef] | UnsupportedGraphError  # where each graph input comes from, or why one can't be named
    outputs: Any  # what the call returned


def capture(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    """Dynamo's graph of ``model(*args, **kwargs)`` (fullgraph, static shapes), as a backend sees it.

    The call runs once, eagerly, from a code object of its own (`_fresh_call`).
    """
    owned = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
    positional = _positional_names(model)
    captured: list[Captured] = []

    def backend(gm: fx.GraphModule, example_inputs):
        try:
            refs = [_input_ref(node, owned, positional) for node in gm.graph.nodes if node.op == "placeholder"]
        except UnsupportedGraphError as error:  # the exporter raises it, not Dynamo's wrapper; explain needs none
            refs = error
        captured.append(Captured(copy_graph_module(gm), refs, None))
        return gm.forward

    with torch.no_grad():
        outputs = torch.compile(_fresh_call(model), backend=backend, fullgraph=True, dynamic=False)(*args, **kwargs)
    if not captured:
        raise CachepassError("Dynamo produced no graph for this call")
    return dataclasses.replace(captured[-1], outputs=outputs)


def trace(model: nn.Module, config: Any, args: tuple, kwargs: dict, narrow: bool = False) -> Traced:
    """Dynamo's graph of ``model(*args, **kwargs)`` with the cache passes applied, and its input sources.

    ``narrow``: 32-bit state and decision arithmetic (see `StateLayout`).
    """
    config = coerce_config(config)
    captured = capture(model, args, kwargs)
    if isinstance(captured.inputs, UnsupportedGraphError):
        raise captured.inputs
    rewritten = rewrite(captured.graph, config, narrow=narrow)
    gm, layout = rewritten.graph, rewritten.layout
    outputs = captured.outputs
    leaves, spec = pytree.tree_flatten(outputs)
    returned = gm.graph.output_node().args[0]
    if len(leaves) != len(returned) or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise UnsupportedGraphError(f"the model returns {len(leaves)} value(s) ({type(outputs).__name__}) but its "
                                    f"graph returns {len(returned)} tensor(s); export needs an output of tensors only")
    return Traced(gm, captured.inputs, layout, spec)


def _fresh_call(model: nn.Module):
    """``model(*args, **kwargs)`` as a method of ``model`` with a code object of its own.

    Dynamo keys its cache on the code object it starts from: every trace then starts clean, adds
    nothing to the model's own cache (or its recompile limit), and its entry dies with the function.
    The model is the frame's ``self``, as when Dynamo traces ``model.forward`` (module paths read
    ``L['self'].blocks.0``); call inputs read ``L['args'][i]`` and ``L['kwargs'][name]``.
    """
    def call(self, *args, **kwargs):
        return self(*args, **kwargs)

    call.__code__ = call.__code__.replace()
    return types.MethodType(call, model)


def _positional_names(model: nn.Module) -> list[str]:
    """Names of ``model.forward``'s positional parameters, to name positional call inputs in exported files."""
    return [p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def _input_ref(node: fx.Node, owned: dict[int, str], positional: list[str]) -> InputRef:
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        raise UnsupportedGraphError(f"graph input {node.name} has no Dynamo source; it cannot be exported")
    example = grapharg.example
    if id(example) in owned:
        return InputRef("model", owned[id(example)], owned[id(example)])
    path = _call_path(grapharg.source)  # ("args", i, ...) or ("kwargs", name, ...)
    if path is None or path[0] not in ("args", "kwargs"):
        raise UnsupportedGraphError(
            f"graph input {node.name} comes from {_source_name(grapharg.source)}; export takes tensors that are parameters or "
            "buffers of the model, or found in the call's arguments by key, index or attribute"
        )
    head = path[1]
    if path[0] == "args":
        head = positional[head] if head < len(positional) else f"args.{head}"
    return InputRef("call", path, ".".join(str(p) for p in (head, *path[2:]) if p != "."))


def _source_name(source: Any) -> str:
    name = source.name  # a method before torch 2.12, a property since
    return name() if callable(name) else name


def _call_path(source: Any) -> tuple | None:
    """The path of ``source`` from a local of the traced frame (None: it does not start at one)."""
    if isinstance(source, dynamo_source.LocalSource):
        return (source.local_name,)
    if isinstance(source, (dynamo_source.GetItemSource, dynamo_source.DictGetItemSource,
                           dynamo_source.ListGetItemSource)) and isinstance(source.index, (str, int)):
        base = _call_path(source.base)
        return None if base is None else (*base, source.index)
    if isinstance(source, dynamo_source.AttrSource):
        base = _call_path(source.base)
        return None if base is None else (*base, ".", source.member)
    return None


def _follow(value: Any, path: tuple) -> Any:
    steps = iter(path)
    for step in steps:
        value = getattr(value, next(steps)) if step == "." else value[step]
    return value


def _register_state(owner: nn.Module, specs: list[TensorSpec], device: torch.device) -> None:
    for spec in specs:
        owner.register_buffer(state_name(spec.name), spec.allocate(device))


def state_name(spec_name: str) -> str:
    """A state tensor's buffer name: ``u0.cached_flags`` -> ``u0_cached_flags`` (buffer names take no dots)."""
    return spec_name.replace(".", "_")


class _RunsTraced(nn.Module):
    """Runs a traced graph with the model's own weights and buffers."""

    def __init__(self, model: nn.Module, traced: Traced):
        super().__init__()
        self.model = model
        self.graph = traced.graph
        self.inputs = traced.inputs
        self.layout = traced.layout

    def _run(self, call_values: Iterator[torch.Tensor], state: list[torch.Tensor]) -> tuple:
        """The graph on the model's tensors, the call's tensors (in graph-input order) and the state."""
        inputs = [_model_tensor(self.model, ref.name) if ref.kind == "model" else next(call_values) for ref in self.inputs]
        return tuple(self.graph(*inputs, *state))


class StepCachedModule(_RunsTraced):
    """``model`` with DBCache step caching in its graph; the state lives in the ``stepcache_state`` buffers.

    Called like ``model`` was when traced (the same positional and keyword arguments), returns what
    it returns. Shapes are those of the trace.
    """

    def __init__(self, model: nn.Module, traced: Traced):
        super().__init__(model, traced)
        self.output_spec = traced.output_spec
        self.stepcache_state = nn.Module()
        _register_state(self.stepcache_state, traced.layout.specs, traced.layout.units[0].hidden.device)

    def forward(self, *args, **kwargs):
        call_values = iter(call_tensors(self.inputs, args, kwargs))
        state = [getattr(self.stepcache_state, state_name(s.name)) for s in self.layout.specs]
        return pytree.tree_unflatten(list(self._run(call_values, state)), self.output_spec)


def _is_parameter(model: nn.Module, name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(module)._parameters


class FunctionalStepCached(_RunsTraced):
    """The graph with its mutable state as explicit inputs and outputs.

    ``forward(*call_inputs, *state)`` returns ``(*outputs, *new_state)``: ``call_inputs`` are the
    call's tensors in `call_inputs` order, ``state`` the mutable state tensors in `state_specs`
    order. Weights and the constant schedule tables are parameters and buffers (ONNX initializers).
    """

    def __init__(self, model: nn.Module, traced: Traced):
        super().__init__(model, traced)
        self.call_inputs = [ref for ref in traced.inputs if ref.kind == "call"]
        self.state_specs = [s for s in traced.layout.specs if s.values is None]  # schedule tables are constants
        self.constants = nn.Module()
        _register_state(self.constants, [s for s in traced.layout.specs if s.values is not None],
                        traced.layout.units[0].hidden.device)

    def forward(self, *flat):
        mutable = {s.name: t.clone() for s, t in zip(self.state_specs, flat[len(self.call_inputs):])}
        state = [mutable[s.name] if s.name in mutable else getattr(self.constants, state_name(s.name))
                 for s in self.layout.specs]
        outputs = self._run(iter(flat[:len(self.call_inputs)]), state)
        return (*outputs, *(mutable[s.name] for s in self.state_specs))


def _model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)


def call_tensors(traced_inputs: list[InputRef], args: tuple, kwargs: dict) -> list:
    """The call's tensors a `FunctionalStepCached` takes, picked out of ``model(*args, **kwargs)``'s arguments."""
    bound = {"args": args, "kwargs": kwargs}
    return [_follow(bound, ref.name) for ref in traced_inputs if ref.kind == "call"]


def export(model: nn.Module, config: StepCacheConfig | Any, *example_args, **example_kwargs):
    """``model`` with step caching as a ``torch.export.ExportedProgram`` (one ``cond`` per cache unit).

    The cache state is buffers under ``stepcache_state.``; the program updates them in place. Call
    ``program.module()(*args, **kwargs)`` once per transformer call of the denoising loop, as the
    compiled model is called; it returns what the model returns. Each ``program.module()`` has a
    fresh cache state of its own; ``cachepass.stats`` / ``reset`` take it. Shapes are static (those
    of the example). Save and load with ``torch.export.save`` and `load`.
    """
    traced = trace(model, config, example_args, example_kwargs)
    wrapper = StepCachedModule(model, traced).eval()
    with torch.no_grad():
        program = torch.export.export(wrapper, example_args, example_kwargs, strict=False)
    summary = _layout_summary(traced.layout) | {"call_options": _call_options(model, example_kwargs)}
    first_op = next(n for n in program.graph.nodes if n.op == "call_function")  # serialized with its metadata
    first_op.meta.setdefault("custom", {})[STATE_META] = summary
    return _own_state_per_module(program)


def _call_options(model: nn.Module, kwargs: dict) -> dict:
    """The call's non-tensor keyword arguments at export (``return_dict=False``) and the forward's defaults
    for the others: a call may leave them out, or give them, as it gave the model."""
    defaults = {
        p.name: p.default
        for p in inspect.signature(model.forward).parameters.values()
        if p.default is not inspect.Parameter.empty and isinstance(p.default, (bool, int, float, str, type(None)))
    }
    given = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}
    return {"exported": given, "defaults": defaults}


STATE_META = "stepcache_state"  # key in the first op's ``meta["custom"]`` (saved with the program): the state layout


def _layout_summary(layout: StateLayout) -> dict:
    return {"units": [[u.index, u.name] for u in layout.units], "streams": layout.config.num_streams,
            "capacity": layout.capacity, "num_inference_steps": layout.config.num_inference_steps}


def _own_state_per_module(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Make ``program.module()`` give each module a copy of the program's (fresh) state.

    ``ExportedProgram.module()`` hands every module the program's own state tensors: two modules
    would share one cache, and a new module would continue where the last one stopped.
    """
    fresh = {name: value.clone() for name, value in [*program.state_dict.items(), *program.constants.items()]
             if name.startswith("stepcache_state.") and isinstance(value, torch.Tensor)}
    unlift = type(program).module

    def module(self, *args, **kwargs):
        built = unlift(self, *args, **kwargs)
        state = built.get_submodule("stepcache_state")
        for name, value in fresh.items():
            setattr(state, name.removeprefix("stepcache_state."), value.clone())
        options = (_summary(built) or {}).get("call_options")
        if options is not None:
            _accept_call_options(built, options)
        return built

    program.module = types.MethodType(module, program)
    return program


def _summary(module: fx.GraphModule) -> dict | None:
    return next((n.meta["custom"][STATE_META] for n in module.graph.nodes if STATE_META in n.meta.get("custom", {})),
                None)


def _accept_call_options(module: nn.Module, options: dict) -> None:
    """Let ``module`` be called as the model was: non-tensor keyword arguments given as at export, or at the
    forward's default, are taken (the program was specialised to them); ``return_dict`` may differ (the
    output is converted to a tuple, or a tuple is refused with the fix); any other difference is an error."""
    exported, defaults = options["exported"], options["defaults"]
    current = {}  # what the call in progress asked for

    def before(_, args, kwargs):
        wanted = {"return_dict": kwargs.get("return_dict", defaults.get("return_dict"))}
        if wanted["return_dict"] and exported.get("return_dict") is False:
            raise CachepassError("this module was exported with return_dict=False and returns a tuple; call it with "
                                 "return_dict=False, or export it with return_dict=True")
        for name in exported.keys() - kwargs.keys():  # left at the forward's default
            if exported[name] != defaults.get(name, exported[name]) and name != "return_dict":
                raise CachepassError(f"this module was exported with {name}={exported[name]!r} and is called without "
                                     f"it (default {defaults[name]!r}): export again with the arguments the model is "
                                     "called with")
            kwargs[name] = exported[name]
        for name in [k for k, v in kwargs.items() if not isinstance(v, torch.Tensor)]:
            value = kwargs[name]
            expected = exported.get(name, defaults.get(name, _MISSING))
            if name == "return_dict" or value == expected:
                if name not in exported:
                    kwargs.pop(name)
                else:
                    kwargs[name] = exported[name]
                continue
            raise CachepassError(f"this module was exported with {name}={expected!r} and is called with "
                                 f"{name}={value!r}: "
                                 "export again with the arguments the model is called with"
                                 if expected is not _MISSING else
                                 f"this module was exported without {name}; export again with the arguments "
                                 "the model is called with")
        current.update(wanted)
        return args, kwargs

    def after(_, args, kwargs, output):
        return output.to_tuple() if current["return_dict"] is False and hasattr(output, "to_tuple") else output

    module.register_forward_pre_hook(before, with_kwargs=True, prepend=True)  # before the export's input check
    module.register_forward_hook(after, with_kwargs=True)


_MISSING = object()


class ExportedState:
    """The cache state of a module made by ``program.module()`` of an exported program (stats, reset)."""

    def __init__(self, module: nn.Module):
        summary = _summary(module)
        if summary is None:
            raise CachepassError(f"{type(module).__name__} has stepcache_state buffers but no state layout: export it "
                                 "again with cachepass.export (and load it with cachepass.load_exported)")
        self.state, self.summary = module.get_submodule("stepcache_state"), summary

    @staticmethod
    def of(module: Any) -> "ExportedState | None":
        """The exported module's state, or None if ``module`` is not a module of an exported program."""
        if not isinstance(module, fx.GraphModule) or not hasattr(module, "stepcache_state"):
            return None
        return ExportedState(module)

    def read(self, name: str) -> torch.Tensor:
        return getattr(self.state, state_name(name))

    def stats(self) -> list:
        warnings = list(mismatch_messages(self.read("clock.report").tolist(), self.summary["num_inference_steps"]).values())
        return read_stats(self.read, [tuple(u) for u in self.summary["units"]], self.summary["streams"],
                          self.summary["capacity"], warnings)

    def reset(self) -> None:
        self.read("clock.calls").zero_()


def load(path) -> torch.export.ExportedProgram:
    """``torch.export.load``, with each state buffer copied into memory it owns.

    torch 2.11's loader builds CPU tensors over immutable ``bytes``: a 1-byte bool buffer then
    aliases CPython's cached ``b'\\x00'``, and the first in-place state update corrupts that object
    for the whole process (fixed in 2.13). The copies make the state safe to update.
    """
    program = torch.export.load(path)
    for name, value in list(program.state_dict.items()):
        if name.startswith("stepcache_state."):
            program.state_dict[name] = value.clone()
    for name, value in list(program.constants.items()):
        if name.startswith("stepcache_state.") and isinstance(value, torch.Tensor):
            program.constants[name] = value.clone()
    _own_state_per_module(program)
    return program

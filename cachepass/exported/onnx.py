"""A step-cached model as ONNX: one ``If`` per cache unit, the cache state as explicit inputs and outputs.

    cachepass.export_onnx(model, config, "wan.onnx", **example_kwargs)
    session = cachepass.exported.onnx.Session("wan.onnx")          # onnxruntime; owns the state between calls
    velocity = session(hidden_states=x, timestep=t, encoder_hidden_states=text)[0]

State kept in buffers would become constant initializers and every update would be lost (the model
would never cache), so the exported graph takes the mutable state as inputs named ``state.<name>``
and returns the updated state as outputs named ``new_state.<name>``, after the model's outputs
(``output.<i>``). `Session` feeds each call's new state into the next call. Weights and the
constant schedule tables are initializers (external data when the file would pass protobuf's 2 GB).
The layout of the state is stored in the file's metadata (key ``cachepass``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from torch import nn

from cachepass.errors import CachepassError
from cachepass.exported.program import FunctionalStepCached, call_tensors, trace

log = logging.getLogger(__name__)

OPSET = 20  # the newest opset TensorRT 10.0-10.1 parse (9 to 20; `cachepass.exported.tensorrt.MAX_OPSET`)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file (protobuf's limit is 2 GB)


def export_onnx(model: nn.Module, config: Any, path: str | os.PathLike, *example_args, trt_compatible: bool = False,
                **example_kwargs) -> str:
    """Export ``model`` with step caching to ONNX at ``path``; returns the path.

    One ``If`` per cache unit; static shapes (the example's); opset `OPSET`. The file passes
    ``onnx.checker``'s full check. Run it with `Session`. ``trt_compatible``: the decision and the
    state in float32 and int32 (TensorRT supports DOUBLE only by casting it down); check the file
    with `cachepass.exported.tensorrt.problems`.
    """
    import onnx

    path = _writable(path)
    _refuse_bfloat16_convolutions(model)
    traced = trace(model, config, example_args, example_kwargs, narrow=trt_compatible)
    wrapper = FunctionalStepCached(model, traced).eval()
    device = traced.layout.units[0].hidden.device
    call = call_tensors(traced.inputs, example_args, example_kwargs)
    state = [spec.allocate(device) for spec in wrapper.state_specs]
    input_names = [ref.label for ref in wrapper.call_inputs] + [f"state.{s.name}" for s in wrapper.state_specs]
    outputs = len(traced.graph.graph.output_node().args[0])
    output_names = [f"output.{i}" for i in range(outputs)] + [f"new_state.{s.name}" for s in wrapper.state_specs]
    try:
        with torch.no_grad():
            program = torch.onnx.export(wrapper, tuple(call + state), dynamo=True, opset_version=OPSET,
                                        input_names=input_names, output_names=output_names, optimize=True,
                                        verbose=False)
    except Exception as error:  # the exporter's own message names the node; lead with it
        node = next((line.strip() for line in str(error).splitlines() if "Error when translating node" in line),
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise CachepassError(f"ONNX export failed: {node}{_bfloat16_hint(model)}") from error
    proto = program.model_proto
    rewritten = replace_bool_where(proto)
    if rewritten:
        log.info("stepcache: ONNX: %d bool Where node(s) written as And/Or/Not (onnxruntime has no bool Where)",
                 rewritten)
    _require_state_as_io(proto, wrapper)
    metadata = {"inputs": input_names[:len(wrapper.call_inputs)], "outputs": outputs,
                "state": [_spec_json(s) for s in wrapper.state_specs],
                "units": [u.name for u in traced.layout.units],
                "streams": traced.layout.config.num_streams, "capacity": traced.layout.capacity}
    onnx.helper.set_model_props(proto, {"cachepass": json.dumps(metadata)})
    large = sum(t.numel() * t.element_size() for t in model.parameters()) > EXTERNAL_DATA_BYTES
    data = os.path.basename(path) + ".data"
    onnx.save_model(proto, path, save_as_external_data=large, location=data)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as error:  # leave no invalid file behind
        for written in (path, os.path.join(os.path.dirname(path), data)):
            if os.path.exists(written):
                os.remove(written)
        raise CachepassError(f"the exported ONNX model is invalid ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}); no file was written"
                             f"{_bfloat16_hint(model)}") from error
    return path


def _writable(path: str | os.PathLike) -> str:
    """``path`` as a string, once its folder is known to exist and be writable (before the long export)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CachepassError(f"export_onnx path {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CachepassError(f"export_onnx path {path!r} is not writable")
    return path


def _bfloat16_hint(model: nn.Module) -> str:
    if not any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return ""
    return (". The model is bfloat16, which ONNX opset 20 does not take everywhere (Conv has no bfloat16): export "
            "it in float16 (model.half()), or in float32 and let TensorRT build a bf16/fp16 engine from it "
            "(its precision flags)")


def _refuse_bfloat16_convolutions(model: nn.Module) -> None:
    conv = next((name for name, m in model.named_modules()
                 if isinstance(m, nn.modules.conv._ConvNd) and m.weight.dtype == torch.bfloat16), None)
    if conv is not None:
        raise CachepassError(f"export_onnx: {conv} is a bfloat16 convolution{_bfloat16_hint(model)}")


def _spec_json(spec) -> dict:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": str(spec.dtype).removeprefix("torch."),
            "fill": spec.fill}


def _require_state_as_io(proto, wrapper: FunctionalStepCached) -> None:
    """Every mutable state tensor must be a graph input and output, never an initializer (a constant)."""
    inputs = {i.name for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    missing = [s.name for s in wrapper.state_specs
               if f"state.{s.name}" not in inputs or f"new_state.{s.name}" not in outputs]
    if missing:
        raise CachepassError(f"ONNX export lost the state as inputs/outputs for {missing}: the exported model "
                             "would never update its cache state")


def replace_bool_where(proto) -> int:
    """``Where(c, x, y)`` on bool ``x``/``y`` -> ``Or(And(c, x), And(Not(c), y))``, in every subgraph.

    onnxruntime implements ``Where`` for numeric types and strings only. Returns the count replaced.
    """
    import onnx

    bool_values = {name for name, (elem, _) in value_types(proto).items() if elem == onnx.TensorProto.BOOL}
    count = 0
    for graph in subgraphs(proto.graph):
        nodes = []
        for node in graph.node:
            if node.op_type == "Where" and node.input[1] in bool_values and node.input[2] in bool_values:
                c, x, y = node.input
                base = f"{node.name or node.output[0]}_bool_where"
                nodes += [onnx.helper.make_node("And", [c, x], [f"{base}_if_true"]),
                          onnx.helper.make_node("Not", [c], [f"{base}_not"]),
                          onnx.helper.make_node("And", [f"{base}_not", y], [f"{base}_if_false"]),
                          onnx.helper.make_node("Or", [f"{base}_if_true", f"{base}_if_false"], list(node.output))]
                count += 1
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def value_types(proto) -> dict[str, tuple[int, int | None]]:
    """name -> (element type, rank) of every value in ``proto``'s graph and subgraphs, as shape inference finds them."""
    import onnx

    found = {}
    for graph in subgraphs(onnx.shape_inference.infer_shapes(proto).graph):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            tensor = value.type.tensor_type
            found[value.name] = (tensor.elem_type, len(tensor.shape.dim) if tensor.HasField("shape") else None)
        for init in graph.initializer:
            found[init.name] = (init.data_type, len(init.dims))
    return found


def subgraphs(graph):
    """``graph`` and every subgraph in its nodes' attributes (the branches of each ``If``), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node:
                yield from subgraphs(attribute.g)
            for sub in attribute.graphs:
                yield from subgraphs(sub)


class Session:
    """An exported step-cached model under onnxruntime, with its cache state.

    Call it once per transformer call of the denoising loop, with the model's tensor inputs by name
    (`input_names`); it returns the model's outputs (torch tensors when given torch tensors). The
    state starts fresh; the graph starts a new generation by itself when the timestep goes up again,
    and `reset` forces one at the next call. `cached_steps` reads, per cache unit and CFG stream,
    the steps the current generation cached.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise CachepassError("cachepass.exported.onnx.Session needs onnxruntime: pip install onnxruntime") from None
        self.session = onnxruntime.InferenceSession(os.fspath(path), providers=providers or ["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map.get("cachepass")
        if metadata is None:
            raise CachepassError(f"{path} was not written by cachepass.export_onnx (no 'cachepass' metadata)")
        self.metadata = json.loads(metadata)
        self.input_names: list[str] = self.metadata["inputs"]
        self.input_types = {i.name: (i.type, i.shape) for i in self.session.get_inputs()}
        self.state = {s["name"]: _fresh(s) for s in self.metadata["state"]}

    def __call__(self, **inputs) -> list:
        unknown = sorted(set(inputs) - set(self.input_names))
        missing = [n for n in self.input_names if n not in inputs]
        if unknown or missing:
            raise TypeError(f"Session takes the inputs {self.input_names}; got unknown {unknown}, missing {missing}")
        as_torch = any(isinstance(v, torch.Tensor) for v in inputs.values())
        feed = {name: _numpy(name, inputs[name], *self.input_types[name]) for name in self.input_names}
        feed.update({f"state.{name}": value for name, value in self.state.items()})
        results = self.session.run(None, feed)
        outputs, new_state = results[:self.metadata["outputs"]], results[self.metadata["outputs"]:]
        self.state = dict(zip(self.state, new_state))
        return [torch.from_numpy(o) for o in outputs] if as_torch else outputs

    def reset(self) -> None:
        """The next call starts a new generation at step 0 (before the first call: nothing to do)."""
        import numpy as np

        self.state["clock.calls"] = np.zeros_like(self.state["clock.calls"])

    def cached_steps(self) -> list[list[list[int]]]:
        """Per cache unit, per CFG stream: the steps of the current (or last) generation that were cached."""
        if int(self.state["clock.calls"]) == 0:
            return [[[] for _ in range(self.metadata["streams"])] for _ in self.metadata["units"]]
        capacity = self.metadata["capacity"]
        return [[[t for t in range(capacity) if flags[t]] for flags in self.state[f"u{i}.cached_flags"]]
                for i in range(len(self.metadata["units"]))]


def _fresh(spec: dict):
    import numpy as np

    try:
        dtype = np.dtype(spec["dtype"])
    except TypeError:
        raise CachepassError(f"state {spec['name']} is {spec['dtype']}, which numpy (and so this Session) cannot hold: "
                             "export the model in float32 or float16 for onnxruntime") from None
    return np.full(spec["shape"], spec["fill"], dtype=dtype)


_ONNX_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(uint8)": "uint8",
               "tensor(int8)": "int8", "tensor(bfloat16)": "bfloat16"}


def _numpy(name: str, value: Any, onnx_type: str, shape: list):
    """``value`` (a tensor, an array, or a Python number for a one-element input) as the array the input takes."""
    import numpy as np

    dtype = _ONNX_TYPES.get(onnx_type, onnx_type)
    expected = f"{dtype}{list(shape)}"
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise CachepassError(
                f"Session input {name!r} is a bfloat16 tensor; numpy (and so onnxruntime's Python "
                f"API) "
                f"has no bfloat16. The file takes {expected}: pass .to(torch.{dtype})"
                if dtype != "bfloat16"
                else f"Session input {name!r}: this file takes bfloat16, which numpy cannot hold; "
                "export the model in float32 or float16 for onnxruntime"
            )
        value = value.detach().cpu().numpy()
    elif isinstance(value, (bool, int, float, np.generic)) and dtype != "bfloat16":
        if math.prod(d if isinstance(d, int) else 1 for d in shape) != 1:
            raise TypeError(f"Session input {name!r} takes {expected}; got the number {value!r}")
        value = np.full([d if isinstance(d, int) else 1 for d in shape], value, dtype=dtype)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"Session input {name!r} takes a tensor or array of {expected}; got {type(value).__name__}")
    if str(value.dtype) != dtype or list(value.shape) != [d if isinstance(d, int) else value.shape[i]
                                                           for i, d in enumerate(shape)][:value.ndim] \
            or value.ndim != len(shape):
        raise TypeError(f"Session input {name!r} takes {expected} (the exported shapes are static); "
                        f"got {value.dtype}{list(value.shape)}")
    return value


"""TensorRT: what its ONNX parser needs from an exported step-cached model, checked without TensorRT.

TensorRT cannot be installed on the machines this project is built on, so the path to it is proven
structurally: `problems` checks an ONNX file from `cachepass.export_onnx` against ONNX-TensorRT 10's
operator matrix (operators and the input types each takes) and against what its ``If`` requires (a
bool scalar condition; branches with the same number of outputs, each pair of the same rank and
type, and different names). Build an engine from a file with no problems with ``trtexec`` or the
TensorRT Python builder (README, "TensorRT").
"""

from __future__ import annotations

import os
from typing import Any

from cachepass.exported.onnx import subgraphs, value_types

MAX_OPSET = 20  # TensorRT 10.0-10.1 parse opsets 9 to 20

# ONNX-TensorRT 10.1 GA, docs/operators.md: supported operators, grouped by the input types they take.
_MATRIX: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (('BFLOAT16', 'FLOAT', 'FLOAT16'),
     ('Acos', 'Acosh', 'Asin', 'Asinh', 'Atan', 'Atanh', 'AveragePool', 'BatchNormalization', 'Ceil', 'Celu',
      'Clip', 'Conv', 'ConvTranspose', 'Cos', 'Cosh', 'CumSum', 'Dropout', 'Einsum', 'Elu', 'Erf', 'Exp',
      'Floor', 'GRU', 'Gemm', 'GlobalAveragePool', 'GlobalLpPool', 'GlobalMaxPool', 'GroupNormalization',
      'HardSigmoid', 'HardSwish', 'Hardmax', 'ImageScaler', 'InstanceNormalization', 'IsInf', 'LRN', 'LSTM',
      'LayerNormalization', 'LeakyRelu', 'Log', 'LogSoftmax', 'LpNormalization', 'LpPool', 'MatMul', 'MaxPool',
      'MeanVarianceNormalization', 'PRelu', 'ParametricSoftplus', 'Pow', 'QuantizeLinear', 'RNN',
      'RandomNormal', 'RandomNormalLike', 'RandomUniform', 'RandomUniformLike', 'Reciprocal', 'Resize', 'Round',
      'ScaledTanh', 'Scan', 'Selu', 'Sigmoid', 'Sin', 'Sinh', 'Softmax', 'Softplus', 'Softsign', 'Sqrt', 'Tan',
      'Tanh', 'ThresholdedRelu', 'Upsample')),
    (('BFLOAT16', 'FLOAT', 'FLOAT16', 'INT32', 'INT64'),
     ('Abs', 'Add', 'ArgMax', 'ArgMin', 'DepthToSpace', 'Div', 'Equal', 'Greater', 'GreaterOrEqual', 'IsNaN',
      'Less', 'LessOrEqual', 'Max', 'Min', 'Mod', 'Mul', 'Neg', 'Pad', 'Range', 'ReduceL1', 'ReduceL2',
      'ReduceLogSum', 'ReduceLogSumExp', 'ReduceMax', 'ReduceMean', 'ReduceMin', 'ReduceProd', 'ReduceSum',
      'ReduceSumSquare', 'Relu', 'Scatter', 'ScatterElements', 'ScatterND', 'Shrink', 'Sign', 'SpaceToDepth',
      'Sub', 'Sum', 'TopK')),
    (('BFLOAT16', 'BOOL', 'FLOAT', 'FLOAT16', 'INT32', 'INT64'),
     ('Concat', 'Constant', 'ConstantOfShape', 'Expand', 'EyeLike', 'Flatten', 'Gather', 'GatherElements',
      'GatherND', 'Identity', 'If', 'Loop', 'OneHot', 'Reshape', 'ReverseSequence', 'Shape', 'Size', 'Slice',
      'Split', 'Squeeze', 'Tile', 'Transpose', 'Trilu', 'Unsqueeze', 'Where')),
    (('FLOAT', 'FLOAT16'),
     ('DeformConv', 'GridSample', 'Mish', 'NonMaxSuppression', 'NonZero', 'RoiAlign')),
    (('BOOL',),
     ('And', 'Not', 'Or', 'Xor')),
    (('BFLOAT16', 'BOOL', 'FLOAT', 'FLOAT16', 'INT32', 'INT64', 'UINT8'),
     ('Cast', 'CastLike')),
    (('FLOAT8E4M3FN', 'INT4', 'INT8'),
     ('DequantizeLinear',)),
    (('BFLOAT16', 'FLOAT', 'FLOAT16', 'INT32', 'INT64', 'INT8'),
     ('Gelu',)),
    (('BFLOAT16', 'FLOAT', 'FLOAT16', 'FLOAT8E4M3FN', 'INT32', 'INT64'),
     ('Mean',)),
]
SUPPORTED: dict[str, frozenset[str]] = {op: frozenset(types) for types, ops in _MATRIX for op in ops}


def problems(model: Any) -> list[str]:
    """What keeps TensorRT's ONNX parser from taking ``model`` (an ``onnx.ModelProto`` or a path); [] if nothing."""
    import onnx

    proto = onnx.load(os.fspath(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model
    found = []
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > MAX_OPSET:
        found.append(f"opset {opset}: TensorRT 10 parses opsets up to {MAX_OPSET}")
    types = value_types(proto)
    for graph in subgraphs(proto.graph):
        for node in graph.node:
            found.extend(_node_problems(node, types))
    return list(dict.fromkeys(found))  # an input used twice by one node is one problem


def _node_problems(node, types: dict) -> list[str]:
    import onnx

    where = f"{node.op_type} node {node.name or node.output[0]}"
    if node.op_type not in SUPPORTED:
        return [f"{where}: {node.op_type} is not in TensorRT 10's ONNX operator matrix"]
    found = []
    for name in node.input:
        elem = types.get(name, (None, None))[0]
        if name and elem is not None and onnx.TensorProto.DataType.Name(elem) not in SUPPORTED[node.op_type]:
            found.append(f"{where}: input {name} is {onnx.TensorProto.DataType.Name(elem)}; TensorRT's {node.op_type} "
                         f"takes {sorted(SUPPORTED[node.op_type])}")
    if node.op_type == "If":
        found.extend(_if_problems(node, types, where))
    return found


def _if_problems(node, types: dict, where: str) -> list[str]:
    import onnx

    found = []
    elem, rank = types.get(node.input[0], (None, None))
    if elem != onnx.TensorProto.BOOL or rank != 0:
        found.append(f"{where}: the condition must be a bool scalar; it is "
                     f"{onnx.TensorProto.DataType.Name(elem) if elem else 'of unknown type'} of rank {rank}")
    branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
    then, other = branches["then_branch"].output, branches["else_branch"].output
    if len(then) != len(other):
        return [*found, f"{where}: the branches return {len(then)} and {len(other)} outputs"]
    for a, b in zip(then, other):
        if a.name == b.name:
            found.append(f"{where}: both branches name an output {a.name}; TensorRT needs different names")
        if types.get(a.name) != types.get(b.name):
            found.append(f"{where}: branch outputs {a.name} and {b.name} differ in type or rank "
                         f"({types.get(a.name)} vs {types.get(b.name)})")
    return found


def compile_exported(program: Any, inputs: list, **settings) -> Any:
    """torch-tensorrt's dynamo path on an exported program, imported lazily.

    It has no ``cond`` converter (torch-tensorrt <= 2.14; pytorch/TensorRT PR #4657 is open): each
    cache unit's cond and its branches stay in PyTorch, and the rest becomes engines. Its lifted
    mutable buffers are copied back without updating the program's own, so the cache state would
    freeze: pass a program whose state is explicit (`cachepass.exported.program.FunctionalStepCached`), not
    `cachepass.export`'s. Not run here: TensorRT cannot be installed on these machines.
    """
    try:
        import torch_tensorrt
    except ImportError as error:
        from cachepass.errors import CachepassError

        raise CachepassError(f"torch-tensorrt is not installed ({error}): pip install torch-tensorrt, for the CUDA "
                             "and torch versions you run; or build an engine from cachepass.export_onnx's file "
                             "with trtexec") from None
    return torch_tensorrt.dynamo.compile(program, inputs, **settings)

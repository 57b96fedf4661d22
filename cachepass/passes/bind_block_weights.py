"""Make each block body call name its weights (`cachepass.bound_weights.WeightRef`) instead of taking them as values.

The piecewise form only (the backend asks for it; the one-graph form, export and the eager reference
run the graph as it is, so they keep the weights as values). Runs after `call_block_bodies`: a call's
argument that is a graph input holding a parameter or buffer (a leaf weight's placeholder, or a
Dynamo input whose source is a module's parameter or buffer) becomes a `WeightRef` to that input.
The block's weights then stop being graph values everywhere after it: discovery, the outlined
middle region, the cond's operands and branches, the split, fake propagation and each program's
generated code carry the activations only (26 of the 30 values a 30-block Wan's block call took).
The placeholders stay: the executor reads the weights from the program's inputs at run time.
"""

from __future__ import annotations

import logging

from torch import fx

from cachepass.analysis.blocks import example_value
from cachepass.bound_weights import WeightRef
from cachepass.leaf_weights import weight_path
from cachepass.passes.call_block_bodies import BODY_PREFIX

log = logging.getLogger(__name__)


def bind_block_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """Each body call's weight inputs -> `WeightRef`s naming them."""
    refs: dict[fx.Node, WeightRef] = {}
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(BODY_PREFIX)]
    for call in calls:
        call.args = tuple(_ref(arg, refs) for arg in call.args)
    gm.graph.lint()
    gm.recompile()
    log.debug("bind_block_weights: %d body call(s) name %d weight input(s)", len(calls), len(refs))
    return gm


def _ref(arg, refs: dict[fx.Node, WeightRef]):
    if not _is_weight(arg):
        return arg
    if arg not in refs:
        refs[arg] = WeightRef(arg.name, example_value(arg))
    return refs[arg]


def _is_weight(arg) -> bool:
    if not isinstance(arg, fx.Node) or arg.op != "placeholder":
        return False
    path = weight_path(arg)
    return path is not None and ("._parameters." in path or "._buffers." in path) and example_value(arg) is not None

"""Autocast around or inside a compiled model: each chipmunk op sees its inputs in the dtype the ops
it replaces would have computed in.

Under `torch.autocast`, linear, matmul and scaled_dot_product_attention compute in the autocast dtype
whatever their inputs are (fp32 weights, an fp32 norm or rotary output). The chipmunk ops are custom
ops, which autocast passes through untouched, so fp32 weights met bf16 activations inside them (a
dtype error in the MLP's first GEMM). The rewrite therefore casts every floating input of a site to
the autocast dtype in effect where the site stood in the graph: the state Dynamo traced the graph
under (it guards on it, so the graph runs only under that state) and the graph's own
`_enter_autocast` / `_exit_autocast` regions (`with torch.autocast(...)` inside the forward). The
ops then run with autocast off (`disabled_inside`): their fp32 statistics stay fp32.

Invariants: with autocast off at a site nothing is inserted; masks and integer inputs are never cast;
the graph's placeholders are untouched.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.fx as fx

from .patterns.fx_utils import val

_ENTER = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
_EXIT = getattr(torch.amp.autocast_mode, "_exit_autocast", None)


def _ambient(device_type: str) -> Optional[torch.dtype]:
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (RuntimeError, TypeError, ValueError):  # a device type autocast does not know
        return None


def autocast_at(graph: fx.Graph):
    """A function (node, device type) -> the autocast dtype in effect at that node (None: off)."""
    states: dict = {}
    regions: list[dict] = []
    current: dict = {}
    for node in graph.nodes:
        if node.op == "call_function" and _ENTER is not None and node.target is _ENTER:
            device_type, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            regions.append(dict(current))
            if isinstance(device_type, str):
                current[device_type] = (dtype or torch.get_autocast_dtype(device_type)) if enabled else None
        elif node.op == "call_function" and _EXIT is not None and node.target is _EXIT and regions:
            current = regions.pop()
        if current:
            states[node] = dict(current)

    def at(node: fx.Node, device_type: str) -> Optional[torch.dtype]:
        inside = states.get(node, {})
        return inside[device_type] if device_type in inside else _ambient(device_type)

    return at


def device_type_of(*nodes) -> str:
    for n in nodes:
        v = val(n)
        if isinstance(v, torch.Tensor):
            return v.device.type
    return "cpu"


def cast(graph: fx.Graph, node, dtype: Optional[torch.dtype], column_major: bool = False):
    """`node` in `dtype` (inserted at the graph's insertion point); unchanged when `dtype` is None,
    when it is no tensor node, or its recorded value is already that dtype or not floating.
    `column_major`: cast the transpose and hand back its transpose, so a weight keeps the stride(0)
    == 1 layout the sparse mm2 reads without a copy of its own."""
    if dtype is None or not isinstance(node, fx.Node):
        return node
    v = val(node)
    if isinstance(v, torch.Tensor) and (v.dtype == dtype or not v.dtype.is_floating_point):
        return node
    if column_major:  # a contiguous copy of the transpose (`to` alone would keep the view's strides)
        t = graph.call_method("t", (node,))
        copy = graph.call_method("to", (t, dtype), {"memory_format": torch.contiguous_format})
        return graph.call_method("t", (copy,))
    return graph.call_method("to", (node, dtype))


def disabled_inside(t: torch.Tensor):
    """Context for an op's body: autocast off on `t`'s device when it is on (the rewrite cast the
    inputs already), so that the op's own fp32 work is not cast down."""
    device_type = t.device.type
    on = _ambient(device_type) is not None
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()

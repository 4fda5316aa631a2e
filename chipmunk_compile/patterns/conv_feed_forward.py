"""Feed-forwards of two 1×1 convolutions (conv → activation → conv), reported, never rewritten.

Some DiTs run their MLP as 1×1 `Conv1d`/`Conv2d` over a (B, C, N) or (B, C, H, W) layout. The MLP
pattern anchors on linear layers, so such a pair was no candidate at all: `inspect()` said nothing
about it (found by the session-44 research spellings, `benchmarks/arch_zoo_spellings.py`). This
pattern lists it as a rejected MLP candidate with the reason; the graph is never changed.

Invariant: only rejections come out of here (a 1×1 convolution pair with a supported or other
elementwise activation between them, the first one's output used by the activation alone).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.fx as fx

from .fx_utils import is_call, is_cast, module_path, shape_of, single_user, val
from .mlp import _looks_activated, activation_of
from .registry import Pattern, Rejection, register_pattern

_CONVS = (torch.conv1d, torch.conv2d, torch.nn.functional.conv1d, torch.nn.functional.conv2d)


def _pointwise_conv(node) -> bool:
    """A 1-D or 2-D convolution whose kernel is 1 (×1): a linear map per position."""
    if not (isinstance(node, fx.Node) and is_call(node, *_CONVS) and len(node.args) > 1):
        return False
    w = val(node.args[1])
    return isinstance(w, torch.Tensor) and w.dim() in (3, 4) and all(k == 1 for k in w.shape[2:])


def match_conv_feed_forward(node: fx.Node, ctx) -> Union[Rejection, None]:
    if not _pointwise_conv(node):
        return None
    h = node.args[0]
    while isinstance(h, fx.Node) and is_cast(h) and single_user(h):
        h = h.args[0]
    act = activation_of(h) if isinstance(h, fx.Node) else None
    first: Optional[fx.Node] = act[1] if act is not None else (
        h.args[0] if _looks_activated(h) and h.args and isinstance(h.args[0], fx.Node) else None)
    if first is None or not _pointwise_conv(first) or not single_user(first):
        return None
    shapes = {"x": shape_of(first.args[0]), "w2": tuple(val(node.args[1]).shape)}
    return Rejection("mlp", "conv_feed_forward", node,
                     "1x1 convolution feed-forward (conv -> activation -> conv): only linear layers are matched",
                     module_path(node), shapes)


register_pattern(Pattern("conv_feed_forward", "mlp", match_conv_feed_forward, priority=0,
                         description="1x1 conv -> act -> 1x1 conv feed-forward: reported as rejected, left as it is"))

"""Attention kernels behind opaque custom ops, reported, never rewritten.

A model whose attention runs through a custom op (diffusers' flash / sage / aiter backends wrap
their kernels in `torch.library` ops; a flash-attn build registers its own) shows Dynamo no softmax:
the op is one node. Such a model had no attention site, and `inspect()` only said that no softmax
attention was found. This pattern finds the node by its structure (an op of another library than
aten / prims / chipmunk, whose first three tensor arguments are query, key and value shaped: one
rank, one head width for q and k, keys and values of one length, and an output shaped like the
query with the value's width) and lists it as a rejected attention candidate with what to do.

Invariant: only rejections come out of here; the graph is never changed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .fx_utils import module_path, val
from .registry import Pattern, Rejection, register_pattern

_OWN = ("aten", "prims", "chipmunk", "higher_order")


def _namespace(target) -> Optional[str]:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    if isinstance(target, torch._ops.OpOverloadPacket):  # attribute access on a packet looks up overloads
        return str(getattr(target, "_qualified_op_name", "")).split("::")[0] or None
    return None


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) and v else v


def match_opaque_attention(node: fx.Node, ctx) -> Optional[Rejection]:
    if node.op != "call_function":
        return None
    ns = _namespace(node.target)
    if ns is None or ns in _OWN:
        return None
    tensors = [val(a) for a in node.args if isinstance(a, fx.Node)]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    out = _first(val(node))
    if len(tensors) < 3 or not isinstance(out, torch.Tensor):
        return None
    q, k, v = tensors[:3]
    if not (q.dim() == k.dim() == v.dim() == out.dim() and q.dim() in (3, 4) and q.is_floating_point()):
        return None
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1] or \
            tuple(out.shape) != (*q.shape[:-1], v.shape[-1]):
        return None
    name = str(node.target).replace("::", ".")
    return Rejection("attention", "opaque", node,
                     f"opaque op {name} over query/key/value-shaped tensors (a fused attention kernel): no "
                     "softmax to rewrite; with diffusers, transformer.set_attention_backend('native') runs SDPA, "
                     "which chipmunk rewrites",
                     module_path(node), {"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape)})


register_pattern(Pattern("opaque", "attention", match_opaque_attention, priority=0,
                         description="custom ops over q/k/v-shaped tensors (fused attention kernels): "
                                     "reported as rejected"))

"""MLP patterns: linear → activation → (no-op dropout) → linear, gated and parallel forms.

Forms (anchored on the second linear):
- plain:    y = W2 · act(W1 x + b1) + b2, act in gelu / gelu-tanh / silu / relu
- gated:    y = W2 · (act(a) * b) + b2, with a and b either the two halves of one linear
            (`proj(x).chunk(2, -1)`, diffusers GEGLU / SwiGLU, or its two halves sliced, Flux2) or
            two linears of the same x
- parallel: y = W2 · cat(other, act(W1 x + b1)) + b2 (diffusers Flux / HunyuanVideo single blocks):
            W2 is split by columns; the `other` part stays a dense linear, the MLP part is sparse.

Casts (`.float()`, `.to(dtype)`) around the activation and the gate are looked through: an
activation evaluated in fp32 and rounded back (diffusers' FP32SiLU, Lumina) is what the kernels do.

Invariants: every intermediate between the first and second linear has exactly one user (the
hidden activation is not needed elsewhere), and the activation is one the kernels implement.
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import (
    arg, fn_kwargs, is_call, is_cast, is_linear, is_method, is_noop_dropout, linear_parts,
    module_path, shape_of, single_user,
)
from .registry import MatchContext, MlpMatch, Pattern, Rejection, register_pattern

_GELU = (F.gelu, torch._C._nn.gelu)
_SILU = (F.silu, torch.nn.functional.silu)
_RELU = (F.relu, torch.relu, torch.nn.functional.relu)
_MUL = (operator.mul, torch.mul)
_CAT = (torch.cat, torch.concat, torch.concatenate)


def activation_of(node) -> Optional[tuple[str, fx.Node]]:
    """(activation name, its input) when `node` applies a supported activation."""
    if is_call(node, *_GELU):
        kw = fn_kwargs(node) or {}
        approx = kw.get("approximate", arg(node, 1, "approximate", "none"))
        return ("gelu_tanh" if approx == "tanh" else "gelu"), node.args[0]
    if is_call(node, *_SILU) or is_method(node, "silu"):
        return "silu", node.args[0]
    if is_call(node, *_RELU) or is_method(node, "relu"):
        return "relu", node.args[0]
    if is_method(node, "gelu"):
        return ("gelu_tanh" if node.kwargs.get("approximate") == "tanh" else "gelu"), node.args[0]
    return None


def _looks_activated(node) -> bool:
    """An elementwise nonlinearity we do not implement (for reporting rejected candidates)."""
    names = ("sigmoid", "tanh", "mish", "hardswish", "elu", "leaky_relu", "softplus", "gelu", "silu")
    if isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return any(n in name for n in names)
    return False


def _peel(h: fx.Node, chain: list) -> fx.Node:
    while isinstance(h, fx.Node) and (is_noop_dropout(h) or is_cast(h)) and single_user(h):
        chain.append(h)
        h = h.args[0]
    return h


def _chunk_half(node) -> Optional[tuple[fx.Node, int, Optional[fx.Node]]]:
    """(linear node, half index, chunk node or None) when `node` is one half of a linear's output
    along its last dim: `linear(x).chunk(2, dim=-1)[i]` (diffusers GEGLU / SwiGLU) or a slice
    `linear(x)[..., :F/2]` / `[..., F/2:]` (Flux2's SwiGLU, fused into the first linear)."""
    if not is_call(node, operator.getitem) or not isinstance(node.args[0], fx.Node):
        return None
    src, idx = node.args[0], node.args[1]
    if isinstance(idx, int):
        if not (is_method(src, "chunk") or is_call(src, torch.chunk)):
            return None
        chunks = arg(src, 1, "chunks")
        dim = arg(src, 2, "dim", 0)
        lin = src.args[0]
        shape = shape_of(lin)
        if chunks != 2 or shape is None or int(dim) % len(shape) != len(shape) - 1 or not is_linear(lin):
            return None
        return lin, idx, src
    shape = shape_of(src)
    if not is_linear(src) or shape is None or not isinstance(shape[-1], int) or shape[-1] % 2:
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    last = idx[-1] if idx else None
    lead = idx[:-1]
    full = slice(None, None, None)
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    if not (lead == (Ellipsis,) or (len(idx) == len(shape) and all(i == full for i in lead))):
        return None
    f, half = shape[-1], shape[-1] // 2
    start, stop = last.start or 0, f if last.stop is None else last.stop
    if (start, stop) == (0, half):
        return src, 0, None
    if (start, stop) == (half, f):
        return src, 1, None
    return None


def _reject(node, reason, shapes=None) -> Rejection:
    return Rejection("mlp", "mlp", node, reason, module_path(node), shapes or {})


def match_mlp(node: fx.Node, ctx: MatchContext) -> Union[MlpMatch, Rejection, None]:
    if not is_linear(node):
        return None
    inp, w2, b2 = linear_parts(node)
    chain = [node]
    h = _peel(inp, chain) if single_user(inp) else inp
    cat_parts, cat_index = None, -1
    if is_call(h, *_CAT) and single_user(h):
        parts = list(arg(h, 0, "tensors"))
        dim = arg(h, 1, "dim", 0)
        shape = shape_of(h)
        if shape is None or int(dim) % len(shape) != len(shape) - 1:
            return None
        hits = [i for i, p in enumerate(parts) if isinstance(p, fx.Node) and _hidden_form(_peel(p, []))]
        if len(hits) != 1:
            return None
        if len(parts) != 2:
            return _reject(node, f"parallel MLP concatenated with {len(parts) - 1} other parts (1 supported)")
        cat_parts, cat_index = parts, hits[0]
        chain.append(h)
        h = parts[cat_index]
        if not single_user(h):
            return None
        h = _peel(h, chain)
    if not single_user(h):
        return None
    form = _hidden_form(h)
    if form is None:
        prev = h
        if _looks_activated(prev) and isinstance(prev.args[0], fx.Node) and is_linear(prev.args[0]):
            if activation_of(prev) is not None:  # supported, but the first linear feeds more than it
                return _reject(node, "the first linear's output has other users")
            return _reject(node, f"unsupported activation {getattr(prev.target, '__name__', prev.target)}")
        return None
    act, x, w_act, b_act, w_lin, b_lin, nodes = form
    chain += nodes
    x_shape = shape_of(x)
    shapes = {"x": x_shape, "w2": shape_of(w2)}
    _, mlp_cfg = ctx.config.for_site(module_path(node))
    if x_shape is None:
        return _reject(node, "unknown input shape", shapes)
    if len(x_shape) < 3:  # (B, C): a conditioning MLP (timestep / pooled embedders), no token axis
        return _reject(node, f"no token dimension (input of rank {len(x_shape)})", shapes)
    if not mlp_cfg.enabled:
        return _reject(node, "disabled by config", shapes)
    tokens = x_shape[-2]
    if tokens < mlp_cfg.min_tokens:
        return _reject(node, f"too short ({tokens} tokens < min_tokens {mlp_cfg.min_tokens})", shapes)
    return MlpMatch(
        pattern="mlp-parallel" if cat_parts else ("mlp-gated" if w_lin is not None else "mlp"),
        anchor=node, output=node, x=x, w_act=w_act, b_act=b_act, w2=w2, b2=b2, act=act,
        nodes=chain, w_lin=w_lin, b_lin=b_lin, cat_parts=cat_parts, cat_index=cat_index,
    )


def _activation_through_casts(h, nodes: list) -> Optional[tuple[str, fx.Node]]:
    """activation_of(h) seen through single-user casts on both sides of the activation, as in
    `silu(a.float()).to(a.dtype)` (diffusers' FP32SiLU); the casts join `nodes`. The kernels
    evaluate every activation in fp32 and round once to the activation dtype, which is what
    such a cast pair spells out."""
    peeled: list = []
    inner = _peel(h, peeled)
    a = activation_of(inner)
    if a is None:
        return None
    name, pre = a
    pre = _peel(pre, peeled) if single_user(pre) else pre
    nodes += peeled + [inner]
    return name, pre


def _hidden_form(h):
    """Decompose the hidden activation h: (act, x, w_act, b_act, w_lin, b_lin, nodes) or None."""
    casts: list = []
    a = _activation_through_casts(h, casts)
    if a is not None:  # plain: act(linear(x)) — or act applied to one chunk half (rare; gated below)
        name, pre = a
        if is_linear(pre) and single_user(pre):
            x, w, b = linear_parts(pre)
            return name, x, w, b, None, None, [h, pre] + casts
        return None
    if not (is_call(h, *_MUL) and len(h.args) == 2 and all(isinstance(t, fx.Node) for t in h.args)):
        return None
    for act_side in (0, 1):
        g, other = h.args[act_side], h.args[1 - act_side]
        casts = []
        a = _activation_through_casts(g, casts) if single_user(g) else None
        if a is None:
            continue
        name, pre = a
        other = _peel(other, casts) if single_user(other) else other
        half_a, half_b = _chunk_half(pre), _chunk_half(other)
        if half_a and half_b and half_a[0] is half_b[0] and half_a[1] != half_b[1]:
            lin, ch = half_a[0], half_a[2]
            if ch is not None and (len(lin.users) != 1 or len(ch.users) != 2):
                return None
            if ch is None and len(lin.users) != 2:  # the two slices are its only users
                return None
            x, w, b = linear_parts(lin)
            f = shape_of(lin)[-1] // 2
            ia, ib = half_a[1], half_b[1]
            w_act, w_lin = (w, ia * f, (ia + 1) * f), (w, ib * f, (ib + 1) * f)
            b_act = (b, ia * f, (ia + 1) * f) if b is not None else None
            b_lin = (b, ib * f, (ib + 1) * f) if b is not None else None
            return name, x, w_act, b_act, w_lin, b_lin, [h, g, pre, other, *([ch] if ch is not None else []), lin] + casts
        if is_linear(pre) and is_linear(other) and single_user(pre) and single_user(other):
            x1, w1, b1 = linear_parts(pre)
            x3, w3, b3 = linear_parts(other)
            if x1 is x3:
                return name, x1, w1, b1, w3, b3, [h, g, pre, other] + casts
    return None


register_pattern(Pattern("mlp", "mlp", match_mlp, priority=100,
                         description="linear → act → [dropout] → linear; gated (GEGLU/SwiGLU); parallel cat"))

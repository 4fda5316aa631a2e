"""MLP patterns: linear → activation → (no-op dropout) → linear, gated and parallel forms.

Forms (anchored on the second linear):
- plain:    y = W2 · act(W1 x + b1) + b2, act in gelu / gelu-tanh / silu / relu / squared relu
- gated:    y = W2 · (act(a) * b) + b2, with a and b either the two halves of one linear
            (`proj(x).chunk(2, -1)`, diffusers GEGLU / SwiGLU, or its two halves sliced, Flux2) or
            two linears of the same x
- parallel: y = W2 · cat(other, act(W1 x + b1)) + b2 (diffusers Flux / HunyuanVideo single blocks):
            W2 is split by columns; the `other` part stays a dense linear, the MLP part is sparse.
- fused first linear: the hidden pre-activation (or both gated halves) is a column range of a
            linear that also projects other things (Flux2 single blocks: `lin(x).split([3D, 2F],
            -1)`, q/k/v first); every other column range becomes a dense linear over its weight
            rows (`MlpMatch.first_rest`).

Casts (`.float()`, `.to(dtype)`) around the activation and the gate are looked through: an
activation evaluated in fp32 and rounded back (diffusers' FP32SiLU, Lumina) is what the kernels do.
Either linear may carry unfused low-rank adapters (LoRA through peft, `low_rank.py`): its weight is
then an `AdaptedWeight` that the rewrite folds.

Invariants: every intermediate between the first and second linear has exactly one user (the
hidden activation is not needed elsewhere; an adapted second linear's base and adapter count as
one) — except a fused first linear and its chunk / split,
whose other users must each be a column range of it — and the activation is one the kernels
implement.
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .attention import attention_queries
from .fx_utils import (
    arg, fn_kwargs, is_call, is_cast, is_linear, is_method, is_noop_dropout, is_param_or_buffer, val, module_path,
    shape_of, signal_like, single_user,
)
from .low_rank import adapted_linear, weight_nodes, weight_shape
from .registry import MatchContext, MlpMatch, Pattern, Rejection, register_pattern
from .token_streams import attention_rows, token_rows

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
    r = _squared(node)
    if r is not None and single_user(r) and (is_call(r, *_RELU) or is_method(r, "relu")):
        return "relu2", r.args[0]  # squared relu: the relu node joins the match (`_activation_through_casts`)
    return None


def _squared(node) -> Optional[fx.Node]:
    """x when `node` is x.square(), x ** 2, torch.pow(x, 2) or x * x; else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if is_call(node, torch.square) or is_method(node, "square"):
        return x
    if (is_call(node, operator.pow, torch.pow) or is_method(node, "pow")) and arg(node, 1, "exponent", None) == 2:
        return x
    if is_call(node, *_MUL) and len(node.args) == 2 and node.args[1] is x:
        return x
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


def _wrapped_weight(*specs) -> Optional[str]:
    """The class name of the first weight (or adapter factor) that is a tensor subclass wrapping
    others (torchao's quantized weights, ...), or None when all are plain tensors."""
    for spec in specs:
        for n in weight_nodes(spec):
            if is_traceable_wrapper_subclass(val(n)):
                return type(val(n)).__name__
    return None


def _used_within(node, owned: set) -> bool:
    return isinstance(node, fx.Node) and len(node.users) > 0 and all(u in owned for u in node.users)


def _peel_owned(h: fx.Node, chain: list, owned: set) -> fx.Node:
    """`_peel` where each peeled node may feed several nodes of `owned` (an adapted linear's base
    and adapter); peeled nodes join both."""
    while isinstance(h, fx.Node) and (is_noop_dropout(h) or is_cast(h)) and _used_within(h, owned):
        chain.append(h)
        owned.add(h)
        h = h.args[0]
    return h


def _last_dim(node: fx.Node, pos: int, name: str, default) -> bool:
    dim = arg(node, pos, name, default)
    shape = shape_of(node.args[0])
    return isinstance(dim, int) and shape is not None and dim % len(shape) == len(shape) - 1


def _column_range(node, depth: int = 0) -> Optional[tuple[fx.Node, int, int, list]]:
    """(linear, start, stop, via) when `node` is the columns [start, stop) of a linear's output
    (last dim), reached through at most three getitems of a chunk / split part or of a last-dim
    slice: `lin(x).chunk(2, -1)[i]` (GEGLU / SwiGLU), `lin(x)[..., :F/2]` (Flux2's SwiGLU),
    `lin(x).split([3D, 2F], -1)[1][..., :F]` (Flux2's single blocks: qkv and MLP input in one
    linear). via: the getitem / chunk / split nodes passed, outermost first."""
    base, kept = node, []
    while is_cast(base) and getattr(val(base), "dtype", 0) == getattr(val(base.args[0]), "dtype", 1):
        kept.append(base)  # a cast that keeps the dtype (peft's `result.to(result_dtype)`); its other users: _fused_rest
        base = base.args[0]
    if adapted_linear(base) is not None:
        shape = shape_of(base)
        return (base, 0, shape[-1], kept) if shape and isinstance(shape[-1], int) else None
    if depth > 2 or not is_call(node, operator.getitem) or not isinstance(node.args[0], fx.Node):
        return None
    src, idx = node.args[0], node.args[1]
    if isinstance(idx, int):  # one part of a chunk / split along the last dim
        if not (is_method(src, "chunk", "split") or is_call(src, torch.chunk, torch.split)):
            return None
        parts = src.meta.get("example_value", src.meta.get("val"))  # the parts' widths
        if not _last_dim(src, 2, "dim", 0) or not isinstance(parts, (list, tuple)):
            return None
        widths = [t.shape[-1] for t in parts]
        if not all(isinstance(w, int) for w in widths) or not -len(widths) <= idx < len(widths):
            return None
        inner = _column_range(src.args[0], depth + 1)
        if inner is None:
            return None
        lin, s0, _, via = inner
        a = s0 + sum(widths[:idx % len(widths)])
        return lin, a, a + widths[idx], [node, src] + via
    shape = shape_of(src)
    idx = idx if isinstance(idx, tuple) else (idx,)
    last = idx[-1] if idx else None
    lead = idx[:-1]
    full = slice(None, None, None)
    if shape is None or not isinstance(shape[-1], int) or not isinstance(last, slice) or last.step not in (None, 1):
        return None
    if not (lead == (Ellipsis,) or (len(idx) == len(shape) and all(i == full for i in lead))):
        return None
    width = shape[-1]
    start, stop = last.start or 0, width if last.stop is None else last.stop
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= width):
        return None
    inner = _column_range(src, depth + 1)
    if inner is None:
        return None
    lin, s0, _, via = inner
    return lin, s0 + start, s0 + stop, [node] + via


def _fused_rest(lin: fx.Node, owned: set) -> Optional[list]:
    """The other column ranges of a first linear whose output also feeds something else (Flux2:
    the attention's q/k/v): [(node, start, stop)] for every getitem of `lin` (or of a chunk /
    split of it) outside `owned`, each to become a dense linear over those weight rows. None when
    some other user is not such a column range (the whole output is needed elsewhere)."""
    rest, stack, seen = [], [lin], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if is_method(u, "chunk", "split") or is_call(u, torch.chunk, torch.split) or (is_cast(u) and u in owned):
                stack.append(u)  # its parts (or, past an adapted linear's cast, its uses) are visited as its users
                continue
            if u in owned:
                continue
            r = _column_range(u)
            if r is None or r[0] is not lin:
                return None
            rest.append((u, r[1], r[2]))
    return rest


# A rank-3 input whose middle axis is at most SEQ_FIRST_MAX_BATCH long and whose first axis has at
# least SEQ_FIRST_MIN_TOKENS (and min_tokens) is read as sequence-first (S, B, C): generation batches
# (CFG, a few prompts) are short, latents are long, and a (B, 1, C) conditioning MLP with a batch of
# 256 is not a generation workload.
SEQ_FIRST_MAX_BATCH = 16
SEQ_FIRST_MIN_TOKENS = 256


def _reject(node, reason, shapes=None) -> Rejection:
    return Rejection("mlp", "mlp", node, reason, module_path(node), shapes or {})


def match_mlp(node: fx.Node, ctx: MatchContext) -> Union[MlpMatch, Rejection, None]:
    second = adapted_linear(node)
    if second is None:
        return None
    inp, w2, b2, chain = second[0], second[1], second[2], list(second[3])
    owned = set(chain)  # the second linear and its adapters: the hidden activation may feed them all
    h = _peel_owned(inp, chain, owned)
    cat_parts, cat_index = None, -1
    if is_call(h, *_CAT) and _used_within(h, owned):
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
        owned.add(h)
        h = parts[cat_index]
        if not single_user(h):
            return None
        h = _peel(h, chain)
    if not _used_within(h, owned | set(chain)):
        return None
    form = _hidden_form(h)
    if form is None:
        prev = h
        if _looks_activated(prev) and isinstance(prev.args[0], fx.Node) and is_linear(prev.args[0]):
            if activation_of(prev) is not None:  # supported, but the first linear feeds more than it
                return _reject(node, "the first linear's output has other users")
            return _reject(node, f"unsupported activation {getattr(prev.target, '__name__', prev.target)}")
        return None
    act, x, w_act, b_act, w_lin, b_lin, nodes, rest = form
    chain += nodes
    x_shape = shape_of(x)
    shapes = {"x": x_shape, "w2": weight_shape(w2)}
    _, mlp_cfg = ctx.config.for_site(module_path(node))
    if x_shape is None:
        return _reject(node, "unknown input shape", shapes)
    wrapped = _wrapped_weight(w_act, w_lin, w2)
    if wrapped is not None:
        return _reject(node, f"its weights are {wrapped} tensors (quantized or wrapped): the kernels gather "
                       "rows of plain weights", shapes)
    if len(x_shape) < 3 and not (len(x_shape) == 2 and _packed_tokens(x, ctx)):
        # (B, C): a conditioning MLP (timestep / pooled embedders), no token axis; or routed rows
        return _reject(node, f"no token dimension (input of rank {len(x_shape)})", shapes)
    if not mlp_cfg.enabled:
        return _reject(node, "disabled by config", shapes)
    tokens, token_axis = x_shape[-2], -2
    if len(x_shape) == 3 and guard_or_false(tokens <= SEQ_FIRST_MAX_BATCH) and \
            guard_or_false(x_shape[0] >= max(mlp_cfg.min_tokens, SEQ_FIRST_MIN_TOKENS)):
        # (S, B, C), sequence first (ERNIE-Image): the op sees its (B, S, C) transpose.
        tokens, token_axis = x_shape[0], 0
    if guard_or_false(tokens == 1):  # (B, 1, C): a conditioning MLP that keeps a size-1 token axis
        if len(x_shape) == 3 and guard_or_false(x_shape[0] > 1):
            return _reject(node, f"no token dimension (one token; read as sequence-first (S, B, C) only from "
                           f"{max(mlp_cfg.min_tokens, SEQ_FIRST_MIN_TOKENS)} tokens)", shapes)
        return _reject(node, "no token dimension (one token)", shapes)
    if not _from_token_input(x, ctx):
        # SkyReels-V2's diffusion forcing embeds a timestep per frame: (B, F, C) looks like tokens, but
        # the input changes whole every step, so no sparse delta can follow it
        return _reject(node, "a timestep/conditioning embedding (its input comes from small step-signal inputs "
                       "and weights only, no token input)", shapes)
    if guard_or_false(tokens < mlp_cfg.min_tokens):
        return _reject(node, f"too short ({tokens} tokens < min_tokens {mlp_cfg.min_tokens})", shapes)
    return MlpMatch(
        pattern="mlp-parallel" if cat_parts else ("mlp-gated" if w_lin is not None else "mlp"),
        anchor=node, output=node, x=x, w_act=w_act, b_act=b_act, w2=w2, b2=b2, act=act,
        nodes=chain, w_lin=w_lin, b_lin=b_lin, cat_parts=cat_parts, cat_index=cat_index, first_rest=rest,
        token_axis=token_axis,
    )


def _from_token_input(x: fx.Node, ctx: MatchContext) -> bool:
    """Whether `x` depends on a graph input that is neither a weight nor a small step signal
    (`fx_utils.signal_like`): the tokens (or any other large input). One pass over the graph,
    memoized."""
    if "token_fed" not in ctx.memo:
        fed: set = set()
        for n in x.graph.nodes:
            if n.op == "placeholder":
                if isinstance(val(n), torch.Tensor) and not signal_like(n) and not is_param_or_buffer(n):
                    fed.add(n)
            elif any(a in fed for a in n.all_input_nodes):
                fed.add(n)
        ctx.memo["token_fed"] = fed
    return x in ctx.memo["token_fed"]


def _packed_tokens(x, ctx: MatchContext) -> bool:
    """A (tokens, C) input whose rows are an attention's tokens (a packed sequence with no batch axis,
    Cosmos3): `token_streams.token_rows`. The op sees it as (1, tokens, C)."""
    if "attention_rows" not in ctx.memo:
        ctx.memo["attention_rows"] = attention_rows(attention_queries(x.graph))
    return token_rows(x, ctx.memo["attention_rows"])


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
    if name == "relu2":  # the relu between the square and its input
        peeled.append(inner.args[0])
    pre = _peel(pre, peeled) if single_user(pre) else pre
    nodes += peeled + [inner]
    return name, pre


def _hidden_form(h):
    """Decompose the hidden activation h: (act, x, w_act, b_act, w_lin, b_lin, nodes, rest) or
    None; rest: the first linear's other column ranges (see `_fused_rest`), usually []."""
    casts: list = []
    a = _activation_through_casts(h, casts)
    if a is not None:  # plain: act(linear(x)), or act of a column range of a fused linear
        name, pre = a
        first = adapted_linear(pre) if single_user(pre) else None
        if first is not None:
            x, w, b, lin_nodes = first
            return name, x, w, b, None, None, [h] + lin_nodes + casts, []
        r = _column_range(pre)
        if r is None or not single_user(pre):
            return None
        lin, start, stop, via = r
        owned = {h, *casts, *via}
        if any(u not in owned for n in via if is_call(n, operator.getitem) for u in n.users):
            return None
        rest = _fused_rest(lin, owned)
        if rest is None:
            return None
        x, w, b, lin_nodes = adapted_linear(lin)
        nodes = [h, *casts, *via, *(n for n, _, _ in rest), *lin_nodes]
        return (name, x, (w, start, stop), (b, start, stop) if b is not None else None, None, None,
                list(dict.fromkeys(nodes)), [(n, x, w, b, s0, s1) for n, s0, s1 in rest])
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
        ra, rb = _column_range(pre), _column_range(other)
        if ra and rb and ra[0] is rb[0] and ra[0] is not pre and rb[0] is not other:
            lin, (a0, a1), (b0, b1) = ra[0], ra[1:3], rb[1:3]
            if a1 - a0 != b1 - b0 or not (a1 <= b0 or b1 <= a0):
                return None  # not two disjoint ranges of one width: not a gate
            inner = [h, g, pre, other] + casts
            owned = set(inner) | set(ra[3]) | set(rb[3])
            for n in set(ra[3]) | set(rb[3]):  # parts and slices feed only this MLP
                if is_call(n, operator.getitem) and any(u not in owned for u in n.users):
                    return None
            rest = _fused_rest(lin, owned)
            if rest is None:
                return None
            x, w, b, lin_nodes = adapted_linear(lin)
            w_act, w_lin = (w, a0, a1), (w, b0, b1)
            b_act = (b, a0, a1) if b is not None else None
            b_lin = (b, b0, b1) if b is not None else None
            nodes = inner + list(ra[3]) + list(rb[3]) + [r[0] for r in rest] + lin_nodes
            rest = [(node, x, w, b, start, stop) for node, start, stop in rest]
            return name, x, w_act, b_act, w_lin, b_lin, list(dict.fromkeys(nodes)), rest
        la = adapted_linear(pre) if single_user(pre) else None
        lb = adapted_linear(other) if single_user(other) else None
        if la is not None and lb is not None and la[0] is lb[0]:
            (x1, w1, b1, na), (_, w3, b3, nb) = la, lb
            return name, x1, w1, b1, w3, b3, [h, g] + na + nb + casts, []
    return None


register_pattern(Pattern("mlp", "mlp", match_mlp, priority=100,
                         description="linear → act → [dropout] → linear; gated (GEGLU/SwiGLU); parallel cat"))

"""Attention patterns: `F.scaled_dot_product_attention`, its backend ops (`aten._scaled_dot_product_
{cudnn,flash,efficient}_attention`, when only the attention output is used: a used log-sum-exp, as
ring attention merges partial results with, is a `Rejection`), and the explicit softmax(QKᵀ)V form.

Invariants:
- A match is self/joint attention only: query length == key length, or queries over joint keys
  (the keys are a concatenation along the sequence of the queries' own projected tokens and other
  streams' tokens, PRX's image queries over text + image keys, or over a KV cache's keys; the
  own tokens may be split in slices around the others, as FLUX.2's cached reference keys between
  its text and image keys; `key_layout` says where the own tokens sit (sizes may be symbolic), shown by
  `token_streams.joint_key_streams`); non-causal, no dropout,
  a constant scale, and a mask that is None, a boolean key-padding mask (broadcast over heads
  and queries), a boolean mask proven to be built from padding vectors (`padding_mask.py`:
  keys, queries or both; padded query rows come out as zeros, as SDPA returns them), or on 4-D
  attention any other float or boolean mask that broadcasts to (B, H, Nq, Nk) (`bias`: pair
  biases, banded or block masks; the op adds it to every score it computes, so dense steps are
  exact and sparse steps see it on their selected keys). Anything else that computes softmax
  attention becomes a `Rejection` with the reason.
- The explicit form: softmax over the last axis (or written out, `e / e.sum(-1, keepdim=True)` of
  `e = x.exp()`) of (casts, constant scales, a subtracted `.amax(-1, keepdim=True)` / `.max(...)`
  row max, optionally detached: softmax is shift invariant, added constants, one added float tensor
  that broadcasts to the scores: the bias, scaled by the scales applied after it, or one
  `masked_fill` by a boolean mask with -inf or a value ≤ -1e4: a key-padding mask or a forbidding
  mask that broadcasts to the scores, which the op takes inverted) of Q Kᵀ, then P V; each product as matmul/bmm (Kᵀ by
  transpose/permute/mT), baddbmm with beta 0, or a two-operand `torch.einsum` whose subscripts say
  exactly that product. q and k upcast exactly to float32 from v's half precision are taken before
  the cast; q, k and v of different dtypes otherwise are a `Rejection` (the op takes one dtype).
- Softmax-free (linear) attention never matches: the explicit pattern is anchored on a softmax.
- `flex_attention` (a score_mod or block mask: arbitrary code per score) never matches; it becomes
  a `Rejection`, so inspect() says why such a model has no attention sites.
- The attention probabilities must have no other user (they would be needed exactly).
"""

from __future__ import annotations

import operator
import re
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from .fx_utils import (
    ATEN_SDPA, MATMUL, SDPA, SOFTMAX_FNS, arg, fn_kwargs, is_call, is_cast, is_method, is_noop_dropout,
    module_path, number, schema_kwargs, shape_of, single_user, val,
)
from .padding_mask import padding_vectors
from .token_streams import distinct_streams, joint_key_streams, key_concat, projected_from, token_slice_of
from .registry import AttentionMatch, MatchContext, Pattern, Rejection, register_pattern


def _reject(pattern: str, node: fx.Node, reason: str, shapes: dict) -> Rejection:
    return Rejection("attention", pattern, node, reason, module_path(node), shapes)


def _key_mask_ok(mask: fx.Node, batch, n_k) -> Optional[str]:
    """None when `mask` is a boolean key-padding mask, else why not."""
    mv = val(mask)
    if not isinstance(mv, torch.Tensor):
        return "attention mask is not a tensor"
    if mv.dtype != torch.bool:
        return f"additive {mv.dtype} attention mask"
    shape = tuple(mv.shape)
    if len(shape) == 4 and shape[1] == 1 and shape[2] == 1 and shape[3] == n_k and shape[0] in (1, batch):
        return None
    # 2-D masks broadcast as (N, Nk) (a per-query mask), so only (1, Nk) is a key-padding mask
    if len(shape) == 2 and shape[1] == n_k and shape[0] == 1:
        return None
    return f"attention mask of shape {list(shape)} is not a key-padding mask (B, 1, 1, Nk)"


def _bias_ok(mask: fx.Node, full: tuple) -> Optional[str]:
    """None when `mask` (a tensor) broadcasts to the scores' shape `full` = (B, H, Nq, Nk), else why not."""
    mv = val(mask)
    shape = tuple(mv.shape)
    if not (mv.is_floating_point() or mv.dtype == torch.bool):
        return f"attention mask of dtype {mv.dtype}"
    if len(shape) > len(full) or not all(
            statically_known_true(d == 1) or statically_known_true(d == f) for d, f in zip(shape[::-1], full[::-1])):
        return f"attention mask of shape {list(shape)} does not broadcast to the scores {list(full)}"
    return None


def _common_checks(pattern, node, ctx, q, k, v, scale, shapes, *, is_causal=False, dropout_p=0.0):
    qs, ks, vs = shape_of(q), shape_of(k), shape_of(v)
    if qs is None or ks is None or vs is None:
        return _reject(pattern, node, "unknown q/k/v shapes", shapes)
    if len(qs) not in (3, 4) or len(ks) != len(qs) or len(vs) != len(qs):
        return _reject(pattern, node, f"q/k/v of rank {len(qs)} (expected 3 or 4)", shapes)
    if is_causal is not False:
        return _reject(pattern, node, "causal attention", shapes)
    if not (isinstance(dropout_p, (int, float)) and dropout_p == 0):
        return _reject(pattern, node, "attention dropout", shapes)
    if scale is not None and not isinstance(scale, (int, float)):
        return _reject(pattern, node, "non-constant softmax scale", shapes)
    # sizes may be unbacked symbols (capture_scalar_outputs): what cannot be decided is not equal
    key_layout = None
    if not guard_or_false(qs[-2] == ks[-2]):
        key_layout = _joint_key_layout(q, k, qs[-2]) or _query_tail_layout(q, k, qs[-2], ks[-2])
        if key_layout is None:
            return _reject(pattern, node, f"cross-attention (query length {qs[-2]} != key length {ks[-2]})", shapes)
    elif distinct_streams(q, k):
        return _reject(pattern, node, f"cross-attention (queries and keys projected from different token streams, "
                                      f"{qs[-2]} tokens each)", shapes)
    if vs[-1] != qs[-1]:
        return _reject(pattern, node, "value head dim differs from query head dim", shapes)
    attn_cfg, _ = ctx.config.for_site(module_path(node))
    if not attn_cfg.enabled:
        return _reject(pattern, node, "disabled by config", shapes)
    if guard_or_false(qs[-2] < attn_cfg.min_tokens):
        return _reject(pattern, node, f"too short ({qs[-2]} tokens < min_tokens {attn_cfg.min_tokens})", shapes)
    return key_layout


def _joint_key_layout(q, k, n_q) -> Optional[tuple]:
    """The key concatenation's parts in key order, ("own", q_start, q_stop or None) for q's own
    tokens and ("other", size or None, None) for other streams' (or precomputed) keys, when k =
    cat(parts, dim=sequence) with every part from another stream except the own ones: one part of
    n_q tokens, or slices of one n_q-token tensor along that axis covering it in order (FLUX.2's
    cached reference keys between the own text and image keys); else None. Sizes may be symbolic (a
    recompile after the token count changed): at most one other part may have a size known only at
    run time, where `Site.key_runs` resolves it from the call's query and key lengths."""
    found = key_concat(k, shape_of(k)[-2])
    if found is None:
        return None
    parts, dim = found
    shapes = [shape_of(p) if isinstance(p, fx.Node) else None for p in parts]
    if any(s is None for s in shapes):
        return None
    own = joint_key_streams(q, parts)
    if not own:
        return None
    if len(own) == 1:
        if not statically_known_true(shapes[own[0]][dim] == n_q):
            return None
        runs = {own[0]: (0, None)}
    else:
        slices = [_token_slice(parts[i], dim) for i in own]
        if any(r is None for r in slices) or len({src for src, _, _ in slices}) != 1:
            return None
        src = slices[0][0]  # the sliced tensor is the queries' own sequence: n_q tokens, cut in order
        if not statically_known_true(shape_of(src)[dim] == n_q) or slices[0][1] != 0 or slices[-1][2] is not None:
            return None
        if any(a[2] is None or a[2] != b[1] for a, b in zip(slices, slices[1:])):
            return None
        runs = {i: (a, b) for i, (_, a, b) in zip(own, slices)}
    sizes = [d if isinstance(d := s[dim], int) else None for s in shapes]
    if sum(sizes[i] is None for i in range(len(parts)) if i not in runs) > 1:
        return None
    return tuple(("own", *runs[i]) if i in runs else ("other", sizes[i], None) for i in range(len(parts)))


def _query_tail_layout(q, k, n_q, n_k) -> Optional[tuple]:
    """(("other", n_k - n_q, None), ("own", 0, None)) when the queries are the last n_q of the n_k
    tokens the keys are, in order: q is cut, as src[..., n_k - n_q:, ...] on the token axis, from a
    projection of n_k tokens whose input, token for token, is also the keys' projection input (a
    KV-cache prefill: every token's keys, the last tokens' queries); else None."""
    found = _axis_slice(token_slice_of(q))
    if found is None:
        return None
    src, dim, sl = found
    # sizes and the start may be symbolic (a recompile after the prefix length changed)
    start, stop = (val(b) if isinstance(b, fx.Node) else b for b in (sl.start, sl.stop))
    if start is None or not statically_known_true(shape_of(src)[dim] == n_k):
        return None
    if not statically_known_true(start == n_k - n_q) or not (stop is None or statically_known_true(stop >= n_k)):
        return None
    x = projected_from(src)
    if x is None or x is not projected_from(k) or shape_of(x) is None:
        return None
    return (("other", start if isinstance(start, int) else None, None), ("own", 0, None))


def _axis_slice(part) -> Optional[tuple]:
    """(source, axis, slice) when `part` is source[:, ..., :, a:b] with unit step: whole on every
    axis before the sliced one; else None."""
    if not (isinstance(part, fx.Node) and part.target is operator.getitem and isinstance(part.args[0], fx.Node)):
        return None
    src, idx = part.args
    idx = idx if isinstance(idx, tuple) else (idx,)
    dim, sl = len(idx) - 1, idx[-1]
    if shape_of(src) is None or any(i != slice(None) for i in idx[:dim]):
        return None
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        return None
    return src, dim, sl


def _token_slice(part, dim) -> Optional[tuple]:
    """(source, start, stop or None) when `part` is source[..., a:b, ...] on axis `dim` with static
    bounds and unit step, whole on every other axis; else None."""
    found = _axis_slice(part)
    if found is None or found[1] != dim:
        return None
    src, _, sl = found
    a, b = 0 if sl.start is None else sl.start, sl.stop
    if not isinstance(a, int) or a < 0 or not (b is None or (isinstance(b, int) and b > a)):
        return None
    return src, a, b


def match_sdpa(node: fx.Node, ctx: MatchContext) -> Union[AttentionMatch, Rejection, None]:
    if not is_call(node, *SDPA):
        return None
    kw = fn_kwargs(node)
    if kw is None:
        return _reject("sdpa", node, "could not read SDPA arguments", {})
    return _sdpa_match("sdpa", node, ctx, kw, node, [node], kw.get("attn_mask"))


def match_sdpa_aten(node: fx.Node, ctx: MatchContext) -> Union[AttentionMatch, Rejection, None]:
    """An SDPA backend op whose only used output is the attention output (getitem 0)."""
    packet = ATEN_SDPA.get(node.target) if node.op == "call_function" else None
    if packet is None:
        return None
    kw = schema_kwargs(node)
    shapes = {"q": shape_of(kw["query"]), "k": shape_of(kw["key"]), "v": shape_of(kw["value"])}
    items = [u for u in node.users if is_call(u, operator.getitem)]
    outs = [u for u in items if u.args[1] == 0 and u.users]
    used_other = [u for u in items if u.args[1] != 0 and u.users]
    if len(items) != len(node.users) or len(outs) != 1 or used_other:
        why = ("its log-sum-exp or another output beside the attention output is used "
               "(e.g. ring attention merging partial results)")
        return _reject("sdpa_aten", node, why, shapes)
    mask = kw.get("attn_bias", kw.get("attn_mask"))
    return _sdpa_match("sdpa_aten", node, ctx, {**kw, "enable_gqa": False}, outs[0], [node, *items], mask)


def _sdpa_match(pattern, node, ctx, kw, output, nodes, mask) -> Union[AttentionMatch, Rejection]:
    """The checks and the match shared by the SDPA call and its backend ops; `kw` by argument name
    (a scale or dropout that is a function's default under `dynamic=True` read as its number)."""
    kw = {**kw, **{name: number(kw[name]) for name in ("scale", "dropout_p") if name in kw}}
    q, k, v = kw["query"], kw["key"], kw["value"]
    shapes = {"q": shape_of(q), "k": shape_of(k), "v": shape_of(v)}
    key_layout = _common_checks(pattern, node, ctx, q, k, v, kw.get("scale"), shapes,
                                is_causal=kw.get("is_causal", False), dropout_p=kw.get("dropout_p", 0.0))
    if isinstance(key_layout, Rejection):
        return key_layout
    qs, ks = shapes["q"], shapes["k"]
    if qs[-3 if len(qs) == 4 else 0] != ks[-3 if len(ks) == 4 else 0] and not kw.get("enable_gqa", False):
        return _reject(pattern, node, "query and key head counts differ without enable_gqa", shapes)
    key_mask = query_mask = bias = None
    if mask is not None:
        if len(qs) != 4:
            return _reject(pattern, node, "masked 3-D attention", shapes)
        why = _key_mask_ok(mask, qs[0], ks[-2])
        if why is None:
            key_mask = mask
        elif key_layout is None and (vectors := padding_vectors(mask, ks[-2])) is not None:
            key_mask, query_mask = vectors
        elif isinstance(val(mask), torch.Tensor) and (why := _bias_ok(mask, (*qs[:-1], ks[-2]))) is None:
            bias = mask
        else:
            return _reject(pattern, node, why, shapes)
        shapes["mask"] = shape_of(mask)
    return AttentionMatch(
        pattern=pattern, anchor=node, output=output, q=q, k=k, v=v, nodes=nodes, mask_node=mask,
        key_mask=key_mask, query_mask=query_mask, bias=bias, scale=kw.get("scale"), squeeze_head=len(qs) == 3,
        key_layout=key_layout,
    )


_MUL = (operator.mul, torch.mul)
_DIV = (operator.truediv, torch.div)
_ADD = (operator.add, torch.add)
_SUB = (operator.sub, torch.sub)


def _const(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _transposed_key(kt: fx.Node) -> Optional[fx.Node]:
    """`k` when `kt` is k with its last two dims swapped."""
    if is_method(kt, "transpose") or is_call(kt, torch.transpose):
        dims = sorted(int(d) % len(shape_of(kt)) for d in kt.args[1:3])
        nd = len(shape_of(kt))
        if dims == [nd - 2, nd - 1]:
            return kt.args[0]
    if is_method(kt, "permute"):
        perm = kt.args[1:] if not isinstance(kt.args[1], (list, tuple)) else kt.args[1]
        nd = len(perm)
        if list(perm) == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return kt.args[0]
    if is_call(kt, getattr) and kt.args[1] == "mT":
        return kt.args[0]
    return None


def _einsum_terms(node: Any) -> Optional[tuple[list, list, list]]:
    """(subscripts of both operands, of the output, the operands) of a two-operand `torch.einsum`,
    each subscript a list of tokens ('...' is one token); None for anything else."""
    if not is_call(node, torch.einsum) or not node.args or not isinstance(node.args[0], str):
        return None
    eq, ops = node.args[0], list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if "->" not in eq or len(ops) != 2 or node.kwargs:
        return None
    lhs, rhs = eq.replace(" ", "").split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    tokens = [re.findall(r"\.\.\.|[A-Za-z]", t) for t in (*parts, rhs)]
    if any("".join(t) != x for t, x in zip(tokens, (*parts, rhs))):
        return None
    return tokens[:2], tokens[2], ops


def _einsum_product(node: Any, first: str) -> Optional[tuple[Any, Any]]:
    """The operands of `einsum('<B>ik,<B>jk-><B>ij', a, b)` (first="ij", a @ bᵀ: the scores from q
    and k) or of `einsum('<B>ij,<B>jk-><B>ik', a, b)` (first="jk", a @ b: probabilities times v),
    for any shared batch subscripts <B> in the same order; None otherwise."""
    terms = _einsum_terms(node)
    if terms is None:
        return None
    (a, b), out, ops = terms
    if len(a) < 2 or len(b) != len(a) or len(out) != len(a):
        return None
    batch, (i, x), (y, z), (o1, o2) = a[:-2], a[-2:], b[-2:], out[-2:]
    if b[:-2] != batch or out[:-2] != batch or len(set(batch)) != len(batch):
        return None
    if "..." in (i, x, y, z, o1, o2):  # a trailing ellipsis may hide more contracted axes than one
        return None
    if first == "ij":  # a: i k, b: j k, out: i j
        ok = z == x and o1 == i and o2 == y and len({i, y, x}) == 3
    else:  # a: i j, b: j k, out: i k
        ok = y == x and o1 == i and o2 == z and len({i, x, z}) == 3
    return tuple(ops) if ok and not ({i, x, y, z} & set(batch)) else None


def _row_max_of(m: Any, x: fx.Node) -> list:
    """The nodes of `x.amax(-1, keepdim=True)` or `x.max(-1, keepdim=True)[0]/.values`, optionally
    `.detach()`ed, when `m` is that (the max a numerically careful softmax subtracts first; softmax
    is shift invariant); else []."""
    nodes = []
    if is_method(m, "detach") or is_call(m, torch.detach):
        nodes.append(m)
        m = m.args[0]
    reduce = "amax"
    if is_call(m, operator.getitem) and m.args[1] == 0 or is_call(m, getattr) and m.args[1] == "values":
        nodes.append(m)
        m, reduce = m.args[0], "max"  # torch.max with a dim returns (values, indices)
    if not (is_method(m, reduce) or is_call(m, getattr(torch, reduce))) or m.args[0] is not x:
        return []
    return [*nodes, m] if _keeps_last_axis(m, x) else []


def _keeps_last_axis(r: fx.Node, x: Any) -> bool:
    """Whether the reduction `r` (amax / max / sum, its dim and keepdim positional or by keyword)
    reduces `x` over its last axis with keepdim=True."""
    dim, keep = arg(r, 1, "dim", None), arg(r, 2, "keepdim", False)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return keep is True and _last_dim(x, dim)


def _exact_upcast_input(x: Any, dtype, chain: list) -> Any:
    """The half-precision input of `x` when `x` is its exact upcast to float32 (`q.float() @
    k.float()ᵀ` in half-precision models: the kernels' float32 accumulation gives the same scores),
    the cast then joining the match if nothing else uses it; else `x`."""
    xv, src = val(x), x.args[0] if is_cast(x) and x.args else None
    sv = val(src)
    if not (isinstance(xv, torch.Tensor) and isinstance(sv, torch.Tensor)) or xv.dtype != torch.float32 \
            or sv.dtype != dtype or dtype not in (torch.float16, torch.bfloat16):
        return x
    if single_user(x):
        chain.append(x)
    return src


def match_explicit(node: fx.Node, ctx: MatchContext) -> Union[AttentionMatch, Rejection, None]:
    parts = _explicit_parts(node)
    if not isinstance(parts, tuple):
        return parts
    chain, pv, q, k, v, scale, bias, bias_scale, forbid = parts
    shapes = {"q": shape_of(q), "k": shape_of(k), "v": shape_of(v)}
    dtypes = {getattr(val(t), "dtype", None) for t in (q, k, v)}
    if len(dtypes) != 1:
        return _reject("explicit", node, f"q, k and v of different dtypes ({', '.join(map(str, dtypes))})", shapes)
    key_layout = _common_checks("explicit", node, ctx, q, k, v, scale, shapes)
    if isinstance(key_layout, Rejection):
        return key_layout
    if shapes["q"][:-2] != shapes["k"][:-2]:
        return _reject("explicit", node, "broadcast q/k batch dims", shapes)
    if bias is not None:
        if not isinstance(val(bias), torch.Tensor):
            return _reject("explicit", node, "additive term on the attention scores is not a tensor", shapes)
        if (why := _bias_ok(bias, (*shapes["q"][:-1], shapes["k"][-2]))) is not None:
            return _reject("explicit", node, why, shapes)
        if not val(bias).is_floating_point():  # adds 0 / 1, not a mask
            return _reject("explicit", node, f"a {val(bias).dtype} tensor added to the scores", shapes)
    key_mask = None
    if forbid is not None:  # the op takes what is attended: the rewrite inverts the mask
        shapes["mask"] = shape_of(forbid)
        full = (*shapes["q"][:-1], shapes["k"][-2])
        if bias is not None:
            return _reject("explicit", node, "a masked fill and an added bias on the attention scores", shapes)
        if getattr(val(forbid), "dtype", None) != torch.bool:
            return _reject("explicit", node, "masked fill of the scores by a non-boolean mask", shapes)
        if len(full) == 4 and _key_mask_ok(forbid, full[0], full[-1]) is None:
            key_mask = forbid
        elif (why := _bias_ok(forbid, full)) is None:
            bias = forbid
        else:
            return _reject("explicit", node, why, shapes)
    return AttentionMatch(
        pattern="explicit", anchor=node, output=pv, q=q, k=k, v=v, nodes=chain[::-1], scale=scale,
        squeeze_head=len(shapes["q"]) == 3, key_layout=key_layout, bias=bias, bias_scale=bias_scale,
        key_mask=key_mask, mask_inverted=forbid is not None,
    )


def attention_queries(graph: fx.Graph) -> list:
    """The query of every attention in `graph` that the patterns here read, accepted by their checks
    or not: SDPA calls, SDPA's backend ops and softmax(QKᵀ)V (`token_streams.attention_rows`)."""
    out = []
    for n in graph.nodes:
        if is_call(n, *SDPA) or (n.op == "call_function" and n.target in ATEN_SDPA):
            out.append(n.args[0] if n.args else n.kwargs.get("query"))
        elif isinstance(parts := _explicit_parts(n), tuple):
            out.append(parts[2])
    return out


def _last_dim(node: Any, dim: Any) -> bool:
    """Whether `dim` (an int) names the last axis of `node`."""
    shape = shape_of(node)
    return shape is not None and isinstance(dim, int) and dim % len(shape) == len(shape) - 1


def _written_out_softmax(node: fx.Node) -> Optional[tuple[fx.Node, list]]:
    """(x, [the sum, the exp]) when `node` is `e / e.sum(-1, keepdim=True)` for `e = x.exp()`, the
    exp used by those two alone: softmax(x) written out (its row max, if any, is subtracted in x)."""
    if not is_call(node, *_DIV) or len(node.args) != 2 or node.kwargs:
        return None
    e, total = node.args
    if not (is_method(e, "exp") or is_call(e, torch.exp)) or set(e.users) != {node, total}:
        return None
    if not (is_method(total, "sum") or is_call(total, torch.sum)) or total.args[0] is not e:
        return None
    if not _keeps_last_axis(total, e) or not single_user(total):
        return None
    return e.args[0], [total, e]


def _masked_fill(s: Any) -> Optional[tuple[fx.Node, fx.Node]]:
    """(scores, mask) when `s` is `scores.masked_fill(mask, value)` for a value of -inf or at most
    -1e4 (exp gives 0 there in every float type): the mask's True entries are keys not attended."""
    if not (is_method(s, "masked_fill") or is_call(s, torch.masked_fill)):
        return None
    scores, mask = arg(s, 0, "input", None), arg(s, 1, "mask", None)
    value = _const(arg(s, 2, "value", None))
    if not isinstance(mask, fx.Node) or value is None or value > -1e4:
        return None
    return scores, mask


def _explicit_parts(node: fx.Node) -> Union[tuple, Rejection, None]:
    """(chain, P·V product, q, k, v, scale, bias, bias_scale, forbid) of the softmax(QKᵀ)V anchored
    at `node`, a softmax or one written out (`_written_out_softmax`); `forbid` the mask of a
    `masked_fill` of the scores (True: not attended); a Rejection or None where the spelling is not
    one."""
    written = _written_out_softmax(node)
    if written is None:
        if not (is_method(node, "softmax") or is_call(node, *SOFTMAX_FNS)) or not _last_dim(node, arg(node, 1, "dim", None)):
            return None
    shape = shape_of(node)
    chain = [node, *(written[1] if written else ())]

    def only_feeds_chain(n: fx.Node) -> bool:  # every user of n is part of the match
        return all(u in chain for u in n.users)

    # -- walk up from the softmax: casts, constant scales, a subtracted row max, one added bias,
    # one masked fill, then QKᵀ ----------------------------------------------------------------
    s, scale, bias, bias_scale, forbid = written[0] if written else node.args[0], 1.0, None, 1.0, None
    while True:
        if is_cast(s) and only_feeds_chain(s):
            chain.append(s)
            s = s.args[0]
        elif is_call(s, *_MUL) and only_feeds_chain(s) and (_const(s.args[1]) is not None or _const(s.args[0]) is not None):
            c = _const(s.args[1]) if _const(s.args[1]) is not None else _const(s.args[0])
            chain.append(s)
            s = s.args[0] if _const(s.args[1]) is not None else s.args[1]
            scale *= c
        elif is_call(s, *_DIV) and only_feeds_chain(s) and _const(s.args[1]) is not None:
            chain.append(s)
            scale /= _const(s.args[1])
            s = s.args[0]
        elif is_call(s, *_SUB) and only_feeds_chain(s) and (row_max := _row_max_of(s.args[1], s.args[0])) \
                and all(single_user(n) for n in row_max):
            chain.extend([s, *row_max])
            s = s.args[0]
        elif forbid is None and (filled := _masked_fill(s)) is not None and only_feeds_chain(s):
            chain.append(s)
            s, forbid = filled
        elif is_call(s, *_ADD) and only_feeds_chain(s) and len(s.args) == 2 and not s.kwargs:
            side = _scores_side(s)
            if side is None or (bias is not None and _const(s.args[1 - side]) is None):
                return _reject("explicit", node, "additive terms on the attention scores that are not one bias",
                               {"scores": shape})
            chain.append(s)
            if _const(s.args[1 - side]) is None:  # a constant shift changes no softmax
                bias, bias_scale = s.args[1 - side], scale  # the scales met so far multiply the bias too
            s = s.args[side]
        else:
            break
    q = kt = k = None
    if (qk := _einsum_product(s, "ij")) is not None and only_feeds_chain(s):
        q, k = qk
    elif is_call(s, *MATMUL) and only_feeds_chain(s):
        q, kt = s.args[0], s.args[1]
    elif is_call(s, torch.baddbmm) and only_feeds_chain(s):
        kw = fn_kwargs(s) or {}
        if _const(kw.get("beta", 1)) != 0:
            return _reject("explicit", node, "baddbmm adds a bias to the scores", {"scores": shape})
        q, kt = kw.get("batch1"), kw.get("batch2")
        scale *= _const(kw.get("alpha", 1.0)) or 1.0
    else:
        return None
    chain.append(s)
    if k is None:
        k = _transposed_key(kt) if isinstance(kt, fx.Node) else None
        if k is None:
            return None
        if single_user(kt):
            chain.append(kt)
    # -- walk down: casts / no-op dropout, then P·V ------------------------------------------
    p = node
    while single_user(p):
        (u,) = p.users
        if is_cast(u) or is_noop_dropout(u):
            chain.append(u)
            p = u
            continue
        break
    if not single_user(p):
        return _reject("explicit", node, "attention probabilities have other users", {"scores": shape})
    (pv,) = p.users
    if (pv_ops := _einsum_product(pv, "jk")) is not None and pv_ops[0] is p:
        v = pv_ops[1]
    elif is_call(pv, *MATMUL) and pv.args[0] is p:
        v = pv.args[1]
    else:
        return None
    chain.append(pv)
    v_dtype = getattr(val(v), "dtype", None)
    q, k = (_exact_upcast_input(t, v_dtype, chain) for t in (q, k))
    return chain, pv, q, k, v, scale, bias, bias_scale, forbid


def _scores_side(add: fx.Node) -> Optional[int]:
    """Which operand of `add` is the scores: the one that reaches a Q·Kᵀ product through casts and
    constant scales (the other is the bias, or a constant); None when neither does."""
    for side in (0, 1):
        n = add.args[side]
        while isinstance(n, fx.Node):
            if _einsum_product(n, "ij") is not None or is_call(n, *MATMUL) or is_call(n, torch.baddbmm):
                return side
            if is_cast(n) or (is_call(n, *_DIV) and _const(n.args[1]) is not None):
                n = n.args[0]
            elif is_call(n, *_MUL) and (_const(n.args[0]) is not None or _const(n.args[1]) is not None):
                n = n.args[0] if _const(n.args[1]) is not None else n.args[1]
            else:
                break
    return None


try:  # the higher-order op Dynamo records for torch.nn.attention.flex_attention
    from torch._higher_order_ops.flex_attention import flex_attention as _FLEX_HOP
except Exception:  # pragma: no cover - a torch without flex attention
    _FLEX_HOP = None


def match_flex(node: fx.Node, ctx: MatchContext) -> Optional[Rejection]:
    if _FLEX_HOP is None or not is_call(node, _FLEX_HOP):
        return None
    q, k, v = node.args[:3]
    return _reject("flex", node, "flex_attention (score_mod / block mask): left dense",
                   {"q": shape_of(q), "k": shape_of(k), "v": shape_of(v)})


register_pattern(Pattern("sdpa", "attention", match_sdpa, priority=100,
                         description="F.scaled_dot_product_attention, positional or keyword"))
register_pattern(Pattern("sdpa_aten", "attention", match_sdpa_aten, priority=95,
                         description="SDPA backend ops (cuDNN, flash, efficient) with only their output used"))
register_pattern(Pattern("explicit", "attention", match_explicit, priority=90,
                         description="softmax(scale * Q Kᵀ [- row max]) V with matmul/bmm/baddbmm/einsum"))
register_pattern(Pattern("flex", "attention", match_flex, priority=80,
                         description="flex_attention: never rewritten, reported as rejected"))

"""Do an attention's queries and keys come from different token streams?

Self and joint attention project queries and keys from the same tokens; cross-attention projects
its keys from another sequence (text, audio, learned latents). Comparing lengths tells them apart
only while the lengths differ: 8 text tokens attending to 8 audio tokens look like self-attention.

Rule: from q (and from k) walk up the graph through ops whose output is one of their inputs
rearranged or rescaled (views, transposes, casts, norms, rotary products, chunks, concatenations:
`_upstream`; on the way to the projection also repeats, `_REPEATS`: grouped-query heads repeated to
the query heads) to the first linear projection on every path; from each projection's input walk on
up the same way to collect the chain of tensors it was made from. Queries and keys come from
different streams when both walks reached a projection on every path and the two chains share no
node.

Invariant: conservative. Any path that cannot be followed (q or k is a graph input, or made by a
matmul, a reduction or another op whose element count matches none of its inputs') makes the
answer "not known to differ" (False), and the caller keeps its length rule alone.

Queries cut from their keys' sequence (`token_slice_of`, `projected_from`): the prefill of a KV
cache attends the last tokens' queries to every token's keys; q is a slice of a projection whose
input also makes k, token for token.

Joint keys (`joint_key_streams`): k = cat(parts), possibly repeated to the query heads after the
concatenation (`key_concat`), with one or more parts from q's stream (the
caller checks that they are its whole sequence, in order); every other
part is projected from another stream or is precomputed, i.e. made of graph inputs by
token-preserving ops with no projection on the way and no input in q's chain (a KV cache filled by
an earlier call).

Cuts: a chain stops at an indexing that keeps fewer elements than its source (a token range of a
packed sequence, Cosmos3's `seq[:und_len]` and `seq[und_len:]`) and records it as (source, index):
two cuts of one sequence are different streams, the same cut made twice is one.

Token rows (`token_rows`): a (tokens, C) input is a token sequence when it is made, by ops that keep
each row where it is, of a chain of some attention's queries (`attention_rows`; SDPA calls and
written-out softmax(QKᵀ)V alike). Indexing by
tensors, gathers, sorts and scatters stop that walk: they move rows by data, as MoE routing does,
and a cache row would then hold another token from one step to the next.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fx_utils import is_call, is_linear, linear_parts, op_name, val

_CAT = (torch.cat, torch.concat, torch.stack)
_LIMIT = 256  # nodes visited per walk


def _numel(node) -> Optional[int]:
    v = val(node)
    return v.numel() if isinstance(v, torch.Tensor) else None


def _upstream(node: fx.Node) -> Optional[list]:
    """The inputs `node`'s output is made of, or None when it is not a token-preserving op."""
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target is operator.getitem:
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else None
    if is_call(node, torch.view_as_complex, torch.view_as_real):  # pairs of the last dim: same tokens
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else None
    if is_call(node, *_CAT):
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        return [p for p in parts if isinstance(p, fx.Node)] if isinstance(parts, (list, tuple)) else None
    v = val(node)
    if isinstance(v, (tuple, list)):  # chunk / split / unbind: pieces of the first input
        first = node.args[0] if node.args else None
        return [first] if isinstance(first, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    # compared without guards: sizes may be symbolic, even unbacked
    same = [a for a in node.all_input_nodes if _numel(a) is not None and statically_known_true(_numel(a) == v.numel())]
    return same or None


# ops whose output is copies of their first input (grouped-query heads repeated to the query heads:
# `k.repeat_interleave(2, dim=1)`, `k[:, :, None].expand(...)`): what they are projected from is
# what that input is projected from
_REPEATS = frozenset({"repeat_interleave", "expand", "expand_as", "repeat", "tile", "broadcast_to"})


def _repeated_from(node: fx.Node) -> Optional[list]:
    """[the repeated input] when `node` is one of `_REPEATS`; else None."""
    first = node.args[0] if node.args else None
    return [first] if op_name(node) in _REPEATS and isinstance(first, fx.Node) else None


def _projection_inputs(start, every_path: bool = True) -> Optional[set]:
    """Inputs of the first linear projection on every path up from `start` (None: a path without
    one), also through repeats (`_REPEATS`: more tokens or heads, each a copy of one projected
    from that input). With every_path False, paths that cannot be followed (a rotary table
    computed from position ids) are dropped: the projections reached on the others."""
    found, todo, seen = set(), [start], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > _LIMIT:
            return None
        if is_linear(n):
            found.add(linear_parts(n)[0])
            continue
        ups = _upstream(n) or _repeated_from(n)
        if ups is None:
            if every_path:
                return None
            continue
        todo.extend(ups)
    return found or None


def _cut(node) -> Optional[tuple]:
    """("cut", source, index) when `node` indexes fewer elements out of a tensor; else None."""
    if not _indexes_tensor(node):
        return None
    a, b = _numel(node), _numel(node.args[0])
    if a is None or b is None or statically_known_true(a == b):
        return None
    return ("cut", node.args[0], repr(node.args[1]))


def _chain(starts) -> set:
    """`starts` and every node they are made of by token-preserving ops (not through projections, not
    above a cut: module docstring), nearest first: a residual stream goes up through every earlier
    block, and a shared ancestor of q's and k's projection inputs sits a step or two above them."""
    out, todo = set(), deque(starts)
    while todo and len(out) < _LIMIT:
        n = todo.popleft()
        if not isinstance(n, fx.Node) or n in out:
            continue
        out.add(n)
        cut = _cut(n)
        if cut is not None:
            out.add(cut)
        elif not is_linear(n):
            todo.extend(_upstream(n) or [])
    return out


# ops that move rows by data (routing, sorting): a (tokens, C) walk stops at them
_MOVES_ROWS = frozenset({"index_select", "gather", "take", "take_along_dim", "masked_select", "sort", "argsort",
                         "topk", "nonzero", "unique", "scatter", "scatter_", "scatter_add", "scatter_add_",
                         "scatter_reduce", "index_put", "index_put_", "index_add", "index_add_", "index_copy",
                         "index_copy_", "masked_scatter", "masked_scatter_", "embedding"})


def _moves_rows(node) -> bool:
    if node.target is operator.getitem:  # indexing by a tensor (advanced indexing, a boolean mask)
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return any(isinstance(i, fx.Node) and isinstance(val(i), torch.Tensor) for i in idx)
    return op_name(node) in _MOVES_ROWS


def attention_rows(queries) -> set:
    """The chains of the projection inputs of `queries` (a graph's attention queries, matched or not:
    `attention.attention_queries`)."""
    rows: set = set()
    for q in queries:
        qs = _projection_inputs(q, every_path=False) if isinstance(q, fx.Node) else None
        rows |= _chain(qs) if qs else set()
    return rows


def token_rows(x: fx.Node, rows: set) -> bool:
    """True when x's rows are tokens of `rows` (`attention_rows`): x is made of a node of them by
    token-preserving ops that never move rows by data (module docstring)."""
    todo, seen = [x], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n in rows:
            return True
        seen.add(n)
        if len(seen) > _LIMIT or is_linear(n) or n.op not in ("call_function", "call_method") or _moves_rows(n):
            continue
        todo.extend(_upstream(n) or [])
    return False


def distinct_streams(q, k) -> bool:
    """True when q and k are provably projected from different token streams (module docstring)."""
    qs, ks = _projection_inputs(q), _projection_inputs(k)
    if qs is None or ks is None:
        return False
    return not (_chain(qs) & _chain(ks))


def _up_token_ops(node, steps: int = 16, repeats: bool = False):
    """node, then what it is made of through token-preserving single-input ops (casts, views, axis
    swaps, a rotary product with a table: the data operand), nearest first, at most `steps`; with
    `repeats` also through `_REPEATS` (keys of grouped-query heads repeated to the query heads: each
    token stays where it is, so a caller that checks the token count finds a repeat along the token
    axis by its count)."""
    for _ in range(steps):
        yield node
        ups = _upstream(node) or (_repeated_from(node) if repeats else None)
        if not ups:
            return
        if _feature_cat(node):  # a rotary product spelled rotate-half: every part holds every token
            node = ups[0]
            continue
        first = node.args[0] if node.args else None
        if len(ups) > 1 and first not in ups:  # follow the data operand (type_as(x, ref): x)
            return
        node = first if len(ups) > 1 else ups[0]


def _cat_dim(node) -> Optional[int]:
    """The output axis a cat / stack node joins along (non-negative), or None when it is not known."""
    v = val(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % v.dim() if isinstance(v, torch.Tensor) and isinstance(dim, int) and v.dim() else None


def _feature_cat(node) -> bool:
    """node concatenates or stacks along its output's last axis (a rotary product's halves or pairs,
    `cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)`): each part has the tokens of the output, in place."""
    if not is_call(node, *_CAT):
        return False
    dim = _cat_dim(node)
    return dim is not None and dim > 0 and dim == val(node).dim() - 1


def key_concat(k, n_k: int) -> Optional[tuple[list, int]]:
    """(the concatenated parts, the axis) when k is, through token-preserving single-input ops (casts, views, axis
    swaps, a rotary product with a table, grouped-query repeats), a concatenation of n_k tokens along one axis;
    else None."""
    for node in _up_token_ops(k, repeats=True):
        if is_call(node, torch.cat, torch.concat):
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = _cat_dim(node)
            if dim is None or not isinstance(parts, (list, tuple)):
                return None
            if val(node).shape[dim] == n_k:
                return list(parts), dim
            if not _feature_cat(node):
                return None
    return None


def _indexes_tensor(node) -> bool:
    """node is tensor[...] (a getitem on a tensor, not on a tuple of outputs)."""
    return node.target is operator.getitem and isinstance(val(node.args[0]), torch.Tensor)


def token_slice_of(q) -> Optional[fx.Node]:
    """The nearest tensor indexing above q through token-preserving single-input ops (where q's
    tokens were cut from a longer sequence), or None."""
    for node in _up_token_ops(q):
        if _indexes_tensor(node):
            return node
    return None


def projected_from(node) -> Optional[fx.Node]:
    """The input of the linear projection `node` is made of through token-preserving single-input
    ops that keep every token (no indexing that drops any) and grouped-query repeats, or None."""
    for n in _up_token_ops(node, repeats=True):
        if is_linear(n):
            return linear_parts(n)[0]
        if _indexes_tensor(n) and not statically_known_true(_numel(n.args[0]) == _numel(n)):
            return None
    return None


def precomputed(node, exclude: set = frozenset()) -> bool:
    """True when `node` is made of graph inputs (or parameters/buffers) by token-preserving ops, with
    no projection on the way and none of the inputs in `exclude` (the queries' chain): keys computed
    before this graph ran, as a KV cache holds them."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > _LIMIT or is_linear(n):
            return False
        if n.op in ("placeholder", "get_attr"):
            if n in exclude:
                return False
            continue
        ups = _upstream(n)
        if ups is None:
            return False
        todo.extend(ups)
    return bool(seen)


def joint_key_streams(q, parts) -> Optional[list]:
    """Indices of the parts of a key concatenation projected from q's token stream, when every
    other part is projected from another one or is precomputed (a KV cache: a graph input); None
    when that is not shown. Walks drop the paths they cannot follow (rotary tables), so both sides
    of the verdict need projections actually reached: an own part shares a chain node with q,
    every other part shares none (or is precomputed)."""
    qs = _projection_inputs(q, every_path=False)
    if qs is None:
        return None
    q_chain = _chain(qs)
    own = []
    for i, p in enumerate(parts):
        ps = _projection_inputs(p, every_path=False)
        if ps is None:
            if precomputed(p, q_chain):
                continue
            return None
        if _chain(ps) & q_chain:
            own.append(i)
    return own or None

"""Linears with unfused low-rank adapters, as peft (diffusers' `load_lora_weights`) leaves them:

    y = linear(x, W, b) + s1 · linear(linear(x, A1), B1) + s2 · ...      (A: r×C, B: F×r, no biases)

An MLP whose linears carry adapters is still an MLP: its weight is W + Σ s·(B @ A), which the
rewrite folds into one tensor in the graph (`rewrite._weight`), so the sparse kernels gather rows
of the adapted weight. Without this, every adapted MLP of a LoRA model stayed dense, unreported.

Invariants: pure functions of nodes (nothing here edits a graph). A term is recognized only when
its input is the base linear's input (through no-op dropouts and value-keeping casts), its scale
is a number or a 0-dim float tensor (hot-swappable adapters), its two linears have no bias and are used only by the term, and its rank is below
both dimensions of W; anything else (DoRA, adapter biases, a tensor scale) leaves the node
unrecognized. Sums are read left-nested, as consecutive `result = result + term` build them.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from .fx_utils import is_call, is_cast, is_linear, is_noop_dropout, linear_parts, shape_of, val

_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)


@dataclass(frozen=True)
class AdaptedWeight:
    """W + Σ scale · (B @ A): a linear's weight with its low-rank terms (A, B, scale)."""

    base: fx.Node
    terms: tuple


def weight_shape(spec) -> Optional[tuple]:
    return shape_of(spec.base if isinstance(spec, AdaptedWeight) else spec)


def _unrange(spec):
    return spec[0] if isinstance(spec, tuple) else spec


def adapter_count(spec) -> int:
    """Low-rank terms of a weight spec (a weight, an `AdaptedWeight` or a (weight, start, stop) range)."""
    spec = _unrange(spec)
    return len(spec.terms) if isinstance(spec, AdaptedWeight) else 0


def weight_nodes(spec) -> list:
    """The tensors a weight spec reads: the weight, or the base weight and every adapter factor."""
    spec = _unrange(spec)
    if isinstance(spec, AdaptedWeight):
        return [spec.base] + [f for a_down, b_up, _ in spec.terms for f in (a_down, b_up)]
    return [spec]


def _source(node: Any, nodes: list) -> Any:
    """`node` seen through single-user no-op dropouts and casts (those join `nodes`)."""
    while isinstance(node, fx.Node) and (is_noop_dropout(node) or is_cast(node)) and len(node.users) == 1:
        nodes.append(node)
        node = node.args[0]
    return node


def _is_scale(a: Any) -> bool:
    """A number, or a one-element tensor (peft's scalings made tensors for compiled hot-swapping)."""
    if isinstance(a, fx.Node):
        v = val(a)
        return isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()
    return isinstance(a, numbers.Number) and not isinstance(a, bool)


def _term(node: Any) -> Optional[tuple]:
    """(input, A, B, scale, nodes) when `node` is scale · linear(linear(input, A), B); scale is a
    float or a 0-dim tensor node."""
    nodes, scale = [], 1.0
    if is_call(node, *_MUL) and len(node.args) == 2 and not node.kwargs:
        lin = [a for a in node.args if is_linear(a)]
        if len(lin) != 1 or not _is_scale(node.args[1 - node.args.index(lin[0])]) or len(lin[0].users) != 1:
            return None
        nodes.append(node)
        scale, node = node.args[1 - node.args.index(lin[0])], lin[0]
        scale = scale if isinstance(scale, fx.Node) else float(scale)
    if not (is_linear(node) and len(node.users) == 1):
        return None
    down, b_up, bias_up = linear_parts(node)
    if bias_up is not None or not (is_linear(down) and len(down.users) == 1):
        return None
    x, a_down, bias_down = linear_parts(down)
    if bias_down is not None:
        return None
    nodes += [node, down]
    return _source(x, nodes), a_down, b_up, scale, nodes


def adapted_linear(node: Any) -> Optional[tuple]:
    """(x, weight, bias, nodes) when `node` is a linear, or a linear plus low-rank terms of the
    same input; weight is the weight node, or an `AdaptedWeight` when there are terms. nodes: the
    linear and every node of its terms (the sums last)."""
    if is_linear(node):
        x, w, b = linear_parts(node)
        return x, w, b, [node]
    if not (is_call(node, *_ADD) and len(node.args) == 2 and not node.kwargs):
        return None
    left, right = node.args
    inner = adapted_linear(left) if isinstance(left, fx.Node) and len(left.users) == 1 else None
    term = _term(right)
    if inner is None or term is None:
        return None
    x, w, b, nodes = inner
    tx, a_down, b_up, scale, term_nodes = term
    if _source(x, []) is not tx:
        return None
    base = w.base if isinstance(w, AdaptedWeight) else w
    ws, a_shape, b_shape = shape_of(base), shape_of(a_down), shape_of(b_up)
    if not (ws and a_shape and b_shape and len(ws) == len(a_shape) == len(b_shape) == 2):
        return None
    rank = a_shape[0]
    if not (b_shape == (ws[0], rank) and a_shape[1] == ws[1] and rank < min(ws)):
        return None
    terms = (w.terms if isinstance(w, AdaptedWeight) else ()) + ((a_down, b_up, scale),)
    return x, AdaptedWeight(base, terms), b, nodes + term_nodes + [node]

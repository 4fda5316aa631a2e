"""The pattern registry: small declarative records that find Chipmunk sites in a Dynamo graph.

Invariants:
- A pattern never mutates the graph: `match(node, ctx)` returns an `AttentionMatch`/`MlpMatch`,
  a `Rejection` (a candidate that looked like a site but must stay dense, with the reason), or
  None (not this pattern). The rewrite (`chipmunk_compile.rewrite`) is the only graph writer.
- Patterns look at structure only (ops, shapes, constants, use counts); never at module or
  model names. Module paths are carried along for reports and per-layer overrides.
- Patterns are tried in descending `priority`; a node already claimed by an earlier match is
  never matched twice.

Registering a pattern for a new architecture::

    from chipmunk_compile.patterns import Pattern, register_pattern, AttentionMatch

    def match_my_attention(node, ctx):
        if not is_call(node, my_fused_attention_fn):
            return None
        q, k, v = node.args[:3]
        return AttentionMatch(pattern="my-attention", anchor=node, output=node, q=q, k=k, v=v,
                              nodes=[node])

    register_pattern(Pattern("my-attention", "attention", match_my_attention, priority=50))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch.fx as fx


@dataclass
class AttentionMatch:
    pattern: str
    anchor: fx.Node
    output: fx.Node  # the node whose uses the chipmunk op's result replaces
    q: fx.Node
    k: fx.Node
    v: fx.Node
    nodes: list[fx.Node]  # nodes that go away once `output` has no more users
    mask_node: Optional[fx.Node] = None  # original mask argument, when present
    # padding read from the mask: `node.flatten(1).bool()` is (B or 1, N); a padded key is never
    # attended, a padded query's output row is zero. Without key_mask, mask_node (when set) must
    # itself be a (B, 1, 1, Nk) key-padding mask.
    key_mask: Optional[fx.Node] = None
    query_mask: Optional[fx.Node] = None
    # any other mask that broadcasts to (B, H, Nq, Nk): a float one is added to the scaled scores
    # (SDPA's attn_mask), a boolean one allows (True) or forbids (False) each query-key pair; the
    # op takes it as an additive bias
    bias: Optional[fx.Node] = None
    bias_scale: float = 1.0  # the written-out form's scales applied after the bias was added: they scale it too
    # key_mask / bias hold a boolean mask whose True entries are NOT attended (the explicit form's
    # masked_fill(mask, -inf)): the rewrite passes its inversion
    mask_inverted: bool = False
    scale: Optional[float] = None  # None: 1/sqrt(D)
    squeeze_head: bool = False  # 3-D (B*H, N, D) attention, given to the op as (B*H, 1, N, D)
    # joint keys (PRX: image queries over cat(text keys, image keys)): the key concatenation's parts
    # in order, ("own", q_start, q_stop) / ("other", size, None), sizes None where symbolic (see
    # attention._joint_key_layout); None when the keys are the queries' own tokens
    key_layout: Optional[tuple] = None
    kind: str = "attention"


@dataclass
class MlpMatch:
    pattern: str
    anchor: fx.Node
    output: fx.Node
    x: fx.Node
    w_act: Any  # fx.Node, or (fx.Node, start, stop) row slice of a fused weight
    b_act: Any
    w2: fx.Node
    b2: Optional[fx.Node]
    act: str
    nodes: list[fx.Node]
    w_lin: Any = None
    b_lin: Any = None
    # parallel form: second linear takes cat(others..., h) along the last dim
    cat_parts: Optional[list[fx.Node]] = None
    cat_index: int = -1  # position of h among cat_parts
    # fused first linear (Flux2 single blocks): its other column ranges, (node, x, w, b, start, stop)
    # each, become dense linears over those weight rows; the fused linear itself is erased
    first_rest: list = field(default_factory=list)
    # 0: sequence-first input (S, B, C) (ERNIE-Image), handed to the op as its (B, S, C) transpose
    token_axis: int = -2
    kind: str = "mlp"


@dataclass
class Rejection:
    kind: str
    pattern: str
    anchor: fx.Node
    reason: str
    path: str = ""
    shapes: dict = field(default_factory=dict)


Match = Union[AttentionMatch, MlpMatch]


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: str  # "attention" | "mlp"
    match: Callable[[fx.Node, "MatchContext"], Optional[Union[Match, Rejection]]]
    priority: int = 0
    description: str = ""

    def __post_init__(self):
        if self.kind not in ("attention", "mlp"):
            raise ValueError(f"pattern {self.name!r}: kind must be 'attention' or 'mlp'")
        if not callable(self.match):
            raise TypeError(f"pattern {self.name!r}: match must be callable")


@dataclass
class MatchContext:
    """What a matcher may consult besides the node: the active config, claimed nodes, and what
    matchers computed once per graph (`memo`)."""

    config: Any
    claimed: set = field(default_factory=set)
    memo: dict = field(default_factory=dict)


_PATTERNS: dict[str, Pattern] = {}


def register_pattern(pattern: Pattern, *, replace: bool = False) -> Pattern:
    if pattern.name in _PATTERNS and not replace:
        raise ValueError(f"a pattern named {pattern.name!r} is registered already")
    _PATTERNS[pattern.name] = pattern
    return pattern


def unregister_pattern(name: str) -> None:
    _PATTERNS.pop(name, None)


def registered_patterns() -> list[Pattern]:
    return sorted(_PATTERNS.values(), key=lambda p: -p.priority)

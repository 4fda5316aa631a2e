"""Find Chipmunk sites in a Dynamo graph and replace them with `chipmunk::*` ops.

Invariants:
- Matching is pure (patterns return records); this module (and `rewrite_subgraphs` and
  `rewrite_multihead`, which it calls first) are the only graph writers.
- Each matched site is replaced by exactly one `torch.ops.chipmunk.attention` or
  `torch.ops.chipmunk.mlp` node (plus views: unsqueeze/squeeze for 3-D attention, flatten/expand
  of a key-padding mask, the scale of a written-out form's bias, weight slices, for the parallel
  MLP form one dense linear + add, and for a first linear fused with other projections one dense
  linear per other column range; under autocast a cast of each floating input to the autocast
  dtype at the site: `autocast_casts`), and the matched nodes are erased once they have no users.
  Nothing else in the graph changes.
- Before matching, `rewrite_subgraphs.inline_subgraphs` inlines activation-checkpointed regions
  and nested compile regions, and `rewrite_multihead.expand_multihead` writes each `nn.MultiheadAttention` /
  `nn.TransformerEncoderLayer` call it can out as the ops it runs, so the patterns see inside them.
- Placeholders are never added or removed (Dynamo re-reads them after the backend returns).
- Layer index: attention sites count layers in graph order, one layer per block: a site in the
  same innermost indexed module as the attention site before it (`blocks.3`: the two SDPAs of a
  differential attention, self- and cross-attention of one block) shares its layer. An MLP site
  takes the layer of the closest attention site before it (0 when none), so "first n layers
  dense" means blocks.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from . import ops as _ops  # noqa: F401  (registers torch.ops.chipmunk)
from .autocast_casts import autocast_at, cast, device_type_of
from .grouping import assign_grouping
from .ops.sites import Site
from .patterns import MatchContext, Rejection, registered_patterns
from .patterns.fx_utils import copy_provenance, module_path, shape_of, val
from .patterns.low_rank import AdaptedWeight, adapter_count, weight_shape
from .rewrite_subgraphs import inline_subgraphs
from .rewrite_multihead import expand_multihead
from .runtime import Session, indexed_path

log = logging.getLogger("chipmunk_compile")


@dataclass
class Plan:
    sites: list[Site] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    grouping: dict = field(default_factory=dict)


def find_matches(gm: fx.GraphModule, config) -> tuple[list, list[Rejection]]:
    inline_subgraphs(gm)
    expand_multihead(gm)
    ctx = MatchContext(config)
    patterns = registered_patterns()
    matches, rejections = [], []
    for node in list(gm.graph.nodes):
        if node in ctx.claimed or node.op not in ("call_function", "call_method"):
            continue
        for pattern in patterns:
            try:
                result = pattern.match(node, ctx)
            except GuardOnDataDependentSymNode as e:  # a size only known at run time: that candidate stays dense
                why = str(e).splitlines()[0][:160]
                result = Rejection(pattern.kind, pattern.name, node, f"data-dependent sizes ({why})", module_path(node))
            if result is None:
                continue
            if isinstance(result, Rejection):
                rejections.append(result)
                break
            if any(n in ctx.claimed for n in result.nodes):
                continue
            matches.append(result)
            ctx.claimed.update(result.nodes)
            break
    return matches, rejections


def plan_sites(gm: fx.GraphModule, config, session: Session, frame_name: str = "") -> tuple[Plan, list]:
    """The sites of `gm`'s matches, named by module path; `frame_name` names those (and the rejected
    candidates) of a frame that runs in no module (a hook's function: TaylorSeer's attention
    frames), which have no path."""
    matches, rejections = find_matches(gm, config)
    for r in rejections:
        r.path = r.path or frame_name
    plan = Plan(rejections=rejections)
    n_attn = 0
    last_block = None  # innermost indexed module of the previous attention site
    pairs = []
    # attention disabled by config still counts as a layer, so MLP layer numbers (and hence
    # `first_n_dense_layers`) do not depend on whether attention is sparsified
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    disabled = [r for r in rejections if r.kind == "attention" and r.reason == "disabled by config"]
    calls: dict = {}
    for m in sorted([*matches, *disabled], key=lambda item: order[item.anchor]):
        module = module_path(m.anchor) or frame_name
        if isinstance(m, Rejection) or m.kind == "attention":
            block = _innermost_block(module)
            n_attn += block is None or block != last_block
            last_block = block
        if isinstance(m, Rejection):
            continue
        attn_cfg, mlp_cfg = config.for_site(module)  # overrides match the module, whatever the call
        # a module called more than once (CogView4 runs one `ff` on the image and on the text
        # tokens) gives one site per call: the second and later calls are named path#1, path#2, ...
        k = calls[(m.kind, module)] = calls.get((m.kind, module), -1) + 1
        path = module if k == 0 else f"{module}#{k}"
        if m.kind == "attention":
            layer = n_attn - 1
            shapes = {"q": shape_of(m.q), "k": shape_of(m.k), "v": shape_of(m.v)}
            if m.bias is not None:
                shapes["bias"] = shape_of(m.bias)
            elif m.mask_node is not None:
                shapes["mask"] = shape_of(m.mask_node)
            site = Site("attention", m.pattern, path, layer, attn_cfg, session, shapes)
            site.key_layout = m.key_layout
        else:
            layer = max(n_attn - 1, 0)
            x_shape = shape_of(m.x)
            if m.token_axis == 0:  # the op sees (B, S, C)
                x_shape = (x_shape[1], x_shape[0], *x_shape[2:])
            shapes = {"x": x_shape, "w_act": _wshape(m.w_act), "w2": weight_shape(m.w2)}
            adapters = sum(adapter_count(w) for w in (m.w_act, m.w_lin, m.w2))
            if adapters:  # LoRA terms folded into its weights, for inspect()
                shapes["adapters"] = (adapters,)
            site = Site("mlp", m.pattern, path, layer, mlp_cfg, session, shapes)
            site.act = m.act
        plan.sites.append(site)
        pairs.append((m, site))
    if n_attn == 0 and not _block_relative(session):
        _layers_from_blocks([s for s in plan.sites if s.kind == "mlp"])
    if any("adapters" in s.shapes for s in plan.sites):
        _warn_per_call_folds()
    return plan, pairs


@functools.cache
def _warn_per_call_folds() -> None:
    """Once per process: unfused adapters are folded into the MLP weights on every call."""
    log.warning("chipmunk: MLP sites with unfused LoRA adapters fold them into their weights on every call "
                "(a read and a write of each adapted weight). Measured on FLUX (H200, 2 double + 4 single blocks, "
                "rank 16 on every linear): 1.13x of Inductor without adapters, 0.95x with them. When the adapters "
                "do not change, fuse them first (pipe.fuse_lora()) or set torch._inductor.config.freezing = True.")


_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|#|$)")
_INNERMOST_BLOCK = re.compile(r"^(.*\.\d+)(?:\.|#|$)")


def _innermost_block(path: str) -> Optional[str]:
    """The path up to its last index (`down.1.blocks.2.attn#1` -> `down.1.blocks.2`); None without one
    (block-relative paths of regional compilation, a weight-shared block called in a loop)."""
    m = _INNERMOST_BLOCK.match(path)
    return m.group(1) if m else None


def _layers_from_blocks(sites: list) -> None:
    """With no attention layer to count (every attention of the graph rejected: PRX's image queries
    attend to text + image keys), number MLP sites by their block, the path up to its first index
    (`transformer_blocks.3`), in graph order, instead of all at layer 0, where
    `first_n_dense_layers` kept every one dense. Block-relative paths (regional compilation) stay."""
    blocks: dict = {}
    for s in sites:
        m = _BLOCK.match(s.path)
        if m:
            s.layer = blocks.setdefault(m.group(1), len(blocks))


def _block_relative(session: Session) -> bool:
    """Whether the session's module is a block of the model it runs in (an indexed module in it:
    `transformer_blocks.3`), so that its graph's paths are relative to a block (regional compilation,
    a block compiled as a frame of its own): their indices (`ff.net.2`) are not blocks. Until session
    51 FLUX's `ff.net.2` and `ff_context.net.2` counted as blocks 0 and 1 there, and layers collided
    across the blocks that the graph serves."""
    owner = session.owner() if session.owner is not None else None
    root = session._root() if session._root is not None else None
    if owner is None or root is None:
        return False
    return indexed_path(next((n for n, m in root.named_modules() if m is owner), ""))


def _wshape(spec) -> Optional[tuple]:
    if isinstance(spec, tuple):
        w, a, b = spec
        s = weight_shape(w)
        return (b - a, *s[1:]) if s else None
    return weight_shape(spec)


def apply(gm: fx.GraphModule, pairs: list) -> None:
    replaced: dict = {}  # an earlier site's output may feed a later site directly
    amp_at = autocast_at(gm.graph)  # before any rewrite: the autocast regions of the graph as traced
    for m, site in pairs:
        for name in ("q", "k", "v", "x", "mask_node", "key_mask", "query_mask", "bias"):
            if getattr(m, name, None) in replaced:
                setattr(m, name, replaced[getattr(m, name)])
        if getattr(m, "cat_parts", None):
            m.cat_parts = [replaced.get(p, p) for p in m.cat_parts]
        if getattr(m, "first_rest", None):
            m.first_rest = [(n, replaced.get(x, x), *r) for n, x, *r in m.first_rest]
        old = m.output
        amp = amp_at(old, device_type_of(*(getattr(m, n, None) for n in ("q", "x", "output"))))
        new = _replace_attention(gm.graph, m, site, amp) if m.kind == "attention" else \
            _replace_mlp(gm.graph, m, site, amp)
        replaced[old] = new
    gm.graph.lint()
    gm.recompile()


def _erase(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(set(nodes), key=lambda n: -order.get(n, -1)):
        if n in order and not n.users:
            graph.erase_node(n)


def _replace_attention(graph: fx.Graph, m, site: Site, amp: Optional[torch.dtype] = None) -> None:
    """`amp`: the autocast dtype at the site (autocast_casts), None when off."""
    with graph.inserting_before(m.output):
        q, k, v = (cast(graph, t, amp) for t in (m.q, m.k, m.v))
        if m.squeeze_head:
            q, k, v = (graph.call_method("unsqueeze", (t, 1)) for t in (q, k, v))
        key_src = m.key_mask
        if key_src is None and m.query_mask is None and m.bias is None:
            key_src = m.mask_node  # a pattern that only names the mask: a (B, 1, 1, Nk) key mask
        bias = cast(graph, m.bias, amp)  # SDPA under autocast casts a float mask as well (not a boolean one)
        if m.mask_inverted:  # masked_fill's boolean mask says what is not attended; the op takes what is
            key_src, bias = (graph.call_function(operator.invert, (t,)) if t is not None else None
                             for t in (key_src, bias))
        batch = graph.call_method("size", (q, 0)) if key_src is not None or m.query_mask is not None else None
        key_mask = _padding_vector(graph, key_src, batch) if key_src is not None else None
        if bias is not None and m.bias_scale != 1.0:  # (QKᵀ + bias)·c: the op adds c·bias to c·QKᵀ
            bias = graph.call_function(operator.mul, (bias, m.bias_scale))
        if bias is not None and m.squeeze_head and len(shape_of(m.bias)) == 3:  # (B*H, Nq, Nk) → (B*H, 1, Nq, Nk)
            bias = graph.call_method("unsqueeze", (bias, 1))
        new = graph.call_function(torch.ops.chipmunk.attention.default,
                                  (q, k, v, key_mask, m.scale, site.id) + ((bias,) if bias is not None else ()))
        copy_provenance(new, m.output)
        if m.query_mask is not None:  # padded queries attend to nothing: SDPA's row is zero
            rows = graph.call_method("reshape", (_padding_vector(graph, m.query_mask, batch), batch, 1, -1, 1))
            new = graph.call_function(torch.where, (rows, new, 0.0))
        if m.squeeze_head:
            new = graph.call_method("squeeze", (new, 1))
    m.output.replace_all_uses_with(new)
    _erase(graph, m.nodes)
    return new


def _padding_vector(graph: fx.Graph, src: fx.Node, batch: fx.Node) -> fx.Node:
    """(B, N) bool from a padding source (a (B or 1, 1, 1, N) mask or a vector)."""
    flat = graph.call_method("flatten", (src, 1))
    if getattr(val(src), "dtype", None) != torch.bool:
        flat = graph.call_method("bool", (flat,))
    return graph.call_method("expand", (flat, batch, -1))


def _weight(graph: fx.Graph, spec, column_major: bool = False):
    """A node for a weight: the node itself, or for an `AdaptedWeight` W + Σ s·(B @ A) folded in
    the graph (one addmm per adapter; mm, mul and add for a tensor scale), made once per graph,
    weight and layout. `column_major`: the fold is computed transposed and handed over as its
    transpose (stride(0) == 1), the layout the sparse mm2 reads W2 in, so the op makes no copy of a
    tensor that is new on every call."""
    if not isinstance(spec, AdaptedWeight):
        return spec
    folds = graph.__dict__.setdefault("_chipmunk_folds", {})
    node = folds.get((spec, column_major))
    if node is None:
        def t(n):
            return graph.call_method("t", (n,))

        node = t(spec.base) if column_major else spec.base
        for a_down, b_up, scale in spec.terms:
            left, right = (t(a_down), t(b_up)) if column_major else (b_up, a_down)
            if isinstance(scale, fx.Node):  # a tensor scale (hot-swappable adapters)
                node = graph.call_function(torch.add, (node, graph.call_function(
                    torch.mul, (graph.call_function(torch.mm, (left, right)), scale))))
            else:
                node = graph.call_function(torch.addmm, (node, left, right), {"alpha": scale})
        node = folds[(spec, column_major)] = t(node) if column_major else node
    return node


def _slice(graph: fx.Graph, spec, cols: Optional[tuple[int, int]] = None, column_major: bool = False):
    """A node for `spec` (a weight or a (weight, start, stop) row slice, see `_weight`), optionally
    column-sliced."""
    if spec is None:
        return None
    if isinstance(spec, tuple):
        w, a, b = spec
        return graph.call_function(operator.getitem, (_weight(graph, w), slice(a, b)))
    spec = _weight(graph, spec, column_major)
    if cols is not None:
        return graph.call_function(operator.getitem, (spec, (slice(None), slice(*cols))))
    return spec


def _split_fused_first_linear(graph: fx.Graph, m) -> None:
    """Each other column range of a fused first linear becomes its own dense linear over those
    weight rows (Flux2's q/k/v), so the fused linear, MLP columns included, can be erased."""
    for node, x, w, b, start, stop in m.first_rest:
        with graph.inserting_before(node):
            dense = graph.call_function(torch._C._nn.linear,
                                        (x, _slice(graph, (w, start, stop)),
                                         _slice(graph, (b, start, stop)) if b is not None else None))
            copy_provenance(dense, node)
            for key in ("example_value", "val"):  # same shape as the column range it replaces
                if key in node.meta:
                    dense.meta[key] = node.meta[key]
        node.replace_all_uses_with(dense)


def _replace_mlp(graph: fx.Graph, m, site: Site, amp: Optional[torch.dtype] = None) -> None:
    """`amp`: the autocast dtype at the site (autocast_casts), None when off."""
    _split_fused_first_linear(graph, m)
    seq_first = m.token_axis == 0
    with graph.inserting_before(m.output):
        w_act, b_act, w_lin, b_lin = (cast(graph, _slice(graph, w), amp) for w in (m.w_act, m.b_act, m.w_lin, m.b_lin))
        x = cast(graph, m.x, amp)
        if seq_first:  # (S, B, C) -> (B, S, C): a view; the op reads strided rows
            x = graph.call_function(torch.transpose, (x, 0, 1))
            copy_provenance(x, m.output)

        def sparse_mlp(w2, b2):
            op = graph.call_function(torch.ops.chipmunk.mlp.default, (x, w_act, b_act, w_lin, b_lin, w2, b2, m.act,
                                                                     site.id))
            copy_provenance(op, m.output)
            if not seq_first:
                return op
            back = graph.call_function(torch.transpose, (op, 0, 1))
            copy_provenance(back, m.output)
            return back

        if m.cat_parts is None:
            new = sparse_mlp(cast(graph, _slice(graph, m.w2, column_major=True), amp, column_major=True),
                             cast(graph, m.b2, amp))
        else:
            other = m.cat_parts[1 - m.cat_index]
            d_other = shape_of(other)[-1]
            d_total = weight_shape(m.w2)[-1]
            if m.cat_index == 1:
                cols_other, cols_mlp = (0, d_other), (d_other, d_total)
            else:
                cols_mlp, cols_other = (0, d_total - d_other), (d_total - d_other, d_total)
            w2_mlp = cast(graph, _slice(graph, m.w2, cols_mlp, column_major=True), amp, column_major=True)
            w2_other = _slice(graph, m.w2, cols_other, column_major=True)
            sparse = sparse_mlp(w2_mlp, None)
            dense = graph.call_function(torch._C._nn.linear, (other, w2_other, m.b2))
            new = graph.call_function(operator.add, (dense, sparse))
            copy_provenance(dense, m.output)
    m.output.replace_all_uses_with(new)
    _erase(graph, m.nodes)
    return new


def rewrite(gm: fx.GraphModule, config, session: Session, *, apply_changes: bool = True,
            example_inputs=None, frame_name: str = "") -> Plan:
    plan, pairs = plan_sites(gm, config, session, frame_name)
    plan.grouping = assign_grouping(gm, example_inputs, pairs, config, session)
    if apply_changes and pairs:
        apply(gm, pairs)
    return plan

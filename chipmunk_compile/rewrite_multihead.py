"""Write out the calls that Dynamo keeps opaque but that hold an attention: `nn.MultiheadAttention`'s
`F.multi_head_attention_forward` and the fused `no_grad` fast paths of it and of
`nn.TransformerEncoderLayer` (which calls, and why the others stay: `patterns/multihead.py`).

Invariants:
- Called by `rewrite.find_matches` before any pattern runs (after `rewrite_subgraphs`); one of the
  graph writers.
- A call is replaced by the public ops `F.multi_head_attention_forward` runs for it (in-projection,
  `F.scaled_dot_product_attention` at the default scale, output projection; for an encoder layer
  also its layer norms, residuals and feed-forward, in its `norm_first` order), so the result is
  what the call computes; every new node carries its fake value and the call's module stack, which
  the matchers and grouping read.
- All or nothing per call: a write-out that fails removes what it made and leaves the call as it
  was (counted `fallback:multihead_write_out_failed`, logged); placeholders are never touched.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from .patterns.fx_utils import copy_provenance, module_path, val
from .patterns.multihead import multihead_call, padding_bools

log = logging.getLogger("chipmunk_compile")


def expand_multihead(gm: fx.GraphModule) -> int:
    """Write out every `nn.MultiheadAttention` / `nn.TransformerEncoderLayer` call that
    `patterns.multihead` can (its `reason` is None) as the ops it runs; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):  # read each call when reached: an earlier write-out may feed it
        call = multihead_call(node)
        if call is None or call.reason is not None:
            continue
        made: list[fx.Node] = []
        try:
            _write_out(gm.graph, call, made)
            count += 1
        except Exception as e:  # the call stays as it is (dense, exact); what was made goes
            for new in reversed(made):
                if not new.users:
                    gm.graph.erase_node(new)
            counters["chipmunk"]["fallback:multihead_write_out_failed"] += 1
            log.warning("chipmunk: %s at %s stays as it is: writing it out failed (%s: %s)",
                        getattr(node.target, "__name__", node.target), module_path(node) or "<top>",
                        type(e).__name__, e)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _write_out(graph: fx.Graph, call, made: list) -> None:
    """Insert the written-out ops before the call (each new node recorded in `made`, with its fake
    value and the call's module stack), then hand the call's users over and erase it. Nothing of the
    graph's existing nodes changes until every new node has been made."""
    node = call.node
    fake_mode = val(call.query).fake_mode

    def fake(n):  # parameters may carry real tensors, or fakes of another mode, as example values
        v = val(n)
        if isinstance(v, torch.Tensor) and getattr(v, "fake_mode", None) is not fake_mode:
            with fake_mode:
                return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
        return v

    def emit(op: str, target, *args, **kwargs) -> fx.Node:
        new = graph.create_node(op, target, args, kwargs)
        made.append(new)
        fargs, fkw = fx.node.map_arg((args, kwargs), fake)
        with fake_mode:
            new.meta["example_value"] = getattr(fargs[0], target)(*fargs[1:], **fkw) if op == "call_method" \
                else target(*fargs, **fkw)
        copy_provenance(new, node)
        return new

    heads, width, linear = call.heads, call.width, torch._C._nn.linear
    # token axes: (L, B, E) -> (B, H, L, E / H) and back; batch-first (B, L, E) likewise
    to_heads, from_heads = ((1, 2, 0, 3), (2, 0, 1, 3)) if call.seq_first else ((0, 2, 1, 3), (0, 2, 1, 3))
    unpack = (2, 1, 3, 0, 4) if call.seq_first else (2, 0, 3, 1, 4)  # (.., .., 3, H, E / H) -> (3, B, H, L, ..)

    def rows(t, i):  # the i-th third of a packed (3E, ...) projection weight or bias
        return None if t is None else emit("call_function", operator.getitem, t, slice(i * width, (i + 1) * width))

    def attention(x_q, x_k, x_v):
        if call.sep_w is None and x_q is x_k is x_v:  # self-attention: one packed projection
            qkv = emit("call_method", "unflatten", emit("call_function", linear, x_q, call.in_w, call.in_b),
                       -1, (3, heads, -1))
            qkv = emit("call_method", "permute", qkv, *unpack)
            q, k, v = (emit("call_function", operator.getitem, qkv, i) for i in range(3))
        else:
            ws = call.sep_w or [rows(call.in_w, i) for i in range(3)]
            q, k, v = (emit("call_method", "permute", emit("call_method", "unflatten", emit(
                "call_function", linear, x, w, rows(call.in_b, i)), -1, (heads, -1)), *to_heads)
                for i, (x, w) in enumerate(zip((x_q, x_k, x_v), ws)))
        mask = None
        if call.key_padding_mask is not None:  # True = ignore; SDPA's boolean mask: True = attend
            mask = emit("call_method", "logical_not", padding_bools(call.key_padding_mask))
            mask = emit("call_method", "unsqueeze", emit("call_method", "unsqueeze", mask, 1), 1)
        o = emit("call_function", F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
        o = emit("call_method", "flatten", emit("call_method", "permute", o, *from_heads), 2)
        return emit("call_function", linear, o, call.out_w, call.out_b)

    with graph.inserting_before(node):
        if not call.layer:
            out = attention(call.query, call.key, call.value)
        else:  # nn.TransformerEncoderLayer: (pre- or post-) norm, attention, feed-forward, residuals
            lay = call.layer

            def norm(x, i):
                return emit("call_function", F.layer_norm, x, (width,), lay[f"norm_weight_{i}"],
                            lay[f"norm_bias_{i}"], lay["eps"])

            def feed_forward(x):
                h = emit("call_function", linear, x, lay["ffn_weight_1"], lay["ffn_bias_1"])
                h = emit("call_function", F.gelu if lay["use_gelu"] else F.relu, h)
                return emit("call_function", linear, h, lay["ffn_weight_2"], lay["ffn_bias_2"])

            x = call.query
            if lay["norm_first"]:
                h = norm(x, 1)
                x = emit("call_function", operator.add, x, attention(h, h, h))
                out = emit("call_function", operator.add, x, feed_forward(norm(x, 2)))
            else:
                x = norm(emit("call_function", operator.add, x, attention(x, x, x)), 1)
                out = norm(emit("call_function", operator.add, x, feed_forward(x)), 2)
    if call.returns_weights:
        for user in list(node.users):  # getitem(call, 0) -> out; getitem(call, 1) has no user
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)
    kpm = call.key_padding_mask  # its float form, when no longer used, goes too (an in-place fill)
    if isinstance(kpm, fx.Node) and kpm is not padding_bools(kpm) and not kpm.users:
        base = kpm.args[0]
        graph.erase_node(kpm)
        if isinstance(base, fx.Node) and not base.users:
            graph.erase_node(base)

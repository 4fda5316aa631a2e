"""`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` in a Dynamo graph: Dynamo keeps their
forwards as one opaque call each (`F.multi_head_attention_forward`; under `no_grad` the fused fast
paths `torch._native_multi_head_attention` and `torch._transformer_encoder_layer_fwd`), with the
projections, the attention and (for the layer) the norms and the feed-forward inside, so no
pattern could see the softmax attention or the MLP in them.

Invariants:
- Pure: `multihead_call` reads a call into a `MultiheadCall`, whose `reason` says why it cannot be
  written out exactly in public ops (None when it can). The rewrite (`rewrite_multihead.expand_multihead`)
  writes the supported calls out before matching: in-projection, `F.scaled_dot_product_attention`
  with MultiheadAttention's default scale, output projection, and for an encoder layer its two
  layer norms, residuals and `linear -> relu/gelu -> linear` feed-forward, in the order its
  `norm_first` says. The attention and MLP patterns then judge what they see like anything else
  (self-attention and the feed-forward become sites; cross-attention and short sequences are
  their rejections, computed exactly by the written-out ops).
- Written out: batched inputs in the call's layout ((L, B, E) for the function, which
  MultiheadAttention hands transposed views even when `batch_first`; (B, L, E) for the fast
  paths), packed or separate projection weights, a boolean `key_padding_mask` (True = ignore, as
  MultiheadAttention reads it; also in the -inf float form MultiheadAttention turns it into before
  the call), and `need_weights=True` when the returned weights have no user (the default of
  `mha(x, x, x)[0]`).
- Everything else (an `attn_mask`, `add_bias_kv`, `add_zero_attn`, training-mode dropout,
  `is_causal`, static keys, weights that are used, an additive key-padding mask, a fast path's
  merged mask) stays as it is, reported by the `multihead` pattern with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import fn_kwargs, is_call, is_method, module_path, schema_kwargs, shape_of, val
from .registry import Pattern, Rejection, register_pattern

MHA_FORWARD = F.multi_head_attention_forward
MHA_FAST_PATH = torch._native_multi_head_attention
ENCODER_LAYER_FAST_PATH = torch._transformer_encoder_layer_fwd


@dataclass
class MultiheadCall:
    """One call, its arguments under common names (fx nodes or constants)."""

    node: fx.Node
    query: Any
    key: Any
    value: Any
    heads: Any
    width: Any
    in_w: Any  # packed (3E, E) projection weight, or None with `sep_w`
    in_b: Any
    sep_w: Optional[tuple]  # separate q/k/v projection weights
    out_w: Any
    out_b: Any
    key_padding_mask: Any
    seq_first: bool  # (L, B, E) inputs; else (B, L, E)
    returns_weights: bool  # the call returns (output, weights)
    layer: dict = field(default_factory=dict)  # encoder layer: norms and feed-forward
    reason: Optional[str] = None

    @property
    def weights_used(self) -> bool:
        """Whether anything reads the returned attention weights (output 1)."""
        if not self.returns_weights:
            return False
        for user in self.node.users:
            if not (is_call(user, operator.getitem) and isinstance(user.args[1], int)):
                return True  # the tuple itself escapes
            if user.args[1] == 1 and user.users:
                return True
        return False


def multihead_call(node: fx.Node) -> Optional[MultiheadCall]:
    """The call read into a `MultiheadCall` (its `reason` set when it cannot be written out), or
    None for other nodes."""
    if is_call(node, MHA_FORWARD):
        kw = fn_kwargs(node)
        if kw is None:
            return None
        separate = kw["use_separate_proj_weight"] is True
        call = MultiheadCall(node, kw["query"], kw["key"], kw["value"], kw["num_heads"], kw["embed_dim_to_check"],
                             None if separate else kw["in_proj_weight"], kw["in_proj_bias"],
                             (kw["q_proj_weight"], kw["k_proj_weight"], kw["v_proj_weight"]) if separate else None,
                             kw["out_proj_weight"], kw["out_proj_bias"], kw["key_padding_mask"], True, True)
        call.reason = _function_reason(kw)
    elif is_call(node, MHA_FAST_PATH):
        kw = schema_kwargs(node, torch.ops.aten._native_multi_head_attention.default)
        if kw is None:
            return None
        call = MultiheadCall(node, kw["query"], kw["key"], kw["value"], kw["num_head"], kw["embed_dim"],
                             kw["qkv_weight"], kw["qkv_bias"], None, kw["proj_weight"], kw["proj_bias"], None,
                             False, True)
        call.reason = "nn.MultiheadAttention fast path with a mask" if kw["mask"] is not None else None
    elif is_call(node, ENCODER_LAYER_FAST_PATH):
        kw = schema_kwargs(node, torch.ops.aten._transformer_encoder_layer_fwd.default)
        if kw is None:
            return None
        src = kw["src"]
        call = MultiheadCall(node, src, src, src, kw["num_heads"], kw["embed_dim"], kw["qkv_weight"], kw["qkv_bias"],
                             None, kw["proj_weight"], kw["proj_bias"], None, False, False,
                             layer={k: kw[k] for k in ("use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1",
                                                        "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1",
                                                        "ffn_weight_2", "ffn_bias_2")})
        call.reason = "nn.TransformerEncoderLayer fast path with a mask" if kw["mask"] is not None else None
    else:
        return None
    call.reason = call.reason or _common_reason(call)
    return call


def _function_reason(kw: dict) -> Optional[str]:
    if kw["attn_mask"] is not None:
        return "nn.MultiheadAttention attn_mask (only a boolean key_padding_mask is exact)"
    if kw["bias_k"] is not None or kw["bias_v"] is not None:
        return "nn.MultiheadAttention add_bias_kv"
    if kw["add_zero_attn"] is not False:
        return "nn.MultiheadAttention add_zero_attn"
    if kw["static_k"] is not None or kw["static_v"] is not None:
        return "nn.MultiheadAttention static keys/values"
    if kw["is_causal"] is not False:
        return "causal attention"
    dropout = kw["dropout_p"]
    if kw["training"] is not False and not (isinstance(dropout, (int, float)) and dropout == 0):
        return "attention dropout"
    if kw["use_separate_proj_weight"] not in (True, False):
        return "nn.MultiheadAttention projection layout unknown"
    return None


def _common_reason(call: MultiheadCall) -> Optional[str]:
    for name in ("query", "key", "value"):
        v = val(getattr(call, name))
        if not isinstance(v, torch.Tensor) or v.dim() != 3:
            return f"unbatched or unknown nn.MultiheadAttention {name}"
    if not isinstance(call.heads, int) or not isinstance(call.width, int):
        return "nn.MultiheadAttention with symbolic head count or width"
    if any(not isinstance(w, fx.Node) for w in (call.sep_w or (call.in_w,))):
        return "nn.MultiheadAttention without projection weights"
    if call.key_padding_mask is not None and padding_bools(call.key_padding_mask) is None:
        return "nn.MultiheadAttention additive key_padding_mask (not built from a boolean one)"
    if call.weights_used:
        return "nn.MultiheadAttention attention weights are used (need_weights)"
    return None


def padding_bools(kpm: fx.Node) -> Optional[fx.Node]:
    """The (B, S) boolean padding (True = ignore) behind a key_padding_mask: the mask itself, or
    the boolean that MultiheadAttention's `F._canonical_mask` turned into its float form
    (`zeros_like(b, dtype=float).masked_fill_(b, -inf)`); None otherwise."""
    def bools(n):
        v = val(n)
        return n if isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 2 else None

    if bools(kpm) is not None:
        return kpm
    if is_method(kpm, "masked_fill_", "masked_fill") or is_call(kpm, torch.masked_fill):
        base, where, value = (list(kpm.args) + [None, None])[:3]
        zeros = is_call(base, torch.zeros_like) and base.args and base.args[0] is where
        if zeros and value == float("-inf") and bools(where) is not None:
            return where
    return None


def match_multihead(node: fx.Node, ctx) -> Optional[Rejection]:
    """A rejection for every MultiheadAttention / encoder-layer call still in the graph: the
    rewrite has written out the ones it can before matching, so what remains is unsupported."""
    call = multihead_call(node)
    if call is None:
        return None
    shapes = {n: shape_of(getattr(call, n)) for n in ("query", "key", "value")}
    return Rejection("attention", "multihead", node, call.reason or "call not written out", module_path(node), shapes)


register_pattern(Pattern("multihead", "attention", match_multihead, priority=5,
                         description="nn.MultiheadAttention / TransformerEncoderLayer calls left as they are"))

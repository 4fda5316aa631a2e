"""Exact attention plus its row log-sum-exp, from the fastest implementation that supports the call.

A refresh step needs the exact output and every query's lse (the column sums that pick the new
key columns are normalized with it). Order of preference on CUDA: cuDNN
(`aten._scaled_dot_product_cudnn_attention` with compute_log_sumexp; a boolean key mask goes in as
an additive bias of 0 / -inf broadcast over heads and queries, an additive score bias as itself,
both broadcast by strides), then flash (`aten._scaled_dot_product_flash_attention`, calls with
neither), then memory-efficient attention (`aten._scaled_dot_product_efficient_attention`, which
takes a bias; its lse is padded to a multiple of 32 queries and cut back), then our
`attn_dense_colsum` kernel without column sums (Triton, or the reference on CPU), which is also the
only one taking GQA. A key mask or bias must leave every query at least one valid key (a padding
mask does).

Invariants:
- The first call per (shapes, strides, dtype, device) tries the libraries in order and remembers
  the first that works; a library that raises or returns an lse of an unexpected shape is counted
  (`counters["chipmunk"]["exact_lse_fallback:<library>"]`), logged once, and not tried again for
  that key. A CUDA-graph recording therefore never meets a first try: the first call of a step
  signature runs eagerly.
- Returns (o, lse): o (B, Hq, N, D) stored as (B, N, Hq, D) (copied only when a library returned
  another layout), lse (B, Hq, N) fp32, natural log.
"""

from __future__ import annotations

import logging

import torch
from torch._dynamo.utils import counters

from ..kernels._common import bias_view
from ._dispatch import kernel

log = logging.getLogger("chipmunk_compile")
_choice: dict = {}


def key_mask_bias(key_mask, q, k):
    """(B, H, Nq, Nk) additive bias, 0 for valid keys and -inf for masked ones: one (B, Nk) row,
    broadcast by strides (no Nq x Nk tensor is materialized)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[-2]
    bias = torch.zeros(B, 1, 1, Nk, dtype=q.dtype, device=q.device)
    return bias.masked_fill_(~key_mask.bool()[:, None, None, :], float("-inf")).expand(B, H, Nq, Nk)


def score_bias(q, k, key_mask=None, bias=None):
    """The (B, H, Nq, Nk) additive bias, in q's dtype, of a key mask and a score bias (either may be
    None; None when both are), broadcast by strides: only the inputs' own shapes are materialized."""
    if bias is None:
        return None if key_mask is None else key_mask_bias(key_mask, q, k)
    bias = bias.to(q.dtype)  # before the expand: a cast of the expanded view would copy it whole
    if key_mask is not None:
        bias = torch.where(key_mask.bool()[:, None, None, :], bias, float("-inf"))
    return bias_view(bias, q, k)


def _cudnn(q, k, v, scale, key_mask=None, bias=None):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, score_bias(q, k, key_mask, bias), True, 0.0,
                                                             False, False, scale=scale)
    return out[0], out[1]


def _flash(q, k, v, scale, key_mask=None, bias=None):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return out[0], out[1]


def _efficient(q, k, v, scale, key_mask=None, bias=None):
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, score_bias(q, k, key_mask, bias), True,
                                                                 0.0, False, scale=scale)
    return out[0], out[1][..., :q.shape[-2]]


LIBRARIES = {"cudnn": _cudnn, "flash": _flash, "efficient": _efficient}
MASKED = {"cudnn", "efficient"}  # the libraries above that take a key mask or bias; masked calls skip the others


def in_bnhd(o: torch.Tensor) -> torch.Tensor:
    """o itself when it is already a (B, N, H, D) buffer seen as (B, H, N, D), else a copy that is."""
    if o.transpose(1, 2).is_contiguous():
        return o
    B, H, N, D = o.shape
    out = torch.empty(B, N, H, D, dtype=o.dtype, device=o.device).transpose(1, 2)
    out.copy_(o)
    return out


def _library_result(name, q, k, v, scale, key_mask, bias):
    o, lse = LIBRARIES[name](q, k, v, scale, key_mask, bias)
    B, H, N, D = q.shape
    if tuple(o.shape) != (B, H, N, v.shape[-1]) or lse.numel() != B * H * N or lse.dtype != torch.float32:
        raise RuntimeError(f"{name} returned o {tuple(o.shape)}, lse {tuple(lse.shape)} {lse.dtype}")
    return in_bnhd(o), lse.reshape(B, H, N)


def _reference_path(q, k, v, key_mask, scale, group, perm, bias):
    o, lse, _ = kernel("attn_dense_colsum", q, k, v, head_dim=q.shape[-1])(
        q, k, v, scale=scale, group=group, key_mask=key_mask, perm=perm, want_colsum=False, bias=bias)
    return o, lse


def _library_usable(q, k) -> bool:
    return q.is_cuda and q.shape[1] == k.shape[1]


def exact_attention_lse(q, k, v, key_mask, scale: float, group: int, perm, bias=None):
    """(o, lse) of exact softmax attention; see the module docstring for which library runs."""
    if not _library_usable(q, k):
        return _reference_path(q, k, v, key_mask, scale, group, perm, bias)
    masked = key_mask is not None or bias is not None
    key = (tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), v.stride(), q.dtype, q.device, key_mask is not None,
           None if bias is None else (tuple(bias.shape), bias.stride(), bias.dtype))
    chosen = _choice.get(key)
    if chosen is None:
        for name in LIBRARIES:
            if masked and name not in MASKED:
                continue
            try:
                result = _library_result(name, q, k, v, scale, key_mask, bias)
            except Exception as exc:  # unsupported shape/arch/version: next library
                counters["chipmunk"][f"exact_lse_fallback:{name}"] += 1
                log.info("chipmunk: exact attention with lse: %s failed for %s (%s)", name, key[:2], exc)
                continue
            _choice[key] = name
            return result
        _choice[key] = "kernel"
        return _reference_path(q, k, v, key_mask, scale, group, perm, bias)
    if chosen == "kernel":
        return _reference_path(q, k, v, key_mask, scale, group, perm, bias)
    return _library_result(chosen, q, k, v, scale, key_mask, bias)

"""Exact attention plus its row log-sum-exp, from the fastest implementation that supports the call.

A refresh step needs the exact output and every query's lse (the column sums that pick the new
key columns are normalized with it). Order of preference on CUDA: cuDNN
(`aten._scaled_dot_product_cudnn_attention` with compute_log_sumexp; a boolean key mask goes in as
an additive bias of 0 / -inf broadcast over heads and queries), then flash
(`aten._scaled_dot_product_flash_attention`, unmasked calls only), then our `attn_dense_colsum`
kernel without column sums (Triton, or the reference on CPU), which is also the only one taking GQA.
A key mask must leave every batch element at least one valid key (a padding mask does).

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


def _cudnn(q, k, v, scale, key_mask=None):
    bias = None if key_mask is None else key_mask_bias(key_mask, q, k)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, False, False, scale=scale)
    return out[0], out[1]


def _flash(q, k, v, scale, key_mask=None):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return out[0], out[1]


LIBRARIES = {"cudnn": _cudnn, "flash": _flash}
MASKED = {"cudnn"}  # the libraries above that take a key mask; the others are skipped for masked calls


def in_bnhd(o: torch.Tensor) -> torch.Tensor:
    """o itself when it is already a (B, N, H, D) buffer seen as (B, H, N, D), else a copy that is."""
    if o.transpose(1, 2).is_contiguous():
        return o
    B, H, N, D = o.shape
    out = torch.empty(B, N, H, D, dtype=o.dtype, device=o.device).transpose(1, 2)
    out.copy_(o)
    return out


def _library_result(name, q, k, v, scale, key_mask):
    o, lse = LIBRARIES[name](q, k, v, scale, key_mask)
    B, H, N, D = q.shape
    if tuple(o.shape) != (B, H, N, v.shape[-1]) or lse.numel() != B * H * N or lse.dtype != torch.float32:
        raise RuntimeError(f"{name} returned o {tuple(o.shape)}, lse {tuple(lse.shape)} {lse.dtype}")
    return in_bnhd(o), lse.reshape(B, H, N)


def _reference_path(q, k, v, key_mask, scale, group, perm):
    o, lse, _ = kernel("attn_dense_colsum", q, k, v, head_dim=q.shape[-1])(
        q, k, v, scale=scale, group=group, key_mask=key_mask, perm=perm, want_colsum=False)
    return o, lse


def _library_usable(q, k) -> bool:
    return q.is_cuda and q.shape[1] == k.shape[1]


def exact_attention_lse(q, k, v, key_mask, scale: float, group: int, perm):
    """(o, lse) of exact softmax attention; see the module docstring for which library runs."""
    if not _library_usable(q, k):
        return _reference_path(q, k, v, key_mask, scale, group, perm)
    masked = key_mask is not None
    key = (tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), v.stride(), q.dtype, q.device, masked)
    chosen = _choice.get(key)
    if chosen is None:
        for name in LIBRARIES:
            if masked and name not in MASKED:
                continue
            try:
                result = _library_result(name, q, k, v, scale, key_mask)
            except Exception as exc:  # unsupported shape/arch/version: next library
                counters["chipmunk"][f"exact_lse_fallback:{name}"] += 1
                log.info("chipmunk: exact attention with lse: %s failed for %s (%s)", name, key[:2], exc)
                continue
            _choice[key] = name
            return result
        _choice[key] = "kernel"
        return _reference_path(q, k, v, key_mask, scale, group, perm)
    if chosen == "kernel":
        return _reference_path(q, k, v, key_mask, scale, group, perm)
    return _library_result(chosen, q, k, v, scale, key_mask)

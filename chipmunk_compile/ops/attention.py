"""`chipmunk::attention`: stateful column-sparse attention (method.md §1).

Step types (decided on the host by `schedule.attn_step_kind`, never by reading a tensor):
- dense:   exact attention; stores the row log-sum-exp for the next refresh's column sums.
- refresh: exact attention + per-group column sums (normalized with the previous dense lse) →
           top-k key columns per (batch, head, query group) → `o_cache = o − attn_S(q, k, v)`.
- sparse:  `o_cache + attn_S(q_t, k_t, v_t)`, attn_S softmax-restricted to the selected keys
           (config `attn.delta = "exact_normalizer"` uses the refresh step's lse instead).

Invariants: the output is always a fresh tensor of logical shape (B, Hq, N, D) stored as
(B, N, Hq, D); the op never returns or aliases a cache. Caches of a branch are read only after
a refresh of the current generation filled them; otherwise the exact path runs (counted).
Tagged `cudagraph_unsafe` so that under `reduce-overhead` Inductor graph-partitions around it
and its host-side step decision runs on every call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..schedule import DENSE, REFRESH, SPARSE, attn_step_kind
from ._dispatch import kernel
from .sites import fallback, lookup

_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _out_like(q: Tensor, v: Tensor) -> Tensor:
    B, H, N, _ = q.shape
    return torch.empty(B, N, H, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)


def _sdpa(q, k, v, key_mask, scale):
    """Exact attention through SDPA (cuDNN/flash on GPU), in the op's output layout."""
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = _out_like(q, v)
    out.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa))
    return out


def _exact(q, k, v, key_mask, scale, group, perm):
    o, lse, _ = kernel("attn_dense_colsum", q, k, v, head_dim=q.shape[-1])(
        q, k, v, scale=scale, group=group, key_mask=key_mask, perm=perm, want_colsum=False)
    return o, lse


@torch.library.custom_op("chipmunk::attention", mutates_args=(), tags=_TAGS)
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: Optional[float], site: int) -> Tensor:
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = lookup(site)
    if s is None:
        o, _ = _exact(q, k, v, key_mask, scale, 192, None)
        return o
    cfg = s.cfg
    layer = s.current_layer()
    if not cfg.enabled or layer < cfg.first_n_dense_layers:  # never sparse: no cache, no lse
        s.ran(DENSE)
        return _sdpa(q, k, v, key_mask, scale)
    group = cfg.group
    perm = s.perm_on(q.device)
    st, pos = s.branch_state()
    kind = attn_step_kind(cfg, pos.step, layer)
    st.ensure((tuple(q.shape), tuple(k.shape), q.dtype, q.device, key_mask is not None))
    B, H, N, D = q.shape
    n_groups = -(-N // group)
    lse_buf = st.tensor("lse", (B, H, N), torch.float32, q.device)
    if kind == SPARSE and st.filled_generation != pos.generation:
        fallback("attn_cache_not_filled", "a sparse step ran before this branch's refresh step")
        kind = REFRESH
    if kind == DENSE:
        o, lse = _exact(q, k, v, key_mask, scale, group, perm)
        lse_buf.copy_(lse)
        st.lse_generation = pos.generation
        s.ran(DENSE)
        return o
    exact_norm = cfg.delta == "exact_normalizer"
    if kind == REFRESH:
        need_idx = cfg.recompute_mask or st.index_generation != pos.generation
        prev = lse_buf if st.lse_generation == pos.generation else None
        o, lse, colsum = kernel("attn_dense_colsum", q, k, v, head_dim=D)(
            q, k, v, scale=scale, group=group, key_mask=key_mask, perm=perm, prev_lse=prev, want_colsum=need_idx)
        if need_idx:
            Nk = k.shape[-2]
            top = max(1, round(cfg.top_keys * Nk))
            rnd = round(cfg.random_keys * Nk)
            keep = s.keep_on(q.device) if cfg.keep_text_keys else None
            idx, cnt = kernel("select_columns", colsum)(colsum, k=top, key_mask=key_mask, always_keep=keep, random_keys=rnd,
                                                            generator=s.rng(q.device, pos.step), inplace=True)
            idx_buf = st.tensor("indices", tuple(idx.shape), torch.int32, q.device)
            cnt_buf = st.tensor("counts", (B, H, n_groups), torch.int32, q.device)
            idx_buf.copy_(idx)
            cnt_buf.copy_(cnt)
            st.index_generation = pos.generation
        idx_buf, cnt_buf = st.get("indices"), st.get("counts")
        lse_buf.copy_(lse)
        st.lse_generation = pos.generation
        o_cache = st.tensor("o_cache", (B, N, H, D), q.dtype, q.device).transpose(1, 2)
        built = kernel("attn_column_sparse", q, k, v, head_dim=D)(
            q, k, v, idx_buf, cnt_buf, scale=scale, group=group, perm=perm, o_base=o, sign=-1.0,
            lse=lse_buf if exact_norm else None)
        o_cache.copy_(built)
        st.filled_generation = pos.generation
        s.ran(REFRESH)
        return o
    idx_buf, cnt_buf = st.get("indices"), st.get("counts")
    o_cache = st.tensor("o_cache", (B, N, H, D), q.dtype, q.device).transpose(1, 2)
    o = kernel("attn_column_sparse", q, k, v, head_dim=D)(
        q, k, v, idx_buf, cnt_buf, scale=scale, group=group, perm=perm, o_base=o_cache, sign=1.0,
        lse=lse_buf if exact_norm else None)
    s.ran(SPARSE)
    return o


@attention.register_fake
def _(q, k, v, key_mask, scale, site):
    return _out_like(q, v)

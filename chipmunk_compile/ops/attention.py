"""`chipmunk::attention`: stateful column-sparse attention (method.md §1).

Step types (decided on the host by `schedule.attn_step_kind`, never by reading a tensor):
- dense:   exact attention through SDPA (cuDNN/flash on GPU); nothing is stored.
- refresh: exact attention with its lse (`exact_attention.exact_attention_lse`: cuDNN when it can)
           → per-group column sums from `attn.colsum_queries` sampled queries per group, normalized
           with that exact lse → top-k key columns per (batch, head, query group) →
           `o_cache = o − attn_S(q, k, v)`, stored by the column-sparse kernel's epilogue into the
           cache itself. When the indices are kept (`recompute_mask: false`, the default) and no
           lse is needed, a refresh after the first takes the exact output from plain SDPA and
           selects nothing.
- sparse:  `o_cache + attn_S(q_t, k_t, v_t)`, attn_S softmax-restricted to the selected keys
           (config `attn.delta = "exact_normalizer"` uses the refresh step's lse instead).

Residual forecast (`attn.extrapolate` = e > 0): the cached residual r = o − attn_S (what the
unselected keys contribute) drifts between refreshes; holding it fixed is the method's main error.
A refresh after the first of a generation also measures r's slope per step against the previous
refresh (written by the epilogue of the attn_S call that computes r, from the cache before it is
rebuilt; with the previous indices when it picks new ones: an extra attn_S call), and sparse steps
use `o_cache + e·min(t − t_ref, span)·slope` (span = the interval the slope was measured over:
beyond it the forecast is held, not extrapolated further; counted `attention_forecast`). Steps are
read from the session's device step and t_ref/span are device scalars, so a recorded CUDA graph
forecasts correctly at every step it replays.

Quality guard (`attn.min_mass` > 0; off by default): a layer's first key selection also measures
the share of the attention mass its kept columns hold (`captured_mass`, a device scalar); a layer
below min_mass runs dense from then on (`too_diffuse`, counted and logged).

Additive bias (`bias`: SDPA's float attn_mask, or a boolean pair mask, which the op turns into
0 / -inf of the queries' dtype; any shape that broadcasts to (B, Hq, Nq, Nk)): every step adds it
to each score it computes — dense and refresh steps through SDPA / the exact-attention libraries,
the column sums through the sampled queries' rows of it, sparse steps on their selected keys only
(the Triton kernel; the Gluon ones take no bias). A bias that changes from call to call (a
time-conditioned pair bias) is read at every call, never cached. A query row whose selected keys
are all -inf gets no delta.

Invariants: the output is always a fresh tensor of logical shape (B, Hq, N, D) stored as
(B, N, Hq, D); the op never returns or aliases a cache. Caches of a branch are read only after
a refresh of the current generation filled them; otherwise the exact path runs (counted).
Tagged `cudagraph_unsafe` so that under `reduce-overhead` Inductor graph-partitions around it
and its host-side step decision runs on every call.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor

from .. import runtime
from ..autocast_casts import disabled_inside
from ..schedule import DENSE, REFRESH, SPARSE, attn_catches_up, attn_step_kind
from ._dispatch import kernel
from .exact_attention import exact_attention_lse, in_bnhd
from .forecast import Forecast
from .sites import POLICIES, capturing, count, fallback, lookup

log = logging.getLogger("chipmunk_compile")
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _out_like(q: Tensor, v: Tensor) -> Tensor:
    B, H, N, _ = q.shape
    return torch.empty(B, N, H, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)


def _sdpa(q, k, v, key_mask, scale, bias=None):
    """Exact attention through SDPA (cuDNN/flash on GPU), in the op's output layout."""
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    if bias is not None:
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return in_bnhd(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa))


def decide(s, st, pos) -> tuple:
    """(kind, new indices?, cache-not-filled fallback?, residual forecast?, a missed refresh caught
    up: False, True (a refresh) or "dense") — host state only (the guard's verdict reads its device
    measurement once per layer, before any graph records that layer's steps)."""
    cfg = s.cfg
    kind = attn_step_kind(cfg, pos.step, s.current_layer(), pos.scale, pos.levels)
    if kind != DENSE and too_diffuse(s):
        return DENSE, False, False, False, False
    unfilled = kind == SPARSE and st.filled_generation != pos.generation
    # a scheduled refresh this site's calls skipped over (a hook's step cache), on caches catch_up
    # periods old: a refresh; plain dense when the branch's previous call is that far back too (the
    # hook skips this site for long stretches: a refresh costs a dense pass, the column sums and the
    # cache's sparse pass, for a cache its next call, as far off, would not read either)
    span = attn_catches_up(cfg, pos.step, st.filled_step, pos.scale, pos.levels) if kind == SPARSE and not unfilled else None
    missed = span is not None
    if missed and pos.step - st.called_step >= span:
        return DENSE, False, False, False, "dense"
    if unfilled or missed:
        kind = REFRESH
    need_idx = kind == REFRESH and (cfg.recompute_mask or st.index_generation != pos.generation)
    # forecast: a refresh measures the slope when an earlier refresh of this generation left a
    # cache; a sparse step applies it once a refresh has measured it
    fore = cfg.extrapolate > 0 and (st.filled_generation == pos.generation if kind == REFRESH
                                    else kind == SPARSE and st.slope_generation == pos.generation)
    return kind, need_idx, unfilled, fore, missed


def commit(s, st, decision, step: int, generation: int) -> None:
    kind, need_idx, fore = decision[0], decision[1], decision[3]
    st.called_step = step
    if kind == REFRESH:
        st.filled_generation, st.filled_step = generation, step
        if need_idx:
            st.index_generation = generation
        if fore:
            st.slope_generation = generation
            if need_idx:  # the residual under the previous indices was taken too
                s.extra_sparse_passes += 1


POLICIES["attention"] = (decide, commit)


@torch.library.custom_op("chipmunk::attention", mutates_args=(), tags=_TAGS)
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: Optional[float], site: int,
              bias: Optional[Tensor] = None) -> Tensor:
    with disabled_inside(q):  # the rewrite cast the inputs to an autocast's dtype already
        return _attention(q, k, v, key_mask, scale, site, bias)


def _attention(q, k, v, key_mask, scale, site, bias) -> Tensor:
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bias = additive_bias(bias, q.dtype)
    s = lookup(site)
    if s is None:
        return _sdpa(q, k, v, key_mask, scale, bias)
    pos = s.session.position()
    if s.plain_dense(pos):  # never sparse (at all, or in this generation): no cache, no lse
        s.finish(None, DENSE, pos)
        return _sdpa(q, k, v, key_mask, scale, bias)
    return s.cached_or_dense(lambda: _cached_attention(s, pos, q, k, v, key_mask, scale, bias),
                             lambda: _sdpa(q, k, v, key_mask, scale, bias), q)


def additive_bias(bias: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """`bias` as the op adds it to the scores: a float tensor as it is (SDPA took it, so it has
    the queries' dtype or fp32), a boolean pair mask as SDPA applies one (0 where True, -inf where
    False), in the queries' dtype."""
    if bias is None or bias.is_floating_point():
        return bias
    if bias.dtype == torch.bool:
        return torch.zeros((), dtype=dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    raise TypeError(f"chipmunk::attention: bias must be a float or boolean tensor, got {bias.dtype}")


def _cached_attention(s, pos, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
                      bias: Optional[Tensor]) -> Tensor:
    """A call of a site that keeps state at step position `pos`: dense, refresh or sparse step per
    its schedule."""
    perm = s.perm_on(q.device, q.shape[-2])
    # the always-kept keys widen each group's index list: a count that changed (another grid of
    # the same token count: ids_regrouping) needs caches of the new width
    n_keep = s.key_keep_on(q.device, q.shape[-2], k.shape[-2])[1] if s.cfg.keep_text_keys else 0
    st = s.branch_state((tuple(q.shape), tuple(k.shape), q.dtype, q.device, key_mask is not None,
                         bias is not None, n_keep), pos, q.shape[-2])
    d = decide(s, st, pos)
    kind, unfilled = d[0], d[2]
    if unfilled:
        fallback("attn_cache_not_filled", "a sparse step ran before this branch's refresh step")
    if d[4]:
        count("attention_dense_caught_up" if d[4] == "dense" else "attention_refresh_caught_up")
    if kind == DENSE:
        if too_diffuse(s):
            fallback("attn_diffuse", "a layer's top keys hold less than attn.min_mass of its attention "
                     "(chipmunk_compile.stats() lists the measured shares)")
        o = _sdpa(q, k, v, key_mask, scale, bias)
        s.finish(st, d, pos)
        return o
    with s.staged(st, q.device, writes=kind == REFRESH):  # a sparse step only reads the caches
        return _stateful_step(s, st, pos, d, q, k, v, key_mask, scale, perm, bias)


def _stateful_step(s, st, pos, d, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], scale: float,
                   perm: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """A refresh or sparse step (`d` = its decision) over the branch's caches."""
    cfg, group = s.cfg, s.cfg.group
    kind, need_idx, _, fore, _ = d
    B, H, N, D = q.shape
    n_groups = -(-N // group)
    exact_norm = cfg.delta == "exact_normalizer"
    lse_buf = st.tensor("lse", (B, H, N), torch.float32, q.device) if exact_norm else None

    def column_sparse(o_base, sign, **kw):  # o_base (+ coef·o_slope) ± attn_S(q, k, v) over the stored keys
        return kernel("attn_column_sparse", q, k, v, head_dim=D)(
            q, k, v, st.get("indices"), st.get("counts"), scale=scale, group=group, perm=perm, o_base=o_base,
            sign=sign, lse=lse_buf, bias=bias, **kw)

    o_cache = st.tensor("o_cache", (B, N, H, D), q.dtype, q.device).transpose(1, 2)
    # the forecast state: read by a forecasting sparse step, measured or marked by every refresh
    fc = Forecast(s, st, pos, "r_slope", "t_ref_span", (B, N, H, D), q.dtype, q.device) \
        if cfg.extrapolate > 0 and (fore or kind != SPARSE) else None
    if kind == SPARSE:
        if fore:
            count("attention_forecast")
            forecast = {"o_slope": fc.slope.transpose(1, 2), "slope_coef": fc.coef(cfg.extrapolate)}
        else:
            forecast = {}
        o = column_sparse(o_cache, 1.0, **forecast)  # the kernel's epilogue adds coef·slope
        s.finish(st, d, pos)
        return o
    # the forecast's slope per step of the residual since the previous refresh, under one index set:
    # written by the kernel that computes that residual, from the cache before it is rebuilt
    measure = (o_cache, fc.slope.transpose(1, 2), fc.measure_rate()) if fore else None
    if not need_idx and not exact_norm:
        # indices kept (recompute_mask: false) and no lse needed: plain SDPA; only the cache is rebuilt
        o = _sdpa(q, k, v, key_mask, scale, bias)
    else:
        o, lse = exact_attention_lse(q, k, v, key_mask, scale, group, perm, bias)
        if bias is not None:  # rows the bias masks whole: SDPA's zero rows, and no share in any column sum
            lost = ~torch.isfinite(lse)
            o.masked_fill_(lost[..., None], 0.0)
            lse = lse.masked_fill(lost, float("inf"))
        if need_idx and measure is not None:  # the residual under the indices the cache was built with
            column_sparse(o, -1.0, measure=measure)
            measure = None
        if need_idx:
            colsum = kernel("attn_colsum_sampled", q, k, head_dim=D)(
                q, k, lse, scale=scale, group=group, samples=cfg.colsum_queries, key_mask=key_mask, perm=perm,
                out_dtype=torch.float16,  # half the bytes for the top-k passes; the ranking needs no more
                qk_fp8=colsum_fp8(cfg, k), bias=bias)
            _select(s, st, colsum, key_mask, (B, H, n_groups), k.shape[-2], pos.step, N)
        if exact_norm:
            lse_buf.copy_(lse)
    column_sparse(o, -1.0, out=o_cache, measure=measure)  # the cache build: o_cache = o − attn_S
    if fc is not None:
        fc.mark()
    s.finish(st, d, pos)
    return o


COLSUM_FP8_MIN_KEYS = 16384  # below, the e4m3 copy of k and the short key loop cost more than they save


def colsum_fp8(cfg, k: Tensor) -> bool:
    """Whether a refresh ranks columns by e4m3 scores (attn.colsum_fp8): many keys, and fp8 tensor
    cores on a GPU (sm_89+; the CPU reference emulates the rounding)."""
    if not cfg.colsum_fp8 or k.shape[-2] < COLSUM_FP8_MIN_KEYS:
        return False
    return not k.is_cuda or torch.cuda.get_device_capability(k.device) >= (8, 9)


def _select(s, st, colsum, key_mask, lead: tuple, Nk: int, step: int, n_q: int) -> None:
    """Top-k key columns (+ always-kept text keys, + random draws) per (batch, head, group) into
    the state's `indices` / `counts`."""
    cfg, device = s.cfg, colsum.device
    top, rnd = max(1, round(cfg.top_keys * Nk)), round(cfg.random_keys * Nk)
    keep, n_keep = s.key_keep_on(device, n_q, Nk) if cfg.keep_text_keys else (None, 0)
    layer = s.current_layer()
    if cfg.min_mass > 0 and layer not in s.attn_mass and runtime.RECORDING is None:  # before colsum is scored in place
        s.attn_mass[layer] = captured_mass(colsum, top, keep)
    draws = s.random_draws(device, step) if rnd else None  # made inside the select kernel
    idx, cnt = kernel("select_columns", colsum)(colsum, k=top, key_mask=key_mask, always_keep=keep,
                                                n_always=n_keep,
                                                random_keys=rnd, draws=draws, inplace=True)
    st.tensor("indices", tuple(idx.shape), torch.int32, device).copy_(idx)
    st.tensor("counts", lead, torch.int32, device).copy_(cnt)


def captured_mass(colsum: Tensor, top: int, always_keep: Optional[Tensor] = None, rows: int = 256) -> Tensor:
    """Mean share of the column-sum mass held by the always-kept columns plus the `top` largest
    others, over at most `rows` evenly spaced (batch, head, group) rows: a 0-dim fp32 device
    tensor (no sync). Flat attention gives ~top/Nk, concentrated attention close to 1."""
    Nk = colsum.shape[-1]
    flat = colsum.reshape(-1, Nk)
    if flat.shape[0] > rows:
        flat = flat.index_select(0, torch.linspace(0, flat.shape[0] - 1, rows, device=flat.device).long())
    flat = flat.float()
    total = flat.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    kept = torch.zeros_like(total)
    if always_keep is not None:
        kept = flat[:, always_keep].sum(-1)
        flat = flat.masked_fill(always_keep, 0.0)
    kept = kept + flat.topk(min(top, Nk), dim=-1, sorted=False).values.sum(-1)
    return (kept / total).clamp(max=1.0).mean()


def too_diffuse(s) -> bool:
    """The guard's verdict for the site's current layer (`attn.min_mass`): True when its measured
    mass share is below min_mass. Read from the device once per layer (one sync, at the first call
    after the layer's first selection, outside any CUDA graph) and kept for the session."""
    if s.cfg.min_mass <= 0:
        return False
    layer = s.current_layer()
    verdict = s.attn_diffuse.get(layer)
    if verdict is None:
        mass = s.attn_mass.get(layer)
        if mass is None or runtime.RECORDING is not None or capturing(mass):
            return False
        verdict = s.attn_diffuse[layer] = float(mass) < s.cfg.min_mass
        if verdict:
            log.warning("chipmunk: %s (layer %d): its top %.1f%% keys hold %.2f of the attention mass "
                        "< attn.min_mass %.2f: the layer stays dense", s.path, layer, 100 * s.cfg.top_keys,
                        float(mass), s.cfg.min_mass)
    return verdict


@attention.register_fake
def _(q, k, v, key_mask, scale, site, bias=None):
    return _out_like(q, v)

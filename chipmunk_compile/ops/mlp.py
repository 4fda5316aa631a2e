"""`chipmunk::mlp`: stateful column-sparse MLP deltas (method.md §2).

h = act(x w_actᵀ + b_act) [* (x w_linᵀ + b_lin)],  y = h w2ᵀ + b2.

Step types (host-side, `schedule.mlp_step_kind`):
- dense:  exact; caches h, y and the per-token-block means of the pre-activation.
- sparse: per block of `block` tokens, the neurons whose block-mean pre-activation moved most
          since they were last refreshed (plus a few random ones) are recomputed:
          `y_cache += (h_new − h_cache[S]) w2[:, S]ᵀ`, `h_cache[S] = h_new`; returns a copy of y_cache.
          Only the selected neurons' reference means are refreshed, so the others accumulate drift.

Error forecast (`mlp.extrapolate` = e > 0): the neurons a sparse step does not recompute keep
stale activations, so the output error grows over a dense period. A dense step after the first of
a generation also runs the sparse path first and stores rate = (y_dense − y_sparse) / (steps since
the previous dense step); sparse steps return `y + e·min(t − t_dense, span)·rate` (span = that
distance; counted `mlp_forecast`), added in mm2's epilogue (no pass of its own). Steps come from the
session's device step and t_dense/span are device scalars, so recorded CUDA graphs forecast at every
step they replay. The caches keep the invariant below: the forecast is added to the returned output
only.

Invariants: `y_cache == h_cache w2ᵀ + b2` up to rounding after every call (the rolling cache), with
h_cache's rows in the grouped token order (row p holds token perm[p]) and y_cache's in model order;
the output is always a fresh contiguous tensor of shape (*x.shape[:-1], w2.shape[0]). Caches are
read only when a dense step of the current generation filled them; otherwise dense (counted).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..autocast_casts import disabled_inside
from ..kernels.mlp_sparse_mm1_ref import apply_act
from ..kernels.mlp_sparse_mm2_ref import mlp_sparse_mm2_ref
from ..schedule import DENSE, SPARSE, mlp_catches_up, mlp_recompute_indices, mlp_step_kind
from ._dispatch import chooses_triton, kernel
from .forecast import Forecast
from .sites import POLICIES, count, fallback, lookup

_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _pre(x, w_act, b_act, w_lin, b_lin):
    a = F.linear(x, w_act, b_act)
    return a, (F.linear(x, w_lin, b_lin) if w_lin is not None else None)


def _hidden(a, b, act):
    h = apply_act(a, act)
    return h * b if b is not None else h


def _score_basis(xb, w_act, b_act, w_lin, b_lin):
    """What the neuron selection tracks per token block: the block-mean pre-activation(s)."""
    a, b = _pre(xb, w_act, b_act, w_lin, b_lin)
    return a if b is None else torch.cat([a, b], dim=-1)


def decide(s, st, pos) -> tuple:
    """(kind, new neuron indices?, cache-not-filled fallback?, error forecast?, the generation's
    first dense step of this branch?, a missed dense step caught up?) — host state only."""
    cfg = s.cfg
    kind = mlp_step_kind(cfg, pos.step, s.current_layer(), pos.scale)
    unfilled = kind == SPARSE and st.filled_generation != pos.generation
    # a scheduled dense step this site's calls skipped over (a hook's step cache), on caches catch_up periods old
    missed = kind == SPARSE and not unfilled and mlp_catches_up(cfg, pos.step, st.filled_step, pos.scale)
    if unfilled or missed:
        kind = DENSE
    recompute = kind == SPARSE and (mlp_recompute_indices(cfg, pos.step, pos.scale) or st.index_generation != pos.generation)
    # forecast: a dense step measures the rate when this generation's caches and some neuron
    # indices exist; a sparse step applies it once a dense step has measured it
    fore = cfg.extrapolate > 0 and (st.filled_generation == pos.generation and "indices" in st.cache
                                    if kind == DENSE else st.slope_generation == pos.generation)
    return kind, recompute, unfilled, fore, kind == DENSE and st.filled_generation != pos.generation, missed


def commit(s, st, decision, step: int, generation: int) -> None:
    kind, recompute, fore = decision[0], decision[1], decision[3]
    if kind == DENSE:
        st.filled_generation, st.filled_step = generation, step
        st.index_generation = -1
        if fore:
            st.slope_generation = generation
            s.extra_sparse_passes += 1  # the sparse path ran before the dense one
    elif recompute:
        st.index_generation = generation


POLICIES["mlp"] = (decide, commit)


@torch.library.custom_op("chipmunk::mlp", mutates_args=(), tags=_TAGS)
def mlp(x: Tensor, w_act: Tensor, b_act: Optional[Tensor], w_lin: Optional[Tensor], b_lin: Optional[Tensor],
        w2: Tensor, b2: Optional[Tensor], act: str, site: int) -> Tensor:
    with disabled_inside(x):  # the rewrite cast the inputs to an autocast's dtype already
        return _mlp(x, w_act, b_act, w_lin, b_lin, w2, b2, act, site)


def _mlp(x, w_act, b_act, w_lin, b_lin, w2, b2, act, site) -> Tensor:
    s = lookup(site)
    out_shape = (*x.shape[:-1], w2.shape[0])
    if s is None:
        return _dense(x, w_act, b_act, w_lin, b_lin, w2, b2, act)
    pos = s.session.position()
    if s.plain_dense(pos):  # never sparse (at all, or in this generation): no caches
        s.finish(None, DENSE, pos)
        return _dense(x, w_act, b_act, w_lin, b_lin, w2, b2, act)
    return s.cached_or_dense(lambda: _cached_mlp(s, pos, x, w_act, b_act, w_lin, b_lin, w2, b2, act, out_shape),
                             lambda: _dense(x, w_act, b_act, w_lin, b_lin, w2, b2, act), x)


def _dense(x, w_act, b_act, w_lin, b_lin, w2, b2, act) -> Tensor:
    a, b = _pre(x, w_act, b_act, w_lin, b_lin)
    return F.linear(_hidden(a, b, act), w2, b2).contiguous()


def _cached_mlp(s, pos, x, w_act, b_act, w_lin, b_lin, w2, b2, act, out_shape) -> Tensor:
    """A call of a site that keeps state at step position `pos`: dense or sparse step per its schedule."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() != 3 else x
    perm = s.perm_on(x.device, x3.shape[1])
    st = s.branch_state((tuple(x3.shape), tuple(w2.shape), x.dtype, x.device), pos, x3.shape[1])
    d = decide(s, st, pos)
    if d[2]:
        fallback("mlp_cache_not_filled", "a sparse MLP step ran before this branch's dense step")
    if d[5]:
        count("mlp_dense_caught_up")
    with s.staged(st, x.device, writes=True):  # both step kinds update the caches
        return _stateful_step(s, st, pos, d, x3, w_act, b_act, w_lin, b_lin, w2, b2, act, perm).reshape(out_shape)


def _stateful_step(s, st, pos, d, x3, w_act, b_act, w_lin, b_lin, w2, b2, act, perm) -> Tensor:
    """A dense or sparse step (`d` = its decision) over the branch's caches; returns (B, M, C_out)."""
    cfg = s.cfg
    kind, recompute, _, fore, first, _ = d
    B, M, _ = x3.shape
    Fh = w_act.shape[0]
    n_blocks = -(-M // cfg.block)
    basis_dim = Fh if w_lin is None else 2 * Fh
    bm_cache = st.tensor("block_pre", (B, n_blocks, basis_dim), torch.float32, x3.device)
    h_cache = st.tensor("h_cache", (B, M, Fh), x3.dtype, x3.device, alloc=_alloc_h)
    y_cache = st.tensor("y_cache", (B, M, w2.shape[0]), x3.dtype, x3.device)
    # the forecast state: read by a forecasting sparse step, measured or marked by every dense step
    fc = Forecast(s, st, pos, "y_rate", "t_dense_span", (B, M, w2.shape[0]), x3.dtype, x3.device) \
        if cfg.extrapolate > 0 and (fore or kind == DENSE) else None
    if kind == DENSE:
        if first and chooses_triton("mlp_sparse_mm2", x3):  # the sparse steps' w2 copy follows the weight
            s.column_major(w2, refresh=True)  # (once a generation: a FLUX-size transposing copy is 250 µs)
        y_sparse = _sparse_delta(s, st, x3, w_act, b_act, w_lin, b_lin, w2, act, perm, h_cache, y_cache) \
            if fore else None  # what the sparse path would have returned now (caches are rebuilt below)
        y = _dense_into_cache(x3, w_act, b_act, w_lin, b_lin, w2, b2, act, perm, h_cache)
        if fore:  # the rate per step at which the sparse path's error grew since the last dense step
            fc.measure(y, y_sparse)
        if fc is not None:
            fc.mark()
        y_cache.copy_(y)
        xb = kernel("mlp_block_means", x3)(x3, block=cfg.block, perm=perm)
        bm_cache.copy_(_score_basis(xb, w_act, b_act, w_lin, b_lin))
        if cfg.score == "output":  # per dense step: follows weight updates between generations
            st.tensor("w2_col_norm", (Fh,), torch.float32, x3.device).copy_(w2.float().norm(dim=0))
        s.finish(st, d, pos)
        return y
    if recompute:
        xb = kernel("mlp_block_means", x3)(x3, block=cfg.block, perm=perm)
        basis = _score_basis(xb, w_act, b_act, w_lin, b_lin)  # the kernel reads bf16/fp16 as fp32
        basis = basis.float() if cfg.score == "output" else basis  # the output score's activations in fp32
        _select_neurons(st, s, basis, bm_cache, Fh, w_lin is not None, pos.step, act)
    if fore:  # added in mm2's epilogue: y_cache stays the plain rolling cache
        count("mlp_forecast")
    y = _sparse_delta(s, st, x3, w_act, b_act, w_lin, b_lin, w2, act, perm, h_cache, y_cache,
                      forecast=(fc.slope, fc.coef(cfg.extrapolate)) if fore else None)
    s.finish(st, d, pos)
    return y


def _sparse_delta(s, st, x3, w_act, b_act, w_lin, b_lin, w2, act, perm, h_cache, y_cache, forecast=None) -> Tensor:
    """The sparse step over the stored neuron indices: h_cache[S] and y_cache move by the selected
    neurons' change; returns a fresh copy of y_cache, plus coef · slope with `forecast` = (slope, coef)."""
    cfg = s.cfg
    idx_buf, cnt_buf = st.get("indices"), st.get("counts")
    delta = kernel("mlp_sparse_mm1", x3, w_act)(
        x3, w_act, b_act, w_lin, b_lin, idx_buf, cnt_buf, h_cache, act=act, block=cfg.block, perm=perm)
    mm2 = kernel("mlp_sparse_mm2", delta, w2)
    w2k = w2 if mm2 is mlp_sparse_mm2_ref else s.column_major(w2)  # the Triton mm2 gathers rows of w2ᵀ
    slope, coef = forecast if forecast is not None else (None, None)
    return mm2(delta, w2k, idx_buf, cnt_buf, y_cache, block=cfg.block, perm=perm, slope=slope, slope_coef=coef)


def _dense_into_cache(x3, w_act, b_act, w_lin, b_lin, w2, b2, act, perm, h_cache) -> Tensor:
    """Exact MLP of a dense step that leaves h in h_cache (rows in grouped order) and returns y.

    h_cache rows are grouped positions (the kernels' contract) so that every sparse step's cache
    read-modify-write is contiguous. With the neuron-major cache (`mlp_alloc_h_cache`), fc1 runs
    transposed, hᵀ = w_act · x_gᵀ, straight into the cache and the activation is applied in place:
    no temporary h, no gather or transposing copy of the (M, F) activation, which is the largest
    tensor of the step. The GEMMs run without a bias: along the rows of a transposed product a bias
    is no cuBLAS epilogue, and addmm wrote it over the whole output first and read it back (92 µs
    per FLUX site on an H100, beside the activation's own pass); `mlp_bias_act` then adds the bias,
    applies the activation and the gate in one pass, in fp32 from the rounded product, rounded once.

    Both GEMMs run over the cache's padded rows (M_pad, a multiple of 64): in the transposed
    product the token count is the contiguous dimension, and at an odd count (OmniGen's 4161
    tokens) cuBLAS fell back to sm75 kernels, 2.2 ms per fc1 half against ~0.35 (H200, session 38).
    The pad rows compute token 0 again: junk in the cache's pad, which nothing reads."""
    B, M, _ = x3.shape
    m_pad = _padded_rows(h_cache)
    if m_pad is None:  # another cache layout: the plain path
        xg = x3 if perm is None else x3.index_select(1, perm.long())
        a, g = _pre(xg, w_act, b_act, w_lin, b_lin)
        h_cache.copy_(_hidden(a, g, act))
        h_rows = h_cache
    else:
        order = perm.long() if perm is not None else None
        if m_pad > M:
            order = torch.arange(M, device=x3.device) if order is None else order
            order = torch.cat([order, order.new_zeros(m_pad - M)])
        xg = x3 if order is None else x3.index_select(1, order)
        h_rows = h_cache.as_strided((B, m_pad, h_cache.shape[2]), h_cache.stride(), h_cache.storage_offset())
        hT = h_rows.transpose(1, 2)  # (B, F, M_pad), each batch contiguous
        bias_act = kernel("mlp_bias_act", hT)
        for b in range(B):  # hᵀ = w_act · x_gᵀ with no bias, then bias, activation and gate in one pass
            torch.mm(w_act, xg[b].t(), out=hT[b])
            gate = torch.mm(w_lin, xg[b].t()) if w_lin is not None else None
            bias_act(hT[b], b_act, act=act, gate=gate, gate_bias=b_lin)
    ys = [F.linear(h_rows[b], w2, b2) for b in range(B)]  # h_rows[b]: a transposed operand, no copy
    yg = (ys[0].unsqueeze(0) if B == 1 else torch.stack(ys))[:, :M]
    if perm is None:
        return yg.contiguous()
    return torch.empty(yg.shape, dtype=yg.dtype, device=yg.device).index_copy_(1, perm.long(), yg)


def _padded_rows(h_cache) -> Optional[int]:
    """M_pad when h_cache is neuron-major with each neuron's M rows at a stride M_pad >= M inside its
    own storage (`mlp_alloc_h_cache`'s layout, M_pad == M unpadded), else None."""
    B, M, Fh = h_cache.shape
    m_pad = h_cache.stride(2)
    if h_cache.stride(1) != 1 or m_pad < M or (B > 1 and h_cache.stride(0) != Fh * m_pad):
        return None
    need = (h_cache.storage_offset() + B * Fh * m_pad) * h_cache.element_size()
    return m_pad if h_cache.untyped_storage().nbytes() >= need else None


def _alloc_h(*shape, dtype, device):
    from ..kernels import mlp_alloc_h_cache

    return mlp_alloc_h_cache(*shape, dtype, device)


def _output_score(st, basis, bm_cache, Fh: int, gated: bool, act: str) -> Tensor:
    """(B, nb, Fh) fp32 `mlp.score: output` ranking: |Δ act(block mean)| (the gated product when
    gated) times ||w2[:, j]||: how much the neuron's stale cache entry moves the MLP output, so that
    a large pre-activation change in the flat part of the activation, or into a neuron with small
    fan-out weights, ranks low. ("preact", the published |Δ block-mean pre-activation|, is computed
    inside the selection kernel.)"""
    def h(t):
        return _hidden(t[..., :Fh], t[..., Fh:] if gated else None, act)

    return (h(basis) - h(bm_cache)).abs_().mul_(st.get("w2_col_norm"))


def _select_neurons(st, s, basis, bm_cache, Fh: int, gated: bool, step: int, act: str) -> None:
    """Per token block: the `top_keys` neurons whose score is largest since they were last picked,
    plus `random_keys` random draws, into `indices`/`counts`, refreshing the picked neurons'
    reference means only (the others keep drifting; method.md §2). One `mlp_select_neurons` call
    (ascending indices for L2 reuse of weight rows in mm1/mm2, no host sync)."""
    cfg, device = s.cfg, basis.device
    B, nb, _ = basis.shape
    top, rnd = max(1, round(cfg.top_keys * Fh)), round(cfg.random_keys * Fh)
    K = min(Fh, top + rnd)
    # draws with replacement; a duplicate or top-k overlap just leaves a slot to top-k. Hashed by
    # the selection kernel itself: no draws tensor built by small torch kernels per site.
    draws = s.random_draws(device, step) if rnd else None
    score = _output_score(st, basis, bm_cache, Fh, gated, act) if cfg.score == "output" else None
    idx = st.get("indices")
    if idx is None:
        idx = st.tensor("indices", (B, nb, K), torch.int32, device)
        st.tensor("counts", (B, nb), torch.int32, device).fill_(K)
    kernel("mlp_select_neurons", basis)(basis, bm_cache, idx, gated=gated, score=score, draws=draws, n_draws=rnd)


@mlp.register_fake
def _(x, w_act, b_act, w_lin, b_lin, w2, b2, act, site):
    return x.new_empty((*x.shape[:-1], w2.shape[0]))

"""Triton: sparse-MLP second matmul over gathered w2 columns, accumulating into the output cache.

Same signature and contract as ``mlp_sparse_mm2_ref.mlp_sparse_mm2_ref`` (read it first).

Kernel invariants:
- Work items are (BLOCK_M-row tile of one token block, BLOCK_N output channels, batch b) on a 1-D
  grid; the reduction runs over the block's first counts packed columns only: full BLOCK_K steps
  without column masks, then one masked step.
- With A_TMA the full K steps read the delta tile through a TMA descriptor over (B * M, K) rows
  (built by the launcher when delta's rows are 16-byte aligned and its batches share one row
  pitch; otherwise those configs are pruned and delta goes through cp.async as before). A tile
  starting near a block's or batch's end reads the next block's rows, or zeros past the tensor:
  they only reach accumulator rows that are never stored. The masked tail step stays cp.async.
  H200, FLUX shape, 70%: 0.206 against 0.215 ms for the best config without (session 32).
- w2 is read as rows of w2ᵀ (F, Cout): row j = neuron j's fan-out, gathered by index. The fast
  layout is w2.stride(0) == 1 (i.e. w2 = w2t.t() for a contiguous (F, Cout) w2t): then rows are
  contiguous. Any other layout is transposed once and cached per weight tensor (weak reference,
  invalidated when the weight's version counter moves) and counted under
  counters["chipmunk"]["kernel_note:mlp_sparse_mm2:w2_transposed_copy"].
- Epilogue: y = y_cache + acc in fp32, rounded once; stored to y_cache (in place) and to the fresh
  output from the same registers; in two column halves with EPI_SUB = 2 (128x256 tiles: no
  spills, against 88 bytes per thread in one piece). With the error forecast (HAS_SLOPE) the output
  is y + coef · slope in fp32 from the rounded y, rounded once, as ``torch.addcmul(y, slope, coef)``
  computes it; the cache stays y. slope is read at the output's offsets (made contiguous like the
  output when it is not), coef is a device scalar, so recorded graphs stay valid. One read of slope
  replaces a pass of its own that read y and slope and wrote the output again.
- W2ᵀ loads are unmasked when the output width is a multiple of the tile (NALIGN). Programs write
  disjoint (row, channel) tiles: race free.
- Program order is grouped with the token tiles fastest, so the concurrently running programs of
  one output-channel slab share the gathered w2ᵀ rows in L2.
- Wave tail: with P = NUM_SMS * OCC resident programs and T tiles, when (T % P) * SPLIT <= P the
  last T % P tiles (a short last wave: 408 = 3 * 132 + 12 tiles at FLUX shapes with 128x256
  tiles) are each split into SPLIT programs of BLOCK_N // SPLIT channels, each over the full
  reduction: no partial sums, so the result is deterministic and rounded once as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from ._tiles import block_rows, column_halves, num_sms, pow2_align, token_block_tile, wave_grid
from ._common import autotune, cdiv, dot_precision, launch, new_empty
from .mlp_sparse_mm2_ref import check_slope


@triton.jit
def _mm2_tile(
    DP, DP_DESC, W2T, IDX, CNT, YC, OUT, PERM, SLOPE, COEF,  #
    sdb, sdm, sdk, swf, swn, syb, sym, syn, sob, som, son, sib, sim, scb,  #
    M, NOUT, b, mb, t, col0,  #
    BLK: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_N: tl.constexpr, EPI_SUB: tl.constexpr,
    A_TMA: tl.constexpr, HAS_SLOPE: tl.constexpr,
):
    pos, row_ok, ri = block_rows(PERM, mb, t * BLOCK_M, BLK, M, BLOCK_M, HAS_PERM)
    cnt = tl.load(CNT + b * scb + mb)
    n = col0 + tl.arange(0, BLOCK_N)
    n_ok = n < NOUT
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    idx_base = IDX + b * sib + mb * sim
    a_base = DP + b * sdb + pos[:, None] * sdm  # delta rows are grouped positions (mm1's contract)
    # Full BLOCK_K tiles without column masks (keeps the loads 16-byte vectorised and
    # software-pipelined), then one masked tail tile.
    n_full = (cnt // BLOCK_K) * BLOCK_K
    a_row = b * M + mb * BLK + t * BLOCK_M  # the tile's first row in the (B * M, K) descriptor
    for kk in range(0, n_full, BLOCK_K):
        c = kk + offs_k
        j = tl.load(idx_base + c)
        if A_TMA:
            # rows past the block's end are another block's (or batch's) or zero-filled: they only
            # reach accumulator rows the epilogue never stores
            a = DP_DESC.load([a_row, kk])
        else:
            a = tl.load(a_base + c[None, :] * sdk, mask=row_ok[:, None], other=0.0)
        if EVEN_N:
            w = tl.load(W2T + j[:, None] * swf + n[None, :] * swn)
        else:
            w = tl.load(W2T + j[:, None] * swf + n[None, :] * swn, mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if n_full < cnt:
        c = n_full + offs_k
        c_ok = c < cnt
        j = tl.load(idx_base + c, mask=c_ok, other=0)
        a = tl.load(a_base + c[None, :] * sdk, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(W2T + j[:, None] * swf + n[None, :] * swn, mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if EPI_SUB == 1:
        _mm2_epilogue(acc, YC, OUT, SLOPE, COEF, syb, sym, syn, sob, som, son, b, ri, row_ok, col0, NOUT, BLOCK_N,
                      HAS_SLOPE)
    else:  # two column halves: fewer temporaries live beside the accumulator
        H: tl.constexpr = BLOCK_N // 2
        a0, a1 = column_halves(acc, BLOCK_M, H)
        _mm2_epilogue(a0, YC, OUT, SLOPE, COEF, syb, sym, syn, sob, som, son, b, ri, row_ok, col0, NOUT, H,
                      HAS_SLOPE)
        _mm2_epilogue(a1, YC, OUT, SLOPE, COEF, syb, sym, syn, sob, som, son, b, ri, row_ok, col0 + H, NOUT, H,
                      HAS_SLOPE)


@triton.jit
def _mm2_epilogue(acc, YC, OUT, SLOPE, COEF, syb, sym, syn, sob, som, son, b, ri, row_ok, col0, NOUT,
                  BLOCK_N: tl.constexpr, HAS_SLOPE: tl.constexpr):
    """Channels [col0, col0 + BLOCK_N): y = y_cache + acc into the cache; y (+ coef · slope) into the
    fresh output."""
    n = col0 + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (n < NOUT)[None, :]
    y_off = ri[:, None] * sym + n[None, :] * syn  # offsets, not a tile of 64-bit pointers
    y = (tl.load(YC + b * syb + y_off, mask=mask, other=0.0).to(tl.float32) + acc).to(YC.dtype.element_ty)
    tl.store(YC + b * syb + y_off, y, mask=mask)
    o_off = b * sob + ri[:, None] * som + n[None, :] * son
    if HAS_SLOPE:  # slope is read at the output's offsets (the launcher makes it contiguous like the output)
        sl = tl.load(SLOPE + o_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + o_off, (y.to(tl.float32) + tl.load(COEF) * sl).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + o_off, y, mask=mask)


@triton.jit
def _mlp_sparse_mm2_kernel(
    DP, DP_DESC, W2T, IDX, CNT, YC, OUT, PERM, SLOPE, COEF,  #
    sdb, sdm, sdk, swf, swn, syb, sym, syn, sob, som, son, sib, sim, scb,  #
    M, NOUT, NB, NBATCH, NUM_SMS,  #
    BLK: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, OCC: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
    NALIGN: tl.constexpr, EPI_SUB: tl.constexpr, A_TMA: tl.constexpr, HAS_SLOPE: tl.constexpr,
):
    EVEN_N: tl.constexpr = NALIGN % BLOCK_N == 0
    pid, t_main, b, mb, t, col0 = token_block_tile(NB, NOUT, NBATCH, NUM_SMS, BLK, BLOCK_M, BLOCK_N, GROUP_M, OCC,
                                                   SPLIT)
    if pid < t_main:
        _mm2_tile(DP, DP_DESC, W2T, IDX, CNT, YC, OUT, PERM, SLOPE, COEF,
                  sdb, sdm, sdk, swf, swn, syb, sym, syn, sob, som, son, sib, sim, scb,
                  M, NOUT, b, mb, t, col0,
                  BLK, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC, EVEN_N, EPI_SUB, A_TMA, HAS_SLOPE)
    else:
        SUB: tl.constexpr = BLOCK_N // SPLIT
        _mm2_tile(DP, DP_DESC, W2T, IDX, CNT, YC, OUT, PERM, SLOPE, COEF,
                  sdb, sdm, sdk, swf, swn, syb, sym, syn, sob, som, son, sib, sim, scb,
                  M, NOUT, b, mb, t, col0 + ((pid - t_main) % SPLIT) * SUB,
                  BLK, HAS_PERM, BLOCK_M, SUB, BLOCK_K, DOT_PREC, EVEN_N, EPI_SUB, A_TMA, HAS_SLOPE)


def _configs():
    out = []
    #         BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, GROUP_M, OCC, SPLIT, EPI_SUB
    # H200 FLUX sweep: 128x128x64, 4 warps, 4 stages 0.280 ms; the same with 5 / 6 stages 0.224 /
    # 0.226 ms (benchmarks/results/bench_kernels_h200_sweep_session5.csv: one warpgroup needs the
    # deeper pipeline to hide the gathered w2 rows); 128x256 tiles: 0.418 ms without the wave-tail
    # split (408 tiles = 3.09 waves), 0.292-0.301 with it (then spilling 88 bytes per thread in the
    # epilogue; none in two column halves); 128x128 with 8 warps 0.427.
    # A_TMA: delta tiles through a TMA descriptor instead of per-thread cp.async (the gathered w2ᵀ
    # rows cannot use one on Hopper); only where the launcher could build the descriptor.
    for bm, bn, bk, w, s, gm, occ, sp, es, tma in [
            (128, 128, 64, 4, 5, 64, 1, 2, 1, False), (128, 128, 64, 4, 6, 64, 1, 2, 1, False),
            (128, 128, 64, 4, 5, 64, 1, 2, 2, False), (128, 256, 64, 8, 4, 64, 1, 4, 2, False),
            (128, 256, 64, 8, 3, 64, 1, 4, 2, False),
            (128, 128, 64, 4, 5, 64, 1, 2, 1, True), (128, 128, 64, 4, 6, 64, 1, 2, 1, True),
            (128, 256, 64, 8, 4, 64, 1, 4, 2, True)]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "OCC": occ,
                                  "SPLIT": sp, "EPI_SUB": es, "A_TMA": tma}, num_warps=w, num_stages=s,
                                 pre_hook=_set_a_block))
    return out


def _set_a_block(nargs):
    """The delta descriptor's box is the config's (BLOCK_M, BLOCK_K) tile (autotune pre-hook)."""
    if nargs.get("DP_DESC") is not None:
        nargs["DP_DESC"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]


def _prune(configs, named_args, **kwargs):
    """A_TMA configs only with a descriptor (every config's row tile is 128: no prune_row_tiles)."""
    has_desc = named_args.get("DP_DESC") is not None
    return [c for c in configs if has_desc or not c.kwargs["A_TMA"]]


def _delta_descriptor(delta_packed):
    """A TMA descriptor over delta_packed as (B * M, K) rows, or None where TMA cannot read it
    (batches not stacked at one row pitch, unaligned rows or base, or a Triton without host
    descriptors). The box shape is set per launch (``_set_a_block``)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    B, M, K = delta_packed.shape
    sb, sm, sk = delta_packed.stride()
    esz = delta_packed.element_size()
    if sk != 1 or (B > 1 and sb != M * sm) or (sm * esz) % 16 or delta_packed.data_ptr() % 16:
        return None
    return TensorDescriptor(delta_packed, [B * M, K], [sm, 1], [16, 16])


# Bench/test hook: a triton.Config that bypasses autotuning (None: autotune / interpreter meta).
_force_config = None
_INTERP_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, OCC=1, SPLIT=2, EPI_SUB=2, A_TMA=True)

_tuned = autotune(configs=_configs(), key=["M", "NOUT", "BLK", "DOT_PREC", "NUM_SMS", "HAS_SLOPE"],
                  restore_value=["YC"], prune_configs_by={"early_config_prune": _prune})(_mlp_sparse_mm2_kernel)

# Keyed by tensor identity: a weakref.WeakKeyDictionary compares colliding keys with Tensor.__eq__
# (elementwise), which raised "Boolean value of Tensor ... is ambiguous" on the H200.
_W2T_CACHE = WeakTensorKeyDictionary()


def w2_rows(w2: torch.Tensor) -> torch.Tensor:
    """(F, Cout) view of w2 with contiguous rows; a cached transposed copy when w2 is row-major."""
    if w2.stride(0) == 1:
        return w2.t()
    version = None if w2.is_inference() else w2._version  # inference tensors keep no version: copied per call
    hit = _W2T_CACHE.get(w2)
    if hit is not None and version is not None and hit[0] == version:
        return hit[1]
    from torch._dynamo.utils import counters

    counters["chipmunk"]["kernel_note:mlp_sparse_mm2:w2_transposed_copy"] += 1
    w2t = w2.t().contiguous()
    if version is not None:
        _W2T_CACHE[w2] = (version, w2t)
    return w2t


def mlp_sparse_mm2(delta_packed, w2, indices, counts, y_cache, *, block: int, perm=None, slope=None,
                   slope_coef=None):
    B, M, _ = delta_packed.shape
    NB = indices.shape[1]
    NOUT = w2.shape[0]
    assert NB == cdiv(M, block) and y_cache.shape == (B, M, NOUT)
    check_slope(slope, slope_coef, y_cache)
    w2t = w2_rows(w2)
    out = new_empty(B, M, NOUT, dtype=y_cache.dtype, device=y_cache.device)
    if slope is not None and not slope.is_contiguous():  # the epilogue reads it at the output's offsets
        slope = slope.contiguous()
    idx = indices.to(torch.int32)
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    cnt = counts.to(torch.int32).contiguous()
    pm = None if perm is None else perm.to(torch.int32).contiguous()
    return mlp_sparse_mm2_prepared(delta_packed, w2t, idx, cnt, y_cache, out, block=int(block), perm=pm,
                                   slope=slope, slope_coef=slope_coef)


def mlp_sparse_mm2_prepared(delta_packed, w2t, idx, cnt, y_cache, out, *, block, perm, slope, slope_coef):
    """The kernel on prepared operands (``mlp_sparse_mm2`` makes them: w2t the (F, Cout) rows, int32
    indices / counts / perm, slope contiguous like out); writes y_cache and out."""
    B, M, _ = delta_packed.shape
    NB = idx.shape[1]
    NOUT = y_cache.shape[-1]
    nsm = num_sms(y_cache.device)
    desc = _delta_descriptor(delta_packed)
    args = (
        delta_packed, desc, w2t, idx, cnt, y_cache, out, perm if perm is not None else cnt,
        slope if slope is not None else out, slope_coef if slope is not None else cnt,
        *delta_packed.stride(), *w2t.stride(), *y_cache.stride(), *out.stride(), idx.stride(0), idx.stride(1),
        cnt.stride(0),
        M, NOUT, NB, B, nsm,
    )
    flags = dict(BLK=int(block), HAS_PERM=perm is not None, DOT_PREC=dot_precision(delta_packed.dtype),
                 NALIGN=pow2_align(NOUT), HAS_SLOPE=slope is not None)

    grid = wave_grid(lambda meta: B * NB * cdiv(block, meta["BLOCK_M"]) * cdiv(NOUT, meta["BLOCK_N"]), nsm)

    def fix_meta(meta):  # what _prune and _set_a_block do to the autotuner's configs
        meta = {**meta, "A_TMA": bool(meta.get("A_TMA", False)) and desc is not None}
        _set_a_block({"DP_DESC": desc, **meta})
        return meta

    launch(_mlp_sparse_mm2_kernel, _tuned, grid, args, flags, force_config=_force_config, interp_meta=_INTERP_META,
           fix_meta=fix_meta)
    return out

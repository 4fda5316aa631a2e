"""Gluon (Hopper, sm_90): column-sparse attention in FlashAttention-3's shape: a producer warpgroup
gathers K/V rows, two consumer warpgroups take turns on the tensor cores (ping-pong).

Same signature and contract as ``attn_column_sparse_ref.attn_column_sparse_ref`` (read it first),
under the conditions of ``attn_column_sparse_hopper.supported`` plus groups of a multiple of 128
queries (``supported()`` says why a call does not qualify). ``attn_column_sparse`` times it against
the other two kernels on the first call of each shape and keeps the fastest.

Why: benchmarks/kernel_ablation.py showed the single-warpgroup Hopper kernel to be one serial chain
per key tile (CTA barrier, MMAs, softmax, rescale), bound by no single unit: skipping its QKᵀ
product saved nothing. Here a warpgroup's softmax runs while the other warpgroup's MMAs do, and no
CTA-wide barrier sits in the loop. H200, HunyuanVideo 93% / Wan 11% at G=128: 24.4 / 26.2 ms
against 29.9 / 32.4 ms for the single-warpgroup kernel (same run, identical outputs). At FLUX's
shape (1x24x4352x128, ~1000 keys per group under the default preset) it beats the Triton kernel too:
0.162 against 0.202 ms with the forecast's slope in both epilogues, 0.181 against 0.209 for a
refresh's cache build with its slope (session 28, graph-replayed,
benchmarks/results/csp_flux_pingpong_h200_session28.txt). ``block_n=64`` (less padding of a short
list's last tile) was slower there: 0.142 against 0.128 ms at 653 keys (session 34).

Kernel invariants:
- One program per 128-row tile of a query group of one (b, h), group-fastest then (b, h); 12 warps
  in three partitions (``gl.warp_specialize``): consumer 0 (the default partition) owns rows 0-63
  of the tile, consumer 1 rows 64-127, the producer (4 warps) issues every K/V copy.
- K and V come through rings of STAGES slots. The producer copies K_t then V_t (rows by index,
  cp.async; rows past the count are zero-filled) into slot t % STAGES once both consumers have
  released the slot's previous tile (``empty`` mbarriers, one arrival per consumer), and each of
  its 128 threads signals ``full`` through cp.async.mbarrier.arrive.noinc (count 128) when its
  copies have landed. Tile t's barriers complete for the (t // STAGES)-th time: parity
  (t // STAGES) & 1.
- Step j of a consumer: wait for K_j and V_{j-1}, take its turn (named barrier 8 + w: the other
  consumer has issued its step), issue S_j = Q K_jᵀ and acc += P_{j-1} V_{j-1}, pass the turn
  (named barrier 9 - w), wait for S_j, release K_j, softmax, wait for the P·V, release V_{j-1},
  rescale. Consumer 1 passes the first turn to consumer 0 and skips its last hand-over, so both
  named barriers see as many arrivals as waits. Triton's warp-specialized lowering uses barrier
  ids 0-3; 8 and 9 are free.
- counts == 0 gives attention 0 (the output is o_base exactly, or 0). Epilogue as in the
  single-warpgroup kernel: o = o_base [+ coef * o_slope] + sign * acc / l, one store per row,
  through the permutation, into ``out`` when given, with ``measure``'s slope from the same registers.
"""

from __future__ import annotations

import inspect
import math

from . import attn_column_sparse_hopper as _hopper
from ._common import LOG2E, int32_index_args

HAVE_WS = _hopper.HAVE_GLUON
if HAVE_WS:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from .attn_column_sparse_hopper import (_issue_rows, _layouts, _load_idx, _load_q_rows, _softmax_step,
                                            _store_rows, _work_item, epilogue_args, epilogue_reason)

    # The list form of warp_specialize (Triton 3.6 through 3.9); Triton 3.5's took other arguments.
    HAVE_WS = next(iter(inspect.signature(gl.warp_specialize).parameters)) == "functions_and_args"

BLOCK_M = 128  # rows per program: 64 per consumer warpgroup
BLOCK_N = 128
STAGES = 2
PRODUCER_REGS = 120  # setmaxnreg budgets (the 12 warps share 64K registers): fastest on the H200
CONSUMER_REGS = 192

if HAVE_WS:
    TURN = gl.constexpr(8)  # named barrier TURN + w: consumer w may issue its MMAs

    @gluon.jit
    def _named_barrier(bar_id, ARRIVE: gl.constexpr):
        """bar.arrive / bar.sync on a named barrier that both consumer warpgroups (256 threads) meet
        at; executed once per thread (one element per thread of the 4-warp partition)."""
        t = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
        if ARRIVE:
            gl.inline_asm_elementwise("bar.arrive $1, 256;", "=r,r", [t * 0 + bar_id], dtype=gl.int32,
                                      is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise("bar.sync $1, 256;", "=r,r", [t * 0 + bar_id], dtype=gl.int32,
                                      is_pure=False, pack=1)

    @gluon.jit
    def _producer(K, V, IDX, CNT, k_smem, v_smem, full_k, full_v, empty_k, empty_v,
                  skb, skh, skn, svb, svh, svn, sib, sih, sig, scb, sch, b, h, hk, g,
                  HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        TPR: gl.constexpr = HEAD_DIM // 8  # threads per row, 16-byte vectors
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
        k_base = K + b.to(gl.int64) * skb + hk.to(gl.int64) * skh
        v_base = V + b.to(gl.int64) * svb + hk.to(gl.int64) * svh
        idx_base = IDX + b.to(gl.int64) * sib + h.to(gl.int64) * sih + g.to(gl.int64) * sig
        cnt = gl.load(CNT + b * scb + h * sch + g)
        j, ok = _load_idx(idx_base, cnt, 0, BLOCK_N, ld_layout, 0)
        for t in range(gl.cdiv(cnt, BLOCK_N)):
            s = t % STAGES
            if t >= STAGES:  # both consumers are done with tile t - STAGES's K
                mbarrier.wait(empty_k.index(s), ((t // STAGES) - 1) & 1)
            _issue_rows(k_smem.index(s), k_base, skn, j, ok, HEAD_DIM, ld_layout)
            cp.mbarrier_arrive(full_k.index(s), increment_count=False)
            if t >= STAGES:
                mbarrier.wait(empty_v.index(s), ((t // STAGES) - 1) & 1)
            _issue_rows(v_smem.index(s), v_base, svn, j, ok, HEAD_DIM, ld_layout)
            cp.mbarrier_arrive(full_v.index(s), increment_count=False)
            j, ok = _load_idx(idx_base, cnt, t + 1, BLOCK_N, ld_layout, 0)  # a tile ahead

    @gluon.jit
    def _consumer(Q, O, OB, OS, COEF, PREV, SOUT, INV, PERM, CNT, q_smem, k_smem, v_smem, full_k, full_v, empty_k,
                  empty_v, sqb, sqh, sqn, sob, soh, son, sbb, sbh, sbn, scb, sch, N, b, h, g, row0, qk_scale, sign,
                  W: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, HAS_PERM: gl.constexpr, HAS_OB: gl.constexpr, HAS_SLOPE: gl.constexpr,
                  HAS_MEASURE: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        ROWS: gl.constexpr = 16 * NW
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        TPR: gl.constexpr = HEAD_DIM // 8
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
        dtype: gl.constexpr = Q.dtype.element_ty
        MINE: gl.constexpr = TURN + W
        OTHER: gl.constexpr = TURN + 1 - W

        r0 = row0 + W * ROWS
        q = _load_q_rows(Q, PERM, sqb, sqh, sqn, b, h, g * G + r0, N, ROWS, HEAD_DIM, HAS_PERM, ld_layout)
        q_smem.store(q)
        fence_async_shared()
        cnt = gl.load(CNT + b * scb + h * sch + g)
        n_tiles = gl.cdiv(cnt, BLOCK_N)

        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        if n_tiles > 0:
            if W == 1:
                _named_barrier(TURN, True)  # consumer 0 takes the first turn
            mbarrier.wait(full_k.index(0), 0)
            _named_barrier(MINE, False)
            s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout), use_acc=False, is_async=True)
            if W == 0 or n_tiles > 1:
                _named_barrier(OTHER, True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            mbarrier.arrive(empty_k.index(0))
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, cnt, qk_scale, BLOCK_N, s_layout, 0)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_tiles):
                sk = j % STAGES
                sv = (j - 1) % STAGES
                mbarrier.wait(full_k.index(sk), (j // STAGES) & 1)
                mbarrier.wait(full_v.index(sv), ((j - 1) // STAGES) & 1)
                _named_barrier(MINE, False)
                s = warpgroup_mma(q_smem, k_smem.index(sk).permute((1, 0)),
                                  gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout), use_acc=False,
                                  is_async=True)
                acc = warpgroup_mma(p_op, v_smem.index(sv), acc, is_async=True)
                if W == 0 or j < n_tiles - 1:
                    _named_barrier(OTHER, True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
                mbarrier.arrive(empty_k.index(sk))
                p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j * BLOCK_N, cnt, qk_scale, BLOCK_N, s_layout, 0)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty_v.index(sv))
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            sv = (n_tiles - 1) % STAGES
            mbarrier.wait(full_v.index(sv), ((n_tiles - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(sv), acc)
            mbarrier.arrive(empty_v.index(sv))

        _store_rows(acc, l_i, O, OB, OS, COEF, PREV, SOUT, INV, PERM, sob, soh, son, sbb, sbh, sbn, b, h, g * G + r0,
                    N, sign, ROWS, HEAD_DIM, HAS_PERM, HAS_OB, HAS_SLOPE, HAS_MEASURE, o_layout)

    @gluon.jit
    def _csp_pingpong_kernel(
        Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, PERM,  #
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sbb, sbh, sbn,  #
        sib, sih, sig, scb, sch,  #
        N, HQ, KV_REP, NG, qk_scale, sign,  #
        G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,  #
        HAS_PERM: gl.constexpr, HAS_OB: gl.constexpr, HAS_SLOPE: gl.constexpr, HAS_MEASURE: gl.constexpr,  #
        q_smem_layout: gl.constexpr, kv_smem_layout: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):
        b, h, hk, g, row0 = _work_item(NG, HQ, KV_REP, G // 128, 128)  # 128-row tiles (BLOCK_M)
        dtype: gl.constexpr = Q.dtype.element_ty

        q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_smem_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
        full_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        full_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_k = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty_v = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(full_k.index(i), count=128)  # each producer thread's cp.async arrival
            mbarrier.init(full_v.index(i), count=128)
            mbarrier.init(empty_k.index(i), count=2)  # one elected thread per consumer warpgroup
            mbarrier.init(empty_v.index(i), count=2)

        gl.warp_specialize([
            (_consumer, (Q, O, OB, OS, COEF, PREV, SOUT, INV, PERM, CNT, q_smem.index(0), k_smem, v_smem, full_k,
                         full_v, empty_k, empty_v, sqb, sqh, sqn, sob, soh, son, sbb, sbh, sbn, scb, sch, N, b, h, g,
                         row0, qk_scale, sign, 0, G, HEAD_DIM, BLOCK_N, STAGES, HAS_PERM, HAS_OB, HAS_SLOPE,
                         HAS_MEASURE)),
            (_consumer, (Q, O, OB, OS, COEF, PREV, SOUT, INV, PERM, CNT, q_smem.index(1), k_smem, v_smem, full_k,
                         full_v, empty_k, empty_v, sqb, sqh, sqn, sob, soh, son, sbb, sbh, sbn, scb, sch, N, b, h, g,
                         row0, qk_scale, sign, 1, G, HEAD_DIM, BLOCK_N, STAGES, HAS_PERM, HAS_OB, HAS_SLOPE,
                         HAS_MEASURE)),
            (_producer, (K, V, IDX, CNT, k_smem, v_smem, full_k, full_v, empty_k, empty_v,
                         skb, skh, skn, svb, svh, svn, sib, sih, sig, scb, sch, b, h, hk, g, HEAD_DIM, BLOCK_N,
                         STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def supported(q, k, v, *, group: int, scale: float, lse=None, o_base=None) -> str | None:
    """None when this kernel can take the call, else the reason it cannot."""
    if not HAVE_WS:
        return "no gluon warp_specialize"
    return _hopper.supported(q, k, v, group=group, scale=scale, lse=lse, o_base=o_base) or beyond_hopper(group)


def beyond_hopper(group: int) -> str | None:
    """What this kernel needs beyond ``attn_column_sparse_hopper.supported`` (for a caller that has
    checked that already), else None."""
    if not HAVE_WS:
        return "no gluon warp_specialize"
    return "group not a multiple of 128" if int(group) % BLOCK_M else None


def attn_column_sparse_pingpong(q, k, v, indices, counts, *, scale: float, group: int, perm=None, o_base=None,
                                sign: float = 1.0, lse=None, o_slope=None, slope_coef=None, out=None, measure=None,
                                stages: int = STAGES, block_n: int = BLOCK_N, producer_regs: int = PRODUCER_REGS,
                                consumer_regs: int = CONSUMER_REGS):
    reason = supported(q, k, v, group=group, scale=scale, lse=lse, o_base=o_base) \
        or epilogue_reason(q, o_base, o_slope, out, measure)
    assert reason is None, reason
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = int(group)
    NG = indices.shape[2]
    assert NG == math.ceil(N / G), "indices must have ceil(N/G) groups"
    o, epi, epi_flags = epilogue_args(q, o_base, o_slope, slope_coef, out, measure)
    idx, cnt, pm = int32_index_args(indices, counts, perm)
    ob = o_base
    obs = ob.stride() if ob is not None else q.stride()
    q_l, kv_l = _layouts(q.dtype, D, 64, block_n)
    _csp_pingpong_kernel[(B * Hq * NG * (G // BLOCK_M), )](
        q, k, v, o, ob if ob is not None else q, *epi, idx, cnt, pm if pm is not None else cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), obs[0], obs[1], obs[2],
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        N, Hq, Hq // Hkv, NG, scale * LOG2E, float(sign),
        G=G, HEAD_DIM=D, BLOCK_N=int(block_n), STAGES=int(stages), HAS_PERM=pm is not None, HAS_OB=ob is not None,
        **epi_flags, q_smem_layout=q_l, kv_smem_layout=kv_l, PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs,
        num_warps=4)
    return o

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
list's last tile) was slower there: 0.142 against 0.128 ms at 653 keys (session 34). One program per
SM looping over the work items, with a narrow last tile (13 keys run on 32 rows): 0.1156 against
0.1307 ms one program per item, at 653 keys (session 36, same run); at HunyuanVideo's and Wan's
lengths the two grids are within 3% either way, so the dispatcher times both.

Kernel invariants:
- A work item is a 128-row tile of a query group of one (b, h), numbered group-fastest then (b, h).
  Program p runs items p, p + P, p + 2P, ... (P programs: one per item, or one per SM when
  ``programs`` says so; the dispatcher times both). 12 warps in three partitions
  (``gl.warp_specialize``): consumer 0 (the default partition) owns rows 0-63 of a tile, consumer
  1 rows 64-127, the producer (4 warps) issues every K/V copy.
- K and V come through rings of STAGES slots that run on across a program's items: ring tile t is
  the t-th key tile of the program (its items' tiles in order). The producer copies K_t then V_t
  (rows by index, cp.async; rows past the count are zero-filled) into slot t % STAGES once both
  consumers have released the slot's previous tile (``empty`` mbarriers, one arrival per
  consumer), and each of its 128 threads signals ``full`` through cp.async.mbarrier.arrive.noinc
  (count 128) when its copies have landed. Tile t's barriers complete for the (t // STAGES)-th
  time: parity (t // STAGES) & 1. So the producer gathers the next item's first tiles while the
  consumers finish the current one.
- Each consumer copies its 64 Q rows of an item (cp.async, through the permutation) into its own
  Q buffer while it runs the previous item's epilogue (its MMAs on that buffer have completed).
- Step j of a consumer: wait for K_j and V_{j-1}, take its turn (named barrier 8 + w: the other
  consumer has issued its step), issue S_j = Q K_jᵀ and acc += P_{j-1} V_{j-1}, pass the turn
  (named barrier 9 - w), wait for S_j, release K_j, softmax, wait for the P·V, release V_{j-1},
  rescale. The turns run on across items: consumer 1 passes the very first turn to consumer 0,
  and consumer 0 takes consumer 1's last hand-over after its last item, so both named barriers see
  as many arrivals as waits. Triton's warp-specialized lowering uses barrier ids 0-3; 8 and 9 are
  free.
- ``narrow`` > 0: an item's last key tile holding at most narrow // 2 (or narrow) keys runs its
  QKᵀ, softmax and P·V on that many rows of the slot (the rows past the count are zeros and would
  score -inf), so a short list's ragged end costs less. Every width has its own MMA code.
- counts == 0 gives attention 0 (the output is o_base exactly, or 0). Epilogue as in the
  single-warpgroup kernel: o = o_base [+ coef * o_slope] + sign * acc / l, one store per row,
  through the permutation, into ``out`` when given, with ``measure``'s slope from the same registers.
"""

from __future__ import annotations

import inspect
import math

from . import attn_column_sparse_hopper as _hopper
from ._common import LOG2E, int32_index_args
from ._tiles import num_sms

HAVE_WS = _hopper.HAVE_GLUON
if HAVE_WS:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                   warpgroup_mma_wait)

    from .attn_column_sparse_hopper import (_issue_rows, _group_rows, _item_coords, _layouts, _load_idx,
                                            _softmax_step, _store_rows, epilogue_args, epilogue_reason)

    # The list form of warp_specialize (Triton 3.6 through 3.9); Triton 3.5's took other arguments.
    HAVE_WS = next(iter(inspect.signature(gl.warp_specialize).parameters)) == "functions_and_args"

BLOCK_M = 128  # rows per program: 64 per consumer warpgroup
BLOCK_N = 128
STAGES = 2
NARROW = 64  # a last key tile of at most NARROW // 2 or NARROW keys takes that many rows
PERSISTENT = False  # one program per SM looping over work items (see the module docstring)
PRODUCER_REGS = 96  # setmaxnreg budgets (the 12 warps share 64K registers): fastest on the H200
CONSUMER_REGS = 208

if HAVE_WS:
    TURN = gl.constexpr(8)  # named barrier TURN + w: consumer w may issue its MMAs
    TILE_M = gl.constexpr(BLOCK_M)

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
    def _issue_q_rows(q_smem, Q, PERM, sqb, sqh, sqn, b, h, pos0, N, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                      HAS_PERM: gl.constexpr, layout: gl.constexpr):
        # cp.async of the Q rows of grouped positions pos0 .. pos0 + ROWS (zero-filled past N) into
        # q_smem, as one commit group: no registers held while they land.
        qi, row_ok = _group_rows(PERM, pos0, N, ROWS, HAS_PERM, gl.SliceLayout(1, layout))
        _issue_rows(q_smem, Q + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh, sqn, qi, row_ok, HEAD_DIM, layout)
        cp.commit_group()

    @gluon.jit
    def _producer(K, V, IDX, CNT, k_smem, v_smem, full_k, full_v, empty_k, empty_v,
                  skb, skh, skn, svb, svh, svn, sib, sih, sig, scb, sch, NG, HQ, KV_REP, TOTAL, NPROG,
                  TPG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        TPR: gl.constexpr = HEAD_DIM // 8  # threads per row, 16-byte vectors
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
        base = 0  # key tiles of this program's earlier work items: the rings' position
        for item in range(gl.program_id(0), TOTAL, NPROG):
            b, h, hk, g, row0 = _item_coords(item, NG, HQ, KV_REP, TPG, TILE_M)
            k_base = K + b.to(gl.int64) * skb + hk.to(gl.int64) * skh
            v_base = V + b.to(gl.int64) * svb + hk.to(gl.int64) * svh
            idx_base = IDX + b.to(gl.int64) * sib + h.to(gl.int64) * sih + g.to(gl.int64) * sig
            cnt = gl.load(CNT + b * scb + h * sch + g)
            n_tiles = gl.cdiv(cnt, BLOCK_N)
            j, ok = _load_idx(idx_base, cnt, 0, BLOCK_N, ld_layout, 0)
            for t in range(n_tiles):
                tt = base + t
                s = tt % STAGES
                if tt >= STAGES:  # both consumers are done with ring tile tt - STAGES's K
                    mbarrier.wait(empty_k.index(s), ((tt // STAGES) - 1) & 1)
                _issue_rows(k_smem.index(s), k_base, skn, j, ok, HEAD_DIM, ld_layout)
                cp.mbarrier_arrive(full_k.index(s), increment_count=False)
                if tt >= STAGES:
                    mbarrier.wait(empty_v.index(s), ((tt // STAGES) - 1) & 1)
                _issue_rows(v_smem.index(s), v_base, svn, j, ok, HEAD_DIM, ld_layout)
                cp.mbarrier_arrive(full_v.index(s), increment_count=False)
                j, ok = _load_idx(idx_base, cnt, t + 1, BLOCK_N, ld_layout, 0)  # a tile ahead
            base += n_tiles

    @gluon.jit
    def _step(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_prev, acc, m_i, l_i, base, j, cnt,
              qk_scale, MINE: gl.constexpr, OTHER: gl.constexpr, WIDTH: gl.constexpr, HAS_PV: gl.constexpr,
              STAGES: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Step j of an item whose first key tile is the rings' tile ``base``: on our turn, issue
        S_j = Q K_jᵀ over the tile's first WIDTH keys and (HAS_PV) acc += P_{j-1} V_{j-1}; pass the
        turn; release K_j after S_j, softmax; release V_{j-1} after the product, rescale.
        Returns (P_j as the next product's operand, acc, m, l); m and l in S_j's row layout."""
        NW: gl.constexpr = gl.num_warps()
        ROWS: gl.constexpr = 16 * NW
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, WIDTH, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        m_i = gl.convert_layout(m_i, gl.SliceLayout(1, s_layout))
        l_i = gl.convert_layout(l_i, gl.SliceLayout(1, s_layout))
        t = base + j
        sk = t % STAGES
        sv = (t - 1) % STAGES
        mbarrier.wait(full_k.index(sk), (t // STAGES) & 1)
        if HAS_PV:
            mbarrier.wait(full_v.index(sv), ((t - 1) // STAGES) & 1)
        _named_barrier(MINE, False)
        s = warpgroup_mma(q_smem, k_smem.index(sk).slice(0, WIDTH).permute((1, 0)),
                          gl.zeros([ROWS, WIDTH], gl.float32, layout=s_layout), use_acc=False, is_async=True)
        if HAS_PV:
            acc = warpgroup_mma(p_prev, v_smem.index(sv), acc, is_async=True)
        _named_barrier(OTHER, True)
        if HAS_PV:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        else:
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(empty_k.index(sk))
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j * BLOCK_N, cnt, qk_scale, WIDTH, s_layout, 0)
        if HAS_PV:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty_v.index(sv))
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        return gl.convert_layout(p.to(q_smem.dtype), p_layout), acc, m_i, l_i

    @gluon.jit
    def _last_step_of_width(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_prev, acc, m_i, l_i, base,
                            j, cnt, qk_scale, MINE: gl.constexpr, OTHER: gl.constexpr, WIDTH: gl.constexpr,
                            HAS_PV: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                            HEAD_DIM: gl.constexpr):
        # The item's last step over WIDTH keys, then its P·V; l returned in full tiles' row layout.
        l_layout: gl.constexpr = gl.SliceLayout(1, gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_N, 16]))
        p_op, acc, m_i, l_i = _step(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_prev, acc, m_i, l_i,
                                    base, j, cnt, qk_scale, MINE, OTHER, WIDTH, HAS_PV, STAGES, BLOCK_N, HEAD_DIM)
        t = base + j
        sv = t % STAGES
        mbarrier.wait(full_v.index(sv), (t // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(sv).slice(0, WIDTH), acc)
        mbarrier.arrive(empty_v.index(sv))
        return acc, gl.convert_layout(l_i, l_layout)

    @gluon.jit
    def _last_step(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_prev, acc, m_i, l_i, base, j, cnt,
                   qk_scale, MINE: gl.constexpr, OTHER: gl.constexpr, BLOCK_N: gl.constexpr, HAS_PV: gl.constexpr,
                   STAGES: gl.constexpr, NARROW: gl.constexpr, HEAD_DIM: gl.constexpr):
        """The last key tile j takes NARROW // 2 or NARROW of its rows when its keys fit (fewer MMAs and
        exponentials on a short list's ragged end; NARROW = 0: always BLOCK_N)."""
        rem = cnt - j * BLOCK_N
        if NARROW >= 32 and rem <= NARROW // 2:
            acc, l_i = _last_step_of_width(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_prev, acc,
                                           m_i, l_i, base, j, cnt, qk_scale, MINE, OTHER, NARROW // 2, HAS_PV,
                                           STAGES, BLOCK_N, HEAD_DIM)
        elif NARROW >= 16 and rem <= NARROW:
            acc, l_i = _last_step_of_width(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_prev, acc,
                                           m_i, l_i, base, j, cnt, qk_scale, MINE, OTHER, NARROW, HAS_PV, STAGES,
                                           BLOCK_N, HEAD_DIM)
        else:
            acc, l_i = _last_step_of_width(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_prev, acc,
                                           m_i, l_i, base, j, cnt, qk_scale, MINE, OTHER, BLOCK_N, HAS_PV, STAGES,
                                           BLOCK_N, HEAD_DIM)
        return acc, l_i

    @gluon.jit
    def _consumer(Q, O, OB, OS, COEF, PREV, SOUT, INV, PERM, CNT, q_smem, k_smem, v_smem, full_k, full_v, empty_k,
                  empty_v, sqb, sqh, sqn, sob, soh, son, sbb, sbh, sbn, scb, sch, N, NG, HQ, KV_REP, TOTAL, NPROG,
                  qk_scale, sign,
                  W: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, HAS_PERM: gl.constexpr, HAS_OB: gl.constexpr, HAS_SLOPE: gl.constexpr,
                  HAS_MEASURE: gl.constexpr, NARROW: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        ROWS: gl.constexpr = 16 * NW
        TPG: gl.constexpr = G // TILE_M
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        TPR: gl.constexpr = HEAD_DIM // 8
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
        MINE: gl.constexpr = TURN + W
        OTHER: gl.constexpr = TURN + 1 - W

        if W == 1:
            _named_barrier(TURN, True)  # consumer 0 takes the first turn
        pid = gl.program_id(0)
        b, h, hk, g, row0 = _item_coords(pid, NG, HQ, KV_REP, TPG, TILE_M)
        _issue_q_rows(q_smem, Q, PERM, sqb, sqh, sqn, b, h, g * G + row0 + W * ROWS, N, ROWS, HEAD_DIM, HAS_PERM,
                      ld_layout)
        base = 0  # key tiles of this program's earlier work items: the rings' position
        for item in range(pid, TOTAL, NPROG):
            b, h, hk, g, row0 = _item_coords(item, NG, HQ, KV_REP, TPG, TILE_M)
            cp.wait_group(0)  # this thread's Q copies; the turn barrier below waits for the other warps'
            fence_async_shared()
            cnt = gl.load(CNT + b * scb + h * sch + g)
            n_tiles = gl.cdiv(cnt, BLOCK_N)

            m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
            if n_tiles > 1:
                p_op, acc, m_i, l_i = _step(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, acc, acc, m_i,
                                            l_i, base, 0, cnt, qk_scale, MINE, OTHER, BLOCK_N, False, STAGES, BLOCK_N,
                                            HEAD_DIM)
                for j in range(1, n_tiles - 1):
                    p_op, acc, m_i, l_i = _step(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_op, acc,
                                                m_i, l_i, base, j, cnt, qk_scale, MINE, OTHER, BLOCK_N, True, STAGES,
                                                BLOCK_N, HEAD_DIM)
                acc, l_i = _last_step(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, p_op, acc, m_i, l_i,
                                      base, n_tiles - 1, cnt, qk_scale, MINE, OTHER, BLOCK_N, True, STAGES,
                                      NARROW, HEAD_DIM)
            elif n_tiles == 1:
                acc, l_i = _last_step(q_smem, k_smem, v_smem, full_k, full_v, empty_k, empty_v, acc, acc, m_i, l_i,
                                      base, 0, cnt, qk_scale, MINE, OTHER, BLOCK_N, False, STAGES, NARROW,
                                      HEAD_DIM)
            base += n_tiles

            # The next item's Q rows are copied into q_smem (its MMAs here have completed) during
            # this item's epilogue.
            b2, h2, hk2, g2, row02 = _item_coords(item + NPROG, NG, HQ, KV_REP, TPG, TILE_M)
            if item + NPROG < TOTAL:
                _issue_q_rows(q_smem, Q, PERM, sqb, sqh, sqn, b2, h2, g2 * G + row02 + W * ROWS, N, ROWS,
                              HEAD_DIM, HAS_PERM, ld_layout)
            _store_rows(acc, l_i, O, OB, OS, COEF, PREV, SOUT, INV, PERM, sob, soh, son, sbb, sbh, sbn, b, h,
                        g * G + row0 + W * ROWS, N, sign, ROWS, HEAD_DIM, HAS_PERM, HAS_OB, HAS_SLOPE, HAS_MEASURE,
                        o_layout)
        if W == 0:
            _named_barrier(MINE, False)  # consumer 1's last hand-over

    @gluon.jit
    def _csp_pingpong_kernel(
        Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, PERM,  #
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sbb, sbh, sbn,  #
        sib, sih, sig, scb, sch,  #
        N, HQ, KV_REP, NG, TOTAL, NPROG, qk_scale, sign,  #
        G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,  #
        HAS_PERM: gl.constexpr, HAS_OB: gl.constexpr, HAS_SLOPE: gl.constexpr, HAS_MEASURE: gl.constexpr,  #
        NARROW: gl.constexpr,  #
        q_smem_layout: gl.constexpr, kv_smem_layout: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):
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
                         full_v, empty_k, empty_v, sqb, sqh, sqn, sob, soh, son, sbb, sbh, sbn, scb, sch, N, NG, HQ,
                         KV_REP, TOTAL, NPROG, qk_scale, sign, 0, G, HEAD_DIM, BLOCK_N, STAGES, HAS_PERM, HAS_OB,
                         HAS_SLOPE, HAS_MEASURE, NARROW)),
            (_consumer, (Q, O, OB, OS, COEF, PREV, SOUT, INV, PERM, CNT, q_smem.index(1), k_smem, v_smem, full_k,
                         full_v, empty_k, empty_v, sqb, sqh, sqn, sob, soh, son, sbb, sbh, sbn, scb, sch, N, NG, HQ,
                         KV_REP, TOTAL, NPROG, qk_scale, sign, 1, G, HEAD_DIM, BLOCK_N, STAGES, HAS_PERM, HAS_OB,
                         HAS_SLOPE, HAS_MEASURE, NARROW)),
            (_producer, (K, V, IDX, CNT, k_smem, v_smem, full_k, full_v, empty_k, empty_v,
                         skb, skh, skn, svb, svh, svn, sib, sih, sig, scb, sch, NG, HQ, KV_REP, TOTAL, NPROG,
                         G // TILE_M, HEAD_DIM, BLOCK_N, STAGES)),
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
                                consumer_regs: int = CONSUMER_REGS, programs: int | None = None,
                                narrow: int | None = None):
    """``programs``: how many programs run the work items (each takes every programs-th one); None:
    one per SM when PERSISTENT, else one per item. ``narrow``: a list's last key tile takes narrow // 2
    or narrow rows when its keys fit (0: always block_n); None: NARROW where the index lists' length
    leaves such a last tile, else 0 (the narrow code's extra MMAs cost ~2% where no tile uses them)."""
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
    total = B * Hq * NG * (G // BLOCK_M)
    if narrow is None:
        narrow = NARROW if 0 < indices.shape[-1] % int(block_n) <= NARROW else 0
    if programs is None:
        programs = num_sms(q.device) if PERSISTENT else total
    nprog = max(1, min(total, int(programs)))
    _csp_pingpong_kernel[(nprog, )](
        q, k, v, o, ob if ob is not None else q, *epi, idx, cnt, pm if pm is not None else cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), obs[0], obs[1], obs[2],
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        N, Hq, Hq // Hkv, NG, total, nprog, scale * LOG2E, float(sign),
        G=G, HEAD_DIM=D, BLOCK_N=int(block_n), STAGES=int(stages), HAS_PERM=pm is not None, HAS_OB=ob is not None,
        **epi_flags, NARROW=int(narrow) if 16 <= int(narrow) < int(block_n) else 0, q_smem_layout=q_l,
        kv_smem_layout=kv_l, PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs,
        num_warps=4)
    return o

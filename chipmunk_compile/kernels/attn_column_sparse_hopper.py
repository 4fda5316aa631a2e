"""Gluon (Hopper, sm_90): column-sparse attention with asynchronous wgmma and a software-pipelined
softmax.

Same signature and contract as ``attn_column_sparse_ref.attn_column_sparse_ref`` (read it first),
for the self-normalized delta only (no ``lse``), scale > 0, head dims 64 and 128, fp16/bf16, a
unit-stride head dim and groups that are a multiple of 64 queries. ``supported()`` gives the reason
a call does not qualify; ``attn_column_sparse.use_hopper_kernel`` lets long key lists come here or
to the warp-specialized ping-pong kernel (``attn_column_sparse_pingpong.py``, which reuses this
file's helpers), whichever times faster, and sends everything else to the portable Triton kernel.

Why a second kernel: Triton's compiler serializes the two dots of an attention step (the softmax of
key tile j waits for QK_j, and P_j V_j waits for the softmax). Here the schedule is written out, as
FlashAttention-3 does within one warpgroup: P_{j-1} V_{j-1} runs on the tensor cores while the
softmax of tile j runs. Measured on the H200 (benchmarks/csp_hopper_probe.py): 3-5% faster than the
Triton kernel at 75-119k keys, slower at FLUX's ~700 keys per group. A warp-specialized variant
(a 4-warp cp.async producer partition with mbarriers, 56-88 registers) was 30-40% slower than this
one: the producer spilled and the consumers paid two partition barriers per tile.

Kernel invariants:
- One program per BLOCK_M-row tile of a query group of one (b, h), group-fastest then (b, h);
  BLOCK_M // 16 warps. Q rows are gathered through the permutation (if any) once, into shared memory.
- K and V rows are gathered by index with cp.async into rings of STAGES slots. Commit group i holds
  K_{i+STAGES} and V_{i+STAGES-1}. It is issued during step i+1, after the barrier at the top of
  that step (every warp is done with K_i and V_{i-1}, whose slots it fills) and after that step's
  MMAs are issued; it is waited for at the top of step i+STAGES. Index vectors are loaded one step
  before their copies (a key tile's vector serves its V one group later). Rows past the group's
  count copy nothing (zero-filled) and their scores are -inf.
- Step j issues S_j = Q K_j^T and acc += P_{j-1} V_{j-1} asynchronously, waits for S_j only (wgmma
  groups complete in issue order), computes the online softmax of S_j, then waits for the product
  and rescales acc.
- counts == 0 gives attention 0 (the output is o_base exactly, or 0).
- Epilogue: o = o_base [+ coef * o_slope] + sign * acc / l, one store per row, through the
  permutation, into ``out`` when given (any strides with a unit head-dim stride); with ``measure``
  also slope_out = (o - prev) * inv_dt from the fp32 o, prev read before o is stored (prev may be
  out). ``epilogue_reason`` says when a call's tensors do not fit (the caller then adds passes).
- ABLATE (constexpr, 0 = off in every real call) drops one piece of work for
  benchmarks/kernel_ablation.py; the branches fold away at compile time, so real calls compile to
  the same code.
"""

from __future__ import annotations

import math

import torch

try:  # Gluon ships with Triton >= 3.5; without it every call takes the Triton kernel.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    # Triton 3.6 (the GPU machine) names the cp.async copy async_copy_global_to_shared; later
    # versions renamed it async_load and made the old name raise.
    _cp_async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after 3.6 as well
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

from ._common import LOG2E, cp_async_rows_reason, empty_bnhd, int32_index_args

# What ``ablate`` may skip (timing only): exponentials, the index gather (consecutive rows are copied
# instead), the P·V or the QKᵀ product.
ABLATIONS = {"": 0, "exp": 1, "gather": 2, "pv": 3, "qk": 4}
BLOCK_M = 128  # rows per program, 16 per warp; groups that are not a multiple of 128 take 64-row tiles
BLOCK_N = 128
STAGES = 2

if HAVE_GLUON:

    @gluon.jit
    def _work_item(NG, HQ, KV_REP, TPG: gl.constexpr, BLOCK_M: gl.constexpr):
        """(b, query head, its kv head, group, first row in the group) of this program: one
        BLOCK_M-row tile of a query group of one (b, h), group-fastest then (b, h)."""
        return _item_coords(gl.program_id(0), NG, HQ, KV_REP, TPG, BLOCK_M)

    @gluon.jit
    def _item_coords(item, NG, HQ, KV_REP, TPG: gl.constexpr, BLOCK_M: gl.constexpr):
        """``_work_item`` of work item ``item`` (a persistent program runs several)."""
        per_bh = NG * TPG
        bh = item // per_bh
        r = item % per_bh
        g = r // TPG
        row0 = (r % TPG) * BLOCK_M
        b = bh // HQ
        h = bh % HQ
        return b, h, h // KV_REP, g, row0

    @gluon.jit
    def _load_idx(idx_base, cnt, tile, BLOCK_N: gl.constexpr, ld_layout: gl.constexpr, ABLATE: gl.constexpr):
        c = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_layout))
        ok = c < cnt
        if ABLATE == 2:  # "gather": consecutive key rows instead of the indexed ones
            return c, ok
        return gl.load(idx_base + c, mask=ok, other=0), ok

    @gluon.jit
    def _issue_rows(smem, base, stride, j, ok, HEAD_DIM: gl.constexpr, ld_layout: gl.constexpr):
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        _cp_async_load(smem, base + j[:, None].to(gl.int64) * stride + offs_d[None, :], mask=ok[:, None])

    @gluon.jit
    def _group_rows(PERM, pos0, N, BLOCK_M: gl.constexpr, HAS_PERM: gl.constexpr, layout: gl.constexpr):
        # Token rows of the tile's grouped positions pos0 .. pos0 + BLOCK_M (masked past N).
        pos = pos0 + gl.arange(0, BLOCK_M, layout=layout)
        ok = pos < N
        if HAS_PERM:
            return gl.load(PERM + pos, mask=ok, other=0), ok
        return pos, ok

    @gluon.jit
    def _load_q_rows(Q, PERM, sqb, sqh, sqn, b, h, pos0, N, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                     HAS_PERM: gl.constexpr, layout: gl.constexpr):
        # The Q rows of grouped positions pos0 .. pos0 + ROWS (through the permutation; 0 past N).
        qi, row_ok = _group_rows(PERM, pos0, N, ROWS, HAS_PERM, gl.SliceLayout(1, layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        return gl.load(Q + b.to(gl.int64) * sqb + h.to(gl.int64) * sqh + qi[:, None].to(gl.int64) * sqn
                       + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    @gluon.jit
    def _store_rows(acc, l_i, O, OB, OS, COEF, PREV, SOUT, INV, PERM, sob, soh, son, sbb, sbh, sbn, b, h, pos0, N,
                    sign, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, HAS_PERM: gl.constexpr, HAS_OB: gl.constexpr,
                    HAS_SLOPE: gl.constexpr, HAS_MEASURE: gl.constexpr, o_layout: gl.constexpr):
        # Epilogue: o = o_base [+ coef * o_slope] + sign * acc / l for grouped positions pos0 ..
        # pos0 + ROWS, one store per row, through the permutation. o_slope shares o_base's strides;
        # with HAS_MEASURE also slope_out = (o - prev) * inv_dt from the fp32 o, prev and slope_out
        # at O's strides (prev may be O itself: each element is read before it is written).
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = acc * (sign / gl.where(l_o > 0, l_o, 1.0))[:, None]
        qo, ok_o = _group_rows(PERM, pos0, N, ROWS, HAS_PERM, gl.SliceLayout(1, o_layout))
        dcol = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        if HAS_OB:
            ob_off = b.to(gl.int64) * sbb + h.to(gl.int64) * sbh + qo[:, None].to(gl.int64) * sbn + dcol[None, :]
            out = out + gl.load(OB + ob_off, mask=ok_o[:, None], other=0.0).to(gl.float32)
            if HAS_SLOPE:
                out = out + gl.load(COEF) * gl.load(OS + ob_off, mask=ok_o[:, None], other=0.0).to(gl.float32)
        o_off = b.to(gl.int64) * sob + h.to(gl.int64) * soh + qo[:, None].to(gl.int64) * son + dcol[None, :]
        if HAS_MEASURE:
            prev = gl.load(PREV + o_off, mask=ok_o[:, None], other=0.0).to(gl.float32)
            gl.store(SOUT + o_off, ((out - prev) * gl.load(INV)).to(SOUT.dtype.element_ty), mask=ok_o[:, None])
        gl.store(O + o_off, out.to(O.dtype.element_ty), mask=ok_o[:, None])

    @gluon.jit
    def _softmax_step(s, m_i, l_i, col0, cnt, qk_scale, BLOCK_N: gl.constexpr, s_layout: gl.constexpr,
                      ABLATE: gl.constexpr):
        if col0 + BLOCK_N > cnt:  # ragged last tile: columns past the count never count
            cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where((cols < cnt)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        if ABLATE == 1:  # "exp": the exponent itself stands in for the probability
            p = s * qk_scale - m_new[:, None]
        else:
            p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _csp_hopper_kernel(
        Q, K, V, O, OB, OS, COEF, PREV, SOUT, INV, IDX, CNT, PERM,  #
        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sbb, sbh, sbn,  #
        sib, sih, sig, scb, sch,  #
        N, HQ, KV_REP, NG, qk_scale, sign,  #
        G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,  #
        STAGES: gl.constexpr, HAS_PERM: gl.constexpr, HAS_OB: gl.constexpr, HAS_SLOPE: gl.constexpr,  #
        HAS_MEASURE: gl.constexpr, q_smem_layout: gl.constexpr, kv_smem_layout: gl.constexpr,  #
        ABLATE: gl.constexpr = 0,  #
    ):
        NW: gl.constexpr = gl.num_warps()
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        TPR: gl.constexpr = HEAD_DIM // 8  # threads per row, 16-byte vectors
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
        dtype: gl.constexpr = Q.dtype.element_ty

        b, h, hk, g, row0 = _work_item(NG, HQ, KV_REP, G // BLOCK_M, BLOCK_M)

        k_base = K + b.to(gl.int64) * skb + hk.to(gl.int64) * skh
        v_base = V + b.to(gl.int64) * svb + hk.to(gl.int64) * svh
        idx_base = IDX + b.to(gl.int64) * sib + h.to(gl.int64) * sih + g.to(gl.int64) * sig
        cnt = gl.load(CNT + b * scb + h * sch + g)
        n_tiles = gl.cdiv(cnt, BLOCK_N)

        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_smem_layout)
        # Prologue groups: {K_0}, {K_1, V_0}, ..., {K_{S-1}, V_{S-2}}. The index vector of a key
        # tile serves its V one group later, and the next one is loaded a step ahead (the load's
        # latency hides behind the step's MMAs instead of stalling the copy issue).
        jk, okk = _load_idx(idx_base, cnt, 0, BLOCK_N, ld_layout, ABLATE)
        _issue_rows(k_smem.index(0), k_base, skn, jk, okk, HEAD_DIM, ld_layout)
        cp.commit_group()
        for t in gl.static_range(1, STAGES):
            jv = jk
            okv = okk
            jk, okk = _load_idx(idx_base, cnt, t, BLOCK_N, ld_layout, ABLATE)
            _issue_rows(k_smem.index(t), k_base, skn, jk, okk, HEAD_DIM, ld_layout)
            _issue_rows(v_smem.index(t - 1), v_base, svn, jv, okv, HEAD_DIM, ld_layout)
            cp.commit_group()
        jv = jk
        okv = okk
        jk, okk = _load_idx(idx_base, cnt, STAGES, BLOCK_N, ld_layout, ABLATE)

        # Q tile (gathered through the permutation) into shared memory, meanwhile.
        q = _load_q_rows(Q, PERM, sqb, sqh, sqn, b, h, g * G + row0, N, BLOCK_M, HEAD_DIM, HAS_PERM, ld_layout)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_smem_layout, q)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        if n_tiles > 0:
            cp.wait_group(STAGES - 1)  # {K_0}
            fence_async_shared()
            _cta_barrier()
            s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout), use_acc=False)
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, 0, cnt, qk_scale, BLOCK_N, s_layout, ABLATE)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_tiles):
                # Slots of K_{j-1} and V_{j-2} are free once every warp is past step j-1.
                cp.wait_group(STAGES - 2)  # group j-S: {K_j, V_{j-1}}
                fence_async_shared()
                _cta_barrier()
                tn = j - 1 + STAGES
                if ABLATE == 4:  # "qk": no QKᵀ product after the first tile
                    s = s + 1.0
                else:
                    s = warpgroup_mma(q_smem, k_smem.index(j % STAGES).permute((1, 0)),
                                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout), use_acc=False,
                                      is_async=True)
                if ABLATE != 3:  # "pv": no P·V product
                    acc = warpgroup_mma(p_op, v_smem.index((j - 1) % STAGES), acc, is_async=True)
                # The copies' address math runs while the tensor cores work.
                _issue_rows(k_smem.index(tn % STAGES), k_base, skn, jk, okk, HEAD_DIM, ld_layout)
                _issue_rows(v_smem.index((tn - 1) % STAGES), v_base, svn, jv, okv, HEAD_DIM, ld_layout)
                cp.commit_group()
                jv = jk
                okv = okk
                jk, okk = _load_idx(idx_base, cnt, tn + 1, BLOCK_N, ld_layout, ABLATE)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
                p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j * BLOCK_N, cnt, qk_scale, BLOCK_N, s_layout, ABLATE)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            cp.wait_group(0)  # V of the last tile (and empty groups past it)
            fence_async_shared()
            _cta_barrier()
            acc = warpgroup_mma(p_op, v_smem.index((n_tiles - 1) % STAGES), acc)
        else:
            cp.wait_group(0)

        _store_rows(acc, l_i, O, OB, OS, COEF, PREV, SOUT, INV, PERM, sob, soh, son, sbb, sbh, sbn, b, h,
                    g * G + row0, N, sign, BLOCK_M, HEAD_DIM, HAS_PERM, HAS_OB, HAS_SLOPE, HAS_MEASURE, o_layout)


def layout_reason(*ts) -> str | None:
    """Why cp.async cannot gather rows of these tensors (``_common.cp_async_rows_reason``), or None."""
    return cp_async_rows_reason(*ts, inner="head dim")


def supported(q, k, v, *, group: int, scale: float, lse=None, o_base=None) -> str | None:
    """None when this kernel can take the call, else the reason it cannot (counted by the caller)."""
    if not HAVE_GLUON:
        return "no gluon"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not sm_90"
    if lse is not None:
        return "exact-normalizer delta"
    if not scale > 0:
        return "scale <= 0"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "dtype"
    if q.shape[-1] not in (64, 128):
        return "head dim"
    if int(group) % 64:
        return "group not a multiple of 64"
    return layout_reason(q, k, v, o_base)


def epilogue_reason(q, o_base=None, o_slope=None, out=None, measure=None) -> str | None:
    """None when the Gluon epilogue can add o_slope, write into out and store measure's slope itself
    (the Triton kernel's contract: ``attn_column_sparse.fused_epilogue_fits``, and a unit head-dim
    stride of out), else why not (the caller then sums and copies in extra passes)."""
    from .attn_column_sparse import fused_epilogue_fits

    if o_slope is not None and (o_base is None or o_slope.stride() != o_base.stride()):
        return "o_slope strides differ from o_base's"
    if out is not None and out.stride(-1) != 1:
        return "out's head dim not contiguous"
    if not fused_epilogue_fits(q, out, measure):
        return "out's shape or dtype, or measure's tensors not at the output's strides"
    return None


def epilogue_args(q, o_base, o_slope, slope_coef, out, measure):
    """(o, the epilogue's tensor arguments OS, COEF, PREV, SOUT, INV, its flags) for a call that
    ``epilogue_reason`` accepted; unused pointers are stand-ins the kernel never reads."""
    B, Hq, N, D = q.shape
    o = empty_bnhd(B, Hq, N, D, dtype=q.dtype, device=q.device) if out is None else out
    os_ = o_slope if o_slope is not None else q
    coef = slope_coef.reshape(1).float() if o_slope is not None else q
    prev, sout, inv = measure if measure is not None else (q, q, q)
    inv = inv.reshape(1).float() if measure is not None else q
    return o, (os_, coef, prev, sout, inv), dict(HAS_SLOPE=o_slope is not None, HAS_MEASURE=measure is not None)


def _layouts(dtype, head_dim, block_m, block_n):
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return (gl.NVMMASharedLayout.get_default_for([block_m, head_dim], gdt),
            gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gdt))


def attn_column_sparse_hopper(q, k, v, indices, counts, *, scale: float, group: int, perm=None, o_base=None,
                              sign: float = 1.0, lse=None, o_slope=None, slope_coef=None, out=None, measure=None,
                              stages: int = STAGES, block_m: int | None = None, block_n: int = BLOCK_N,
                              ablate: str = ""):
    """``ablate`` (benchmarks/kernel_ablation.py only; the result is then wrong): one of ABLATIONS,
    a piece of work the kernel skips, so that its time without it shows what that piece costs."""
    reason = supported(q, k, v, group=group, scale=scale, lse=lse, o_base=o_base) \
        or epilogue_reason(q, o_base, o_slope, out, measure)
    assert reason is None, reason
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    G = int(group)
    if block_m is None:
        block_m = BLOCK_M if G % BLOCK_M == 0 else 64
    assert G % block_m == 0, "a group is a whole number of row tiles"
    NG = indices.shape[2]
    assert NG == math.ceil(N / G), "indices must have ceil(N/G) groups"
    o, epi, epi_flags = epilogue_args(q, o_base, o_slope, slope_coef, out, measure)
    idx, cnt, pm = int32_index_args(indices, counts, perm)
    ob = o_base
    obs = ob.stride() if ob is not None else q.stride()
    q_l, kv_l = _layouts(q.dtype, D, block_m, block_n)
    grid = (B * Hq * NG * (G // block_m), )
    _csp_hopper_kernel[grid](
        q, k, v, o, ob if ob is not None else q, *epi, idx, cnt, pm if pm is not None else cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), obs[0], obs[1], obs[2],
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        N, Hq, Hq // Hkv, NG, scale * LOG2E, float(sign),
        G=G, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=int(stages), HAS_PERM=pm is not None,
        HAS_OB=ob is not None, **epi_flags, q_smem_layout=q_l, kv_smem_layout=kv_l, ABLATE=ABLATIONS[ablate],
        num_warps=block_m // 16)
    return o

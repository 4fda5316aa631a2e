"""Probe (session 38): why a column-sparse call with a score bias costs ~4.5x the unbiased one.

    python benchmarks/bias_load_probe.py [modes...]    # FLUX's shape 1x24x4352x128, 15% of the keys, (N, N) bias

A minimal self-normalized column-sparse kernel (the shipped one's masked-step loop, no permutation,
forecast or lse), timed per MODE: 0 no bias; 1 the bias gathered at (query row, selected column)
inside the key loop, as `attn_column_sparse` does; 2 the same, prefetched one key tile ahead;
3 a compact (B, H, groups, G, K) copy of the selected bias entries, loaded contiguously; 4 compact,
prefetched; 6 gathered and 7 compact, the bias given to the score MMA as its accumulator
(s = q·kᵀ + bias/scale, then scaled) instead of added after it. Also times making the compact copy:
a torch gather, and `_compact` (a plain gather kernel, heads fastest so that a group's bias rows are
shared in L2; written in session 38, not yet run on a GPU).

H200, session 38 (bias_load_probe_h200_session38.txt), 64x32 tiles / 4 warps / 3 stages:
none 0.139 ms; gathered 0.551; prefetched 0.706; compact 0.405; compact prefetched 0.415;
gathered as accumulator 0.525; compact as accumulator 0.263. The shipped kernel at the same shape
with contiguous index runs instead of random ones costs 0.564 against 0.587 ms: the scattered
sectors are not what costs. A compact layout fed to the MMA would halve the bias's cost, but the
compaction itself (a torch gather: 1.0 ms) would need its own kernel; not done.
"""
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

LOG2E = 1.4426950408889634


@triton.jit
def _bias_at(brow, cols, mask):
    """The (rows, cols) bias tile at row pointers brow, in log2 units."""
    return tl.load(brow[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def _k(Q, K, V, O, OB, IDX, CNT, BIAS, N, HQ, NG, KC, sq_n, sk_n, so_n, sb_r, qk_scale,
       G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    pid = tl.program_id(0)
    TPG: tl.constexpr = G // BM
    bh = pid // (NG * TPG)
    r = pid % (NG * TPG)
    g = r // TPG
    row0 = (r % TPG) * BM
    h = bh % HQ
    loc = row0 + tl.arange(0, BM)
    qi = g * G + loc
    row_ok = qi < N
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BN)
    q = tl.load(Q + h * D + qi[:, None] * sq_n + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    inv_scale = 1.0 / qk_scale  # the bias (log2 units) over qk_scale in the accumulator, times qk_scale after
    kb = K + h * D
    vb = V + h * D
    ib = IDX + (bh * NG + g) * KC
    cnt = tl.load(CNT + bh * NG + g)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if MODE == 1 or MODE == 2 or MODE == 6:
        brow = BIAS + qi * sb_r  # (N, N) bias shared by heads
    else:
        brow = BIAS + ((bh * NG + g) * G + loc).to(tl.int64) * KC  # compact rows
    c0 = offs_n
    if MODE == 2:
        j0 = tl.load(ib + c0, mask=c0 < cnt, other=0)
        bnext = tl.load(brow[:, None] + j0[None, :], mask=row_ok[:, None] & (c0 < cnt)[None, :], other=0.0)
    elif MODE == 4:
        bnext = tl.load(brow[:, None] + c0[None, :], mask=row_ok[:, None] & (c0 < cnt)[None, :], other=0.0)
    else:
        bnext = tl.zeros([BM, BN], tl.bfloat16)
    for start in range(0, cnt, BN):
        c = start + offs_n
        c_ok = c < cnt
        j = tl.load(ib + c, mask=c_ok, other=0)
        k = tl.load(kb + j[:, None] * sk_n + offs_d[None, :])
        v = tl.load(vb + j[:, None] * sk_n + offs_d[None, :])
        if MODE == 6:
            bacc = _bias_at(brow, j, row_ok[:, None] & c_ok[None, :]) * inv_scale
            s = tl.dot(q, tl.trans(k), acc=bacc) * qk_scale
        elif MODE == 7:
            bacc = _bias_at(brow, c, row_ok[:, None] & c_ok[None, :]) * inv_scale
            s = tl.dot(q, tl.trans(k), acc=bacc) * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        if MODE == 1:
            s += _bias_at(brow, j, row_ok[:, None] & c_ok[None, :])
        elif MODE == 3:
            s += _bias_at(brow, c, row_ok[:, None] & c_ok[None, :])
        elif MODE == 2 or MODE == 4:
            bcur = bnext
            c1 = c + BN
            if MODE == 4:
                bnext = tl.load(brow[:, None] + c1[None, :], mask=row_ok[:, None] & (c1 < cnt)[None, :], other=0.0)
            else:
                j1 = tl.load(ib + c1, mask=c1 < cnt, other=0)
                bnext = tl.load(brow[:, None] + j1[None, :], mask=row_ok[:, None] & (c1 < cnt)[None, :], other=0.0)
            s += bcur.to(tl.float32) * 1.4426950408889634
        s = tl.where(c_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc * (-1.0 / tl.where(l_i > 0, l_i, 1.0))[:, None]
    offs = h * D + qi[:, None] * so_n + offs_d[None, :]
    out += tl.load(OB + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(O + offs, out.to(tl.bfloat16), mask=row_ok[:, None])


@triton.jit
def _compact(BIAS, IDX, OUT, N, HQ, NG, KC, sb_r, G: tl.constexpr, R: tl.constexpr, BK: tl.constexpr):
    """OUT[bh, g, r, k] = BIAS[row g*G + r, IDX[bh, g, k]] for one (g, R-row block, head): heads fastest,
    so the programs reading one group's bias rows run together and share them in L2."""
    pid = tl.program_id(0)
    bh = pid % HQ
    rest = pid // HQ
    RPG: tl.constexpr = G // R
    g = rest // RPG
    loc = (rest % RPG) * R + tl.arange(0, R)
    qi = g * G + loc
    row_ok = qi < N
    brow = BIAS + qi * sb_r
    ib = IDX + (bh * NG + g) * KC
    orow = OUT + ((bh * NG + g) * G + loc).to(tl.int64) * KC
    for k0 in range(0, KC, BK):
        c = k0 + tl.arange(0, BK)
        c_ok = c < KC
        j = tl.load(ib + c, mask=c_ok, other=0)
        v = tl.load(brow[:, None] + j[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        tl.store(orow[:, None] + c[None, :], v, mask=c_ok[None, :])


def main():
    modes = [int(m) for m in sys.argv[1:]] or [0, 1, 2, 3, 4, 6, 7]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_head_dims import _inputs
    from chipmunk_compile.kernels import attn_column_sparse_ref
    h, n, d, keep, G = 24, 4352, 128, 0.15, 128
    torch.manual_seed(0)
    q, k, v, idx, cnt = _inputs(h, n, d, keep)
    KC = idx.shape[-1]
    NG = idx.shape[2]
    ob = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    bias = (0.5 * torch.randn(n, n, device="cuda")).bfloat16()
    rows = torch.arange(NG * G, device="cuda")
    src_rows, src_cols = rows.clamp_max(n - 1).view(NG, G)[None, None, :, :, None], idx.long()[:, :, :, None, :]
    comp = bias[src_rows, src_cols].contiguous()  # (1, H, NG, G, KC)
    scale = d ** -0.5
    ref = attn_column_sparse_ref(q, k, v, idx, cnt, scale=scale, group=G, o_base=ob, sign=-1.0, bias=bias)
    t_gather = do_bench(lambda: bias[src_rows, src_cols])
    print(f"torch compaction gather {t_gather:.4f} ms (compact {comp.numel()*2/1e6:.0f} MB)")
    comp_k = torch.empty_like(comp)
    for r_rows, bk in ((16, 128), (32, 64), (64, 64)):
        f = lambda: _compact[(h * NG * (G // r_rows),)](  # noqa: E731
            bias, idx, comp_k, n, h, NG, KC, bias.stride(0), G=G, R=r_rows, BK=bk)
        f()
        real = (rows < n).view(NG, G)[None, None, :, :, None].expand_as(comp)  # rows past N are padding
        same = torch.equal(comp_k[real], comp[real])
        print(f"compaction kernel R={r_rows} BK={bk}: {do_bench(f):.4f} ms (matches the torch gather: {same})")
    for mode in modes:
        for bm, bn, w, st in ((64, 32, 4, 3), (128, 32, 8, 3)):
            o = torch.empty(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            bb = bias if mode in (1, 2, 6) else comp
            grid = (h * NG * (G // bm),)
            f = lambda: _k[grid](  # noqa: E731
                q, k, v, o, ob, idx, cnt, bb, n, h, NG, KC, q.stride(2), k.stride(2), o.stride(2),
                bias.stride(0), scale * LOG2E, G=G, D=d, BM=bm, BN=bn, MODE=mode, num_warps=w, num_stages=st)
            try:
                f()
                torch.cuda.synchronize()
                t = do_bench(f)
                err = float('nan') if mode == 0 else ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                print(f"mode {mode} {bm}x{bn} w{w} s{st}: {t:.4f} ms  err {err:.1e}", flush=True)
            except Exception as e:
                print(f"mode {mode} {bm}x{bn}: {type(e).__name__} {str(e)[:100]}", flush=True)


if __name__ == "__main__":
    main()

"""Gluon (Hopper, sm_90): the sparse MLP's second matmul, warp-specialized, two consumer warpgroups in
ping-pong over whole output tiles.

Same contract as ``mlp_sparse_mm2_ref.mlp_sparse_mm2_ref`` (read it first), on the prepared operands
of ``mlp_sparse_mm2.mlp_sparse_mm2_prepared``, under the conditions ``supported()`` checks (fp16/bf16,
unit inner strides, 16-byte aligned rows, an output width that is a multiple of BLOCK_N).

Status: correct (bit-identical outputs to the Triton kernel at FLUX's shape, H200) and twice as slow,
so nothing dispatches to it. H200, FLUX's MLP (4352 tokens, 12288 -> 3072), CUDA-graph replayed
(benchmarks/results/mm2_pingpong_h200_session64.txt): 30% of the neurons 0.409-0.412 ms against the
Triton kernel's 0.201 ms, 15% 0.223-0.233 against 0.117-0.123 ms; 64-row and 64x256 tiles and 2-4
stages per ring were slower still. Not profiled. The likeliest cause is the copies in flight: the
producer fills one consumer's ring at a time, so 3 stages of 32 KB (96 KB, 6.3 MFLOP of work) are in
flight against the Triton kernel's 4 stages of 48 KB (128x256 tiles: 192 KB, 16.8 MFLOP), and the
time follows the depth (2 stages per ring: 0.500 ms, 3: 0.412). A cooperative variant (both
consumers on 64-row halves of every 128x256 tile, one ring of 4 stages, as the column-sparse
ping-pong kernel shares its K/V tiles) would hold as much in flight as the Triton kernel with a
producer warpgroup besides; not built yet. ``benchmarks/bench_kernels.py`` times this kernel beside
the Triton one on sm_90 so that a next version is measured the same way.

Why it was tried: the Triton kernel gathers w2ᵀ rows by pointer loads, which keep its K loop in one
warpgroup on cp.async (Hopper's TMA has no row gather): latency-bound, ~55% tensor-pipe use (ncu,
session 27), and its epilogue (the cache's read-modify-write and the output store) idles the
tensor cores. Here a producer warpgroup issues every copy, and the two consumers own alternate work
items, so one's epilogue runs while the other's MMAs do (CUTLASS's "ping-pong" GEMM schedule).

Kernel invariants:
- A work item is a BLOCK_M x BLOCK_N output tile: BLOCK_M rows of one token block (grouped
  positions) x BLOCK_N output channels of one batch, numbered with the token tiles fastest, then
  the channel tiles, then the batch (programs running at once share their channel slabs' gathered
  w2ᵀ rows in L2). Program p runs items p, p + P, p + 2P, ...; its k-th item belongs to consumer
  k % 2. Warps: consumer 0 (the default partition), consumer 1, the producer; 4 each.
- Each consumer has a ring of STAGES slots of its own (delta tile and w2ᵀ rows; ``full`` and
  ``empty`` mbarriers per slot). With one shared ring a consumer would wait on a slot many phases
  ahead of the barrier's current one (the other consumer's tiles sit between its own), and a
  parity wait cannot tell those phases apart (the first version hung on the H100).
- The producer walks the program's items in order and copies item k's K tiles (BLOCK_K packed
  columns of delta, and the w2ᵀ rows of those columns' neurons, gathered by index) by cp.async into
  ring k % 2 at that ring's position (its earlier items' K tiles). It waits on ``empty[s]`` before
  refilling slot s (parity of the slot's previous use) and each of its 128 threads signals
  ``full[s]`` (cp.async.mbarrier.arrive.noinc, count 128) when its copies have landed. It finishes
  issuing item k's copies before it starts item k + 1's, so the consumers' K loops alternate: one
  consumer's epilogue and its next item's first copies run while the other's MMAs do. The w2ᵀ rows
  of columns past the block's count are zero-filled; delta is copied in 16-byte vectors (cp.async's
  unit), so a vector that starts below the count is read whole: its columns past the count hold
  finite values (mm1 writes zeros there; ``supported`` checks that the storage holds the last row's
  vector) and meet zero rows, so they add nothing.
- A consumer walks the same items and takes every other one; on its items it waits ``full``,
  issues the wgmma on the slot, keeps one product in flight, and releases the slot before
  (``empty``, one arrival) once the product that read it has completed.
- Epilogue: y = y_cache + acc in fp32, rounded once, stored to y_cache (token rows: through the
  permutation) and to the output, with the forecast's coef · slope added from the rounded y
  (HAS_SLOPE) as the Triton kernel does. It runs in EPI column slices of the accumulator (fewer
  registers live). Items own disjoint tiles: race free.
"""

from __future__ import annotations

import inspect

import torch

from ._common import cp_async_rows_reason
from ._tiles import num_sms

try:  # Gluon's warp specialization (Triton >= 3.6's list form)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    _cp_async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared
    HAVE_WS = next(iter(inspect.signature(gl.warp_specialize).parameters)) == "functions_and_args"
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_WS = False

BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
STAGES = 3  # per consumer ring
EPI = 4  # epilogue column slices (one piece spilled ~5 KB per thread, two ~2 KB, four ~12 bytes)
PRODUCER_REGS = 56
CONSUMER_REGS = 224

if HAVE_WS:

    @gluon.jit
    def _item(item, n_mt, NT_N, TPB: gl.constexpr, BLOCK_N: gl.constexpr):
        """(batch, token block, row tile in the block, first channel) of work item ``item``."""
        per_b = n_mt * NT_N
        b = item // per_b
        r = item % per_b
        mt = r % n_mt
        return b, mt // TPB, mt % TPB, (r // n_mt) * BLOCK_N

    @gluon.jit
    def _tile_positions(rows, mb, t, M, BLK: gl.constexpr, BLOCK_M: gl.constexpr):
        """Grouped positions of row tile t of token block mb (``rows`` = arange(BLOCK_M) in the caller's
        layout), and which of them exist (inside the block and below M); as ``_tiles.block_rows``."""
        loc = t * BLOCK_M + rows
        pos = mb * BLK + loc
        return pos, (loc < BLK) & (pos < M)

    @gluon.jit
    def _n_k(CNT, scb, b, mb, BLOCK_K: gl.constexpr):
        return gl.cdiv(gl.load(CNT + b * scb + mb), BLOCK_K)

    @gluon.jit
    def _producer(DP, W2T, IDX, CNT, a0, b0, full0, empty0, a1, b1, full1, empty1,
                  sdb, sdm, swf, sib, sim, scb, M, n_mt, NT_N, TOTAL, NPROG,
                  BLK: gl.constexpr, TPB: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        a_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [NW, 1], [1, 0])
        b_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_N // 8), BLOCK_N // 8], [NW, 1], [1, 0])
        offs_ka = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
        offs_kb = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_layout))
        base0 = 0  # K tiles of the program's earlier items in ring 0 (consumer 0's) and ring 1
        base1 = 0
        k = 0
        for item in range(gl.program_id(0), TOTAL, NPROG):
            b, mb, t, col0 = _item(item, n_mt, NT_N, TPB, BLOCK_N)
            cnt = gl.load(CNT + b * scb + mb)
            n_k = gl.cdiv(cnt, BLOCK_K)
            pos, row_ok = _tile_positions(rows, mb, t, M, BLK, BLOCK_M)
            a_rows = DP + b.to(gl.int64) * sdb + pos[:, None].to(gl.int64) * sdm
            w_cols = W2T + col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, b_layout))
            idx_base = IDX + b.to(gl.int64) * sib + mb.to(gl.int64) * sim
            if k % 2 == 0:
                _fill(a_rows, w_cols, idx_base, row_ok, cnt, n_k, swf, offs_ka, offs_kb, a0, b0, full0, empty0, base0,
                      BLOCK_K, STAGES)
                base0 += n_k
            else:
                _fill(a_rows, w_cols, idx_base, row_ok, cnt, n_k, swf, offs_ka, offs_kb, a1, b1, full1, empty1, base1,
                      BLOCK_K, STAGES)
                base1 += n_k
            k += 1

    @gluon.jit
    def _fill(a_rows, w_cols, idx_base, row_ok, cnt, n_k, swf, offs_ka, offs_kb, a_ring, b_ring, full, empty, base,
              BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """Copy one item's n_k K tiles into a consumer's ring, from its position ``base`` on."""
        ok = offs_kb < cnt
        j = gl.load(idx_base + offs_kb, mask=ok, other=0)
        for kt in range(n_k):
            tt = base + kt
            s = tt % STAGES
            if tt >= STAGES:  # the consumer has released the slot's previous tile
                mbarrier.wait(empty.index(s), ((tt // STAGES) - 1) & 1)
            # delta is copied in whole 16-byte vectors: columns of a vector that starts below the
            # count are read up to the vector's end (zeros by mm1's contract, or pad; the w2ᵀ rows
            # they meet are zero-filled, so they add nothing)
            c = kt * BLOCK_K + offs_ka
            _cp_async_load(a_ring.index(s), a_rows + c[None, :], mask=row_ok[:, None] & ((c // 8) * 8 < cnt)[None, :])
            _cp_async_load(b_ring.index(s), w_cols[None, :] + j[:, None].to(gl.int64) * swf, mask=ok[:, None])
            cp.mbarrier_arrive(full.index(s), increment_count=False)
            cn = (kt + 1) * BLOCK_K + offs_kb  # the next tile's neurons, loaded a tile ahead
            ok = cn < cnt
            j = gl.load(idx_base + cn, mask=ok, other=0)

    @gluon.jit
    def _epilogue_slice(acc, YC, OUT, SLOPE, COEF, yc_row, o_row, row_ok, col0, syn, son,
                        HAS_SLOPE: gl.constexpr, WIDTH: gl.constexpr):
        # (layouts come from the tensors: Triton 3.6 takes no layout object as a jit argument)
        n = col0 + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, acc.type.layout))
        mask = row_ok[:, None]
        y_ptr = YC + (yc_row[:, None] + (n * syn)[None, :])
        y = (gl.load(y_ptr, mask=mask, other=0.0).to(gl.float32) + acc).to(YC.dtype.element_ty)
        gl.store(y_ptr, y, mask=mask)
        o_off = o_row[:, None] + (n * son)[None, :]  # int32
        if HAS_SLOPE:  # slope at the output's offsets (the launcher asserts its strides are the output's)
            sl = gl.load(SLOPE + o_off, mask=mask, other=0.0).to(gl.float32)
            gl.store(OUT + o_off, (y.to(gl.float32) + gl.load(COEF) * sl).to(OUT.dtype.element_ty), mask=mask)
        else:
            gl.store(OUT + o_off, y, mask=mask)

    @gluon.jit
    def _halves(x, ROWS: gl.constexpr, H: gl.constexpr):
        """Columns [0, H) and [H, 2H) of a (ROWS, 2H) register tile (register-local in wgmma's layout)."""
        return gl.split(gl.permute(gl.reshape(x, [ROWS, 2, H]), (0, 2, 1)))

    @gluon.jit
    def _epilogue_part(a, yc, ob, sl, COEF, ri, row_ok, col0, sym, som, syn, son, HAS_SLOPE: gl.constexpr,
                       WIDTH: gl.constexpr):
        rl: gl.constexpr = gl.SliceLayout(1, a.type.layout)
        _epilogue_slice(a, yc, ob, sl, COEF, gl.convert_layout(ri * sym, rl), gl.convert_layout(ri * som, rl),
                        gl.convert_layout(row_ok, rl), col0, syn, son, HAS_SLOPE, WIDTH)

    @gluon.jit
    def _consumer(YC, OUT, SLOPE, COEF, PERM, CNT, a_ring, b_ring, full, empty,
                  syb, sym, syn, sob, som, son, scb, M, n_mt, NT_N, TOTAL, NPROG,
                  W: gl.constexpr, BLK: gl.constexpr, TPB: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, EPI: gl.constexpr,
                  HAS_PERM: gl.constexpr, HAS_SLOPE: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        base = 0  # K tiles of this consumer's earlier items: its ring's position
        k = 0
        for item in range(gl.program_id(0), TOTAL, NPROG):
            if k % 2 == W:
                b, mb, t, col0 = _item(item, n_mt, NT_N, TPB, BLOCK_N)
                n_k = _n_k(CNT, scb, b, mb, BLOCK_K)
                acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
                for kt in range(n_k):
                    tt = base + kt
                    s = tt % STAGES
                    mbarrier.wait(full.index(s), (tt // STAGES) & 1)
                    acc = warpgroup_mma(a_ring.index(s), b_ring.index(s), acc, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                    if kt > 0:  # the product that read the previous slot has completed
                        mbarrier.arrive(empty.index((tt - 1) % STAGES))
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                if n_k > 0:
                    mbarrier.arrive(empty.index((base + n_k - 1) % STAGES))
                base += n_k
                pos, row_ok = _tile_positions(rows, mb, t, M, BLK, BLOCK_M)
                if HAS_PERM:
                    ri = gl.load(PERM + pos, mask=row_ok, other=0)
                else:
                    ri = pos
                # int32 offsets beside per-batch base pointers (supported() bounds them): a tile of
                # 64-bit pointers beside the accumulator spilled
                yc = YC + b.to(gl.int64) * syb
                ob = OUT + b.to(gl.int64) * sob
                sl = SLOPE + b.to(gl.int64) * sob
                if EPI == 1:
                    _epilogue_slice(acc, yc, ob, sl, COEF, ri * sym, ri * som, row_ok, col0, syn, son, HAS_SLOPE,
                                    BLOCK_N)
                elif EPI == 2:  # column slices: fewer registers live at once
                    H: gl.constexpr = BLOCK_N // 2
                    a0, a1 = _halves(acc, BLOCK_M, H)
                    _epilogue_part(a0, yc, ob, sl, COEF, ri, row_ok, col0, sym, som, syn, son, HAS_SLOPE, H)
                    _epilogue_part(a1, yc, ob, sl, COEF, ri, row_ok, col0 + H, sym, som, syn, son, HAS_SLOPE, H)
                else:
                    Q: gl.constexpr = BLOCK_N // 4
                    a0, a1 = _halves(acc, BLOCK_M, 2 * Q)
                    a00, a01 = _halves(a0, BLOCK_M, Q)
                    _epilogue_part(a00, yc, ob, sl, COEF, ri, row_ok, col0, sym, som, syn, son, HAS_SLOPE, Q)
                    _epilogue_part(a01, yc, ob, sl, COEF, ri, row_ok, col0 + Q, sym, som, syn, son, HAS_SLOPE, Q)
                    a10, a11 = _halves(a1, BLOCK_M, Q)
                    _epilogue_part(a10, yc, ob, sl, COEF, ri, row_ok, col0 + 2 * Q, sym, som, syn, son, HAS_SLOPE, Q)
                    _epilogue_part(a11, yc, ob, sl, COEF, ri, row_ok, col0 + 3 * Q, sym, som, syn, son, HAS_SLOPE, Q)
            k += 1

    @gluon.jit
    def _mm2_pingpong_kernel(
        DP, W2T, IDX, CNT, YC, OUT, PERM, SLOPE, COEF,  #
        sdb, sdm, swf, syb, sym, syn, sob, som, son, sib, sim, scb,  #
        M, n_mt, NT_N, TOTAL, NPROG,  #
        BLK: gl.constexpr, TPB: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr, STAGES: gl.constexpr, EPI: gl.constexpr, HAS_PERM: gl.constexpr,
        HAS_SLOPE: gl.constexpr, a_smem_layout: gl.constexpr, b_smem_layout: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    ):
        dtype: gl.constexpr = DP.dtype.element_ty
        # one ring per consumer (see the module docstring)
        a0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_smem_layout)
        b0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], b_smem_layout)
        a1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_smem_layout)
        b1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], b_smem_layout)
        full0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty0 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        full1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty1 = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(full0.index(i), count=128)  # each producer thread's cp.async arrival
            mbarrier.init(full1.index(i), count=128)
            mbarrier.init(empty0.index(i), count=1)  # the consuming warpgroup
            mbarrier.init(empty1.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (YC, OUT, SLOPE, COEF, PERM, CNT, a0, b0, full0, empty0, syb, sym, syn, sob, som, son,
                         scb, M, n_mt, NT_N, TOTAL, NPROG, 0, BLK, TPB, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, EPI,
                         HAS_PERM, HAS_SLOPE)),
            (_consumer, (YC, OUT, SLOPE, COEF, PERM, CNT, a1, b1, full1, empty1, syb, sym, syn, sob, som, son,
                         scb, M, n_mt, NT_N, TOTAL, NPROG, 1, BLK, TPB, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, EPI,
                         HAS_PERM, HAS_SLOPE)),
            (_producer, (DP, W2T, IDX, CNT, a0, b0, full0, empty0, a1, b1, full1, empty1, sdb, sdm, swf, sib, sim,
                         scb, M, n_mt, NT_N, TOTAL, NPROG, BLK, TPB, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def _vectors_in_storage(t: torch.Tensor) -> bool:
    """Whether the last row's final 16-byte vector (read whole, see the module docstring) lies in t's storage."""
    B, M, K = t.shape
    last = t.storage_offset() + (B - 1) * t.stride(0) + (M - 1) * t.stride(1) + -(-K // 8) * 8
    return last * t.element_size() <= t.untyped_storage().nbytes()


def _int32_rows(t: torch.Tensor) -> bool:
    """Whether one batch's element offsets fit int32 (the epilogue's offsets beside a per-batch base)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) < 2 ** 31


def supported(delta_packed, w2t, y_cache, *, block_n: int = BLOCK_N) -> str | None:
    """None when this kernel can take the call (w2t: the (F, Cout) rows view mm2 gathers; the output is
    allocated like y_cache), else why not."""
    if not HAVE_WS:
        return "no gluon warp_specialize"
    if not (delta_packed.is_cuda and torch.cuda.get_device_capability(delta_packed.device)[0] == 9):
        return "not an sm_90 device"
    if delta_packed.dtype not in (torch.float16, torch.bfloat16) or w2t.dtype != delta_packed.dtype:
        return "dtype"
    reason = cp_async_rows_reason(delta_packed, w2t)
    if reason is not None:
        return reason
    if not _vectors_in_storage(delta_packed):
        return "delta's last 16-byte vector past its storage"
    if y_cache.shape[-1] % block_n:
        return f"output width not a multiple of {block_n}"
    if not _int32_rows(y_cache):
        return "y_cache past int32 offsets"
    return None


def mlp_sparse_mm2_pingpong(delta_packed, w2t, idx, cnt, y_cache, out, *, block: int, perm=None, slope=None,
                            slope_coef=None, stages: int = STAGES, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                            epi: int = EPI, programs: int | None = None, producer_regs: int = PRODUCER_REGS,
                            consumer_regs: int = CONSUMER_REGS):
    """Launch on prepared operands (as ``mlp_sparse_mm2_prepared`` takes them); writes y_cache and out.
    ``programs``: how many programs share the work items (None: one per SM)."""
    reason = supported(delta_packed, w2t, y_cache, block_n=block_n)
    assert reason is None, reason
    # the epilogue addresses out (and slope, at out's offsets) by int32 offsets beside a batch base
    assert out.shape == y_cache.shape and out.dtype == y_cache.dtype and _int32_rows(out), "out like y_cache"
    assert slope is None or (slope.shape == out.shape and slope.stride() == out.stride()), "slope at out's strides"
    B, M, _ = delta_packed.shape
    NOUT = y_cache.shape[-1]
    NB = idx.shape[1]
    tpb = -(-int(block) // int(block_m))
    n_mt = NB * tpb
    nt_n = NOUT // block_n
    total = B * n_mt * nt_n
    nprog = max(1, min(total, int(programs) if programs else num_sms(y_cache.device)))
    gdt = gl.bfloat16 if delta_packed.dtype == torch.bfloat16 else gl.float16
    a_l = gl.NVMMASharedLayout.get_default_for([int(block_m), BLOCK_K], gdt)
    b_l = gl.NVMMASharedLayout.get_default_for([BLOCK_K, block_n], gdt)
    _mm2_pingpong_kernel[(nprog, )](
        delta_packed, w2t, idx, cnt, y_cache, out, perm if perm is not None else cnt,
        slope if slope is not None else out, slope_coef if slope is not None else cnt,
        delta_packed.stride(0), delta_packed.stride(1), w2t.stride(0), *y_cache.stride(), *out.stride(),
        idx.stride(0), idx.stride(1), cnt.stride(0),
        M, n_mt, nt_n, total, nprog,
        BLK=int(block), TPB=tpb, BLOCK_M=int(block_m), BLOCK_N=int(block_n), BLOCK_K=BLOCK_K, STAGES=int(stages),
        EPI=int(epi), HAS_PERM=perm is not None, HAS_SLOPE=slope is not None, a_smem_layout=a_l, b_smem_layout=b_l,
        PRODUCER_REGS=int(producer_regs), CONSUMER_REGS=int(consumer_regs), num_warps=4)
    return out

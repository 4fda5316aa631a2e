"""Triton: top-k key-column selection per (batch, head, query group): threshold, then compaction.

Same signature and contract as ``select_columns_ref.select_columns_ref`` (read it first), except
for which of several equal scores fills the last slots: the reference lets torch.topk pick among
ties, this kernel takes the lowest column ids. The selected score multiset is the same.

Kernel invariants (one program per row (b, h, group); a row is Nk scores, contiguous):
- Scores become order-preserving unsigned keys of BITS = 16 (fp16/bf16) or 32 (fp32) bits (sign
  bit set for positives, all bits flipped for negatives). Always-kept columns get the largest key
  (above +inf, like the reference's +inf boost); key-masked columns are not candidates at all.
  Random draws are boosted to the dtype's max in the scores, so they rank above every real score
  and below the always-kept ones: hash draws (``HashDraws``) by the row's own program before its
  first pass (stores, then a CTA barrier, so the passes read them back), explicit or generator
  draws beforehand in torch (``boost_random_draws``, shared with the reference). A drawn masked or
  always-kept column needs no exclusion: the key ignores its score either way.
- Radix select from the top, one digit per pass (RADIX0 bits, then RADIX bits each, ``RADIX``): a
  masked histogram of the next digit of the candidates that match the prefix found so far, then
  the digit holding the `need`-th largest key. The passes give the exact key T of the K-th
  largest candidate and the number of ties at T to take (K = min(k + n_always + random_keys, Nk,
  candidates)). The passes are ALU-bound (ncu: ALU pipe 89.5%, DRAM 13%), and ``tl.histogram``
  costs ~40 integer ops per element at 64 bins (a warp ballot per bin bit, then masks and a
  popcount per bin; fewer than 32 bins cost as 32). A pass whose candidates are few (at most
  Nk / SPARSE_REFINE_DIV, known from the previous pass) counts them instead by relaxed atomics
  into the row's scratch counters (``sparse_refine``): a few ops per element.
- Sampled threshold (16-bit scores, rows of >= SAMPLED_MIN_KEYS columns; ``sample``): the keys of
  SAMPLE evenly spaced columns give, by a radix select in registers, the keys at ranks r -+ m
  around the K-th largest's expected rank r = K·SAMPLE/Nk (m = SAMPLE_Z·sqrt(r) + 2). One window
  pass histograms the row into those bounds widened to aligned bins of 2^shift keys, plus one bin
  below and one above; if the K-th largest falls in the window (counts say so, exactly), digit
  passes resolve the `shift` bits left (run-time positions), else a plain radix select of all 16
  bits follows (a miss costs one pass; the bounds sit 4 sigmas out). Either way T and the tie
  count are exact: the sample only decides how many passes it takes. The window pass has
  2^WINDOW_BITS = 16 bins (14 in the window) and the refine passes after it resolve up to
  REFINE_BITS = 6 bits each, their ~1% of the row counted by atomics. H200, HunyuanVideo size
  (22296 rows x 118800): 24.5 ms with session 17's 6-bit window and histogram refines, 21.6 with
  atomic refines, 17.2 with the 4-bit window too; Wan 16.6 -> 11.7 ms (bench_refresh.py).
- Compaction pass: columns with key > T, and the first `need` ones with key == T, are written in
  column order (positions from one scan of both counts packed in an int32), so indices come out
  sorted ascending with no sort; slots past counts are zeroed. No host sync, no allocation besides
  the outputs and the per-row scratch counters: safe under CUDA graphs.
- Every pass re-reads the row (passes + 1 reads); a row is ~240 KB of fp16 at video sizes and
  mostly comes from L2 after the first read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import new_empty
from .random_draws import hash_base, hash_draw
from .random_draws_ref import HashDraws
from .select_columns_ref import boost_random_draws, selection_width

# (first digit, later digits) in bits, per key width. tl.histogram lowers to one warp ballot per
# digit bit plus, per 32 bins, a mask product and a popcount per element, so narrower digits are
# cheaper per pass: the schedule trades passes against bins (chosen on the H200, bench_refresh.py).
RADIX = {16: (4, 6), 32: (8, 8)}
# Sampled threshold (16-bit scores of rows >= SAMPLED_MIN_KEYS): SAMPLE evenly spaced columns, a
# bracket of SAMPLE_Z binomial standard deviations around the K-th largest's rank among them, one
# 2**WINDOW_BITS-bin window pass over the row. H200 (bench_refresh.py, same run): 1024 samples tie
# 512 on flat sums and save 1.3 ms on skewed Wan sums (11.6 vs 13.0 ms: a narrower bracket needs
# one refine pass, not two); a 3- or 6-bit window is slower than 4 (HunyuanVideo 23.9 / 21.6 vs
# 17.2 ms).
SAMPLE = 1024
SAMPLE_Z = 4.0
WINDOW_BITS = 4
REFINE_BITS = 6  # bits per refine pass after the window
SAMPLED_MIN_KEYS = 16384
# A refine pass counts its candidates by atomics when they are at most Nk / SPARSE_REFINE_DIV of the
# row (few same-address atomics per chunk), else by tl.histogram.
SPARSE_REFINE_DIV = 32


@triton.jit
def _keys(S, AK, KM, row, b, offs, Nk, BITS: tl.constexpr, HAS_AK: tl.constexpr, HAS_KM: tl.constexpr):
    """(order-preserving unsigned key, is-candidate) of columns offs of one row."""
    inb = offs < Nk
    if BITS == 16:
        raw = tl.load(S + row * Nk + offs, mask=inb, other=0).to(tl.int16, bitcast=True)
        u = raw.to(tl.uint16, bitcast=True).to(tl.uint32)
        neg = (u >> 15) != 0
        key = tl.where(neg, u ^ 0xFFFF, u | 0x8000)
        top = 0xFFFF
    else:
        raw = tl.load(S + row * Nk + offs, mask=inb, other=0).to(tl.int32, bitcast=True)
        u = raw.to(tl.uint32, bitcast=True)
        neg = (u >> 31) != 0
        key = tl.where(neg, ~u, u | 0x80000000)
        top = 0xFFFFFFFF
    ok = inb
    if HAS_AK:
        ak = tl.load(AK + offs, mask=inb, other=0)
        key = tl.where(ak != 0, top, key)
    if HAS_KM:
        km = tl.load(KM + b * Nk + offs, mask=inb, other=0)
        ok = ok & (km != 0)
    return key, ok


@triton.jit
def _first_digit_pass(S, AK, KM, row, b, Nk, K, arange, WIDTH: tl.constexpr, BITS: tl.constexpr,
                      CHUNK: tl.constexpr, HAS_AK: tl.constexpr, HAS_KM: tl.constexpr):
    """The radix select's first pass: the top WIDTH-bit digit of the K-th largest candidate key.
    Returns (that digit, `need` left at it, number of candidates, candidates at that digit); later
    digits: `_refine_pass`."""
    NBINS: tl.constexpr = 1 << WIDTH
    bins = tl.arange(0, NBINS)
    hist = tl.zeros([NBINS], tl.int32)
    for start in range(0, Nk, CHUNK):
        key, ok = _keys(S, AK, KM, row, b, start + arange, Nk, BITS, HAS_AK, HAS_KM)
        digit = ((key >> (BITS - WIDTH)) & (NBINS - 1)).to(tl.int32)
        hist += tl.histogram(digit, NBINS, mask=ok)
    total = tl.sum(hist)
    need = tl.maximum(tl.minimum(total, K), 1)  # candidates may be fewer than K
    d_star, need = _pick_digit(hist, bins, need)
    return d_star.to(tl.uint32), need, total, _count_at(hist, bins, d_star)


@triton.jit
def _count_at(hist, bins, d):
    return tl.sum(tl.where(bins == d, hist, 0))


@triton.jit
def _pick_digit(hist, bins, need):
    """(digit d* holding the `need`-th largest of the histogrammed keys, `need` left at d*)."""
    total = tl.sum(hist)
    # count_ge[d] = number of keys with digit >= d: non-increasing in d
    count_ge = total - tl.cumsum(hist, 0) + hist
    d_star = tl.sum((count_ge >= need).to(tl.int32)) - 1
    return d_star, need - tl.sum(tl.where(bins > d_star, hist, 0))


@triton.jit
def _window_pass(S, AK, KM, row, b, Nk, lo, hi, shift, arange, BITS: tl.constexpr, CHUNK: tl.constexpr,
                 NBINS: tl.constexpr, HAS_AK: tl.constexpr, HAS_KM: tl.constexpr):
    """One read of the row, one histogram per chunk (its cross-warp sum is a pass's main cost, so
    no other reduction rides along): bin 0 counts the candidates below lo, bin NBINS-1 those above
    hi, bin 1 + (key >> shift) - (lo >> shift) those in [lo, hi]."""
    hist = tl.zeros([NBINS], tl.int32)
    base = lo >> shift
    for start in range(0, Nk, CHUNK):
        key, ok = _keys(S, AK, KM, row, b, start + arange, Nk, BITS, HAS_AK, HAS_KM)
        digit = tl.where(key > hi, NBINS - 1, tl.where(key < lo, 0, (key >> shift) - base + 1)).to(tl.int32)
        hist += tl.histogram(digit, NBINS, mask=ok)
    return hist


@triton.jit
def _prefix_digits(S, AK, KM, row, b, offs, Nk, prefix, shift, width, BITS: tl.constexpr, HAS_AK: tl.constexpr,
                   HAS_KM: tl.constexpr):
    """(the `width`-bit digit at `shift`, whether the column is a candidate with key >> (shift +
    width) == prefix) of columns offs."""
    key, ok = _keys(S, AK, KM, row, b, offs, Nk, BITS, HAS_AK, HAS_KM)
    return ((key >> shift) & ((1 << width) - 1)).to(tl.int32), ok & ((key >> (shift + width)) == prefix)


@triton.jit
def _refine_pass(S, AK, KM, SCR, row, b, Nk, prefix, shift, width, need, n_cand, sparse_max, arange,
                 BITS: tl.constexpr, CHUNK: tl.constexpr, NBINS: tl.constexpr, HAS_AK: tl.constexpr,
                 HAS_KM: tl.constexpr):
    """One radix pass: the `width`-bit digit at `shift` (width <= log2 NBINS; constexpr in the radix
    select, run-time after the sampled window) of the `need`-th largest of the `n_cand` candidates
    with key >> (shift + width) == prefix. Returns (prefix with that digit appended, `need` left at
    it, candidates left at it). n_cand <= sparse_max (after the sampled window: ~1% of the row):
    counted by relaxed atomics into the row's NBINS scratch counters, else by tl.histogram (why:
    the module docstring)."""
    bins = tl.arange(0, NBINS)
    if n_cand <= sparse_max:
        scr = SCR + row * NBINS
        tl.store(scr + bins, tl.zeros([NBINS], tl.int32))
        tl.debug_barrier()
        for start in range(0, Nk, CHUNK):
            digit, ok = _prefix_digits(S, AK, KM, row, b, start + arange, Nk, prefix, shift, width, BITS, HAS_AK,
                                       HAS_KM)
            tl.atomic_add(scr + digit, 1, mask=ok, sem="relaxed", scope="cta")
        tl.debug_barrier()  # the CTA's atomics are done and visible before the counts are read
        hist = tl.load(scr + bins, cache_modifier=".cg")
    else:
        hist = tl.zeros([NBINS], tl.int32)
        for start in range(0, Nk, CHUNK):
            digit, ok = _prefix_digits(S, AK, KM, row, b, start + arange, Nk, prefix, shift, width, BITS, HAS_AK,
                                       HAS_KM)
            hist += tl.histogram(digit, NBINS, mask=ok)
    d_star, need = _pick_digit(hist, bins, need)
    return (prefix << width) | d_star.to(tl.uint32), need, _count_at(hist, bins, d_star)


@triton.jit
def _rank_key(keys, rank, BITS: tl.constexpr, WBITS: tl.constexpr):
    """The key of 0-based descending rank `rank` (clamped to the tensor) among `keys` (a register
    tensor): a radix select in registers, BITS bits in digits of at most WBITS."""
    NBINS: tl.constexpr = 1 << WBITS
    N_DIGITS: tl.constexpr = (BITS + WBITS - 1) // WBITS
    FIRST: tl.constexpr = BITS - WBITS * (N_DIGITS - 1)  # the first digit's width, the rest WBITS
    bins = tl.arange(0, NBINS)
    need = tl.minimum(tl.maximum(rank, 0), keys.numel - 1) + 1
    hist = tl.histogram((keys >> (BITS - FIRST)).to(tl.int32), NBINS)
    d_star, need = _pick_digit(hist, bins, need)
    prefix = d_star.to(tl.uint32)
    for p in tl.static_range(1, N_DIGITS):
        shift = BITS - FIRST - WBITS * p
        ok = (keys >> (shift + WBITS)) == prefix
        hist = tl.histogram(((keys >> shift) & (NBINS - 1)).to(tl.int32), NBINS, mask=ok)
        d_star, need = _pick_digit(hist, bins, need)
        prefix = (prefix << WBITS) | d_star.to(tl.uint32)
    return prefix


@triton.jit
def _sampled_threshold(S, AK, KM, SCR, row, b, Nk, K, sparse_max, arange, BITS: tl.constexpr, CHUNK: tl.constexpr,
                       SAMPLE: tl.constexpr, Z: tl.constexpr, WBITS: tl.constexpr, RBITS: tl.constexpr,
                       HAS_AK: tl.constexpr, HAS_KM: tl.constexpr):
    """(T, ties to take at T, number taken) for 16-bit keys: a bracket around the K-th largest key
    from SAMPLE evenly spaced columns, one window pass, then the bits the window left open."""
    NBINS: tl.constexpr = 1 << WBITS
    cols = (tl.arange(0, SAMPLE).to(tl.int64) * Nk) // SAMPLE
    sk, sok = _keys(S, AK, KM, row, b, cols, Nk, BITS, HAS_AK, HAS_KM)
    sk = tl.where(sok, sk, 0)  # non-candidates rank last (key 0 is no score's)
    r = K.to(tl.float32) * SAMPLE / Nk  # the K-th largest's expected rank in the sample
    m = Z * tl.sqrt(r) + 2.0  # Z binomial standard deviations
    hi_rank = tl.floor(r - m).to(tl.int32)
    lo_rank = tl.ceil(r + m).to(tl.int32)
    t_hi = tl.where(hi_rank < 0, (1 << BITS) - 1, _rank_key(sk, hi_rank, BITS, WBITS))
    t_lo = tl.where(lo_rank >= SAMPLE, 0, _rank_key(sk, lo_rank, BITS, WBITS))
    # the smallest shift that fits [t_lo, t_hi] in the NBINS - 2 aligned window bins
    shift = tl.zeros([], tl.int32)
    for _ in tl.static_range(BITS):
        shift += (((t_hi >> shift) - (t_lo >> shift)) >= NBINS - 2).to(tl.int32)
    lo = (t_lo >> shift) << shift
    hi = (((t_hi >> shift) + 1) << shift) - 1
    hist = _window_pass(S, AK, KM, row, b, Nk, lo, hi, shift, arange, BITS, CHUNK, NBINS, HAS_AK, HAS_KM)
    bins = tl.arange(0, NBINS)
    n_take = tl.minimum(tl.sum(hist), K)
    n_above = tl.sum(tl.where(bins == NBINS - 1, hist, 0))
    window = tl.where((bins > 0) & (bins < NBINS - 1), hist, 0)
    # the window holds the n_take-th largest candidate iff fewer lie above it and enough in it
    hit = (n_above < n_take) & (n_above + tl.sum(window) >= n_take)
    d_star, need_w = _pick_digit(window, bins, n_take - n_above)
    prefix = tl.where(hit, (lo >> shift) + d_star.to(tl.uint32) - 1, 0)
    need = tl.where(hit, need_w, tl.maximum(n_take, 1))
    n_cand = tl.where(hit, _count_at(window, bins, d_star), tl.sum(hist))
    left = tl.where(hit, shift, BITS)  # a miss starts over: a plain radix select of every bit
    passes = tl.full([], 1, tl.int32)
    while left > 0:
        width = tl.minimum(left, RBITS)
        left -= width
        prefix, need, n_cand = _refine_pass(S, AK, KM, SCR, row, b, Nk, prefix, left, width, need, n_cand,
                                            sparse_max, arange, BITS, CHUNK, 1 << RBITS, HAS_AK, HAS_KM)
        passes += 1
    return prefix, need, n_take, passes


@triton.jit
def _boost_hash_draws(S, STEP, salt_term, n_draws, row, Nk, arange, CHUNK: tl.constexpr, TOP: tl.constexpr):
    """Store TOP (the dtype's max) at the row's `n_draws` hash-drawn columns: draw j of the row is
    random_draws_ref.hash_ints at flat position row·n_draws + j, in the same int64 arithmetic."""
    base = hash_base(STEP, salt_term)
    for j0 in range(0, n_draws, CHUNK):
        j = j0 + arange
        col = hash_draw(row * n_draws + j, base, Nk)
        tl.store(S + row * Nk + col, tl.full([CHUNK], TOP, tl.float32).to(S.dtype.element_ty), mask=j < n_draws)
    tl.debug_barrier()  # the row's other threads read these scores in the first pass


@triton.jit
def _select_columns_kernel(S, AK, KM, IDX, CNT, PASSES, STEP, SCR, Nk, K, ROWS_PER_B, salt_term, n_draws, sparse_max,
                           BITS: tl.constexpr, RADIX0: tl.constexpr, RADIX: tl.constexpr, CHUNK: tl.constexpr,
                           SAMPLE: tl.constexpr, Z: tl.constexpr, WBITS: tl.constexpr, RBITS: tl.constexpr,
                           HAS_AK: tl.constexpr, HAS_KM: tl.constexpr, COUNT_PASSES: tl.constexpr,
                           HASH_DRAWS: tl.constexpr, TOP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // ROWS_PER_B
    arange = tl.arange(0, CHUNK)
    if HASH_DRAWS:
        _boost_hash_draws(S, STEP, salt_term, n_draws, row, Nk, arange, CHUNK, TOP)

    if SAMPLE > 0:
        prefix, need, n_take, passes = _sampled_threshold(S, AK, KM, SCR, row, b, Nk, K, sparse_max, arange, BITS,
                                                          CHUNK, SAMPLE, Z, WBITS, RBITS, HAS_AK, HAS_KM)
        if COUNT_PASSES:
            tl.store(PASSES + row, passes)
    else:
        prefix, need, total, n_cand = _first_digit_pass(S, AK, KM, row, b, Nk, K, arange, RADIX0, BITS, CHUNK, HAS_AK,
                                                        HAS_KM)
        n_take = tl.minimum(total, K)
        for p in tl.static_range(1, 1 + (BITS - RADIX0) // RADIX):
            prefix, need, n_cand = _refine_pass(S, AK, KM, SCR, row, b, Nk, prefix, BITS - RADIX0 - RADIX * p, RADIX,
                                                need, n_cand, sparse_max, arange, BITS, CHUNK, 1 << RADIX, HAS_AK,
                                                HAS_KM)

    # Compaction in column order: key > T, then the first `need` ties at T. One scan per chunk:
    # the counts of both kinds packed in one int32 (CHUNK < 2^16), instead of a scan per kind.
    idx_row = IDX + row * K
    gts = tl.zeros([], tl.int32)  # columns with key > T before this chunk
    ties = tl.zeros([], tl.int32)  # columns with key == T before this chunk
    for start in range(0, Nk, CHUNK):
        offs = start + arange
        key, ok = _keys(S, AK, KM, row, b, offs, Nk, BITS, HAS_AK, HAS_KM)
        gt = ok & (key > prefix)  # no candidates: ok is all False
        eq = ok & (key == prefix)
        flags = gt.to(tl.int32) | (eq.to(tl.int32) << 16)
        packed = tl.cumsum(flags, 0)
        ties_incl = ties + (packed >> 16)  # 1-based rank of a tie among all ties so far
        take = gt | (eq & (ties_incl <= need))
        # position = taken before this chunk + gts in it up to here + ties taken in it up to here - 1
        pos = gts + (packed & 0xFFFF) + tl.minimum(ties_incl, need) - 1
        tl.store(idx_row + pos, offs.to(tl.int32), mask=take)
        in_chunk = tl.sum(flags, 0)
        gts += in_chunk & 0xFFFF
        ties += in_chunk >> 16
    for start in range(0, K, CHUNK):
        offs = start + arange
        tl.store(idx_row + offs, tl.zeros([CHUNK], tl.int32), mask=(offs >= n_take) & (offs < K))
    tl.store(CNT + row, n_take)


def select_columns(colsum, *, k: int, key_mask=None, always_keep=None, random_keys: int = 0, generator=None,
                   inplace: bool = False, n_always=None, draws=None, radix: tuple | None = None,
                   sample: int | None = None, passes=None, sparse_refine: int | None = None,
                   window_bits: int | None = None):
    """passes: an optional int32 tensor of B·H·Gc elements that receives, per row, the histogram
    passes over the row the sampled path made (the window pass included; tests read it).
    sparse_refine: a refine pass over at most this many candidates counts them by atomics (default
    Nk // SPARSE_REFINE_DIV from SAMPLED_MIN_KEYS columns on, else -1; -1: never, Nk: always). window_bits: the sampled path's window pass
    histogram (default WINDOW_BITS). Neither changes the result, only the time."""
    B, H, Gc, Nk = colsum.shape
    K, n_always = selection_width(colsum, k, always_keep, random_keys, n_always)
    scores = colsum
    if colsum.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        scores = colsum.float()
    hashed = random_keys > 0 and isinstance(draws, HashDraws)
    if random_keys > 0:
        # boosted in place only where the reference would be (inplace and fp16/fp32), else in a copy
        if scores is colsum and not (inplace and colsum.dtype in (torch.float16, torch.float32)):
            scores = colsum.clone()
        if not hashed:
            boost_random_draws(scores, key_mask, always_keep, random_keys, generator, draws)
    scores = scores if scores.is_contiguous() else scores.contiguous()
    idx = new_empty(B, H, Gc, K, dtype=torch.int32, device=colsum.device)
    cnt = new_empty(B, H, Gc, dtype=torch.int32, device=colsum.device)
    ak = always_keep.to(torch.int8).contiguous() if always_keep is not None else cnt
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else cnt
    bits = 32 if scores.dtype == torch.float32 else 16
    r0, r = radix or RADIX[bits]
    assert 1 <= r0 <= bits and r >= 1 and (bits - r0) % r == 0, f"radix {r0}+{r}*n must make {bits} bits"
    if sample is None:
        sample = SAMPLE if bits == 16 and Nk >= SAMPLED_MIN_KEYS and radix is None else 0
    assert sample == 0 or (bits == 16 and sample >= 16 and sample & (sample - 1) == 0), \
        "sample: a power of two >= 16, for 16-bit scores"
    if sparse_refine is None:  # measured on long rows only (HunyuanVideo, Wan); FLUX's 4352 keep histograms
        sparse_refine = Nk // SPARSE_REFINE_DIV if Nk >= SAMPLED_MIN_KEYS else -1
    wbits = window_bits or WINDOW_BITS
    assert 2 <= wbits <= 8, "window_bits: 2..8"
    nbins = max(1 << r, 1 << REFINE_BITS)
    scratch = new_empty(B * H * Gc * nbins if sparse_refine >= 0 else 1, dtype=torch.int32, device=colsum.device)
    step, salt_term, n_draws = (draws.step, draws.salt_term, int(random_keys)) if hashed else (cnt, 0, 0)
    if B * H * Gc:
        _select_columns_kernel[(B * H * Gc,)](
            scores, ak, km, idx, cnt, passes if passes is not None else cnt, step, scratch, Nk, K, H * Gc, salt_term,
            n_draws, sparse_refine, BITS=bits, RADIX0=r0, RADIX=r, CHUNK=_chunk(Nk), SAMPLE=sample, Z=SAMPLE_Z,
            WBITS=wbits, RBITS=REFINE_BITS, HAS_AK=always_keep is not None, HAS_KM=key_mask is not None,
            COUNT_PASSES=passes is not None and sample > 0, HASH_DRAWS=hashed, TOP=torch.finfo(scores.dtype).max,
            num_warps=4)
    return idx, cnt


def _chunk(Nk: int) -> int:
    # H200 sweep (2048/1024/4096 columns x 4/8 warps x 1/3 stages, hunyuan and wan rows): 2048 columns,
    # 4 warps, no pipelining is fastest (25.8 vs 29.3 ms for 4096 x 8 warps at 22272 x 118800).
    return max(16, triton.next_power_of_2(min(Nk, 2048)))

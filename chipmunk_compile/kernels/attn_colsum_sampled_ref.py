"""Reference (pure PyTorch) for per-query-group column sums estimated from sampled queries.

A refresh step needs, per (batch, head, query group), a ranking of key columns by their attention
mass. Summing the probabilities of every query costs a second QKᵀ pass over all queries (half the
FLOPs of attention). Queries of one group are spatial neighbours that share their important keys
(the premise of the grouping), so a few queries per group rank the columns almost as well: with S
of G queries the pass costs S/G of that.

Contract (shared with the Triton kernel ``attn_colsum_sampled.py``):
- q (B, Hq, N, D), k (B, Hkv, Nk, D), any strides, Hq % Hkv == 0 (kv head = h // (Hq // Hkv)).
- lse (B, Hq, N) fp32: the exact natural-log softmax normalizer of every query (from the dense
  attention of the same step), so every sampled probability is exact.
- Group g = query positions g*G .. g*G+G-1 of the query order (perm order when perm is given:
  position p is query perm[p]); the last group may be short.
- ``sample_offsets(G, samples)`` picks the sampled positions inside a group: S = min(samples, G,
  MAX_SAMPLES) offsets, padded with -1 to a power of two >= 16 (the kernel's slot count).
  samples >= G (and G <= MAX_SAMPLES) means every query. With stride s = G / S (G % S == 0) the
  offsets are j·s + (j mod s): one per stride window, shifted by one position per window, so a
  row-major s×s sub-tile of the grouping (4×4 for images at S = G/4) gets one sample in every row
  and every column rather than a single column (on the trained tiny DiT: +2.5% sparse-step error
  against every query at S=32, +14% with plain j·s; benchmarks/colsum_sampling.py). Otherwise
  floor(j·G/S).
- Returns colsum (B, Hq, ceil(N/G), Nk) in out_dtype (fp32 default; fp16 halves the buffer and
  the selection's passes over it), summed in fp32: colsum[b,h,g,j] = sum over the sampled queries i of
  group g (positions < N) of exp(s_ij - lse_i), s = scale * q·k + bias. Unscaled: only the ranking
  within a (b, h, g) row is used.
- bias: None or a float tensor broadcasting to (B, Hq, N, Nk) (SDPA's float attn_mask, read through
  ``bias_view``), added to the scaled scores: s_ij = scale * q_i·k_j + bias[b, h, i, j], i the query
  (after perm); it may hold -inf (probability 0). lse must be that of the same biased scores, and
  finite for every sampled query (a query whose bias masks every key is not supported).
- key_mask (B, Nk) bool: False keys get probability 0; key_mask and bias both apply.
- qk_fp8: the scores come from q and k rounded to float8 e4m3 (``to_e4m3``; products summed in
  fp32, the bias added to them in fp32). The ranking needs no more, and the kernel's QKᵀ then
  moves half the key bytes and runs at twice the tensor-core rate (benchmarks/colsum_precision.py).
"""

from __future__ import annotations

import math

import torch

from ._common import bias_view

MAX_SAMPLES = 128  # one kernel tile of sampled rows per group at most


def sample_offsets(group: int, samples: int) -> list[int]:
    """Offsets of the sampled queries inside a group, padded with -1 to the kernel's slot count."""
    G = int(group)
    if G < 1 or samples < 1:
        raise ValueError(f"group and samples must be >= 1, got {group}, {samples}")
    S = min(int(samples), G, MAX_SAMPLES)
    s = G // S
    offs = [j * s + j % s for j in range(S)] if G % S == 0 else [(j * G) // S for j in range(S)]
    slots = max(16, 1 << (S - 1).bit_length())
    return offs + [-1] * (slots - S)


def _offsets_on(group: int, samples: int, device) -> torch.Tensor:
    """`sample_offsets` without its padding, computed on `device` (no host-to-device copy, which a
    CUDA graph recording of this path, the GPU fallback, cannot do)."""
    G = int(group)
    S = min(int(samples), G, MAX_SAMPLES)
    j = torch.arange(S, device=device)
    s = G // S
    return j * s + j % s if G % S == 0 else (j * G) // S


def to_e4m3(x):
    """x rounded to float8 e4m3 (nearest, saturating at ±448: a plain cast of a larger value is NaN)."""
    return x if x.dtype == torch.float8_e4m3fn else x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def attn_colsum_sampled_ref(q, k, lse, *, scale: float, group: int, samples: int, key_mask=None, perm=None,
                            out_dtype=torch.float32, qk_fp8: bool = False, bias=None):
    bv = bias_view(bias, q, k)
    if qk_fp8:
        q, k = to_e4m3(q), to_e4m3(k)
    B, Hq, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    G = int(group)
    NG = math.ceil(N / G)
    offs = _offsets_on(G, samples, q.device)
    pos = (torch.arange(NG, device=q.device)[:, None] * G + offs[None, :]).reshape(-1)  # (NG * S,) positions
    valid = pos < N
    pos = pos.clamp(max=N - 1)
    rows = perm.long()[pos] if perm is not None else pos
    colsum = torch.zeros(B, Hq, NG, Nk, dtype=torch.float32, device=q.device)
    for b in range(B):
        for h in range(Hq):
            s = (q[b, h, rows].float() @ k[b, h // rep].float().T) * scale  # (NG*S, Nk)
            if bv is not None:
                s = s + bv[b, h, rows].float()
            if key_mask is not None:
                s = s.masked_fill(~key_mask[b].bool()[None, :], float("-inf"))
            p = torch.exp(s - lse[b, h, rows].float()[:, None]) * valid[:, None]
            colsum[b, h] = p.view(NG, -1, Nk).sum(dim=1)
    return colsum.to(out_dtype)

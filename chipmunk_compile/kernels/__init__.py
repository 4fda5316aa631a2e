"""Kernel implementations for chipmunk_compile: pure-PyTorch references and Triton kernels.

Every op ``<op>`` has a reference ``<op>_ref`` (``<op>_ref.py``, imports without Triton: the CPU
path and the test oracle) and, where it pays, a Triton kernel ``<op>`` (``<op>.py``) with the SAME
signature. ``get_kernel(name, *tensors, head_dim=None)`` returns the implementation to call:

- Triton when Triton imports, every given tensor is on CUDA (compute capability >= 8.0), the dtype
  is fp16/bf16/fp32 and, for attention ops, head_dim is at most 256 (a head dim that is not a power
  of two, PixArt's 72 or Lumina's 96, runs in tiles of the next one, the columns past it masked;
  AuraFlow's 256 in the column-sparse kernel's own list of 256-wide tiles);
- the Triton kernel also on CPU when ``TRITON_INTERPRET=1`` and ``CHIPMUNK_KERNELS=triton``
  (interpreter tests; note the interpreter mis-handles bf16 loads: test fp16/fp32 there);
- otherwise the reference, counting ``counters["chipmunk"]["kernel_fallback:<name>:<reason>"]`` and
  logging once per (name, reason) on the "chipmunk_compile" logger.
``CHIPMUNK_KERNELS=ref`` forces the references everywhere (reason "forced_ref").
References never read tensor data on the host nor build tensors from host data (no ``int(t)``,
boolean-mask indexing, ``.cpu()``, ``torch.tensor(list)``): on GPU they are the fallback inside
recorded step graphs, which a host sync would break (``tests/test_graphs.py`` checks it).

Ops (keyword names are fixed; see each ``*_ref.py`` docstring for the exact contract). The three
attention ops also take ``bias=None``: an additive score bias (SDPA's float attn_mask) that broadcasts
to (B, Hq, Nq, Nk), read through ``_common.bias_view`` (no copy), added to every score they compute.
- attn_dense_colsum(q, k, v, *, scale, group, key_mask=None, perm=None, prev_lse=None, want_colsum=True)
  -> (o, lse, colsum|None). Triton: one pass with prev_lse; without prev_lse a second QK^T-only pass
  computes the column sums (~1.5x dense). Pass prev_lse whenever a previous dense lse exists.
- attn_colsum_sampled(q, k, lse, *, scale, group, samples, key_mask=None, perm=None) -> colsum (B, Hq, Gc, Nk)
  from `samples` evenly spread queries per group and the exact lse of the same step (QKᵀ only,
  samples/G of a dense QKᵀ pass). The refresh steps use it after cuDNN attention returned o and lse.
- select_columns(colsum, *, k, key_mask=None, always_keep=None, random_keys=0, generator=None, n_always=None, draws=None)
  -> (indices int32 (B,H,Gc,K), counts int32 (B,H,Gc)), ascending, score ties to the lowest column ids.
  Triton: radix select (4+6+6-bit passes for fp16/bf16 sums, 8+8+8+8 for fp32), for long 16-bit
  rows a sampled bracket around the threshold first (a 16-bin window pass, then usually one
  refine pass; exact either way), then one compaction pass; a pass over few candidates counts
  them by atomics instead of a histogram; no sort, no host sync. ``draws`` may be a
  ``random_draws_ref.HashDraws`` (step tensor, salt): the kernel hashes the draws in place.
- attn_column_sparse(q, k, v, indices, counts, *, scale, group, perm=None, o_base=None, sign=1.0, lse=None,
  o_slope=None, slope_coef=None, out=None, measure=None, bias=None) -> o (into ``out`` when given; ``measure`` =
  (prev, slope_out, inv_dt) also stores (o − prev)·inv_dt: a refresh builds its cache and the
  forecast's slope in the kernel's epilogue, with no extra pass).
  On sm_90, index lists of >= 512 keys per group (head dim 128) may go to a Gluon kernel (same
  contract): the warp-specialized ping-pong one (``attn_column_sparse_pingpong.py``, groups of a
  multiple of 128; counted as ``kernel_pingpong:attn_column_sparse``) or the single-warpgroup one
  (``attn_column_sparse_hopper.py``; ``kernel_gluon:attn_column_sparse``): the first call of each
  such shape times them and the Triton kernel and keeps the fastest (counted as
  ``kernel_choice:attn_column_sparse:<kernel>``; ``CHIPMUNK_GLUON=1`` forces Gluon, ``0`` forbids
  it; a call with a bias always runs Triton). On the H200 of session 19 the ping-pong kernel was ~19% faster than the single-warpgroup one;
  in session 28 it beat Triton at FLUX's ~1000 keys per group too (0.162 against 0.202 ms).
- mlp_sparse_mm1(x, w_act, b_act, w_lin, b_lin, indices, counts, h_cache, *, act, block, perm=None)
  -> delta_packed (B, M, K); updates h_cache in place. h_cache and delta_packed rows are positions
  in the grouped order (row p = token perm[p]); x and mm2's y_cache rows are tokens.
- mlp_sparse_mm2(delta_packed, w2, indices, counts, y_cache, *, block, perm=None, slope=None,
  slope_coef=None) -> fresh y (+ slope_coef · slope: the MLP's error forecast, output only); updates
  y_cache in place. Fast when w2.stride(0) == 1 (pass ``w2t.t()`` of a contiguous (F, Cout) copy made
  once); a row-major w2 is transposed once per weight and cached. ``mlp_sparse_mm2_pingpong.py`` holds a
  warp-specialized Gluon variant for sm_90 (correct, twice as slow on the H200: not dispatched; timed
  beside the Triton kernel by ``benchmarks/bench_kernels.py``).
- mlp_block_means(x, *, block, perm=None) -> (B, ceil(M/block), C). Triton: one read of x (the
  torch chain of gather, fp32 copy, reduction and cast made four passes).
- mlp_select_neurons(basis, bm_cache, indices, *, gated=False, score=None, draws=None, n_draws=0) -> None:
  the K = indices.shape[-1] top-scoring neurons per token block, ascending, into indices; refreshes
  their reference means in bm_cache. basis: fp32, or bf16/fp16 read as fp32. draws: an int64
  tensor, or HashDraws with n_draws per block. Triton: one launch, the row in registers, the K-th
  largest key found bit by bit (32 block-wide counts), compaction by one scan, hashed draws made in
  the program.
- mlp_bias_act(h, bias, *, act, gate=None, gate_bias=None) -> h: in place over the dense MLP step's
  neuron-major fc1 product (F, M), h = act(h + bias) · (gate + gate_bias) in fp32, rounded once.
  Triton: one read and one write (addmm's broadcast bias fill, its read-back and the activation
  made three passes).
- transpose_copy(dst, src) -> dst: a 2-D copy between memory orders (a row-major w2 into its
  column-major copy for mm2). Triton: tiled, both sides coalesced (torch's strided copy: 0.53 TB/s).
- mlp_alloc_h_cache(B, M, F, dtype, device): (B, M, F) view of a (B, F, M_pad) buffer (M_pad: M rounded up
  to 64 elements, so that every neuron row is 128-byte aligned).

Layouts: attention outputs are (B, Hq, N, D) views of (B, N, Hq, D) buffers. Any group size G works
(G is a compile-time constant of the attention kernels: one compile + autotune per G).
Measured on H200 (benchmarks/results/bench_kernels_h200.csv): G=128 is best or tied — FLUX 4352
tokens at 85% sparsity 0.131 ms (G=128) vs 0.134 (G=192); 118800 tokens at 93% 31.2 ms (G=128) vs
36.3 ms (G=192, where 128-row tiles half-fill the second tile of each group). Default G=128.
mlp_sparse_mm1 returns delta_packed as a (B, M, K) view of a buffer whose rows are padded to a
multiple of 64 elements (contiguous when K % 64 == 0): pass it straight to mlp_sparse_mm2 and do
not assume contiguity; an index width K that is a multiple of 64 is ideal.
Triton kernels autotune on the first call per shape key (a few seconds each; caches are restored
after tuning, so the first call's in-place updates are still applied exactly once).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from .attn_colsum_sampled_ref import attn_colsum_sampled_ref
from .attn_column_sparse_ref import attn_column_sparse_ref
from .attn_dense_colsum_ref import attn_dense_colsum_ref
from .mlp_bias_act_ref import mlp_bias_act_ref
from .mlp_block_means_ref import mlp_block_means_ref
from .mlp_h_cache import mlp_alloc_h_cache
from .mlp_select_neurons_ref import mlp_select_neurons_ref
from .mlp_sparse_mm1_ref import mlp_sparse_mm1_ref
from .mlp_sparse_mm2_ref import mlp_sparse_mm2_ref
from .select_columns_ref import select_columns_ref
from .transpose_copy_ref import transpose_copy_ref

__all__ = [
    "attn_colsum_sampled_ref", "attn_column_sparse_ref", "attn_dense_colsum_ref", "mlp_block_means_ref", "mlp_sparse_mm1_ref",
    "mlp_sparse_mm2_ref", "mlp_select_neurons_ref", "select_columns_ref", "mlp_bias_act_ref", "transpose_copy_ref",
    "mlp_alloc_h_cache",
    "get_kernel", "REFS",
]

log = logging.getLogger("chipmunk_compile")

REFS = {
    "attn_dense_colsum": attn_dense_colsum_ref,
    "attn_column_sparse": attn_column_sparse_ref,
    "attn_colsum_sampled": attn_colsum_sampled_ref,
    "select_columns": select_columns_ref,
    "mlp_sparse_mm1": mlp_sparse_mm1_ref,
    "mlp_sparse_mm2": mlp_sparse_mm2_ref,
    "mlp_block_means": mlp_block_means_ref,
    "mlp_select_neurons": mlp_select_neurons_ref,
    "mlp_bias_act": mlp_bias_act_ref,
    "transpose_copy": transpose_copy_ref,
}
_TRITON_OPS = {"attn_dense_colsum", "attn_column_sparse", "attn_colsum_sampled", "select_columns", "mlp_sparse_mm1",
               "mlp_sparse_mm2", "mlp_select_neurons", "mlp_block_means", "mlp_bias_act", "transpose_copy"}
_ATTN_OPS = {"attn_dense_colsum", "attn_column_sparse", "attn_colsum_sampled"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged: set = set()
_impl_cache: dict = {}


def _triton_importable() -> bool:
    if "triton" not in _impl_cache:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _impl_cache["triton"] = True
        except Exception:  # pragma: no cover - depends on the install
            _impl_cache["triton"] = False
    return _impl_cache["triton"]


def _triton_impl(name: str):
    mod = importlib.import_module(f"{__name__}.{name}")
    return getattr(mod, name)


def _fallback(name: str, reason: str):
    from torch._dynamo.utils import counters

    counters["chipmunk"][f"kernel_fallback:{name}:{reason}"] += 1
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        log.info("chipmunk kernels: %s uses the PyTorch reference (%s)", name, reason)
    return REFS[name]


def _reason(name: str, tensors, head_dim) -> str | None:
    mode = os.environ.get("CHIPMUNK_KERNELS", "").lower()
    if mode == "ref":
        return "forced_ref"
    if not _triton_importable():
        return "no_triton"
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    forced = mode == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not forced:
        if not ts or not all(t.is_cuda for t in ts):
            return "not_cuda"
        if torch.cuda.get_device_capability(ts[0].device)[0] < 8:
            return "arch"
    floats = [t for t in ts if t.is_floating_point()]
    if floats and floats[0].dtype not in _DTYPES:
        return "dtype"
    if name in _ATTN_OPS:
        hd = head_dim if head_dim is not None else (floats[0].shape[-1] if floats else None)
        if hd is None or not 1 <= hd <= 256:  # other head dims load as tiles of the next power of two
            return "head_dim"
    return None


def get_kernel(name: str, *tensors, head_dim=None):
    """Implementation of op ``name`` for these tensors: the Triton kernel or the counted reference."""
    if name not in REFS:
        raise KeyError(f"unknown chipmunk kernel {name!r}")
    if name not in _TRITON_OPS:
        return REFS[name]
    reason = _reason(name, tensors, head_dim)
    if reason is not None:
        return _fallback(name, reason)
    return _triton_impl(name)

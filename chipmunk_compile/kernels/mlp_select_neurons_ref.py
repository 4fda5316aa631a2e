"""Neuron selection of a sparse MLP step, per (batch, token block) (PyTorch only).

Contract (the Triton twin ``mlp_select_neurons.py`` has the same signature and result):
- basis (B, nb, Fb) fp32, or bf16/fp16 read as fp32 (the model's linear output as is: no cast
  kernel per site): this step's block-mean pre-activation(s); bm_cache (B, nb, Fb) fp32: the
  reference means of the neurons' last refresh. Fb = Fh, or 2·Fh when ``gated`` (the activation
  half first, then the linear half).
- Score of neuron j: ``score[..., j]`` when a (B, nb, Fh) fp32 ``score`` is given (e.g. the output
  score of ops/mlp.py), else |basis − bm_cache| (summed over both halves when gated). Scores are
  expected ≥ 0; NaN ranks highest.
- ``draws`` (B, nb, r) int64: neurons forced in (their score becomes +inf); repeats are harmless.
  Or a ``HashDraws`` with ``n_draws`` = r: the draws ``hash_ints(step, salt, (B, nb, r), Fh)``,
  which the Triton kernel hashes in its own programs (this reference materializes them).
- Selected = the K = indices.shape[-1] (≤ Fh) highest scores; among equal scores the lowest neuron
  ids. ``indices`` (B, nb, K) int32 (last dim contiguous) receives them in ascending order: the
  sparse kernels walk weight rows in order (L2 reuse), and no slot is ever left unwritten.
- ``bm_cache`` is updated in place for the selected neurons only (both halves when gated): the
  others keep drifting until they are picked (method.md §2). Returns None.
"""

from __future__ import annotations

import torch

from .random_draws_ref import HashDraws


def neuron_scores(basis, bm_cache, *, gated: bool, score=None, draws=None) -> torch.Tensor:
    """(B, nb, Fh) fp32 ranking scores, a fresh tensor."""
    if score is not None:
        ch = score.float().clone()
    else:
        ch = (basis - bm_cache).abs_()
        if gated:
            Fh = basis.shape[-1] // 2
            ch = ch[..., :Fh] + ch[..., Fh:]
    if draws is not None and draws.numel():
        ch.scatter_(-1, draws, float("inf"))
    return ch


def check_draws(draws, n_draws: int) -> bool:
    """True for hashed draws; n_draws (their count per block) goes with HashDraws only."""
    if isinstance(draws, HashDraws):
        if n_draws < 0:
            raise ValueError(f"mlp_select_neurons: n_draws must be >= 0, got {n_draws}")
        return True
    if n_draws:
        raise ValueError("mlp_select_neurons: n_draws counts HashDraws draws; a draws tensor has its own count")
    return False


def mlp_select_neurons_ref(basis, bm_cache, indices, *, gated: bool = False, score=None, draws=None,
                           n_draws: int = 0) -> None:
    if check_draws(draws, n_draws):
        B, nb, Fb = basis.shape
        draws = draws.ints((B, nb, int(n_draws)), Fb // 2 if gated else Fb) if n_draws else None
    ch = neuron_scores(basis, bm_cache, gated=gated, score=score, draws=draws)
    K = indices.shape[-1]
    if K > ch.shape[-1]:
        raise ValueError(f"mlp_select_neurons: K={K} exceeds the {ch.shape[-1]} neurons")
    top = torch.sort(ch, dim=-1, descending=True, stable=True).indices[..., :K]
    idx = top.sort(dim=-1).values
    indices.copy_(idx)
    mask = torch.zeros_like(ch, dtype=torch.bool).scatter_(-1, idx, True)
    both = torch.cat([mask, mask], dim=-1) if gated else mask
    bm_cache.copy_(torch.where(both, basis, bm_cache))

"""select_columns: properties of the selected index sets (pure PyTorch, no Triton)."""

import torch

from chipmunk_compile.kernels import get_kernel, select_columns, select_columns_ref


def test_topk_sorted_masked_always_random():
    g = torch.Generator().manual_seed(0)
    B, H, Gc, Nk = 2, 3, 4, 40
    cs = torch.rand(B, H, Gc, Nk, generator=g)
    km = torch.rand(B, Nk, generator=g) > 0.25
    ak = torch.zeros(Nk, dtype=torch.bool)
    ak[[1, 5, 7]] = True
    km[:, 5] = False  # masked beats always_keep
    idx, cnt = select_columns(cs, k=6, key_mask=km, always_keep=ak, random_keys=2,
                              generator=torch.Generator().manual_seed(1))
    K = 6 + 3 + 2
    assert idx.shape == (B, H, Gc, K) and idx.dtype == torch.int32 and cnt.dtype == torch.int32
    for b in range(B):
        for h in range(H):
            for gi in range(Gc):
                c = int(cnt[b, h, gi])
                assert c == min(K, int(km[b].sum()))
                sel = idx[b, h, gi, :c].long()
                assert (sel[1:] > sel[:-1]).all()  # sorted, unique
                assert (idx[b, h, gi, c:] == 0).all()
                assert km[b, sel].all()
                assert {c for c in (1, 7) if km[b, c]} <= set(sel.tolist())
                # top-6 selectable non-always columns by colsum are all present
                sc = cs[b, h, gi].masked_fill(~km[b] | ak, -1)
                top = sc.topk(6).indices
                assert set(top.tolist()) <= set(sel.tolist())


def test_unmasked_path_always_random_and_draws():
    """No key mask (the fast path): always-kept + drawn columns + top-k fill K distinct sorted slots."""
    g = torch.Generator().manual_seed(3)
    B, H, Gc, Nk, k = 1, 2, 3, 50, 7
    cs = torch.rand(B, H, Gc, Nk, generator=g)
    ak = torch.zeros(Nk, dtype=torch.bool)
    ak[[0, 1]] = True
    draws = torch.randint(0, Nk, (B, H, Gc, 3), generator=g)
    draws[..., 0] = 1  # an always-kept column drawn: that slot goes to top-k
    idx, cnt = select_columns_ref(cs.clone(), k=k, always_keep=ak, random_keys=3, n_always=2, draws=draws)
    K = k + 2 + 3
    assert (cnt == K).all() and idx.shape[-1] == K
    for h in range(H):
        for gi in range(Gc):
            sel = idx[0, h, gi].long()
            assert (sel[1:] > sel[:-1]).all()
            want = {0, 1} | set(draws[0, h, gi].tolist())
            rest = cs[0, h, gi].clone()
            rest[list(want)] = -1
            want |= set(rest.topk(K - len(want)).indices.tolist())
            assert set(sel.tolist()) == want


def test_counts_when_few_keys_and_no_extras():
    cs = torch.rand(1, 1, 2, 10)
    km = torch.zeros(1, 10, dtype=torch.bool)
    km[0, [2, 4, 9]] = True
    idx, cnt = select_columns_ref(cs, k=5, key_mask=km)
    assert cnt.tolist() == [[[3, 3]]]
    assert idx[0, 0, 0].tolist() == [2, 4, 9, 0, 0]
    idx, cnt = select_columns_ref(cs, k=4)
    ref = cs.topk(4, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.long(), ref) and (cnt == 4).all()


def test_dispatch_returns_reference():
    assert get_kernel("select_columns", torch.zeros(1)) is select_columns_ref

"""Column-sparse attention on the key columns a model actually selected, against stratified random
subsets of the same width (what bench_kernels.py / bench_csp_hopper.py time).

    python benchmarks/csp_model_indices.py [--model wan] [--steps 4]

Builds the model with one block at its published size and resolution (random weights, bf16),
runs chipmunk with the model's preset (first dense layers off) for a few steps, takes each
attention site's stored indices/counts and its token permutation, and times `attn_column_sparse`
on fresh q/k/v with: the model's indices and permutation; the model's indices without it;
random subsets with the model's counts. Also prints how the selections are spread (distinct keys
per head, share of keys picked by most groups) to tell whether hot keys explain a difference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import build, inputs, timestep  # noqa: E402
from bench_kernels import bench, sorted_random_subsets  # noqa: E402

import chipmunk_compile  # noqa: E402,F401
from chipmunk_compile.kernels.attn_column_sparse import attn_column_sparse  # noqa: E402
from chipmunk_compile.runtime import sessions_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=75600, help="token count when the site has no permutation")
    args = ap.parse_args()
    model = build(args.model, 1)
    kw = inputs(args.model, model)
    cfg = {"preset": args.model, "attn": {"first_n_dense_layers": 0}, "mlp": {"first_n_dense_layers": 0}}
    c = torch.compile(model, backend="chipmunk", options={"config": cfg})
    from chipmunk_compile.kernels import attn_column_sparse_hopper as hopper
    inner, seen = hopper.attn_column_sparse_hopper, []

    def capture(*a, **k):  # the model's own q/k/v/o_base of a sparse call (sign +1), as the op passes them
        if k.get("sign", 1.0) > 0 and not seen:
            seen.append((a, dict(k)))
        return inner(*a, **k)

    hopper.attn_column_sparse_hopper = capture
    with torch.no_grad():
        for i in range(args.steps):
            c(**kw, timestep=timestep(args.model, i, 50, "cuda", torch.bfloat16), return_dict=False)
    torch.cuda.synchronize()
    hopper.attn_column_sparse_hopper = inner
    if seen:
        (q, k, v, idx, cnt), kw_ = seen[0]
        for nm, t in (("q", q), ("k", k), ("v", v), ("o_base", kw_.get("o_base"))):
            if t is not None:
                print(f"model {nm}: shape {tuple(t.shape)} stride {t.stride()} contiguous {t.is_contiguous()} "
                      f"storage {t.untyped_storage().nbytes() // t.element_size()} elements", flush=True)
        fresh = [torch.randn(t.shape[0], t.shape[2], t.shape[1], t.shape[3], device="cuda",
                             dtype=t.dtype).transpose(1, 2) for t in (q, k, v)]
        print(f"    model tensors, model indices           {bench(lambda: inner(q, k, v, idx, cnt, **kw_)):8.3f} ms")
        print(f"    fresh (B,N,H,D) q/k/v, model indices    {bench(lambda: inner(*fresh, idx, cnt, **kw_)):8.3f} ms")
        print(f"    model q, fresh k/v                      {bench(lambda: inner(q, *fresh[1:], idx, cnt, **kw_)):8.3f} ms")
        print(f"    model k/v, fresh q                      {bench(lambda: inner(fresh[0], k, v, idx, cnt, **kw_)):8.3f} ms")
        # After ~60 ms of GEMMs, as in the model's step (projections, FFN): clocks under power load
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for label, n_mm in (("alone", 0), ("after 36 GEMMs 8192^3", 36)):
            times = []
            for _ in range(6):
                for _ in range(n_mm):
                    a = (a @ a).clamp_(-1, 1)
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                inner(q, k, v, idx, cnt, **kw_)
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1))
            print(f"    csp {label:24s} median {sorted(times)[3]:8.3f} ms  ({', '.join(f'{t:.1f}' for t in times)})")
    sess = sessions_of(c)[0]
    bufs = dict(sess.state.named_buffers())
    for name, idx in bufs.items():
        if not name.endswith("__indices"):
            continue
        prefix = name[: -len("indices")]
        cnt = bufs[prefix + "counts"]
        site = next(s for s in sess.sites if name.startswith(f"s{s.id}__"))
        B, H, NG, W = idx.shape
        G = site.cfg.group
        perm = site.perm_on(idx.device, None)
        N = perm.numel() if perm is not None else args.tokens
        assert -(-N // G) == NG, (N, G, NG)
        D = 128
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        ob = torch.randn_like(q)
        sc = D ** -0.5
        c_mean = cnt.float().mean().item()
        rnd = sorted_random_subsets((B, H, NG), N, W, "cuda")
        runs = {
            "model indices + perm": lambda: attn_column_sparse(q, k, v, idx, cnt, scale=sc, group=G, perm=perm, o_base=ob),
            "model indices, no perm": lambda: attn_column_sparse(q, k, v, idx, cnt, scale=sc, group=G, o_base=ob),
            "random subsets, model counts, perm": lambda: attn_column_sparse(q, k, v, rnd, cnt, scale=sc, group=G,
                                                                             perm=perm, o_base=ob),
            "random subsets, full width, perm": lambda: attn_column_sparse(
                q, k, v, rnd, torch.full_like(cnt, W), scale=sc, group=G, perm=perm, o_base=ob),
        }
        # spread: per head, how many distinct keys the groups pick, and how often the top key is picked
        valid = torch.arange(W, device="cuda") < cnt[..., None]
        hits = torch.zeros(B * H, N, device="cuda")
        hits.scatter_add_(1, idx.long().reshape(B * H, -1), valid.reshape(B * H, -1).float())
        distinct = (hits > 0).float().sum(1).mean().item() / N
        hot = (hits > 0.5 * NG).float().sum(1).mean().item() / N
        print(f"{name}: B{B} H{H} NG{NG} width {W} mean count {c_mean:.0f} N {N} perm {perm is not None}; "
              f"distinct keys per head {distinct:.3f} of N, picked by > half the groups {hot:.3f} of N", flush=True)
        for label, fn in runs.items():
            print(f"    {label:38s} {bench(fn):8.3f} ms", flush=True)
        break


if __name__ == "__main__":
    main()

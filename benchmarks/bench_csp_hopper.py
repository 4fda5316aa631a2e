"""Gluon Hopper column-sparse attention against the Triton kernel, the reference and cuDNN.

    python benchmarks/bench_csp_hopper.py [--check-only]     # H100/H200 only

Correctness first (small shapes against the reference: ragged counts, count 0, permutation,
o_base, GQA, head dims 64/128, fp16/bf16; the large shapes against the Triton kernel), then
medians (CUDA events, triton.testing.do_bench) of cuDNN dense, the Triton kernel, the Gluon kernel
per configuration (CSP_CONFIGS="STAGESxBLOCK_MxBLOCK_N,...", CSP_SHAPES="FLUX,..." to keep some
cases), the warp-specialized ping-pong kernel (attn_column_sparse_pingpong.py) and the dispatched
``attn_column_sparse``, which sends short index lists (< HOPPER_MIN_KEYS) to Triton and times the
kernels that qualify on the first call of a longer list's shape (the row names its pick).
Rows go to benchmarks/results/bench_csp_hopper_h200.csv.
"""
import csv
import math, os, sys
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from benchmarks.bench_kernels import bench, sorted_random_subsets  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse as T  # noqa: E402
from chipmunk_compile.kernels.attn_column_sparse import attn_column_sparse  # noqa: E402
from chipmunk_compile.kernels.attn_column_sparse_ref import attn_column_sparse_ref  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse_hopper as H  # noqa: E402
from chipmunk_compile.kernels import attn_column_sparse_pingpong as P  # noqa: E402

dev = "cuda"


def _cfg(c):  # "STAGESxBLOCK_MxBLOCK_N"
    st, bm, bn = (int(x) for x in c.split("x"))
    return c, dict(stages=st, block_m=bm, block_n=bn)


CONFIGS = [_cfg(c) for c in os.environ.get("CSP_CONFIGS", "2x128x128,3x128x128").split(",")]
ROWS = []
print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)


def inputs(B, Hq, Hkv, N, D, keep, G, dt, ragged=False, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, N, Hq, D, device=dev, dtype=dt).transpose(1, 2)
    k, v = (torch.randn(B, N, Hkv, D, device=dev, dtype=dt).transpose(1, 2) for _ in range(2))
    NG = math.ceil(N / G)
    Kc = max(1, round(keep * N))
    idx = sorted_random_subsets((B, Hq, NG), N, Kc, dev)
    cnt = torch.full((B, Hq, NG), Kc, dtype=torch.int32, device=dev)
    if ragged:
        cnt = torch.randint(0, Kc + 1, (B, Hq, NG), device=dev, dtype=torch.int32)
        cnt[..., 0] = 0
        cnt[..., -1] = Kc
    return q, k, v, idx, cnt


def check():
    cases = [  # B, Hq, Hkv, N, D, keep, G, dtype, ragged, perm, ob
        (1, 2, 2, 1000, 128, 0.3, 128, torch.bfloat16, False, False, False),
        (2, 4, 2, 777, 128, 0.4, 128, torch.bfloat16, True, True, True),
        (1, 3, 3, 1500, 64, 0.25, 128, torch.float16, True, True, True),
        (1, 2, 1, 2048, 128, 0.11, 256, torch.float16, True, False, True),
        (1, 2, 2, 300, 64, 1.0, 128, torch.bfloat16, False, True, False),
    ]
    for (B, Hq, Hkv, N, D, keep, G, dt, rag, use_perm, use_ob) in cases:
        q, k, v, idx, cnt = inputs(B, Hq, Hkv, N, D, keep, G, dt, rag)
        perm = torch.randperm(N, device=dev).int() if use_perm else None
        ob = torch.randn_like(q) if use_ob else None
        for cname, kw in CONFIGS:
            o = H.attn_column_sparse_hopper(q, k, v, idx, cnt, scale=D ** -0.5, group=G, perm=perm, o_base=ob,
                                            sign=-1.0, **kw)
            r = attn_column_sparse_ref(q, k, v, idx, cnt, scale=D ** -0.5, group=G, perm=perm, o_base=ob, sign=-1.0)
            err = (o.float() - r.float()).abs().max().item()
            print(f"check B{B} H{Hq}/{Hkv} N{N} D{D} keep{keep} G{G} {dt} ragged={rag} perm={use_perm} ob={use_ob} "
                  f"{cname}: max err {err:.3e} {'OK' if err < 2e-2 else 'FAIL'}", flush=True)


def speed():
    gpu = torch.cuda.get_device_name()
    shapes = [("FLUX 85%", 1, 24, 4352, 0.15), ("FLUX preset 16.5%", 1, 24, 4352, 0.165),
              ("FLUX 2048px 10%", 1, 24, 16896, 0.10), ("FLUX 2048px 16.5%", 1, 24, 16896, 0.165),
              ("32k tokens 10%", 1, 24, 32768, 0.10),
              ("HunyuanVideo 93%", 1, 24, 118800, 0.07), ("HunyuanVideo 6%", 1, 24, 118800, 0.06),
              ("Wan 11%", 1, 40, 75600, 0.11)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    only = os.environ.get("CSP_SHAPES")  # comma-separated prefixes of the case names
    if only:
        shapes = [s for s in shapes if any(s[0].startswith(p) for p in only.split(","))]
    for name, B, Hh, N, keep in shapes:
        D, G = 128, 128
        q, k, v, idx, cnt = inputs(B, Hh, Hh, N, D, keep, G, torch.bfloat16)
        ob = torch.randn_like(q)
        perm = torch.randperm(N, device=dev).int()
        sc = D ** -0.5
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            base = bench(lambda: F.scaled_dot_product_attention(q, k, v, scale=sc))
        args = (q, k, v, idx, cnt)
        kw = dict(scale=sc, group=G, o_base=ob, perm=perm)
        os.environ["CHIPMUNK_GLUON"] = "0"  # the Triton kernel alone
        t = attn_column_sparse(*args, **kw)
        runs = [("triton", bench(lambda: attn_column_sparse(*args, **kw)), 0.0)]
        del os.environ["CHIPMUNK_GLUON"]
        for cname, ckw in CONFIGS:
            o = H.attn_column_sparse_hopper(*args, **kw, **ckw)
            err = (o.float() - t.float()).abs().max().item()
            runs.append((f"gluon {cname}", bench(lambda: H.attn_column_sparse_hopper(*args, **kw, **ckw)), err))
        if P.supported(q, k, v, group=G, scale=sc, o_base=ob) is None:  # the warp-specialized ping-pong kernel
            o = P.attn_column_sparse_pingpong(*args, **kw)
            err = (o.float() - t.float()).abs().max().item()
            runs.append(("gluon ping-pong", bench(lambda: P.attn_column_sparse_pingpong(*args, **kw)), err))
        counters.clear()
        ms = bench(lambda: attn_column_sparse(*args, **kw))  # its first call times the kernels that qualify
        picked = [c.rsplit(":", 1)[1] for c in counters["chipmunk"] if c.startswith("kernel_choice:")]
        if not T.use_hopper_kernel(q, k, v, idx, scale=sc, group=G, o_base=ob):
            picked = ["triton"]
        runs.append((f"dispatched ({'/'.join(picked) or 'gluon, forced'})", ms, 0.0))
        print(f"{name:20s} keys/group {idx.shape[-1]:6d}  cudnn {base:9.4f} ms  ideal {1 / keep:5.1f}x", flush=True)
        for kname, ms, err in runs:
            print(f"    {kname:22s} {ms:9.4f} ms  {base / ms:6.2f}x cudnn  max|diff| vs triton {err:.1e}", flush=True)
            ROWS.append(dict(gpu=gpu, shape=f"{B}x{Hh}x{N}x{D}", case=name, keys=idx.shape[-1], kernel=kname,
                             ms=round(ms, 4), cudnn_ms=round(base, 4), speedup=round(base / ms, 3),
                             ideal=round(1 / keep, 2)))
        del q, k, v, idx, cnt, ob
    out = os.path.join(os.path.dirname(__file__), "results", "bench_csp_hopper_h200.csv")
    with open(os.environ.get("CSP_CSV", out), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)


if __name__ == "__main__":
    check()
    if "--check-only" not in sys.argv:
        speed()

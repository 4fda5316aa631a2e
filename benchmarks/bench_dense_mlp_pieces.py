"""Two pieces of a dense MLP step, old way against new, at FLUX.1's single-block MLP (bf16, CUDA events):

- fc1 + bias + gelu_tanh into the neuron-major activation cache (4352 tokens, 3072 -> 12288): addmm
  with the bias as a broadcast (F, 1) matrix (torch fills the whole output with it first, the GEMM
  reads it back) then gelu_ in place, against mm then `mlp_bias_act` (bias and activation in one
  pass; what `ops.mlp._dense_into_cache` runs since session 56);
- w2 (3072 x 12288) into its column-major copy for the sparse mm2 (`ops.sites.Site.column_major`,
  once per site and generation): torch's copy_ against `transpose_copy`.

    python benchmarks/bench_dense_mlp_pieces.py   # H100/H200; a table and bench_dense_mlp_pieces_<gpu>.csv

Each piece is timed two ways: back-to-back calls between CUDA events (``median_ms``; what session 56
recorded, `benchmarks/results/bench_dense_mlp_pieces_h100_session56.txt`) and replayed from one CUDA
graph (``bench_kernels.graph_ms``: no launch cost, as the step graphs run them; since session 57).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from chipmunk_compile.kernels.mlp_bias_act import mlp_bias_act  # noqa: E402
from chipmunk_compile.kernels.transpose_copy import transpose_copy  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import graph_ms  # noqa: E402
from csv_rows import write_rows  # noqa: E402


def median_ms(fn, reps=30):
    """Median ms of `fn()` between CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[reps // 2]


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_dense_mlp_pieces.py needs a CUDA GPU")
    kw = dict(device="cuda", dtype=torch.bfloat16)
    M, C, Fh = 4352, 3072, 12288
    x, w, b = torch.randn(M, C, **kw), torch.randn(Fh, C, **kw) * C ** -0.5, torch.randn(Fh, **kw)
    hT = torch.empty(Fh, M, **kw)

    def old():
        return torch.ops.aten.gelu_(torch.addmm(b[:, None], w, x.t(), out=hT), approximate="tanh")

    def new():
        return mlp_bias_act(torch.mm(w, x.t(), out=hT), b, act="gelu_tanh")

    old()
    ref = hT.clone()
    new()
    err = ((hT.float() - ref.float()).norm() / ref.float().norm()).item()
    gpu = torch.cuda.get_device_name()
    pieces = {"old": old, "addmm": lambda: torch.addmm(b[:, None], w, x.t(), out=hT),
              "gelu_": lambda: torch.ops.aten.gelu_(hT, approximate="tanh"), "new": new,
              "mm": lambda: torch.mm(w, x.t(), out=hT), "mlp_bias_act": lambda: mlp_bias_act(hT, b, act="gelu_tanh")}
    w2 = torch.randn(C, Fh, **kw)
    col = torch.empty_strided(w2.shape, (1, C), **kw)
    pieces.update({"copy_": lambda: col.copy_(w2), "transpose_copy": lambda: transpose_copy(col, w2)})
    t = {k: (median_ms(fn), graph_ms(fn)) for k, fn in pieces.items()}

    def ms(k):
        ev, rp = t[k]
        return f"{ev:.4f} / {rp:.4f}" if rp is not None else f"{ev:.4f} / -"

    print(f"{gpu}: ms as events / replayed")
    print(f"fc1 + bias + gelu_tanh into the neuron-major cache, {M}x{C}->{Fh} bf16")
    print(f"  old  addmm(bias[:, None]) + gelu_: {ms('old')} (addmm {ms('addmm')}, gelu_ {ms('gelu_')})")
    print(f"  new  mm + mlp_bias_act:            {ms('new')} (mm {ms('mm')}, mlp_bias_act {ms('mlp_bias_act')}); "
          f"rel. diff {err:.1e}")
    print(f"w2 {C}x{Fh} bf16 into its column-major copy: copy_ {ms('copy_')}, transpose_copy "
          f"{ms('transpose_copy')}, equal {torch.equal(col, w2)}")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    chip = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu"
    rows = [dict(gpu=gpu, piece=k, ms=round(ev, 4), replayed_ms=None if rp is None else round(rp, 4))
            for k, (ev, rp) in t.items()]
    print(f"wrote {write_rows(os.path.join(out_dir, f'bench_dense_mlp_pieces_{chip}.csv'), rows)}")


if __name__ == "__main__":
    main()

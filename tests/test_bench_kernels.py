"""The host-side parts of benchmarks/bench_kernels.py: rows carry the CUDA-graph timing beside the
do_bench one, and the graph speedup only where both the row and its baseline were replayed."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_kernels as bk  # noqa: E402


def _timing(ms, graph):
    t = bk.Timing(ms)
    t.graph = graph
    return t


def test_rows_carry_the_graph_timing_and_its_speedup():
    bk.ROWS.clear()
    base = _timing(0.38, 0.40)
    bk.record("attn", "csp", "1x24x4352x128", _timing(0.15, 0.125), baseline_ms=base, flops=1e9)
    row = bk.ROWS[-1]
    assert row["ms"] == 0.15 and row["speedup_vs_baseline"] == round(0.38 / 0.15, 2)
    assert row["graph_ms"] == 0.125 and row["graph_speedup"] == round(0.40 / 0.125, 2)
    assert row["tflops"] == round(1e9 / 0.15 / 1e9, 1)  # from the do_bench time, as before


def test_no_graph_speedup_without_both_graph_timings():
    bk.ROWS.clear()
    bk.record("mlp", "a", "s", _timing(0.2, None), baseline_ms=_timing(1.0, 1.1))
    bk.record("mlp", "b", "s", _timing(0.2, 0.19), baseline_ms=1.0)  # a plain float baseline
    bk.record("mlp", "c", "s", 0.3)  # a plain float row (sweep rows, older callers)
    a, b, c = bk.ROWS[-3:]
    assert "graph_ms" not in a and "graph_speedup" not in a and a["speedup_vs_baseline"] == 5.0
    assert b["graph_ms"] == 0.19 and "graph_speedup" not in b
    assert "graph_ms" not in c and c["ms"] == 0.3
    bk.ROWS.clear()


def test_timing_is_a_float():
    t = _timing(0.5, 0.4)
    assert isinstance(t, float) and t * 2 == 1.0 and not hasattr(t * 2, "graph")


def test_mlp_rows_name_a_block_other_than_128(monkeypatch):
    """--mlp-block N times the sparse GEMMs over N-token blocks; those rows say so in their name, so a
    CSV of both is not ambiguous (timings stubbed: the section's bookkeeping only, on the CPU)."""
    import torch

    monkeypatch.setattr(bk, "bench", lambda fn, **kw: bk.Timing(1.0))
    for block, tagged in ((128, False), (256, True)):
        bk.ROWS.clear()
        bk.mlp_section(300, 64, 256, [0.5], torch.float32, "cpu", block=block)
        sparse = [r["name"] for r in bk.ROWS if r["name"].startswith("mm")]
        assert sparse == ["mm1 keep=0.50" + (" block=256" if tagged else ""),
                          "mm2 keep=0.50" + (" block=256" if tagged else ""),
                          "mm1+mm2 keep=0.50" + (" block=256" if tagged else "")]
    bk.ROWS.clear()


def test_mlp_forecast_rows_time_the_epilogue_against_a_pass_of_its_own(monkeypatch):
    """At 15% of the neurons (flux-fast's 1843 of FLUX's 12288) the section times mm2 with the error
    forecast's slope in its epilogue against mm2 followed by an addcmul, the speedup read against the
    latter. Each timed call runs once, through the kernels' references (which check the operands as
    the launchers do); timings stubbed: 2 ms for the addcmul row, 1 ms otherwise."""
    import torch

    from chipmunk_compile.kernels import mlp_block_means as bm, mlp_sparse_mm1 as m1, mlp_sparse_mm2 as m2
    from chipmunk_compile.kernels.mlp_block_means_ref import mlp_block_means_ref
    from chipmunk_compile.kernels.mlp_sparse_mm1_ref import mlp_sparse_mm1_ref
    from chipmunk_compile.kernels.mlp_sparse_mm2_ref import mlp_sparse_mm2_ref

    monkeypatch.setattr(m1, "mlp_sparse_mm1", mlp_sparse_mm1_ref)
    monkeypatch.setattr(m2, "mlp_sparse_mm2", mlp_sparse_mm2_ref)
    monkeypatch.setattr(bm, "mlp_block_means", mlp_block_means_ref)
    monkeypatch.setattr(bk.torch, "compile", lambda fn, **kw: fn)

    def fake_bench(fn, **kw):
        fn()
        return bk.Timing(2.0 if "addcmul" in fn.__code__.co_names else 1.0)

    monkeypatch.setattr(bk, "bench", fake_bench)
    bk.ROWS.clear()
    bk.mlp_section(300, 64, 256, [0.15, 0.5], torch.float32, "cpu")
    rows = {r["name"]: r for r in bk.ROWS}
    assert rows["mm2 keep=0.15 then addcmul"]["ms"] == 2.0
    assert rows["mm2 keep=0.15 +slope"]["speedup_vs_baseline"] == 2.0
    assert not any("slope" in n or "addcmul" in n for n in rows if "keep=0.50" in n)
    bk.ROWS.clear()

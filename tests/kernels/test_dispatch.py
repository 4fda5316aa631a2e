"""get_kernel: Triton vs reference choice and counted fallbacks; the shared launch helpers."""

import inspect
import pathlib

import pytest
import torch
import triton
import triton.language as tl
from torch._dynamo.utils import counters

from chipmunk_compile import kernels as K


def test_cpu_tensors_fall_back_and_count(monkeypatch):
    monkeypatch.delenv("CHIPMUNK_KERNELS", raising=False)
    counters.clear()
    q = torch.zeros(1, 1, 4, 64)
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert K.get_kernel("attn_dense_colsum", q, q, q) is K.attn_dense_colsum_ref
    assert counters["chipmunk"]["kernel_fallback:attn_dense_colsum:not_cuda"] == 1


def test_forced_ref(monkeypatch):
    monkeypatch.setenv("CHIPMUNK_KERNELS", "ref")
    counters.clear()
    x = torch.zeros(2, 2, device="cuda" if torch.cuda.is_available() else "cpu")
    assert K.get_kernel("mlp_sparse_mm1", x) is K.mlp_sparse_mm1_ref
    assert counters["chipmunk"]["kernel_fallback:mlp_sparse_mm1:forced_ref"] == 1


def test_forced_triton_and_guards(monkeypatch):
    monkeypatch.setenv("CHIPMUNK_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    counters.clear()
    q = torch.zeros(1, 1, 4, 64)
    assert K.get_kernel("attn_column_sparse", q).__name__ == "attn_column_sparse"
    assert K.get_kernel("attn_column_sparse", torch.zeros(1, 1, 4, 80)).__name__ == "attn_column_sparse"  # padded
    assert K.get_kernel("attn_column_sparse", torch.zeros(1, 1, 4, 256)).__name__ == "attn_column_sparse"  # AuraFlow
    assert K.get_kernel("attn_column_sparse", torch.zeros(1, 1, 4, 288)) is K.attn_column_sparse_ref
    assert counters["chipmunk"]["kernel_fallback:attn_column_sparse:head_dim"] == 1
    assert K.get_kernel("mlp_sparse_mm2", q.double()) is K.mlp_sparse_mm2_ref
    assert counters["chipmunk"]["kernel_fallback:mlp_sparse_mm2:dtype"] == 1
    with pytest.raises(KeyError):
        K.get_kernel("nope")


def test_h_cache_layout():
    """Neuron-major, each neuron's row of tokens padded to 64 elements (128-byte aligned rows)."""
    h = K.mlp_alloc_h_cache(2, 10, 6, torch.float16, "cpu")
    assert h.shape == (2, 10, 6) and h.stride() == (6 * 64, 1, 64)
    h = K.mlp_alloc_h_cache(1, 4161, 8, torch.bfloat16, "cpu")  # OmniGen's 64 + 1 + 4096 tokens
    assert h.stride() == (8 * 4224, 1, 4224)
    assert K.mlp_alloc_h_cache(1, 4352, 8, torch.bfloat16, "cpu").stride() == (8 * 4352, 1, 4352)  # FLUX: no pad


def test_faster_choice_measures_once_per_key_and_never_under_capture(monkeypatch):
    """The faster run wins, the choice is kept (later calls time nothing), each key is measured on
    its own, and a call during a CUDA-graph capture gets the default without being measured."""
    from chipmunk_compile.kernels import _common

    monkeypatch.setattr(_common, "_CHOICES", {})
    counters.clear()
    timed = []

    def timer(fn):
        timed.append(fn())
        return {"a": 2.0, "b": 1.0, "c": 0.5}[timed[-1]]

    runs = {"a": lambda: "a", "b": lambda: "b"}
    assert _common.faster_choice(("op", 1), runs, "a", timer=timer) == "b"
    assert timed == ["a", "b"]
    assert _common.faster_choice(("op", 1), {"a": lambda: "a", "c": lambda: "c"}, "a", timer=timer) == "b"
    assert timed == ["a", "b"]  # remembered: nothing timed again
    assert _common.faster_choice(("op", 2), {"a": lambda: "a", "c": lambda: "c"}, "a", timer=timer) == "c"
    assert counters["chipmunk"]["kernel_choice:op:b"] == 1 and counters["chipmunk"]["kernel_choice:op:c"] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _common.faster_choice(("op", 3), runs, "a", timer=timer) == "a"
    assert ("op", 3) not in _common._CHOICES and timed == ["a", "b", "a", "c"]


@pytest.mark.parametrize("pingpong_ok", [True, False])
def test_hopper_dispatch_offers_the_pingpong_kernel_first(monkeypatch, pingpong_ok):
    """Long key lists on Hopper: the ping-pong kernel is a candidate (and the default under a capture
    or CHIPMUNK_GLUON=1) where it qualifies, else the single-warpgroup one; Triton is always one;
    the pick runs once and is counted. Kernels and timer are stand-ins (no GPU here)."""
    from chipmunk_compile.kernels import attn_column_sparse as dispatch
    from chipmunk_compile.kernels import attn_column_sparse_hopper as hopper
    from chipmunk_compile.kernels import attn_column_sparse_pingpong as pingpong

    ran = []
    monkeypatch.setattr(dispatch, "use_hopper_kernel", lambda *a, **k: True)
    monkeypatch.setattr(pingpong, "beyond_hopper", lambda group: None if pingpong_ok else "group not a multiple of 128")
    monkeypatch.setattr(pingpong, "attn_column_sparse_pingpong", lambda *a, **k: ran.append("pingpong") or "P")
    monkeypatch.setattr(hopper, "attn_column_sparse_hopper", lambda *a, **k: ran.append("gluon") or "G")
    monkeypatch.setattr(dispatch, "_attn_column_sparse_triton", lambda *a, **k: ran.append("triton") or "T")
    offered = []

    def choice(key, runs, default):
        offered.append((list(runs), default))
        return "triton"

    monkeypatch.setattr(dispatch, "faster_choice", choice)
    x = torch.zeros(1, 1, 4, 128)
    args = (x, x, x, torch.zeros(1, 1, 1, 4096, dtype=torch.int32), torch.zeros(1, 1, 1, dtype=torch.int32))
    first = "pingpong" if pingpong_ok else "gluon"
    counters.clear()
    assert dispatch.attn_column_sparse(*args, scale=0.1, group=128) == "T"
    assert offered == [((["pingpong", "pingpong_persistent"] if pingpong_ok else []) + ["gluon", "triton"], first)]
    assert ran == ["triton"] and not [c for c in counters["chipmunk"] if c.startswith("kernel_")]
    monkeypatch.setenv("CHIPMUNK_GLUON", "1")  # forced: the first Gluon kernel, untimed
    assert dispatch.attn_column_sparse(*args, scale=0.1, group=128) == ("P" if pingpong_ok else "G")
    assert len(offered) == 1 and ran[-1] == first
    assert counters["chipmunk"][f"kernel_{first}:attn_column_sparse"] == 1


def test_cuda_event_timing_queues_a_spin_before_each_start_event(monkeypatch):
    """cuda_event_ms times a call with the GPU already busy (a spin kernel queued first), so the host
    launches fn before the start event fires and fn's own Python launch cannot pace the GPU time
    (a 0.16 ms kernel read slower than a 0.22 ms one that way, H200, session 28). CUDA is faked."""
    from chipmunk_compile.kernels import _common

    log = []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            log.append("record")

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.5

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: log.append(("spin", cycles)))
    ms = _common.cuda_event_ms(lambda: log.append("fn"), reps=3)
    assert ms == 1.5
    assert log[0] == "fn"  # the untimed first call (compiles / tunes)
    timed = log[1:]
    assert timed == [("spin", _common.SPIN_CYCLES), "record", "fn", "record"] * 3
    assert _common.SPIN_CYCLES >= 1_000_000  # ~0.5 ms or more at H100/H200 clocks: longer than a launch


def test_hopper_dispatch_times_without_out_and_measure_then_runs_the_pick_with_them(monkeypatch):
    """A refresh's cache build writes out (its measure's prev): the candidates are timed on pure calls
    (a timed run writing the cache would change the next run's prev), the pick then runs once with out
    and measure, fused into its epilogue; with strides its epilogue cannot take, the same call plus
    write_out's separate passes. Kernels and timer are stand-ins (no GPU here)."""
    from chipmunk_compile.kernels import attn_column_sparse as dispatch
    from chipmunk_compile.kernels import attn_column_sparse_hopper as hopper
    from chipmunk_compile.kernels import attn_column_sparse_pingpong as pingpong

    calls = []

    def stand_in(name):
        def kernel(q, *a, out=None, measure=None, programs=None, **k):
            calls.append((name + ("_persistent" if programs else ""), out is not None, measure is not None))
            return torch.ones_like(q) if out is None else out.fill_(1.0)
        return kernel

    monkeypatch.setattr(dispatch, "use_hopper_kernel", lambda *a, **k: True)
    monkeypatch.setattr(pingpong, "beyond_hopper", lambda group: None)
    monkeypatch.setattr(pingpong, "attn_column_sparse_pingpong", stand_in("pingpong"))
    monkeypatch.setattr(hopper, "attn_column_sparse_hopper", stand_in("gluon"))
    monkeypatch.setattr(dispatch, "_attn_column_sparse_triton", stand_in("triton"))

    def choice(key, runs, default):
        for run in runs.values():
            run()
        return "pingpong"

    monkeypatch.setattr(dispatch, "faster_choice", choice)
    q = torch.zeros(1, 2, 4, 128)
    args = (q, q, q, torch.zeros(1, 2, 1, 4096, dtype=torch.int32), torch.zeros(1, 2, 1, dtype=torch.int32))
    cache = torch.zeros(1, 4, 2, 128).transpose(1, 2)  # (B, N, H, D) storage, as empty_bnhd's
    slope_out = torch.full_like(cache, float("nan"))
    measure = (cache, slope_out, torch.tensor(0.5))
    o = dispatch.attn_column_sparse(*args, scale=0.1, group=128, o_base=q, sign=-1.0, out=cache, measure=measure)
    assert calls == [("pingpong", False, False), ("pingpong_persistent", False, False), ("gluon", False, False),
                     ("triton", False, False), ("pingpong", True, True)]
    assert o is cache and (cache == 1).all() and torch.isnan(slope_out).all()  # the stand-in wrote no slope
    calls.clear()
    odd = torch.zeros(1, 2, 4, 130)[..., :128]  # out with the head dim contiguous but other strides than o's
    prev = torch.full_like(cache, 3.0)
    wrote = dispatch.attn_column_sparse(*args, scale=0.1, group=128, o_base=q, sign=-1.0, out=odd,
                                        measure=(prev, slope_out, torch.tensor(0.5)))
    assert calls[-1] == ("pingpong", False, False)  # measure at other strides than out: not fused
    assert wrote is odd and (odd == 1).all()
    assert (slope_out == -1.0).all()  # write_out's pass: (1 - 3) * 0.5


def test_autotune_keeps_timings_on_disk_unless_turned_off(monkeypatch):
    """Every kernel module tunes through _common.autotune, which asks Triton to keep the timings on disk
    (cache_results) where Triton has the option, and leaves it out when CHIPMUNK_AUTOTUNE_CACHE=0 or
    when this Triton's autotune has no such parameter."""
    from chipmunk_compile.kernels import _common

    kernels_dir = pathlib.Path(_common.__file__).parent
    tuned = [p.stem for p in kernels_dir.glob("*.py") if "autotune(" in p.read_text() and p.stem != "_common"]
    assert len(tuned) >= 5 and not any("triton.autotune(" in (kernels_dir / f"{m}.py").read_text() for m in tuned)

    seen = []

    def recorder(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None, cache_results=False):
        seen.append(cache_results)
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", recorder)
    monkeypatch.delenv("CHIPMUNK_AUTOTUNE_CACHE", raising=False)
    _common.autotune([], ["N"], restore_value=["X"])
    monkeypatch.setenv("CHIPMUNK_AUTOTUNE_CACHE", "0")
    _common.autotune([], ["N"])
    assert seen == [True, False]

    def older(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None):
        seen.append("older")
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", older)
    monkeypatch.delenv("CHIPMUNK_AUTOTUNE_CACHE")
    _common.autotune([], ["N"])  # a TypeError here would break every kernel import on such a Triton
    assert seen[-1] == "older"
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter never caches
    wrapper = _common.autotune([triton.Config({"B": 1}), triton.Config({"B": 2})], ["n"])(_copy_kernel)
    assert wrapper.cache_results == ("cache_results" in inspect.signature(triton.autotune).parameters)


@triton.jit
def _copy_kernel(x, y, n, B: tl.constexpr):
    offs = tl.arange(0, B)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)


_TUNE_IN_A_NEW_PROCESS = """
import torch
from chipmunk_compile.kernels import attn_column_sparse as m
B, H, N, D, G, K = 1, 2, 300, 64, 64, 100
q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16) for _ in range(3))
NG = -(-N // G)
idx = torch.rand(B, H, NG, N, device="cuda").topk(K, dim=-1).indices.sort(-1).values.int()
cnt = torch.full((B, H, NG), K, dtype=torch.int32, device="cuda")
m.attn_column_sparse(q, k, v, idx, cnt, scale=D ** -0.5, group=G)
torch.cuda.synchronize()
print("timed" if hasattr(m._tuned, "bench_time") else "read")  # bench_time: set when this process timed configs
"""


@pytest.mark.gpu
def test_gpu_a_new_process_reads_the_timings_instead_of_timing_again(tmp_path):
    """The cross-process effect of _common.autotune on a real GPU: the first process times the configs and
    writes them into the Triton cache dir, the next one reads them, and CHIPMUNK_AUTOTUNE_CACHE=0 times again."""
    import os
    import subprocess
    import sys

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.fail(f"Triton {triton.__version__} has no autotune(cache_results=...): the project needs >= 3.4 here")
    env = {k: v for k, v in os.environ.items() if k not in ("CHIPMUNK_AUTOTUNE_CACHE", "TRITON_INTERPRET")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", _TUNE_IN_A_NEW_PROCESS], env={**env, **extra},
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    assert run() == "timed"
    assert list(tmp_path.rglob("*.autotune.json"))
    assert run() == "read"
    assert run(CHIPMUNK_AUTOTUNE_CACHE="0") == "timed"

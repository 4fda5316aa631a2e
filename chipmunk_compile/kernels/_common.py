"""Small helpers shared by the Triton launchers (imports Triton lazily; safe without it).

Invariants:
- ``interpreting()`` is True iff ``TRITON_INTERPRET=1``; launchers then use one small fixed config
  (the interpreter is slow and autotuning there would multiply test time).
- ``dot_precision(dtype)``: fp32 inputs use IEEE fp32 dots so the fp32 path matches the reference
  tightly; fp16/bf16 inputs use the tensor cores with fp32 accumulation.
- ``new_empty``/``empty_bnhd`` allocate outputs; CHIPMUNK_KERNELS_POISON=1 fills them with NaN (integer
  outputs: their min) so tests catch elements a kernel failed to write.
- ``bias_view`` is how every attention kernel and reference reads an additive score bias: a view of
  it broadcast to (B, Hq, Nq, Nk), zero strides on broadcast axes (never a copy).
- ``ACTS`` lists the activation names every MLP kernel and reference accept.
- ``int32_index_args`` gives the column-sparse launchers int32 indices/counts with a unit last
  stride and an int32 contiguous permutation (no copy when they already are).
- ``launch`` runs a kernel the one way a launcher may: a forced ``triton.Config`` (benchmark and
  test hook) if set, else the interpreter's fixed small config, else the autotuned wrapper.
- ``autotune`` is ``triton.autotune`` with the timings kept on disk (Triton >= 3.4's ``cache_results``,
  in Triton's cache dir, keyed by the kernel source, the target, the tuning key and the configs), so
  a new process on the same machine skips the benchmarking; CHIPMUNK_AUTOTUNE_CACHE=0 (read at import)
  turns it off, and older Tritons tune in every process as before.
- ``faster_choice`` times interchangeable kernels once per key and process (CUDA events behind a
  ~1 ms GPU spin, so a kernel's Python launch does not pace its timing; outside any graph capture;
  during a capture it returns the default unmeasured and measures nothing) and returns the same
  choice for that key ever after: a later call never syncs the host.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
ACTS = ("gelu", "gelu_tanh", "silu", "relu", "relu2")  # relu2: squared ReLU (Primer, Nemotron)
# Integer codes passed to kernels as a constexpr.
ACT_CODE = {name: i for i, name in enumerate(ACTS)}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def bias_view(bias, q, k):
    """`bias` (SDPA's float attn_mask: added to the scaled scores, natural-log units, any shape that
    broadcasts to (B, Hq, Nq, Nk), any float dtype) as a (B, Hq, Nq, Nk) view, or None."""
    if bias is None:
        return None
    B, H, Nq, _ = q.shape
    if bias.dim() > 4 or not bias.is_floating_point():
        raise ValueError(f"attention bias must be a float tensor of rank <= 4, got {bias.dtype} {tuple(bias.shape)}")
    return bias.expand(B, H, Nq, k.shape[-2])


def new_empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-filled (integers: their min) when CHIPMUNK_KERNELS_POISON=1 (tests: catches
    unwritten outputs)."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if os.environ.get("CHIPMUNK_KERNELS_POISON", "0") == "1":
        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).min)
    return t


def cp_async_rows_reason(*ts, inner: str = "inner dim") -> str | None:
    """cp.async copies 16-byte vectors of rows: each tensor (None skipped) needs a unit-stride last
    dim (named ``inner`` in the reason), a 16-byte aligned base and row strides of whole 16-byte
    units, else the compiler would reject the copies. The reason, or None."""
    for t in ts:
        if t is None:
            continue
        if t.stride(-1) != 1:
            return f"{inner} not contiguous"
        if t.data_ptr() % 16 or any(st % (16 // t.element_size()) for st in t.stride()[:-1]):
            return "rows not 16-byte aligned"
    return None


def empty_bnhd(B: int, H: int, N: int, D: int, *, dtype, device) -> torch.Tensor:
    """(B, H, N, D) view of a (B, N, H, D) buffer: the attention output layout of design.md."""
    return new_empty(B, N, H, D, dtype=dtype, device=device).transpose(1, 2)


def int32_index_args(indices, counts, perm):
    """(indices, counts, perm) as the column-sparse attention kernels read them."""
    idx = indices if indices.stride(-1) == 1 else indices.contiguous()
    cnt = counts if counts.stride(-1) == 1 else counts.contiguous()
    return idx.to(torch.int32), cnt.to(torch.int32), None if perm is None else perm.to(torch.int32).contiguous()


def autotune(configs, key, **kw):
    """``triton.autotune(configs=configs, key=key, **kw)``, caching its timings on disk where it can
    (module invariant): a fresh process otherwise re-times every config of every kernel and tuning key
    before its first output (~1 min for the 1024-token tiny DiT on an H200, session 24)."""
    import triton

    if os.environ.get("CHIPMUNK_AUTOTUNE_CACHE", "1") != "0" \
            and "cache_results" in inspect.signature(triton.autotune).parameters:
        kw["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **kw)


def launch(kernel, tuned, grid, args, flags: dict, *, force_config=None, interp_meta: dict,
           fix_meta: Callable[[dict], dict] | None = None) -> None:
    """kernel[grid(meta)](*args, **flags) with meta from force_config, interp_meta under the
    interpreter, or the autotuner (``tuned``, the autotuned wrapper of ``kernel``). ``fix_meta``
    adjusts a fixed meta (forced or interpreter) as the autotuner's pruning and config pre-hooks
    treat its own configs."""
    if force_config is None and not interpreting():
        tuned[grid](*args, **flags)
        return
    meta, opts = (interp_meta, {}) if force_config is None else \
        (force_config.kwargs, dict(num_warps=force_config.num_warps, num_stages=force_config.num_stages))
    if fix_meta is not None:
        meta = fix_meta(meta)
    kernel[grid(meta)](*args, **meta, **opts, **flags)


_CHOICES: dict = {}  # key -> name of the faster run, measured once per process
SPIN_CYCLES = 2_000_000  # GPU clock cycles (~1 ms) queued ahead of each timed call


def cuda_event_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median CUDA-event time of fn after one untimed call (which compiles or tunes it)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # a ~1 ms spin first, so the host has queued fn's launches before the start event fires: the
        # events then time the GPU work alone, as a recorded step graph replays it (a 0.15 ms Gluon
        # kernel read ~0.23 ms when its Python launch paced the GPU, H200, session 28)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def faster_choice(key, runs: dict[str, Callable[[], object]], default: str, *, timer=cuda_event_ms) -> str:
    """The name of the fastest of ``runs`` (interchangeable calls on the caller's real inputs) for
    ``key``: timed on its first call, remembered after. Under a CUDA-graph capture, unmeasured keys
    get ``default`` (timing there would sync the host) and stay unmeasured."""
    if key in _CHOICES:
        return _CHOICES[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return default
    ms = {name: timer(fn) for name, fn in runs.items()}
    best = min(ms, key=ms.get)
    _CHOICES[key] = best
    log.info("chipmunk: %s -> %s (%s)", key, best, ", ".join(f"{n} {t:.3f} ms" for n, t in ms.items()))
    from torch._dynamo.utils import counters

    counters["chipmunk"][f"kernel_choice:{key[0]}:{best}"] += 1
    return best

"""`chipmunk_compile.calibrate`: the cheapest config that keeps a user's own generation within a
quality bound of dense, found on their model, prompts and step count.

Users of every caching and sparse-attention method tune thresholds and budgets per model by hand
(landscape: TeaCache's coefficients, SpargeAttn's hyper-parameters, FBCache's threshold, Chipmunk's
top-k and refresh schedule). Here one call runs the generation dense once and once per candidate
config, scores each candidate by its PSNR against the dense output and by the whole model's FLOPs
against dense (`flops.model_flops_ratio`, from one more dense generation under torch's FLOP
counter, inside the model's calls only: a pipeline's text encoders and VAE cost the same under
every candidate and are left out), and returns the cheapest candidate at or above `min_psnr`. The sites' FLOPs alone
(`model_flops=False`) rank only candidates that rewrite the same ops: a candidate with one op off
has fewer sites, so its sites' ratio is over less work (on the tiny DiT the MLP alone read 0.58 of
its sites' FLOPs and is 0.83 of the model's), and step caching also skips the rest of the model.

Invariants:
- The dense reference runs once, compiled as the candidates are (plain Inductor when they run
  through Inductor, whose rounding differs from eager in bf16; the module as given for "eager");
  each candidate compiles the module afresh after `torch._dynamo.reset()` (so its sessions and
  caches are its own), and Dynamo is reset again at the end: compile your models after
  calibrating, not before.
- A pipeline's module attribute is set to the candidate for its run and restored afterwards.
- A module compiled in place (`module.compile(...)`, itself or its blocks) is calibrated as the
  module it compiled: its compiled calls are set aside while calibrating and put back afterwards
  (else the dense reference and every candidate would run that compilation instead).
- With no candidate at or above `min_psnr`, `met` is False, the most faithful candidate is
  returned, and that is logged: never a silent pick below the bound. A candidate that ran no sparse
  step (no site rewritten, or a step count whose periods scale to 1) equals dense and is never
  chosen; when no candidate ran one, that is logged with the reason.
- With `timed`, the cost is the measured speed of a second generation against dense (compiled as
  the candidates are), both timed the same way; PSNR is always the first generation's.
- PSNR is over the peak-to-peak range of the dense output (2 for images in [-1, 1], 1 in [0, 1];
  latents use their own range), averaged over the batch's samples in dB.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .compiled_options import compiled_in_place

log = logging.getLogger("chipmunk_compile")

_OFF = {"enabled": False}
_ADAPTIVE = {"enabled": True, "threshold": 0.2, "extrapolate": 1.0}  # skipped calls forecast (TaylorSeer's first order)

# (name, config): the `default` preset, cheaper and more faithful variants of it, each op alone, and
# whole-call step caching alone and stacked on `default` (the backend's other tool)
DEFAULT_CANDIDATES: tuple[tuple[str, dict], ...] = (
    ("method: 5% keys refreshed every 10 steps", {"preset": "method"}),
    ("default, 5% keys, 15% neurons", {"preset": "default", "attn": {"top_keys": 0.05}, "mlp": {"top_keys": 0.15}}),
    ("default", {"preset": "default"}),
    ("default, attention refreshed every 3 steps", {"preset": "default", "attn": {"full_step_every": 3}}),
    ("default, 20% keys, refreshed every 3", {"preset": "default", "attn": {"top_keys": 0.2, "full_step_every": 3}}),
    ("default, MLP only", {"preset": "default", "attn": {"enabled": False}}),
    ("default, attention only", {"preset": "default", "mlp": {"enabled": False}}),
    ("step caching alone: adaptive 0.2, forecast", {"preset": "default", "attn": _OFF, "mlp": _OFF,
                                                     "step_cache": _ADAPTIVE}),
    ("default + step caching: adaptive 0.2, forecast", {"preset": "default", "step_cache": _ADAPTIVE}),
)


@dataclass
class CandidateResult:
    name: str
    config: dict
    psnr: float
    flops: float  # the cost ranked: the model's FLOPs against dense when counted, else the sites'
    seconds: float  # compile + generation, wall clock
    sites: int = 0  # sites that ran
    sparse_calls: int = 0  # their calls that were not dense: a candidate with none ran dense, never chosen
    speedup: Optional[float] = None  # timed: dense generation time / this candidate's (its second run)
    site_flops: Optional[float] = None  # the sites' FLOPs against the same calls dense


@dataclass
class Calibration:
    """What `calibrate` found: `config` to pass as `options={"config": ...}`."""
    name: str
    config: dict
    psnr: float
    flops: float
    met: bool
    min_psnr: float
    candidates: list[CandidateResult] = field(default_factory=list)
    speedup: Optional[float] = None  # timed runs only
    model_flops: bool = False  # `flops` are the whole model's (counted), else the sites'

    def __str__(self) -> str:
        timed = self.speedup is not None
        what = "model FLOPs" if self.model_flops else "site FLOPs"
        rows = [f"{'candidate':<50} {'PSNR dB':>8} {what:>11} {'sites':>5} {'seconds':>8}"
                + (f" {'speedup':>8}" if timed else "")]
        for c in sorted(self.candidates, key=lambda c: -c.speedup if timed else c.flops):
            mark = " <" if c.name == self.name else ""
            rows.append(f"{c.name:<50} {c.psnr:>8.2f} {c.flops:>11.3f} {c.sites:>5} {c.seconds:>8.1f}"
                        + (f" {c.speedup:>7.3f}x" if timed else "") + mark)
        verdict = "meets" if self.met else "NO candidate meets"
        cost = f"{self.speedup:.3f}x dense" if timed else f"{self.flops:.3f} of the {what}"
        return (f"chipmunk calibration: {self.name!r} ({verdict} {self.min_psnr:.1f} dB against dense: "
                f"{self.psnr:.2f} dB at {cost})\n" + "\n".join(rows))


def psnr_against(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of `out` against `ref` over ref's peak-to-peak range, the mean over samples."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"calibrate: a candidate's output has shape {tuple(out.shape)}, dense gave "
                         f"{tuple(ref.shape)}: run() must return the same output for every module")
    peak = float(ref.max() - ref.min()) or 1.0
    mse = ((out - ref) ** 2).reshape(ref.shape[0], -1).mean(1) if ref.dim() > 1 else ((out - ref) ** 2).mean()[None]
    vals = [math.inf if m == 0 else 10 * math.log10(peak * peak / m) for m in mse.tolist()]
    finite = [v for v in vals if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


def _timed(fn) -> float:
    """Wall-clock seconds of `fn()`, the device drained before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _cost(compiled, dense_total: Optional[float]) -> tuple[float, float, int, int]:
    """(the cost ranked, the sites' FLOPs ratio, how many sites ran, their calls that were not dense
    plus the calls step caching skipped). The cost is the whole model's FLOPs ratio when the dense
    generation was counted (`dense_total`), else the sites' ratio, where a skipped call counts at
    no cost against all calls."""
    from .flops import model_flops_ratio, sites_flops_ratio
    from .runtime import sessions_of

    sessions = sessions_of(compiled)
    sites = [s for session in sessions for s in session.sites if s.steps]
    ratio = sites_flops_ratio(sites) if sites else 1.0
    caches = [session.step_cache.summary() for session in sessions if session.step_cache is not None]
    skipped, computed = sum(c["skipped"] for c in caches), sum(c["computed"] for c in caches)
    sparse_calls = sum(n for s in sites for kind, n in s.steps.items() if kind != "dense") + skipped
    ratio = ratio * computed / (computed + skipped) if skipped else ratio
    cost = model_flops_ratio(sites, dense_total, computed, skipped) if dense_total else ratio
    return cost, ratio, len(sites), sparse_calls


def _set_aside_in_place_compilations(model: torch.nn.Module) -> list:
    """Makes `model` and its submodules run their own forwards, not what `module.compile()` made of
    them; returns what `_put_back` restores."""
    held = [(m, m._compiled_call_impl) for m in model.modules() if compiled_in_place(m)]
    for m, _ in held:
        m._compiled_call_impl = None
    return held


def _put_back(held: list) -> None:
    for m, fn in held:
        m._compiled_call_impl = fn


def calibrate(target: Any, run: Callable[[torch.nn.Module], torch.Tensor], *, min_psnr: float = 30.0,
              candidates: Optional[Sequence[tuple[str, Any]]] = None, steps: Optional[int] = None,
              scheduler: Any = None, module: Optional[str] = None, compiler: str = "inductor",
              timed: bool = False, model_flops: bool = True) -> Calibration:
    """The cheapest of `candidates` (default: `DEFAULT_CANDIDATES`) whose generation stays at or
    above `min_psnr` dB of the dense one.

    target: the model, or an object that holds it as attribute `module` (default "transformer" for
        anything but a module: a diffusers pipeline; give `module` for a module that holds it).
    run: `run(m)` runs one whole generation with module `m` (for a pipeline, also set as its
        `module` attribute) and returns its output (images or latents), with the same seeds every
        time. Called once dense and once per candidate.
    steps: the generation's step count, written into every candidate (the refresh periods scale to
        it from the first generation, as they will in use); or `scheduler`, followed per candidate.
    compiler: "inductor" (what you will run) or "eager" (faster to compile, for a quick look).
    timed: run every generation (dense too) a second time, timed, and pick the fastest candidate at
        the bound instead of the one with the fewest FLOPs (on the GPU you will run: what FLOPs only
        estimate; a second run, so no compile or first-occurrence recording is timed).
    model_flops: rank by the whole model's FLOPs, from one more dense generation, eager, under
        torch's FLOP counter (False: by the sites' FLOPs, comparable only between candidates that
        rewrite the same ops and skip no call).
    """
    from . import follow_scheduler
    from .config import ChipmunkConfig
    from .flops import count_flops

    if module is None and not isinstance(target, torch.nn.Module):
        module = "transformer"
    holder = target if module is not None else None
    model = getattr(target, module, None) if holder is not None else target
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"calibrate: target must be an nn.Module or hold one as .{module}, "
                        f"got {type(target).__name__}")
    model = getattr(model, "_orig_mod", model)
    todo = [(name, copy.deepcopy(config)) for name, config in (candidates if candidates is not None
                                                               else DEFAULT_CANDIDATES)]
    if not todo:
        raise ValueError("calibrate: no candidates")
    for _, config in todo:
        if isinstance(config, dict) and steps is not None:
            config["steps"] = steps
        ChipmunkConfig.from_any(config)  # a bad candidate fails here, before any compile

    def use(m):
        if holder is not None:
            setattr(holder, module, m)
        with torch.no_grad():
            return run(m)

    results: list[CandidateResult] = []
    set_aside = _set_aside_in_place_compilations(model)
    if set_aside:
        log.info("chipmunk calibration: the module's in-place compilations are set aside while calibrating")
    try:
        torch._dynamo.reset()
        eager_out: list = []  # the counted generation is the eager reference itself
        dense_total = count_flops(lambda: eager_out.append(use(model)), model) if model_flops else None
        dense = torch.compile(model) if compiler == "inductor" else model
        ref = eager_out[0] if eager_out and dense is model else use(dense)
        dense_seconds = _timed(lambda: use(dense)) if timed else None
        for name, config in todo:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            compiled = torch.compile(model, backend="chipmunk", options={"config": config, "compiler": compiler})
            if scheduler is not None:
                follow_scheduler(compiled, scheduler)
            out = use(compiled)
            seconds = time.perf_counter() - t0
            flops, site_flops, n_sites, sparse_calls = _cost(compiled, dense_total)  # the first run's: scored
            speedup = dense_seconds / _timed(lambda: use(compiled)) if timed else None
            results.append(CandidateResult(name, config, psnr_against(out, ref), flops, seconds, n_sites,
                                           sparse_calls, speedup, site_flops))
            log.info("chipmunk calibration: %s: %.2f dB at %.3f of the %s FLOPs", name, results[-1].psnr,
                     results[-1].flops, "model's" if model_flops else "sites'")
    finally:
        if holder is not None:
            setattr(holder, module, model)
        _put_back(set_aside)
        torch._dynamo.reset()
    if not any(r.sparse_calls for r in results):
        log.warning("chipmunk calibration: no candidate ran a sparse step, so each ran dense: %s",
                    "no site was rewritten (chipmunk_compile.inspect(model, *inputs) lists why: e.g. fewer tokens "
                    "than min_tokens)" if not any(r.sites for r in results) else
                    "the step count leaves none (the refresh periods scale to 1 step: a few-step sampler)")
    passing = [r for r in results if r.psnr >= min_psnr and r.sparse_calls]
    cost = (lambda r: (-r.speedup, -r.psnr)) if timed else (lambda r: (r.flops, -r.psnr))  # ties: the faithful one
    best = min(passing, key=cost) if passing else max(results, key=lambda r: (r.sparse_calls > 0, r.psnr))
    found = Calibration(best.name, best.config, best.psnr, best.flops, bool(passing), min_psnr, results,
                        best.speedup, bool(model_flops))
    if timed and passing and best.speedup < 1:
        log.warning("chipmunk calibration: the fastest candidate at the bound, %r, is slower than dense (%.3fx): "
                    "run dense", best.name, best.speedup)
    if not passing and any(r.sparse_calls for r in results):
        log.warning("chipmunk calibration: no candidate reaches %.1f dB against dense (best: %r, %.2f dB): "
                    "run dense, lower the bound, or give candidates that refresh more often", min_psnr,
                    best.name, best.psnr)
    return found

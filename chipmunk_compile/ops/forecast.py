"""First-order forecast state of one site branch, shared by `attn.extrapolate` and `mlp.extrapolate`.

A quantity q (the attention's cached residual, the MLP's stale-neuron error) is measured at the
steps that compute it exactly; between them it is forecast as q_ref + e·min(t − t_ref, span)·slope.

Invariants:
- `slope` is a cache buffer of the branch (named by the op, so reports and tests see it); `t_ref`
  (the last measuring step) and `span` (its distance to the measuring step before) are two fp32
  device scalars in one more buffer. t is the session's device step, so a recorded CUDA graph
  forecasts correctly at every step it replays; no value is read on the host.
- Arithmetic is on 0-dim tensors, so results keep the buffers' dtype.
- Whether a step measures or forecasts is the op's host decision (`decide`); this class only
  does the device work.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Forecast:
    def __init__(self, site, st, pos, slope_name: str, times_name: str, shape: tuple, dtype, device):
        self.slope = st.tensor(slope_name, shape, dtype, device)
        times = st.tensor(times_name, (2,), torch.float32, device)  # (t_ref, span)
        self.t_ref, self.span = times[0], times[1]
        self.t_now = site.session.device_step_float(device, pos.step)

    def coef(self, e: float) -> Tensor:
        """e·min(t − t_ref, span): never further ahead than the interval the slope was measured over.
        Two small kernels per forecasting site and step (three when e ≠ 1)."""
        ahead = torch.minimum(self.t_now - self.t_ref, self.span)
        return ahead if e == 1.0 else ahead * e

    def measure(self, now: Tensor, before: Tensor) -> None:
        """slope = (now − before) / (t − t_ref): the change per step since the last measuring step."""
        self.slope.copy_((now - before) / self._record_span())

    def measure_rate(self) -> Tensor:
        """For a kernel that writes the slope itself (``attn_column_sparse(measure=…)``): records the
        span as `measure` does and returns 1 / (t − t_ref), a 0-dim fp32 device tensor."""
        return 1.0 / self._record_span()

    def _record_span(self) -> Tensor:
        """span = t − t_ref (this measuring step's distance to the previous one), returned as the
        divisor. A measuring step at or before the last one (one step run twice on a branch: two
        guidance calls pinned to one branch) divides by infinity: a zero slope and span, a hold,
        where it divided by zero (NaN latents from the next step on until session 44)."""
        dt = self.t_now - self.t_ref
        self.span.fill_(dt.clamp(min=0))
        return torch.where(dt > 0, dt, torch.full_like(dt, float("inf")))

    def mark(self) -> None:
        """This step is the latest measuring step."""
        self.t_ref.fill_(self.t_now)

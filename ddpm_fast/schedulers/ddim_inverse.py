"""``DDIMInverseScheduler``: diffusers' DDIM inversion scheduler on the fused ``ddim_reverse_step``."""
from __future__ import annotations

import warnings
from typing import List, Optional, Union

import numpy as np
import torch

from .. import ops
from ..schedule import NoiseSchedule
from ._base import SchedulerOutput, _FastSchedulerBase
from ._config import register_to_config
from .ddim import _NEEDS_SET_TIMESTEPS, _DDIMTimesteps

__all__ = ["DDIMInverseScheduler", "DDIMInverseSchedulerOutput"]

DDIMInverseSchedulerOutput = SchedulerOutput


class DDIMInverseScheduler(_DDIMTimesteps, _FastSchedulerBase):
    """diffusers' ``DDIMInverseScheduler`` (DDIM inversion, ``x_t`` to a noisier ``x_next``) on the
    fused ops: same constructor, config and ``set_timesteps``/``step``.

    ``timesteps`` ascend. ``step(model_output, timestep, sample)`` goes *to* ``timestep`` from the
    entry before it in the schedule (from ``initial_alpha_cumprod``, 1 with ``set_alpha_to_one``
    else ``abar_0``, at the first entry); a timestep outside the schedule comes from diffusers'
    ``min(t - T // n, T - 1)``. ``x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps``
    with ``eps`` from the raw model output and ``x0_hat`` clipped if ``clip_sample``."""

    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")
    _spacings = ("leading", "trailing")
    _compatibles: List[str] = []
    _index_shift = 1
    ignore_for_config = ["kwargs"]
    _deprecated_kwargs = ["set_alpha_to_zero"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - set(self._deprecated_kwargs))
        if unknown:
            raise TypeError(f"DDIMInverseScheduler got unexpected keyword argument(s) {unknown}")
        if kwargs.get("set_alpha_to_zero", None) is not None:
            warnings.warn("The `set_alpha_to_zero` argument is deprecated. Please use `set_alpha_to_one` instead.",
                          FutureWarning, stacklevel=3)
            set_alpha_to_one = kwargs["set_alpha_to_zero"]
        ops._check_choice("prediction_type", prediction_type, ops.PREDICTION_TYPES)
        ops._check_choice("timestep_spacing", timestep_spacing, self._spacings)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        init = torch.ones((), dtype=torch.float64) if set_alpha_to_one else self.schedule.alphas_cumprod[0]
        # the table the ops index: [initial_alpha_cumprod, abar_0, ..., abar_{L-1}], so that
        # index t + 1 is timestep t and index 0 the constant before the first step
        abar = torch.cat([init.reshape(1), self.schedule.alphas_cumprod])
        betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self._table = NoiseSchedule(betas.nan_to_num(nan=1.0), check_range=False)
        self.timesteps = torch.from_numpy(np.arange(0, int(num_train_timesteps)).astype(np.int64))

    def _ops_schedule(self) -> NoiseSchedule:
        return self._table

    def _fallback_prev(self, t):
        """diffusers' ``min(t - T // n, T - 1)`` (negative: from ``initial_alpha_cumprod``)."""
        p = super()._fallback_prev(t)
        T = self.config.num_train_timesteps
        return p.clamp(max=T - 1) if isinstance(p, torch.Tensor) else min(p, T - 1)

    def _set_prev_table(self, timesteps):
        # the step to an entry comes from the entry before it: the descending rule on the reversed list
        super()._set_prev_table(None if timesteps is None else list(reversed(timesteps)))

    def _guard_check(self, t, p):
        self._guard.check(p, t)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' ``leading`` (+ ``steps_offset``) and ``trailing`` spacings, ascending."""
        ts = list(reversed(self._spaced_timesteps(num_inference_steps)))
        self.num_inference_steps = int(num_inference_steps)
        self._finish_set_timesteps(ts, device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One inversion step to ``timestep`` (class docstring). Returns ``SchedulerOutput(prev_sample
        = x_next, pred_original_sample = x0_hat)`` or a tuple with ``return_dict=False``."""
        self._check_tensors(model_output, sample)
        if self.num_inference_steps is None:
            raise ValueError(_NEEDS_SET_TIMESTEPS)
        to_i, from_i, _ = self._step_timesteps(timestep, sample)
        c = self.config
        x_next, x0_hat = ops.ddim_reverse_step(
            model_output, from_i, sample, self._table, next_t=to_i, prediction_type=c.prediction_type,
            clip_sample=bool(c.clip_sample), clip_sample_range=float(c.clip_sample_range), return_x0=True)
        if not return_dict:
            return (x_next, x0_hat)
        return SchedulerOutput(prev_sample=x_next, pred_original_sample=x0_hat)

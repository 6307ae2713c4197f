"""``DDIMScheduler``: diffusers' class (Song et al. 2021) on the fused ``ddim_step``."""
from __future__ import annotations

from typing import List, Optional, Union

import numpy as np
import torch

from .. import ops, reference
from ._base import SchedulerOutput, _FastSchedulerBase
from ._config import register_to_config

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput"]

DDIMSchedulerOutput = SchedulerOutput

_NEEDS_SET_TIMESTEPS = ("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                        "scheduler")


class _DDIMTimesteps:
    """DDIM's timestep rules (shared with the inverse): ``set_timesteps`` is needed before a
    step, and a host timestep outside the schedule steps by diffusers' ``t - T // n``."""

    _step_off_schedule = True

    def _before_set_timesteps(self, t: int) -> int:
        raise ValueError(_NEEDS_SET_TIMESTEPS)

    def _state(self, device):
        if self._prev_host is None:
            raise ValueError(_NEEDS_SET_TIMESTEPS)
        return super()._state(device)


class DDIMScheduler(_DDIMTimesteps, _FastSchedulerBase):
    """diffusers' ``DDIMScheduler`` on the fused ops. A step from a timestep of the schedule goes
    to the next entry of the schedule for every spacing (docs/diffusers.md)."""

    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")

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
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        ops._check_choice("prediction_type", prediction_type, ops.PREDICTION_TYPES)
        ops._check_choice("timestep_spacing", timestep_spacing, self._spacings)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._final_abar = 1.0 if set_alpha_to_one else float(self.schedule.alphas_cumprod[0])

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' spacings; builds the previous-timestep table (on ``device`` if given). The
        next step that needs counter noise draws a new seed."""
        ts = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._finish_set_timesteps(ts, device)

    def _abar_pair(self, timestep, prev_timestep):
        a = self.schedule.alphas_cumprod
        abar_t = a[int(timestep)]
        p = int(prev_timestep)
        abar_prev = a[p] if p >= 0 else torch.tensor(self._final_abar, dtype=torch.float64)
        return abar_t, abar_prev

    def _get_variance(self, timestep, prev_timestep=None):
        """diffusers' ``_get_variance``: the posterior variance of the pair (fp32 result from
        ``reference.posterior_variance`` on the float64 tables); ``prev_timestep`` defaults to
        the step's target."""
        if prev_timestep is None:
            prev_timestep = self._previous_host(int(timestep))
        abar_t, abar_prev = self._abar_pair(timestep, prev_timestep)
        return reference.posterior_variance(abar_t, abar_prev).to(torch.float32)

    def _ddim(self, model_output, t, prev_t, sample, eta, use_clipped_model_output, noise, seed, offset,
              guidance_scale):
        return ops.ddim_step(
            model_output, t, sample, self.schedule, prev_t=prev_t, eta=eta,
            prediction_type=self.config.prediction_type, use_clipped_model_output=bool(use_clipped_model_output),
            final_alpha_cumprod=self._final_abar, guidance_scale=guidance_scale,
            noise=noise, seed=seed, offset=offset if seed is not None else 0, return_x0=True, **self._clip_options())

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True, *, guidance_scale: Optional[float] = None):
        """One DDIM step from ``timestep`` to the next entry of the schedule (a timestep outside
        the schedule: diffusers' ``t - T // n``). Per-sample/device timesteps, the counter noise
        without a generator and ``guidance_scale`` as in :meth:`DDPMScheduler.step`."""
        self._check_tensors(model_output, sample)
        if self.num_inference_steps is None:
            raise ValueError(_NEEDS_SET_TIMESTEPS)
        dev = sample.device
        t, prev_t, _ = self._step_timesteps(timestep, sample)
        eta = ops._check_float("eta", eta, low=0.0, high=1.0)
        noise, seed, offset = self._noise(generator, variance_noise, sample.shape, model_output.dtype, dev, eta > 0)
        x_prev, x0_hat = self._ddim(model_output, t, prev_t, sample, eta, use_clipped_model_output, noise, seed,
                                    offset, guidance_scale)
        return self._step_output(x_prev, x0_hat, dev, return_dict)

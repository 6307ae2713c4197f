"""``DDPMScheduler``: diffusers' class (Ho et al. 2020) on the fused ``ddpm_step``."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import numpy as np
import torch

from .. import ops, reference
from ._base import SchedulerOutput, _FastSchedulerBase, learned_variance_to_log
from ._config import register_to_config

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput"]

DDPMSchedulerOutput = SchedulerOutput


class DDPMScheduler(_FastSchedulerBase):
    """diffusers' ``DDPMScheduler`` on the fused ops: same constructor, config, attributes and
    methods; docs/diffusers.md lists the deliberate differences."""

    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        ops._check_choice("variance_type", variance_type, ops.VARIANCE_TYPES)
        ops._check_choice("prediction_type", prediction_type, ops.PREDICTION_TYPES)
        ops._check_choice("timestep_spacing", timestep_spacing, self._spacings)
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[List[int]] = None):
        """diffusers' spacings (``linspace``, ``leading`` + ``steps_offset``, ``trailing``) or custom
        descending ``timesteps``; builds the previous-timestep table (on ``device`` if given). The
        next step that needs counter noise draws a new seed."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            if len(ts) == 0:
                raise ValueError("`custom_timesteps` must not be empty.")
            for i in range(1, len(ts)):
                if ts[i] >= ts[i - 1]:
                    raise ValueError("`custom_timesteps` must be in descending order.")
            if ts[0] >= T:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
            if ts[-1] < 0:
                raise ValueError(f"`timesteps` must be non-negative, got {ts[-1]}")
            self.custom_timesteps = True  # num_inference_steps is left as it was, as in diffusers
        else:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps or timesteps")
            ts = self._spaced_timesteps(num_inference_steps)
            self.num_inference_steps = int(num_inference_steps)
            self.custom_timesteps = False
        self._finish_set_timesteps(ts, device)

    def previous_timestep(self, timestep):
        """The previous timestep (diffusers' method; host ints and tensors)."""
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 0:
            return self._prev_cpu.to(timestep.device)[timestep.long()]
        p = self._previous_host(int(timestep))
        return torch.tensor(p) if (self.custom_timesteps or self.num_inference_steps) else p

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """diffusers' ``_get_variance`` (for pipelines that call it) from the float64 tables by
        ``reference``'s formulas: a variance for ``fixed_small``/``fixed_large``/``learned``, a
        std for ``fixed_small_log`` and a log-variance for ``fixed_large_log``/``learned_range``
        (diffusers' return values)."""
        t = int(t)
        p = self._previous_host(t)
        a = self.schedule.alphas_cumprod
        abar_t = a[t]
        abar_prev = a[p] if p >= 0 else torch.ones((), dtype=torch.float64)
        beta = float(reference.step_beta(abar_t, abar_prev))
        var = float(reference.posterior_variance(abar_t, abar_prev).clamp(min=reference.VARIANCE_FLOOR))
        vt = variance_type or self.config.variance_type
        if vt == "learned":
            return predicted_variance
        if vt == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * math.log(beta) + (1 - frac) * math.log(var)
        out = {"fixed_small": var, "fixed_small_log": math.exp(0.5 * math.log(var)), "fixed_large": beta,
               "fixed_large_log": math.log(beta) if beta > 0 else -math.inf}[vt]
        return torch.tensor(out, dtype=torch.float32)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None,
             guidance_scale: Optional[float] = None):
        """One reverse step from ``timestep`` to its previous timestep (diffusers' semantics).

        ``timestep``: an int, a 0-d tensor (CPU or the sample's device) or a ``(B,)`` tensor of
        per-sample timesteps. ``generator`` (or a list, one per row): noise drawn as diffusers
        draws it; ``variance_noise``: the noise itself; neither: the counter noise
        (docs/diffusers.md). ``guidance_scale``: ``model_output`` holds ``2B`` rows (unconditional
        first) combined as ``uncond + w (cond - uncond)``. Returns ``SchedulerOutput(prev_sample,
        pred_original_sample)`` or a tuple with ``return_dict=False``."""
        self._check_tensors(model_output, sample)
        dev = sample.device
        t, prev_t, t_host = self._step_timesteps(timestep, sample)
        vt = self.config.variance_type
        C = sample.shape[1] if sample.dim() > 1 else 1
        noise_dtype = model_output.dtype  # diffusers draws in the model output's dtype
        model_output = learned_variance_to_log(model_output, C, vt)
        draw = t_host is None or t_host > 0
        noise, seed, offset = self._noise(generator, variance_noise, sample.shape, noise_dtype, dev, draw)
        x_prev, x0_hat = ops.ddpm_step(
            model_output, t, sample, self.schedule, prev_t=prev_t,
            prediction_type=self.config.prediction_type, variance_type=vt, guidance_scale=guidance_scale,
            noise=noise, seed=seed, offset=offset if seed is not None else 0, return_x0=True, **self._clip_options())
        return self._step_output(x_prev, x0_hat, dev, return_dict)

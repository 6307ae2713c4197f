"""``DDPMParallelScheduler`` and ``DDIMParallelScheduler``: diffusers' ParaDiGMS schedulers
(Shih et al. 2023, parallel sampling by Picard iteration) on the fused steps.

Everything of the serial parent, plus ``batch_step_no_noise(model_output, timesteps, sample)``:
one noise-free step for a batch whose rows sit at different timesteps (``timesteps`` is a
``(B,)`` tensor), as the parallel pipeline calls it; the per-row timesteps run in one fused launch.
"""
from __future__ import annotations

import torch

from .. import ops, reference
from ._base import SchedulerOutput
from .ddim import _NEEDS_SET_TIMESTEPS, DDIMScheduler
from .ddpm import DDPMScheduler

__all__ = ["DDPMParallelScheduler", "DDIMParallelScheduler", "DDPMParallelSchedulerOutput",
           "DDIMParallelSchedulerOutput"]

DDPMParallelSchedulerOutput = SchedulerOutput
DDIMParallelSchedulerOutput = SchedulerOutput


def _check_batch_timesteps(timesteps, sample):
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timesteps must be a (B,) integer tensor, got {type(timesteps).__name__}")
    if timesteps.dim() > 1 or timesteps.numel() != sample.shape[0]:
        raise ValueError(f"timesteps must hold one timestep per row of sample ({sample.shape[0]}), got shape "
                         f"{tuple(timesteps.shape)}")
    return timesteps.reshape(-1)


class DDPMParallelScheduler(DDPMScheduler):
    """diffusers' ``DDPMParallelScheduler``: :class:`DDPMScheduler` plus ``batch_step_no_noise``."""

    _is_ode_scheduler = False

    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps: torch.Tensor,
                            sample: torch.Tensor) -> torch.Tensor:
        """The posterior mean of a DDPM step for each row at its own timestep (no noise added; the
        parallel pipeline adds pre-drawn noise). A row at a timestep of the schedule goes to the
        next entry; outside it to diffusers' ``t - T // n``. Learned-variance channels are
        ignored, as in diffusers. Returns the ``(B, ...)`` previous samples."""
        self._check_tensors(model_output, sample)
        timesteps = _check_batch_timesteps(timesteps, sample)
        t, prev_t, _ = self._step_timesteps(timesteps, sample, off_schedule=True)
        C = sample.shape[1] if sample.dim() > 1 else 1
        if self.config.variance_type in ("learned", "learned_range") and model_output.dim() > 1 \
                and model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C]
        zero = torch.zeros((), dtype=sample.dtype, device=sample.device).expand(sample.shape)
        return ops.ddpm_step(model_output, t, sample, self.schedule, prev_t=prev_t,
                             prediction_type=self.config.prediction_type, variance_type="fixed_small", noise=zero,
                             **self._clip_options())


class DDIMParallelScheduler(DDIMScheduler):
    """diffusers' ``DDIMParallelScheduler``: :class:`DDIMScheduler` plus ``batch_step_no_noise``."""

    _is_ode_scheduler = True

    def _batch_get_variance(self, t: torch.Tensor, prev_t: torch.Tensor) -> torch.Tensor:
        """Per-row posterior variances (fp32) of the pairs ``(t, prev_t)``; ``prev_t < 0`` uses
        ``final_alpha_cumprod`` (diffusers' batch method uses 1 there, its ``step`` the final alpha)."""
        table = self.schedule.alphas_cumprod
        abar_t = reference.abar_at(table, t.cpu().long())
        abar_prev = reference.abar_at(table, prev_t.cpu().long(), self._final_abar)
        return reference.posterior_variance(abar_t, abar_prev).to(device=t.device, dtype=torch.float32)

    def batch_step_no_noise(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                            eta: float = 0.0, use_clipped_model_output: bool = False) -> torch.Tensor:
        """A deterministic DDIM step for each row at its own timestep (``eta`` must be 0, as
        diffusers asserts). A row at a timestep of the schedule goes to the next entry; outside
        it to diffusers' ``t - T // n``. Returns the ``(B, ...)`` previous samples."""
        self._check_tensors(model_output, sample)
        if self.num_inference_steps is None:
            raise ValueError(_NEEDS_SET_TIMESTEPS)
        if eta != 0.0:
            raise ValueError(f"batch_step_no_noise is deterministic: eta must be 0.0, got {eta!r}")
        timesteps = _check_batch_timesteps(timesteps, sample)
        t, prev_t, _ = self._step_timesteps(timesteps, sample, off_schedule=True)
        x_prev, _ = self._ddim(model_output, t, prev_t, sample, 0.0, use_clipped_model_output, None, None, None,
                               None)
        return x_prev

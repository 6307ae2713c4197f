"""ddpm_fast: fused CPU, CUDA and Triton kernels for DDPM/DDIM, with a pure-PyTorch reference.

See README.md; the math, the noise contract and the API contract are docs/math.md, docs/noise.md and docs/api.md.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .schedule import NoiseSchedule, space_timesteps, inference_timesteps, rescale_zero_terminal_snr  # noqa: E402
from . import backends  # noqa: E402  (callable: ddpm_fast.backends() is the availability report)
from .backends import BackendUnavailable  # noqa: E402
from .ops import (  # noqa: E402
    gaussian_noise, q_sample, ddpm_step, ddim_step, ddim_reverse_step, diffusion_loss, vlb_loss, hybrid_loss,
    set_debug_checks,
)

# Names provided by modules that import heavier things (tqdm, diffusers' config files): loaded
# on first use so ``import ddpm_fast`` stays light.
_LAZY = {
    "DDPMScheduler": "ddpm_fast.schedulers",
    "DDIMScheduler": "ddpm_fast.schedulers",
    "SchedulerOutput": "ddpm_fast.schedulers",
    "DDIMInverseScheduler": "ddpm_fast.schedulers",
    "DDPMParallelScheduler": "ddpm_fast.schedulers",
    "DDIMParallelScheduler": "ddpm_fast.schedulers",
    "swap_schedulers": "ddpm_fast.schedulers",
    "sample": "ddpm_fast.sampling",
    "training_loss": "ddpm_fast.training",
    "NoiseStream": "ddpm_fast.training",
    "UniformSampler": "ddpm_fast.training",
    "LossAwareSampler": "ddpm_fast.training",
    "profiling": "ddpm_fast.nvtx",
    "reference": "ddpm_fast.reference",
}


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        value = mod if name == "reference" else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")


__all__ = [
    "__version__", "NoiseSchedule", "space_timesteps", "inference_timesteps", "rescale_zero_terminal_snr",
    "backends", "BackendUnavailable", "gaussian_noise", "q_sample", "ddpm_step", "ddim_step",
    "ddim_reverse_step", "diffusion_loss", "vlb_loss", "hybrid_loss", "set_debug_checks", *_LAZY,
]

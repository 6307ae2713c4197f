"""Drop-in replacements for diffusers' ``DDPMScheduler``, ``DDIMScheduler``,
``DDIMInverseScheduler``, ``DDPMParallelScheduler`` and ``DDIMParallelScheduler`` on the fused ops.

Same constructor arguments and defaults, ``config``, attributes (fp32 ``betas``, ``alphas``,
``alphas_cumprod``, ``timesteps``, ``init_noise_sigma``, ...), methods (``set_timesteps``,
``step``, ``add_noise``, ``get_velocity``, ``scale_model_input``, ``from_config``,
``save_pretrained``/``from_pretrained`` with ``scheduler_config.json``), so replacing the import is
all a user changes; :func:`swap_schedulers` puts them into a diffusers pipeline. Without diffusers
installed a small built-in config layer (``_config.py``) gives the same methods and files.
docs/diffusers.md lists every behaviour matched and every deliberate difference.

Layout: ``_config.py`` (diffusers' config layer or the built-in one), ``_base.py`` (tables,
timesteps, noise), ``ddpm.py``, ``ddim.py``, ``ddim_inverse.py``, ``parallel.py``, ``pipelines.py``.
"""
from __future__ import annotations

from ._base import (SchedulerOutput, TimestepNotInScheduleError, _draw_seed, _norm_device,  # noqa: F401
                    learned_variance_to_log, randn_like_diffusers, to_device_async)
from ._config import USING_DIFFUSERS, ConfigMixin, FrozenDict, SchedulerMixin  # noqa: F401
from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddim_inverse import DDIMInverseScheduler, DDIMInverseSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput
from .parallel import (DDIMParallelScheduler, DDIMParallelSchedulerOutput, DDPMParallelScheduler,
                       DDPMParallelSchedulerOutput)
from .pipelines import from_diffusers, rebuilds_scheduler, swap_schedulers

# The public path of the classes (pickles, reprs, and the module a model_index.json written by an
# earlier ddpm_fast names: diffusers' loader looks up SchedulerMixin there, hence its import above).
for _cls in (DDPMScheduler, DDIMScheduler, DDIMInverseScheduler, DDPMParallelScheduler, DDIMParallelScheduler,
             SchedulerOutput, TimestepNotInScheduleError):
    _cls.__module__ = __name__
del _cls

__all__ = ["DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
           "SchedulerOutput", "DDPMSchedulerOutput", "DDIMSchedulerOutput", "DDIMInverseSchedulerOutput",
           "DDPMParallelSchedulerOutput", "DDIMParallelSchedulerOutput", "TimestepNotInScheduleError",
           "swap_schedulers", "from_diffusers", "rebuilds_scheduler", "FrozenDict", "USING_DIFFUSERS",
           "SchedulerMixin", "ConfigMixin"]

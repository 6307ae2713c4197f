"""Noise schedules: float64 tables (docs/math.md) and timestep helpers (docs/math.md, docs/api.md).

Every table is built once in float64 on the CPU; ``NoiseSchedule.to(device)`` returns a cached
float64 copy on a device (never rounded to fp32: kernels compute per-row coefficients in float64
from ``alphas_cumprod`` and round only then).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

__all__ = [
    "NoiseSchedule",
    "betas_for_schedule",
    "rescale_zero_terminal_snr",
    "space_timesteps",
    "inference_timesteps",
    "SCHEDULE_NAMES",
]

SCHEDULE_NAMES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid")
SPACINGS = ("leading", "linspace", "trailing")


def _linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal: beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta)."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - f((t + 1) / T) / f(t / T), max_beta) for t in range(T)], dtype=torch.float64
    )


def _sigmoid_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """diffusers' DDPMScheduler sigmoid schedule (GeoDiff)."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def betas_for_schedule(name: str, num_timesteps: int = 1000, beta_start: float = 1e-4,
                       beta_end: float = 0.02) -> torch.Tensor:
    """The float64 betas of a named schedule (names as diffusers spells them; ``cosine`` aliases
    ``squaredcos_cap_v2``)."""
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if name == "linear":
        return _linear_betas(num_timesteps, beta_start, beta_end)
    if name == "scaled_linear":
        return _scaled_linear_betas(num_timesteps, beta_start, beta_end)
    if name in ("squaredcos_cap_v2", "cosine"):
        return _cosine_betas(num_timesteps)
    if name == "sigmoid":
        return _sigmoid_betas(num_timesteps, beta_start, beta_end)
    raise ValueError(f"beta_schedule (name) must be one of {SCHEDULE_NAMES}, got {name!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift and scale sqrt(abar) so the last is 0 and the first unchanged."""
    betas = betas.to(torch.float64)
    sqrt_abar = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class _derived:
    """A table derived from ``betas``/``alphas_cumprod``, computed on first read and then stored
    on the instance (a non-data descriptor: the stored value wins). A device copy made by
    :meth:`NoiseSchedule.to` takes the CPU table's values (computed there, then moved), so a table
    is the same on every device."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        host = obj.__dict__.get("_host")
        value = self.fn(obj) if host is None else getattr(host, self.name).to(obj.alphas_cumprod.device)
        obj.__dict__[self.name] = value
        return value


class NoiseSchedule:
    """The float64 tables of a DDPM noise schedule (docs/math.md).

    Attributes (all 1-D float64 CPU tensors of length ``num_timesteps``): ``betas``, ``alphas``,
    ``alphas_cumprod`` (abar), ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``,
    ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance``, ``posterior_log_variance_clipped``,
    ``posterior_mean_coef_x0``, ``posterior_mean_coef_xt``. ``timestep_map`` maps each index to
    the original training timestep (identity unless respaced).

    ``check_range=False`` accepts any finite betas (the drop-in schedulers take what diffusers'
    constructors take); tables then hold NaN/inf where ``abar`` leaves [0, 1), and the caller
    keeps steps away from those timesteps.
    """

    def __init__(self, betas, timestep_map: Optional[Sequence[int]] = None, *, check_range: bool = True):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if check_range and not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if not bool(torch.isfinite(betas).all()):
            raise ValueError("betas must be finite")
        self.betas = betas
        T = betas.numel()
        self.num_timesteps = T
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        # the other tables (_derived below) are computed on first read: no library code reads them
        if timestep_map is None:
            timestep_map = range(T)
        self.timestep_map = torch.as_tensor(list(timestep_map), dtype=torch.int64)
        if self.timestep_map.numel() != T:
            raise ValueError("timestep_map must have one entry per timestep")
        self._device_cache: Dict[str, torch.Tensor] = {}

    # -- derived tables (computed on first read) -----------------------------------------
    @_derived
    def alphas_cumprod_prev(self):
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @_derived
    def sqrt_alphas_cumprod(self):
        return self.alphas_cumprod.sqrt()

    @_derived
    def sqrt_one_minus_alphas_cumprod(self):
        return (1.0 - self.alphas_cumprod).sqrt()

    @_derived
    def sqrt_recip_alphas_cumprod(self):
        return self.alphas_cumprod.rsqrt()

    @_derived
    def sqrt_recipm1_alphas_cumprod(self):
        return (1.0 / self.alphas_cumprod - 1.0).sqrt()

    @_derived
    def posterior_variance(self):
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @_derived
    def posterior_log_variance_clipped(self):
        if self.num_timesteps > 1:
            return torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        return torch.log(self.posterior_variance.clamp_min(1e-20))

    @_derived
    def posterior_mean_coef_x0(self):
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)

    @_derived
    def posterior_mean_coef_xt(self):
        return (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, rescale_zero_snr: bool = False) -> "NoiseSchedule":
        betas = betas_for_schedule(name, num_timesteps, beta_start, beta_end)
        if rescale_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    def respace(self, kept_timesteps: Iterable[int]) -> "NoiseSchedule":
        """improved-diffusion respacing: keep these timesteps, re-index them 0..n-1 with
        ``beta_i = 1 - abar_{k_i} / abar_{k_{i-1}}``; ``timestep_map`` maps back to the original t."""
        kept = sorted(set(int(k) for k in kept_timesteps))
        if not kept:
            raise ValueError("kept_timesteps must not be empty")
        if kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"kept_timesteps must lie in [0, {self.num_timesteps}), got {kept[0]}..{kept[-1]}")
        abar = self.alphas_cumprod[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        betas = 1.0 - abar / abar_prev
        return NoiseSchedule(betas, timestep_map=self.timestep_map[kept].tolist())

    # -- device tables ----------------------------------------------------------------------
    def to(self, device) -> "NoiseSchedule":
        """This schedule with every table as a float64 tensor on ``device`` (cached: the same
        object is returned on every call for one device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        key = f"schedule@{device}"
        cached = self._device_cache.get(key)
        if cached is None:
            from ._tensors import _check_device  # a ValueError naming `device` where torch cannot use it
            _check_device("device", device)
            cached = object.__new__(NoiseSchedule)
            for k, v in self.__dict__.items():
                if isinstance(v, torch.Tensor) and v.dtype == torch.float64:
                    v = v.to(device)
                cached.__dict__[k] = v
            cached._device_cache = self._device_cache
            cached._host = self  # the derived tables not read yet come from here
            self._device_cache[key] = cached
        return cached

    def table(self, device, name: str = "alphas_cumprod") -> torch.Tensor:
        """One float64 table on ``device`` (kernels take ``alphas_cumprod``), from :meth:`to`'s cache."""
        return getattr(self.to(device), name)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_timesteps={self.num_timesteps}, beta[0]={self.betas[0].item():.3g}, "
                f"beta[-1]={self.betas[-1].item():.3g})")

    def __len__(self) -> int:
        return self.num_timesteps


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> List[int]:
    """improved-diffusion's ``space_timesteps``: ``"10,20"`` splits [0, T) into equal sections and
    keeps that many evenly strided steps of each; ``"ddimN"`` keeps ``range(0, T, stride)`` with the
    stride that gives exactly N steps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return sorted(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from T={num_timesteps}")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"section_counts must look like '10,20' or 'ddim50', got {section_counts!r}") from None
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: List[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken = []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return sorted(set(all_steps))


def inference_timesteps(num_timesteps: int, num_inference_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> List[int]:
    """diffusers' spacings, in sampling order (descending).

    linspace: ``round(linspace(0, T-1, n))`` reversed; leading: ``arange(n) * (T // n)`` reversed
    plus ``steps_offset``; trailing: ``round(arange(T, 0, -T/n)) - 1``.
    """
    T, n = num_timesteps, num_inference_steps
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {n!r}")
    import numpy as np

    if spacing == "linspace":
        steps = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // n
        steps = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = T / n
        steps = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if steps.max() >= T or steps.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {T})")
    return [int(s) for s in steps]

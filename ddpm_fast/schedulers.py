"""Drop-in replacements for diffusers' ``DDPMScheduler`` and ``DDIMScheduler`` (REFERENCE §2, §7).

Same constructor arguments and defaults, ``config``, attributes (fp32 ``betas``, ``alphas``,
``alphas_cumprod``, ``timesteps``, ``init_noise_sigma``, ...), methods (``set_timesteps``,
``step``, ``add_noise``, ``get_velocity``, ``scale_model_input``, ``from_config``,
``save_pretrained``/``from_pretrained`` with ``scheduler_config.json``), so replacing the import is
all a user changes. With diffusers installed the classes are diffusers ``SchedulerMixin``/
``ConfigMixin`` subclasses (its pipelines accept them, its config files load as is, ours load in
diffusers); without it a small built-in config layer gives the same methods and files
(``DDPM_FAST_NO_DIFFUSERS=1`` forces that layer).

The math runs in the fused ops of :mod:`ddpm_fast.ops` (the fastest backend available). With a
``generator`` (or a list of them, one per batch row) the noise is drawn exactly as diffusers
draws it (``torch.randn(shape, generator=g, device=g.device, dtype=model_output.dtype)`` moved to
the sample's device), so results match diffusers' within its fp32-table error.

Deliberate differences from diffusers (REFERENCE §7), each tested in tests/test_schedulers.py:

* Tables are float64 (``scheduler.schedule``, a :class:`~ddpm_fast.NoiseSchedule`); the fp32
  ``betas``/``alphas_cumprod`` attributes are rounded from them for compatibility only.
* Half-precision inputs keep fp32 math (diffusers computes in the input dtype and, in
  ``add_noise``, rounds ``abar`` to it: in bf16 ``abar`` is 1 for t = 0..9 of the linear schedule).
* ``variance_type="fixed_large_log"`` is finite and equal to ``fixed_large`` (diffusers
  square-roots a log-variance: NaN).
* ``variance_type="learned"`` keeps diffusers' meaning (the extra channels are a *variance*,
  ``sigma = sqrt(v)``); it is converted to a log-variance for the ops. A negative value is NaN, as
  in diffusers (no variance is negative).
* ``DDIMScheduler``'s previous timestep is the next entry of its schedule for every spacing
  (diffusers uses ``t - T // n``: wrong for ``linspace``, and for ``trailing`` when ``n`` does not
  divide ``T``).
* ``step`` also takes per-sample ``(B,)`` timesteps and device-tensor timesteps, and makes no
  host-device sync: the previous timestep comes from a device lookup table built at
  ``set_timesteps``, not from ``nonzero()``/``.item()``. A device-tensor timestep cannot be
  checked on the host: one that is not in the schedule steps to ``t - 1`` (host timesteps that are
  not in the schedule raise ``ValueError``). With a ``generator`` and a device-tensor timestep the
  noise is always drawn (diffusers skips the draw at ``t = 0``, which needs the host to read ``t``).
* Without a ``generator``, the noise is the §3 counter-based noise of ``(seed, offset)``: the seed
  is drawn from torch's global CPU generator at construction and at every ``set_timesteps`` (so
  ``torch.manual_seed`` controls it; each draw consumes one number of that generator, which
  diffusers' constructor and ``set_timesteps`` do not), and the offset, an int64 tensor on the sample's device,
  advances by one per ``step`` call (in place, so a CUDA graph draws fresh noise on each replay).
  Row ``b``'s noise does not depend on the batch size.
* ``step`` accepts ``guidance_scale=w`` (fused classifier-free guidance: ``model_output`` has
  ``2B`` rows, unconditional first) and ``DDPMScheduler.step`` also ``variance_noise=`` (as DDIM's).
* diffusers' ``DDIMPipeline`` rebuilds its scheduler with diffusers' own
  ``DDIMScheduler.from_config``: assign ``pipe.scheduler = ddpm_fast.DDIMScheduler(...)`` after
  constructing it. ``DDPMPipeline`` takes ours as is.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import numbers
import os
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from . import ops
from .schedule import NoiseSchedule, betas_for_schedule, inference_timesteps, rescale_zero_terminal_snr

__all__ = ["DDPMScheduler", "DDIMScheduler", "SchedulerOutput", "DDPMSchedulerOutput", "DDIMSchedulerOutput",
           "FrozenDict", "USING_DIFFUSERS"]

CONFIG_NAME = "scheduler_config.json"


# --------------------------------------------------------------------------------------------
# config layer: diffusers' when importable, else a minimal one with the same files and methods
# --------------------------------------------------------------------------------------------
def _diffusers_parts():
    if os.environ.get("DDPM_FAST_NO_DIFFUSERS", "") not in ("", "0"):
        return None
    try:
        from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
        from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
        from diffusers.utils import BaseOutput
    except Exception:  # not installed, or broken: the built-in layer works alike
        return None
    return ConfigMixin, FrozenDict, register_to_config, SchedulerMixin, BaseOutput, \
        [e.name for e in KarrasDiffusionSchedulers]


_DIFFUSERS = _diffusers_parts()
USING_DIFFUSERS = _DIFFUSERS is not None


class _OwnFrozenDict(OrderedDict):
    """A read-only dict whose keys are also attributes (diffusers' ``FrozenDict``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_frozen", True)

    def _readonly(self, *args, **kwargs):
        raise Exception(f"You cannot modify a {type(self).__name__} (it is frozen)")

    __delitem__ = setdefault = pop = update = _readonly

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            self._readonly()
        super().__setattr__(name, value)

    def __setitem__(self, name, value):
        if getattr(self, "_frozen", False):
            self._readonly()
        super().__setitem__(name, value)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


class _OwnConfigMixin:
    """The part of diffusers' ``ConfigMixin``/``SchedulerMixin`` the schedulers use: ``config``,
    ``register_to_config``, ``from_config``, ``load_config``, ``save_pretrained`` and (local)
    ``from_pretrained`` with ``scheduler_config.json``, in diffusers' file format."""

    config_name = CONFIG_NAME
    ignore_for_config: List[str] = []
    _compatibles: List[str] = []
    has_compatibles = True

    @property
    def config(self) -> _OwnFrozenDict:
        return self._internal_dict

    def register_to_config(self, **kwargs):
        internal = dict(getattr(self, "_internal_dict", {}) or {})
        internal.update(kwargs)
        self._internal_dict = _OwnFrozenDict(internal)

    @classmethod
    def _init_keys(cls):
        params = inspect.signature(cls.__init__).parameters
        return [k for k in params if k != "self" and params[k].kind not in (inspect.Parameter.VAR_KEYWORD,
                                                                            inspect.Parameter.VAR_POSITIONAL)]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        if config is None:
            config = {}
        config = dict(config)
        config.update(kwargs)
        keys = cls._init_keys()
        init = {k: v for k, v in config.items() if k in keys}
        unused = {k: v for k, v in config.items() if k not in keys and not k.startswith("_")}
        obj = cls(**init)
        return (obj, unused) if return_unused_kwargs else obj

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs) -> dict:
        path = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            path = os.path.join(path, subfolder)
        if os.path.isdir(path):
            path = os.path.join(path, cls.config_name)
        if not os.path.isfile(path):
            raise EnvironmentError(f"no {cls.config_name} at {path!r} (without diffusers installed only local "
                                   "directories and files can be loaded)")
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: Optional[str] = None,
                        return_unused_kwargs: bool = False, **kwargs):
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        config = {k: _jsonable(v) for k, v in self.config.items()}
        config["_class_name"] = type(self).__name__
        config.setdefault("_diffusers_version", "0.0.0")
        return json.dumps(dict(sorted(config.items())), indent=2) + "\n"

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise NotImplementedError("push_to_hub needs diffusers installed")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise AssertionError(f"save_directory ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self.config_name), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _own_register_to_config(init):
    """Record the ``__init__`` arguments (defaults filled in) as the config, as diffusers does."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        sig = inspect.signature(init)
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        config = {k: v for k, v in bound.arguments.items() if k != "self"}
        self.register_to_config(**config)
        init(self, *args, **kwargs)

    return inner


class _OwnBaseOutput(OrderedDict):
    """diffusers' ``BaseOutput``: a dataclass that is also an ordered dict and a tuple of its
    non-None fields (``out.prev_sample``, ``out["prev_sample"]``, ``out[0]``, ``out.to_tuple()``)."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                OrderedDict.__setitem__(self, f.name, value)

    def __getitem__(self, k):
        if isinstance(k, str):
            return OrderedDict.__getitem__(self, k)
        return self.to_tuple()[k]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())


if USING_DIFFUSERS:
    _ConfigMixin, FrozenDict, _register_to_config, _SchedulerMixin, _BaseOutput, _KARRAS_COMPATIBLES = _DIFFUSERS
    _BASES: tuple = (_SchedulerMixin, _ConfigMixin)
else:
    FrozenDict = _OwnFrozenDict
    _register_to_config = _own_register_to_config
    _BaseOutput = _OwnBaseOutput
    _BASES = (_OwnConfigMixin,)
    _KARRAS_COMPATIBLES = []


@dataclass
class SchedulerOutput(_BaseOutput):
    """The output of ``step``: ``prev_sample`` (x_{t-1}, the next model input) and
    ``pred_original_sample`` (x0_hat after clipping/thresholding)."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


DDPMSchedulerOutput = SchedulerOutput
DDIMSchedulerOutput = SchedulerOutput


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _laplace_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' ``betas_for_alpha_bar(alpha_transform_type="laplace")``, in float64."""

    def alpha_bar(t):
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float64)


def _build_schedule(cls_name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                    rescale_betas_zero_snr, allowed) -> NoiseSchedule:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral) \
            or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() != T:
            raise ValueError(f"trained_betas must be a 1-D sequence of num_train_timesteps={T} values, got "
                             f"shape {tuple(betas.shape)}")
    elif beta_schedule == "laplace" and "laplace" in allowed:
        betas = _laplace_betas(T)
    elif beta_schedule in allowed:
        betas = betas_for_schedule(beta_schedule, T, float(beta_start), float(beta_end))
    else:
        raise NotImplementedError(f"{beta_schedule} is not implemented for {cls_name} (beta_schedule must be one "
                                  f"of {allowed})")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas)


def _draw_seed() -> int:
    """A §3 seed from torch's global CPU generator (so ``torch.manual_seed`` controls it)."""
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))


def _norm_device(device) -> torch.device:
    # cuda gets its current index; a device this torch cannot use is a ValueError naming `device`
    return ops._check_device("device", device)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without a host sync (pinned + non_blocking on CUDA;
    a pageable copy would synchronise, which ``torch.cuda.set_sync_debug_mode`` reports)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _is_host_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def randn_like_diffusers(shape, generator, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn exactly as diffusers' ``randn_tensor``: on the generator's device when
    that is the CPU (then moved), one batch row per generator for a list."""
    device = torch.device(device)
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    if len(gens) == 0:
        raise ValueError("generator must not be an empty list")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(g).__name__}")
    gen_type = gens[0].device.type
    if gen_type != device.type and gen_type != "cpu":
        raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    rand_device = torch.device("cpu") if gen_type != device.type else device
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        if len(generator) != shape[0]:
            raise ValueError(f"a list of generators needs one per batch row: got {len(generator)} for batch "
                             f"{shape[0]}")
        row = (1,) + tuple(shape[1:])
        out = torch.cat([torch.randn(row, generator=g, device=rand_device, dtype=dtype) for g in generator], 0)
    else:
        out = torch.randn(tuple(shape), generator=gens[0], device=rand_device, dtype=dtype)
    return out.to(device)


def learned_variance_to_log(model_output: torch.Tensor, channels: int, variance_type: str) -> torch.Tensor:
    """For ``variance_type="learned"``: diffusers reads the extra channels as a variance, the ops
    as a log-variance; return the output with ``log(variance)`` there (fp32 math; a negative
    variance gives NaN, as diffusers' square root does). Other types: unchanged."""
    if variance_type != "learned" or model_output.dim() < 2 or model_output.shape[1] != 2 * channels:
        return model_output
    prediction, variance = model_output[:, :channels], model_output[:, channels:]
    cd = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    return torch.cat([prediction.to(cd), variance.to(cd).log()], dim=1)


class _DeviceState:
    """Per-device tensors a step reads, so it never copies from the host: ``steps`` =
    ``arange(-1, T)`` (``steps[t + 1]`` is a 0-d view of ``t``), ``prev_of`` (``prev_of[t]``, the
    previous timestep of ``t`` in the schedule), and the §3 ``seed``/``offset`` (0-d int64)."""

    __slots__ = ("steps", "prev_of", "seed", "offset")


# --------------------------------------------------------------------------------------------
# the shared base
# --------------------------------------------------------------------------------------------
class _FastSchedulerBase(*_BASES):
    _compatibles = list(_KARRAS_COMPATIBLES)
    order = 1
    _beta_schedules: Tuple[str, ...] = ()

    # -- construction -------------------------------------------------------------------------
    def _init_tables(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                     rescale_betas_zero_snr):
        self.schedule = _build_schedule(type(self).__name__, num_train_timesteps, beta_start, beta_end,
                                        beta_schedule, trained_betas, rescale_betas_zero_snr, self._beta_schedules)
        # fp32 attributes for compatibility (diffusers' dtypes); the ops use schedule's float64 table
        self.betas = self.schedule.betas.to(torch.float32)
        self.alphas = self.schedule.alphas.to(torch.float32)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        T = self.schedule.num_timesteps
        self.timesteps = torch.from_numpy(np.arange(0, T)[::-1].copy().astype(np.int64))
        self._noise_seed = _draw_seed()
        self._set_prev_table(None)

    def _set_prev_table(self, timesteps: Optional[List[int]]):
        """Host dict and CPU table of each timestep's previous one; device copies made lazily."""
        T = self.schedule.num_timesteps
        prev = torch.arange(-1, T - 1, dtype=torch.int64)  # t - 1 (before set_timesteps; the fallback)
        if timesteps is None:
            self._prev_host = None
        else:
            self._prev_host = {}
            for i, t in enumerate(timesteps):
                p = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                self._prev_host[t] = p
                prev[t] = p
        self._prev_cpu = prev
        self._device_states: Dict[str, _DeviceState] = {}

    def _reseed(self, device=None):
        self._noise_seed = _draw_seed()
        for st in self._device_states.values():
            st.seed.fill_(self._noise_seed)
            st.offset.zero_()
        if device is not None:
            self._state(_norm_device(device))

    def _state(self, device: torch.device) -> _DeviceState:
        key = str(device)
        st = self._device_states.get(key)
        if st is None:
            st = _DeviceState()
            T = self.schedule.num_timesteps
            st.steps = torch.arange(-1, T, dtype=torch.int64, device=device)
            st.prev_of = to_device_async(self._prev_cpu, device)
            st.seed = torch.full((), self._noise_seed, dtype=torch.int64, device=device)
            st.offset = torch.zeros((), dtype=torch.int64, device=device)
            self.schedule.table(device)  # cache the float64 table on the device now
            self._device_states[key] = st
        return st

    @property
    def noise_offset(self) -> torch.Tensor:
        """The §3 offset tensor of the first device stepped on (advances by one per ``step``)."""
        if not self._device_states:
            return torch.zeros((), dtype=torch.int64)
        return next(iter(self._device_states.values())).offset

    # -- diffusers' small methods -------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM/DDIM need no input scaling); kept for interchangeability."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _spaced_timesteps(self, num_inference_steps) -> List[int]:
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not _is_host_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if num_inference_steps > T:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                f" {T} as the unet model trained with this scheduler can only handle maximal {T} timesteps.")
        spacing = self.config.timestep_spacing
        if spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"{spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' "
                             "or 'trailing'.")
        return inference_timesteps(T, int(num_inference_steps), spacing, int(self.config.steps_offset))

    def _finish_set_timesteps(self, timesteps: List[int], device):
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        if device is not None:
            self.timesteps = self.timesteps.to(_norm_device(device))
        self._set_prev_table(timesteps)
        self._reseed(device)

    # -- the forward process ------------------------------------------------------------------
    def _per_row_timesteps(self, timesteps, like: torch.Tensor):
        if _is_host_int(timesteps):
            return int(timesteps)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        if timesteps.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"timesteps must be integers, got dtype {timesteps.dtype}")
        timesteps = timesteps.reshape(-1)
        if timesteps.numel() == 1 and like.shape[0] != 1:
            timesteps = timesteps.reshape(())
        if timesteps.device != like.device and not (timesteps.dim() == 0 and timesteps.device.type == "cpu"):
            timesteps = timesteps.to(like.device)
        return timesteps.to(torch.int64)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` per row, by the fused ``q_sample`` (float64
        coefficients, fp32 math whatever the input dtype; diffusers rounds ``abar`` to the input
        dtype)."""
        t = self._per_row_timesteps(timesteps, original_samples)
        if isinstance(noise, torch.Tensor) and noise.device != original_samples.device:
            noise = noise.to(original_samples.device)
        return ops.q_sample(original_samples, t, self.schedule, noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (float64 coefficients, fp32 math)."""
        t = self._per_row_timesteps(timesteps, sample)
        if isinstance(t, int):
            t = torch.full((sample.shape[0],), t, dtype=torch.int64)
        elif t.dim() == 0:
            t = t.expand(sample.shape[0])
        T = self.schedule.num_timesteps
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"timesteps must lie in [0, {T}), got values in [{int(t.min())}, {int(t.max())}]")
        abar = self.schedule.table(sample.device)[t.to(sample.device)]
        shape = (-1,) + (1,) * (sample.dim() - 1)
        cd = torch.float64 if sample.dtype == torch.float64 else torch.float32
        sa = abar.sqrt().to(cd).reshape(shape)
        s1 = (1.0 - abar).sqrt().to(cd).reshape(shape)
        return (sa * noise.to(cd) - s1 * sample.to(cd)).to(sample.dtype)

    # -- timesteps for a step -----------------------------------------------------------------
    def _previous_host(self, t: int) -> int:
        raise NotImplementedError

    def _step_timesteps(self, timestep, sample: torch.Tensor):
        """``(t, prev_t, t_host)`` for the ops: device views/tensors, never a host copy on CUDA.
        ``t_host`` is the host int when one timestep is known on the host, else None."""
        T = self.schedule.num_timesteps
        dev = sample.device
        B = sample.shape[0]
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                if timestep.is_floating_point() and timestep.dim() == 0 and timestep.device.type == "cpu" \
                        and float(timestep) == int(timestep):
                    timestep = int(timestep)
                else:
                    raise TypeError(f"timestep must be an int or an integer tensor, got dtype {timestep.dtype}")
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep.dim() <= 1:
            if timestep.device.type == "cpu":
                timestep = int(timestep.reshape(()))
            else:
                timestep = timestep.reshape(())
        if _is_host_int(timestep):
            t = int(timestep)
            if not 0 <= t < T:
                raise ValueError(f"timestep must lie in [0, {T}), got {t}")
            p = self._previous_host(t)
            st = self._state(dev)
            return st.steps[t + 1], st.steps[p + 1], t
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(f"timestep must be an int or an int64 tensor, got {type(timestep).__name__}")
        if timestep.dim() not in (0, 1) or (timestep.dim() == 1 and timestep.shape[0] != B):
            raise ValueError(f"timestep must be an int, a 0-d tensor or a ({B},) tensor of per-sample timesteps, "
                             f"got shape {tuple(timestep.shape)}")
        t = timestep.to(torch.int64)
        if t.device != dev:
            if t.device.type != "cpu":
                raise ValueError(f"timestep is on {t.device} but the sample is on {dev}")
            self._check_host_rows(t)
            t = t.to(dev)
        elif dev.type == "cpu":
            self._check_host_rows(t)
        st = self._state(dev)
        return t, st.prev_of[t], None

    def _check_host_rows(self, t: torch.Tensor):
        T = self.schedule.num_timesteps
        if t.numel() == 0:
            return
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= T:
            raise ValueError(f"timestep must lie in [0, {T}), got values in [{lo}, {hi}]")
        for v in torch.unique(t).tolist():
            self._previous_host(int(v))  # raises for a timestep not in the schedule

    def _noise(self, generator, variance_noise, shape, dtype, device, draw: bool):
        """``(noise, seed, offset)`` for the ops."""
        if variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                             "`generator` or `variance_noise` stays `None`.")
        st = self._state(device)
        if variance_noise is not None:
            if not isinstance(variance_noise, torch.Tensor) or tuple(variance_noise.shape) != tuple(shape):
                raise ValueError(f"variance_noise must be a tensor of the sample's shape {tuple(shape)}, got "
                                 f"{getattr(variance_noise, 'shape', type(variance_noise).__name__)}")
            return variance_noise.to(device), None, None
        if generator is not None:
            if not draw:
                return None, st.seed, st.offset  # no row needs noise: the generator is left untouched
            return randn_like_diffusers(shape, generator, device, dtype), None, None
        return None, st.seed, st.offset

    def _advance(self, device):
        self._state(device).offset.add_(1)

    def _clip_options(self) -> dict:
        """The config's clipping and dynamic-thresholding options, as the step ops take them."""
        c = self.config
        return dict(clip_sample=bool(c.clip_sample), clip_sample_range=float(c.clip_sample_range),
                    thresholding=bool(c.thresholding), dynamic_thresholding_ratio=float(c.dynamic_thresholding_ratio),
                    sample_max_value=float(c.sample_max_value))

    def _step_output(self, x_prev, x0_hat, device, return_dict: bool):
        """Advances the §3 noise offset and returns a step's result as diffusers does."""
        self._advance(device)
        if not return_dict:
            return (x_prev, x0_hat)
        return SchedulerOutput(prev_sample=x_prev, pred_original_sample=x0_hat)


# --------------------------------------------------------------------------------------------
# DDPM
# --------------------------------------------------------------------------------------------
class DDPMScheduler(_FastSchedulerBase):
    """diffusers' ``DDPMScheduler`` (Ho et al. 2020) on the fused ops; see the module docstring for
    the deliberate differences (REFERENCE §7)."""

    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")

    @_register_to_config
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
        ops._check_choice("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        self.custom_timesteps = False
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[List[int]] = None):
        """diffusers' spacings (``linspace``, ``leading`` + ``steps_offset``, ``trailing``) or custom
        descending ``timesteps``. Also draws a new §3 seed (for steps without a generator) and
        builds the previous-timestep table on ``device``."""
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
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps or timesteps")
            ts = self._spaced_timesteps(num_inference_steps)
            self.num_inference_steps = int(num_inference_steps)
            self.custom_timesteps = False
        self._finish_set_timesteps(ts, device)

    def _previous_host(self, t: int) -> int:
        if self._prev_host is None:
            return t - 1
        try:
            return self._prev_host[t]
        except KeyError:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps (set_timesteps gave "
                             f"{list(self._prev_host)[:8]}...)") from None

    def previous_timestep(self, timestep):
        """The previous timestep (diffusers' method; host ints and tensors)."""
        if isinstance(timestep, torch.Tensor) and timestep.dim() > 0:
            return self._prev_cpu.to(timestep.device)[timestep.long()]
        p = self._previous_host(int(timestep))
        return torch.tensor(p) if (self.custom_timesteps or self.num_inference_steps) else p

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """diffusers' ``_get_variance`` (for pipelines that call it), from the float64 tables:
        a variance for ``fixed_small``/``fixed_large``/``learned``, a std for ``fixed_small_log``
        and a log-variance for ``fixed_large_log``/``learned_range`` (diffusers' return values)."""
        t = int(t)
        p = self._previous_host(t)
        a = self.schedule.alphas_cumprod
        abar_t = float(a[t])
        abar_prev = float(a[p]) if p >= 0 else 1.0
        beta = 1 - abar_t / abar_prev
        var = max((1 - abar_prev) / (1 - abar_t) * beta, 1e-20)
        vt = variance_type or self.config.variance_type
        if vt == "fixed_small":
            out = var
        elif vt == "fixed_small_log":
            out = math.exp(0.5 * math.log(var))
        elif vt == "fixed_large":
            out = beta
        elif vt == "fixed_large_log":
            out = math.log(beta)
        elif vt == "learned":
            return predicted_variance
        else:
            frac = (predicted_variance + 1) / 2
            return frac * math.log(beta) + (1 - frac) * math.log(var)
        return torch.tensor(out, dtype=torch.float32)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None,
             guidance_scale: Optional[float] = None):
        """One reverse step from ``timestep`` to its previous timestep (diffusers' semantics).

        ``timestep``: an int, a 0-d tensor (CPU or the sample's device) or a ``(B,)`` tensor of
        per-sample timesteps. ``generator`` (or a list, one per row): noise drawn as diffusers
        draws it; ``variance_noise``: the noise itself; neither: §3 noise (module docstring).
        ``guidance_scale``: ``model_output`` holds ``2B`` rows (unconditional first) combined as
        ``uncond + w (cond - uncond)``. Returns ``SchedulerOutput(prev_sample,
        pred_original_sample)`` or a tuple with ``return_dict=False``."""
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors")
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


# --------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------
_NEEDS_SET_TIMESTEPS = ("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                        "scheduler")


class DDIMScheduler(_FastSchedulerBase):
    """diffusers' ``DDIMScheduler`` (Song et al. 2021) on the fused ops; the previous timestep is
    the next entry of the schedule for every spacing (REFERENCE §7; module docstring)."""

    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2")

    @_register_to_config
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
        ops._check_choice("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self._init_tables(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                          rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._final_abar = 1.0 if set_alpha_to_one else float(self.schedule.alphas_cumprod[0])
        self._prev_host = None  # DDIM needs set_timesteps before step (as diffusers)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """diffusers' spacings; also draws a new §3 seed and builds the previous-timestep table."""
        ts = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = int(num_inference_steps)
        self._finish_set_timesteps(ts, device)

    def _previous_host(self, t: int) -> int:
        if self._prev_host is None:
            raise ValueError(_NEEDS_SET_TIMESTEPS)
        try:
            return self._prev_host[t]
        except KeyError:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps") from None

    def _state(self, device):
        if self._prev_host is None:
            raise ValueError(_NEEDS_SET_TIMESTEPS)
        return super()._state(device)

    def _get_variance(self, timestep, prev_timestep):
        """diffusers' ``_get_variance`` from the float64 tables (fp32 result)."""
        a = self.schedule.alphas_cumprod
        abar_t = float(a[int(timestep)])
        abar_prev = float(a[int(prev_timestep)]) if int(prev_timestep) >= 0 else self._final_abar
        return torch.tensor((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), dtype=torch.float32)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True, *, guidance_scale: Optional[float] = None):
        """One DDIM step from ``timestep`` to the next entry of the schedule (diffusers' semantics
        otherwise; per-sample/device timesteps, §3 noise without a generator and ``guidance_scale``
        as in :meth:`DDPMScheduler.step`)."""
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be torch.Tensors")
        if self.num_inference_steps is None:
            raise ValueError(_NEEDS_SET_TIMESTEPS)
        dev = sample.device
        t, prev_t, _ = self._step_timesteps(timestep, sample)
        eta = ops._check_float("eta", eta, low=0.0, high=1.0)
        if eta > 0:
            noise, seed, offset = self._noise(generator, variance_noise, sample.shape, model_output.dtype, dev, True)
        else:
            noise, seed, offset = None, None, None
        x_prev, x0_hat = ops.ddim_step(
            model_output, t, sample, self.schedule, prev_t=prev_t, eta=eta,
            prediction_type=self.config.prediction_type, use_clipped_model_output=bool(use_clipped_model_output),
            final_alpha_cumprod=self._final_abar, guidance_scale=guidance_scale,
            noise=noise, seed=seed, offset=offset if seed is not None else 0, return_x0=True, **self._clip_options())
        return self._step_output(x_prev, x0_hat, dev, return_dict)
